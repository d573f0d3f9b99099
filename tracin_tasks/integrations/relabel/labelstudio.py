"""Flagged rows as tasks of a Label Studio project, through ``label-studio-sdk`` 2.x.

* **Project**: created on first delivery, reused by title afterwards. Its labeling interface shows
  the example (a small PNG when the model input is an image, e.g. ``(1, 8, 8)`` digits; a
  key/value table of the features otherwise), a line with the given label, the suggested label,
  the TracIn score and rank, and asks for the correct class (``Choices`` named ``label``) with an
  optional note. A later batch with classes the project lacks adds them as choices; the rest of a
  configuration someone edited in the UI is kept.
* **Tasks**: one per (dataset fingerprint, row id), carrying ``row_id``, ``fingerprint``,
  ``run_id``, ``audit_key``, ``given_label``, ``suggested_label``, ``score``, ``rank``, … in
  ``data``; the suggested label arrives as a prediction (``model_version`` ``tracin-<audit_key[:8]>``,
  ``score`` the TracIn score) so a reviewer sees it pre-selected. Delivery is idempotent: the
  project's tasks of that fingerprint are listed first and only missing rows are imported. A task
  nobody has annotated yet is refreshed with a newer audit's score and rank (``updated``); a task
  with any annotation, submitted or skipped, is never touched (``unchanged``).
* **Decisions**: a task's latest submitted annotation gives ``relabeled`` (a class other than the
  given label) or ``confirmed``; a task with only skipped (cancelled) annotations gives
  ``skipped``; tasks without annotations are still open and give nothing.

Credentials: an API key (a legacy token or a personal access token) passed explicitly, read from
a Prefect Secret block (``secret_block``), or from an environment variable (``api_key_env``,
default ``LABEL_STUDIO_API_KEY``). The key never appears in :attr:`LabelStudioSink.name`, in logs or
in error messages; a URI that carries one is refused.

Example::

    sink = open_sink("labelstudio://labels.internal:8080?project=Digits%20audit&scheme=http"
                     "&secret_block=label-studio-key")
    sink.deliver(batch)
    decisions = sink.decisions(batch.fingerprint)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tracin_tasks.exceptions import ConfigurationError, DataError, SinkUnavailableError, require_extra
from tracin_tasks.integrations.relabel.base import (
    CONFIRMED,
    RELABELED,
    SKIPPED,
    Decision,
    Delivery,
    FlaggedBatch,
    redact,
)
from tracin_tasks.integrations.relabel.labelstudio_format import (
    CHOICES_NAME,
    SUMMARY_NAME,
    _add_choices,
    _as_dict,
    _as_int,
    _chosen,
    _classes,
    _config_kind,
    _detail,
    _first_line,
    _handled,
    _iso,
    _note,
    _prediction,
    _view_kind,
    _when,
    label_config,
    task_data,
)

logger = logging.getLogger(__name__)

DEFAULT_PROJECT = "tracin-tasks relabel"
DEFAULT_API_KEY_ENV = "LABEL_STUDIO_API_KEY"
_IMPORT_CHUNK = 250
_PAGE = 500
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
_URI_OPTIONS = {"project", "scheme", "secret_block", "api_key_env", "timeout", "max_retries"}
_SECRET_QUERY = {"api_key", "apikey", "key", "token", "secret", "password"}
#: the task fields a newer audit refreshes on a task nobody has annotated yet
_REFRESHED = ("run_id", "audit_key", "audit_run_id", "score", "rank", "self_influence", "suggested_label", "reason",
              "summary")


class LabelStudioSink:
    """Flagged rows as Label Studio tasks (see the module docstring).

    Args:
        url: the Label Studio server, e.g. ``http://labels.internal:8080`` (a path prefix is kept
            for servers behind a proxy).
        project: the project title; created on first delivery, reused afterwards.
        api_key: the key itself. Prefer ``secret_block`` or ``api_key_env`` so that it stays out
            of code and flow parameters.
        secret_block: a Prefect Secret block holding the key (takes precedence over the variable),
            read with ``secret_reader``.
        api_key_env: the environment variable holding the key.
        secret_reader: reads a secret by block name; the orchestration layer and the CLI pass
            Prefect's (this module does not import Prefect).
        timeout: seconds per HTTP request.
        max_retries: the SDK's own retries of refused connections and 5xx answers; the flow's
            retries and the outbox come on top.

    Constructing a sink does no network call; the first delivery or decisions call connects.
    """

    def __init__(self, url: str, project: str = DEFAULT_PROJECT, *, api_key: str | None = None,
                 secret_block: str | None = None, api_key_env: str | None = DEFAULT_API_KEY_ENV,
                 timeout: float = 30.0, max_retries: int = 1,
                 secret_reader: Callable[[str], str] | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(
                f"Label Studio URL {redact(url)!r} is not an http(s) URL with a host; expected e.g. "
                "http://127.0.0.1:8080."
            )
        if parts.username or parts.password or parts.query:
            raise ConfigurationError(
                f"Label Studio URL {redact(url)!r} carries credentials or a query; pass the API key through "
                f"secret_block= or the {api_key_env or DEFAULT_API_KEY_ENV} environment variable instead."
            )
        if not isinstance(project, str) or not project.strip():
            raise ConfigurationError("The Label Studio project title must be a non-empty string.")
        if not timeout or float(timeout) <= 0:
            raise ConfigurationError(f"timeout must be a positive number of seconds, got {timeout!r}.")
        self.url = url.rstrip("/")
        self.project = project.strip()
        self.secret_block = secret_block or None
        self.api_key_env = api_key_env or None
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self._api_key = api_key  # only when passed explicitly; never printed
        self._secret_reader = secret_reader
        self.name = f"{redact(self.url)}#project={self.project}"
        self._client: Any = None
        self._project_id: int | None = None
        self._label_config: str | None = None
        self._users: dict[int, str] | None = None

    def __repr__(self) -> str:  # the default repr would be harmless, but keep the key out of any dump
        return f"LabelStudioSink({self.name!r})"

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> LabelStudioSink:
        """``labelstudio://host:port[/prefix]?project=Title&scheme=http&secret_block=NAME&api_key_env=VAR``.

        ``scheme`` defaults to ``http`` for localhost and ``https`` elsewhere. Keyword ``options``
        (``api_key``, ``project``, ``timeout``, …) override the query.
        """
        parts = urlsplit(uri)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        secret = sorted(k for k in query if k.lower() in _SECRET_QUERY)
        if secret or parts.password:
            raise ConfigurationError(
                f"The Label Studio sink URI {redact(uri)!r} carries a credential ({', '.join(secret) or 'password'}). "
                "Keep the API key out of URIs: name a Prefect Secret block (?secret_block=...) or an environment "
                f"variable (?api_key_env=..., default {DEFAULT_API_KEY_ENV})."
            )
        unknown = sorted(set(query) - _URI_OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"Unknown options {unknown} in the Label Studio sink URI {redact(uri)!r}; "
                f"known: {sorted(_URI_OPTIONS)}."
            )
        if not parts.hostname:
            raise ConfigurationError(f"The Label Studio sink URI {redact(uri)!r} names no host; expected "
                                     "labelstudio://host:port?project=Title.")
        scheme = query.pop("scheme", None) or ("http" if parts.hostname in _LOOPBACK else "https")
        if scheme not in ("http", "https"):
            raise ConfigurationError(f"scheme must be http or https, got {scheme!r}.")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        netloc = f"{host}:{parts.port}" if parts.port else host
        kwargs: dict[str, Any] = {}
        for key in ("project", "secret_block", "api_key_env"):
            if key in query:
                kwargs[key] = query[key]
        for key, kind in (("timeout", float), ("max_retries", int)):
            if key in query:
                try:
                    kwargs[key] = kind(query[key])
                except ValueError:
                    raise ConfigurationError(f"{key}={query[key]!r} in {redact(uri)!r} is not a number.") from None
        kwargs.update(options)
        return cls(f"{scheme}://{netloc}{parts.path.rstrip('/')}", **kwargs)

    # -- connection ----------------------------------------------------------------------------

    def _key_source(self) -> str:
        if self._api_key is not None:
            return "the api_key argument"
        if self.secret_block:
            return f"the Prefect Secret block {self.secret_block!r}"
        return f"the environment variable {self.api_key_env}" if self.api_key_env else "nowhere (no key source set)"

    def _read_key(self) -> str | None:
        if self._api_key is not None:
            return self._api_key
        if self.secret_block:
            if self._secret_reader is None:
                raise ConfigurationError(
                    f"{self.name} takes its API key from the Prefect Secret block {self.secret_block!r}, but nothing "
                    "here reads Secret blocks: open the sink from a Prefect flow or the tracin-tasks CLI, or pass "
                    "api_key_env= instead."
                )
            return self._secret_reader(self.secret_block)
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def _connect(self) -> Any:
        if self._client is not None:
            return self._client
        sdk = require_extra("label_studio_sdk", "labelstudio")
        key = self._read_key()
        if not key:
            raise ConfigurationError(
                f"No Label Studio API key for {self.name}: {self._key_source()} is empty or unset. Set "
                f"{self.api_key_env or DEFAULT_API_KEY_ENV}, or save the key in a Prefect Secret block and name it "
                "(secret_block= or ?secret_block=...)."
            )
        with self._calls("setting up the client"):  # a personal access token is checked for expiry here
            self._client = sdk.LabelStudio(base_url=self.url, api_key=str(key), timeout=self.timeout,
                                           max_retries=self.max_retries)
        return self._client

    @contextmanager
    def _calls(self, what: str) -> Iterator[None]:
        """Turn the SDK's and httpx's errors into ours, without the key and without their traceback
        (an httpx error holds the request, whose headers hold the key)."""
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        try:
            yield
        except httpx.TransportError as exc:  # refused, reset, timed out, DNS
            raise SinkUnavailableError(
                f"Label Studio at {redact(self.url)} cannot be reached while {what}: {type(exc).__name__}"
                f"{': ' + _first_line(exc) if _first_line(exc) else ''}. Is the server running?"
            ) from None
        except ApiError as exc:
            status = exc.status_code
            if status in (401, 403):
                raise ConfigurationError(
                    f"Label Studio at {redact(self.url)} refused the API key read from {self._key_source()} "
                    f"(HTTP {status}) while {what}. Check that the key is current (Label Studio: Account & Settings "
                    "-> access token) and that its user may use the project; a legacy token also needs legacy "
                    "tokens enabled for the organization."
                ) from None
            if status is None or status >= 500 or status in (408, 429):
                raise SinkUnavailableError(
                    f"Label Studio at {redact(self.url)} failed while {what} (HTTP {status}): {_detail(exc.body)}"
                ) from None
            raise ConfigurationError(
                f"Label Studio at {redact(self.url)} rejected a request while {what} (HTTP {status}): "
                f"{_detail(exc.body)}"
            ) from None

    def _find_project(self) -> int | None:
        """The id of the project titled :attr:`project` (the oldest if several), or ``None``."""
        if self._project_id is not None:
            return self._project_id
        client = self._connect()
        with self._calls(f"looking up the project {self.project!r}"):
            found = [p for p in client.projects.list(title=self.project, page_size=100) if p.title == self.project]
        if not found:
            return None
        found.sort(key=lambda p: p.id)
        if len(found) > 1:
            logger.warning("%s: %d projects are titled %r; using the oldest (id %d).", self.name, len(found),
                           self.project, found[0].id)
        self._project_id = int(found[0].id)
        return self._project_id

    def _ensure_project(self, batch: FlaggedBatch) -> int:
        client = self._connect()
        classes = _classes(batch)
        pid = self._find_project()
        if pid is None:
            config = label_config(classes, _view_kind(batch))
            with self._calls(f"creating the project {self.project!r}"):
                created = client.projects.create(
                    title=self.project, label_config=config,
                    description="Training rows flagged by tracin-tasks (TracIn self-influence) for label review.",
                    show_skip_button=True,
                )
            logger.info("%s: created project id %s.", self.name, created.id)
            self._project_id, self._label_config = int(created.id), config
            return self._project_id
        if self._label_config is None:
            with self._calls(f"reading the project {self.project!r}"):
                self._label_config = client.projects.get(id=pid).label_config or ""
        config = self._label_config
        if f'name="{CHOICES_NAME}"' not in config or f"${SUMMARY_NAME}" not in config:
            raise ConfigurationError(
                f"The Label Studio project {self.project!r} (id {pid}) was not set up by tracin-tasks: its labeling "
                f"configuration has no Choices named {CHOICES_NAME!r} over ${SUMMARY_NAME}. Nothing was imported. "
                "Use another project title, or restore that configuration."
            )
        missing = [c for c in classes if f'<Choice value="{c}"' not in config]
        if missing:
            config = _add_choices(config, missing)
            with self._calls(f"adding the classes {missing} to the project {self.project!r}"):
                client.projects.update(id=pid, label_config=config)
            logger.info("%s: added the classes %s as choices.", self.name, missing)
            self._label_config = config
        return pid

    def _tasks(self, pid: int, fingerprint: str, fields: str) -> list[Any]:
        client = self._connect()
        query = json.dumps({"filters": {"conjunction": "and", "items": [{
            "filter": "filter:tasks:data.fingerprint", "operator": "equal", "type": "String", "value": fingerprint,
        }]}})
        with self._calls("listing the project's tasks"):
            tasks = list(client.tasks.list(project=pid, fields=fields, query=query, page_size=_PAGE))
        # the filter is the server's; check again here so that a server ignoring it cannot mix data versions
        return [t for t in tasks if (t.data or {}).get("fingerprint") == fingerprint]

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client._client_wrapper.httpx_client.httpx_client.close()
            except Exception:  # pragma: no cover - a private attribute of the SDK moved; nothing to release then
                pass

    def __enter__(self) -> LabelStudioSink:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the sink protocol ---------------------------------------------------------------------

    def deliver(self, batch: FlaggedBatch) -> Delivery:
        """Import the batch's rows that the project lacks; refresh rows nobody annotated yet."""
        if not batch.rows:
            return Delivery(self.name, 0, 0, 0)
        pid = self._ensure_project(batch)
        kind = _config_kind(self._label_config or "")
        existing: dict[str, Any] = {}
        for task in self._tasks(pid, batch.fingerprint, fields="task_only"):
            existing.setdefault(str(task.data.get("row_id")), task)
        client = self._connect()
        new = [row for row in batch.rows if row.row_id not in existing]
        for start in range(0, len(new), _IMPORT_CHUNK):
            chunk = new[start:start + _IMPORT_CHUNK]
            payload = []
            for row in chunk:
                item: dict[str, Any] = {"data": task_data(batch, row, kind)}
                prediction = _prediction(batch, row)
                if prediction:
                    item["predictions"] = [prediction]
                payload.append(item)
            with self._calls(f"importing {len(chunk)} tasks"):
                client.projects.import_tasks(id=pid, request=payload)
        updated = 0
        for row in batch.rows:
            task = existing.get(row.row_id)
            if task is None or _handled(task):
                continue
            data = task_data(batch, row, kind)
            old = task.data or {}
            if all(old.get(k) == data.get(k) for k in _REFRESHED):
                continue
            with self._calls(f"refreshing the task of row {row.row_id!r}"):
                client.tasks.update(id=str(task.id), data={**old, **{k: data[k] for k in _REFRESHED}})
                prediction = _prediction(batch, row)
                if prediction and old.get("audit_key") != batch.audit_key:
                    client.predictions.create(task=int(task.id), **prediction)
            updated += 1
        delivered = len(new)
        logger.info("%s: %d new tasks, %d refreshed, %d left as they are.", self.name, delivered, updated,
                    len(batch.rows) - delivered - updated)
        return Delivery(self.name, delivered, updated, len(batch.rows) - delivered - updated)

    def decisions(self, fingerprint: str) -> list[Decision]:
        """The decisions the project's annotations hold for this dataset version, most suspicious first."""
        pid = self._find_project()
        if pid is None:
            return []
        found: list[tuple[int, Decision]] = []
        for task in self._tasks(pid, fingerprint, fields="all"):
            decision = self._decision(task)
            if decision is not None:
                found.append((_as_int(task.data.get("rank"), 0), decision))
        found.sort(key=lambda pair: (pair[0], pair[1].row_id))
        return [d for _, d in found]

    # -- reading annotations -------------------------------------------------------------------

    def _decision(self, task: Any) -> Decision | None:
        data = task.data or {}
        row_id = str(data.get("row_id"))
        given = _as_int(data.get("given_label"), None)
        annotations = [_as_dict(a) for a in (task.annotations or [])]
        submitted = [a for a in annotations if not a.get("was_cancelled")]
        cancelled = [a for a in annotations if a.get("was_cancelled")]
        if submitted:
            latest = max(submitted, key=_when)
            chosen = _chosen(latest)
            if chosen is None:
                logger.warning("%s: the latest annotation of row %r (task %s) chooses no class; not counted as a "
                               "decision.", self.name, row_id, task.id)
                return None
            try:
                label = int(chosen)
            except ValueError:
                raise DataError(f"Row {row_id!r} (task {task.id}) was annotated with {chosen!r}, which is not a "
                                "class number; the project's choices must be the class numbers.") from None
            status = CONFIRMED if given is not None and label == given else RELABELED
        elif cancelled:
            latest, label, status = max(cancelled, key=_when), given, SKIPPED
        else:
            return None
        return Decision(
            row_id=row_id, status=status, label=label if status == RELABELED else given, given_label=given,
            decided_by=self._who(latest.get("completed_by")), decided_at=_iso(latest.get("updated_at")
                                                                                or latest.get("created_at")),
            audit_run_id=data.get("audit_run_id") or None, note=_note(latest),
        )

    def _who(self, user: Any) -> str | None:
        if isinstance(user, dict):
            return user.get("email") or (str(user["id"]) if user.get("id") is not None else None)
        if user is None:
            return None
        if self._users is None:
            self._users = {}
            try:
                with self._calls("listing users"):
                    self._users = {int(u.id): u.email for u in self._connect().users.list() if u.email}
            except (SinkUnavailableError, ConfigurationError):  # a key that may not list users still gets ids
                logger.info("%s: cannot list users; decisions name annotators by id.", self.name)
        return self._users.get(_as_int(user, -1)) or str(user)
