"""URIs that settings carry: none may hold a password, because settings are stored.

An audit's settings go into its plan (``plan.json`` in the results store), Prefect's flow-run
parameters, events and reports. A password written into a tracking, queue or store URI would
land in all of them, so such a URI is refused where settings enter, with the way to pass the
credential instead.
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


def uri_secret(uri: str | None) -> str | None:
    """The password or secret query value a URI carries, or None."""
    if not uri or not isinstance(uri, str):
        return None
    base, _, query = uri.partition("?")
    try:
        password = urlsplit(base).password
    except ValueError:
        password = None
    if password:
        return password
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key.lower() in SECRET_QUERY_KEYS and value:
            return value
    return None


def refuse_uri_credentials(uri: str | None, what: str, advice: str = MLFLOW_CREDENTIALS_ADVICE) -> None:
    """Raise :class:`CredentialsInUriError` when ``uri`` carries a password (never quoting it)."""
    secret = uri_secret(uri)
    if secret is None:
        return
    shown = uri.replace(secret, "***")  # type: ignore[union-attr]
    raise CredentialsInUriError(
        f"{what} {shown!r} carries a password. An audit stores its settings (the plan in the results store, "
        f"Prefect's flow-run parameters, events and reports), so it refuses credentials in a URI. {advice}"
    )
