"""URIs in settings, messages and names: shown without secrets, and refused when they carry one.

An audit's settings go into its plan (``plan.json`` in the results store), Prefect's flow-run
parameters, events and reports. A password written into a tracking, queue or store URI would
land in all of them, so such a URI is refused where settings enter, with the way to pass the
credential instead (:func:`refuse_uri_credentials`). Wherever a URI is shown or used to name
something (logs, errors, reports, outbox folders, cache keys), :func:`redact` shows it without
its password and secret query values.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from tracin_tasks.exceptions import CredentialsInUriError

#: query keys that carry a secret (Label Studio keys, tokens)
SECRET_QUERY_KEYS = frozenset({"password", "api_key", "apikey", "token", "key", "secret", "access_token"})

MLFLOW_CREDENTIALS_ADVICE = (
    "Remove the password from the URI and give it to the audit another way: set MLFLOW_TRACKING_USERNAME and "
    "MLFLOW_TRACKING_PASSWORD in the environment of the audit and of every worker, or store it in a Prefect "
    "Secret block and name the block (mlflow_secret_block= / --mlflow-secret-block)."
)
SINK_CREDENTIALS_ADVICE = (
    "Remove the password from the URI: PostgreSQL reads it from PGPASSWORD or ~/.pgpass on the worker, Label "
    "Studio's key comes from a Prefect Secret block (?secret_block=NAME) or LABEL_STUDIO_API_KEY."
)


def _password(base: str) -> str | None:
    try:
        return urlsplit(base).password
    except ValueError:  # not a URL this can parse (e.g. an IPv6 typo): nothing to find
        return None


def redact(uri: str | None) -> str | None:
    """``uri`` with its password and secret query values replaced by ``***``.

    The rest is kept exactly (case, IPv6 brackets, ``sqlite:///relative`` paths): string surgery,
    not a re-assembly that would normalise it.
    """
    if not uri:
        return uri
    base, sep, query = uri.partition("?")
    if _password(base) is not None:
        start = base.find("://") + 3
        end = min((i for i in (base.find(c, start) for c in "/#") if i != -1), default=len(base))
        at = base.rfind("@", start, end)  # the userinfo ends at the netloc's last "@"
        colon = base.find(":", start, at)
        if at != -1 and colon != -1:
            base = base[:colon + 1] + "***" + base[at:]
    if sep:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{k}={'***' if k.lower() in SECRET_QUERY_KEYS else v}" for k, v in pairs)
    return base + sep + query


def uri_secret(uri: str | None) -> str | None:
    """The password or secret query value a URI carries, or None."""
    if not uri or not isinstance(uri, str):
        return None
    base, _, query = uri.partition("?")
    password = _password(base)
    if password:
        return password
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key.lower() in SECRET_QUERY_KEYS and value:
            return value
    return None


def refuse_uri_credentials(uri: str | None, what: str, advice: str = MLFLOW_CREDENTIALS_ADVICE) -> None:
    """Raise :class:`CredentialsInUriError` when ``uri`` carries a password (never quoting it)."""
    if uri_secret(uri) is None:
        return
    raise CredentialsInUriError(
        f"{what} {redact(uri)!r} carries a password. An audit stores its settings (the plan in the results store, "
        f"Prefect's flow-run parameters, events and reports), so it refuses credentials in a URI. {advice}"
    )
