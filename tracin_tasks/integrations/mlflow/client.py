"""Talking to one MLflow tracking server: bounded retries, a health probe, messages without secrets.

Every call to the server goes through :meth:`TrackingClient.call`, which retries connection
problems a bounded number of times (``TRACIN_TASKS_MLFLOW_RETRIES``, default 3; first wait
``TRACIN_TASKS_MLFLOW_BACKOFF``, default 0.5 s, doubling up to ``TRACIN_TASKS_MLFLOW_BACKOFF_MAX``,
default 30 s) and then raises :class:`TrackingServerUnavailableError`, and maps MLflow's
"no such run" to :class:`RunNotFoundError`. Messages name the server by its redacted URI.
"""

from __future__ import annotations

import base64
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from tracin_tasks._env import env_number
from tracin_tasks._uris import redact
from tracin_tasks.exceptions import RunNotFoundError, TrackingServerUnavailableError, require_extra

mlflow = require_extra("mlflow", "mlflow")
from mlflow.exceptions import MlflowException  # noqa: E402

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: MLflow's own HTTP retries back off for minutes: each call is kept short and retried here instead
_MLFLOW_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def is_connection_problem(exc: BaseException) -> bool:
    """Whether an MLflow error means the server did not answer (worth a retry)."""
    text = str(exc).lower()
    return any(
        s in text
        for s in ("connection", "max retries", "timed out", "timeout", "refused", "unreachable", "503", "502", "504")
    )


def _split_credentials(uri: str) -> tuple[str, str | None]:
    """``http://user:pw@host`` → (``http://host``, a Basic ``Authorization`` value or None)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None
    netloc = parts.netloc.rsplit("@", 1)[1]
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return urlunsplit(parts._replace(netloc=netloc)), f"Basic {token}"


class TrackingClient:
    """One tracking server, reached with bounded retries.

    Args:
        tracking_uri: the server (default: MLflow's own default tracking URI).
        retries: attempts per call (default ``$TRACIN_TASKS_MLFLOW_RETRIES`` or 3).
        backoff: first wait between attempts in seconds (default ``$TRACIN_TASKS_MLFLOW_BACKOFF`` or 0.5).
    """

    def __init__(self, tracking_uri: str | None = None, retries: int | None = None, backoff: float | None = None):
        for key, value in _MLFLOW_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.uri = tracking_uri or mlflow.get_tracking_uri()
        self.display_uri = redact(self.uri)  # never the password: for messages and logs
        self.retries = max(1, int(retries if retries is not None else env_number("TRACIN_TASKS_MLFLOW_RETRIES", 3, int)))
        self.backoff = float(backoff if backoff is not None else env_number("TRACIN_TASKS_MLFLOW_BACKOFF", 0.5))
        self.max_backoff = env_number("TRACIN_TASKS_MLFLOW_BACKOFF_MAX", 30.0)
        self._client = None

    @property
    def mlflow(self):
        """The underlying ``MlflowClient`` (made on first use)."""
        if self._client is None:
            self._client = mlflow.MlflowClient(tracking_uri=self.uri)
        return self._client

    def call(self, what: str, fn: Callable[[], T], run_id: str | None = None) -> T:
        """Run one tracking call with bounded retries; map MLflow's errors to ours."""
        delay = self.backoff
        last: Exception | None = None
        for attempt in range(1, self.retries + 1):
            try:
                return fn()
            except MlflowException as exc:
                code = getattr(exc, "error_code", "")
                if what == "get_run" and code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    raise RunNotFoundError(
                        f"MLflow at {self.display_uri} has no run {run_id!r} ({what}). Check the run "
                        "id and that --tracking-uri points at the server the run was logged to."
                    ) from exc
                if not is_connection_problem(exc):
                    raise
                last = exc
            except FileNotFoundError:
                raise
            except (OSError, ConnectionError) as exc:  # requests' errors derive from OSError
                last = exc
            if attempt < self.retries:
                logger.warning("MLflow at %s did not answer (%s); retrying in %.1fs", self.display_uri, what, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        error = TrackingServerUnavailableError(
            f"The MLflow tracking server at {self.display_uri} did not answer after {self.retries} "
            f"attempts ({what}): {self.scrub(str(last))}. Check that it is running and reachable from this "
            "machine (retries: TRACIN_TASKS_MLFLOW_RETRIES / TRACIN_TASKS_MLFLOW_BACKOFF)."
        )
        # MLflow's own errors quote the request URL, password included: keep such a cause out of tracebacks
        raise error from (None if self.display_uri != self.uri else last)

    def scrub(self, text: str) -> str:
        """``text`` without the tracking URI's password, should a library have quoted it."""
        try:
            password = urlsplit(self.uri).password
        except ValueError:
            password = None
        if password:
            for form in {password, unquote(password)}:
                text = text.replace(form, "***")
        return text

    def probe(self) -> None:
        """Fail fast (after the retries) when an HTTP tracking server does not answer ``/health``."""
        if not self.uri.startswith(("http://", "https://")):
            return
        # urllib takes user:password@ for part of the host name: send them as a header instead
        base, auth = _split_credentials(self.uri)
        if auth is None and os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
            pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ['MLFLOW_TRACKING_PASSWORD']}"
            auth = "Basic " + base64.b64encode(pair.encode()).decode()
        request = urllib.request.Request(base.rstrip("/") + "/health", headers={"Authorization": auth} if auth else {})

        def probe() -> None:
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310 - user-chosen URI
                    resp.read()
            except urllib.error.HTTPError:
                return  # it answered; the API calls will say what is wrong
            except urllib.error.URLError as exc:
                raise ConnectionError(str(exc.reason)) from exc

        self.call("health check", probe)

    def get_run(self, run_id: str) -> Any:
        self.probe()
        return self.call("get_run", lambda: self.mlflow.get_run(run_id), run_id=run_id)
