"""Audit side: find a run's checkpoints, learning rates, model and training data in MLflow.

:class:`MlflowCheckpointSource` reads one run. It understands three layouts, tried in this order:

1. runs logged with :mod:`tracin_tasks.mlflow` (``checkpoints/step_<N>/state_dict.pt``);
2. plain artifact folders of state_dicts, the step read from the path
   (``ckpt/epoch_3.pt``, ``checkpoint-300/model.pth``...), with an ``lr`` metric;
3. MLflow 3 LoggedModels linked to the run by step (``mlflow.pytorch.log_model(..., step=N)``);
   their ``.pt2`` weights are read without unpickling; pickle-format models need
   ``allow_pickle=True``.

Files are downloaded once into a local cache keyed by tracking server, run and artifact path,
and read by :mod:`tracin_tasks.core.weights` (declared sizes checked before any data, nothing
unpickled unless the user opts in). The model factory a run names is imported only from modules
the operator trusts (:mod:`tracin_tasks.integrations.model_factory`).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import pandas as pd
import torch
from torch import nn

from tracin_tasks._env import env_number
from tracin_tasks.core.checkpoint import Checkpoint
from tracin_tasks.core.table import TrainingTable
from tracin_tasks.core.weights import read_pt2_file, read_torch_file
from tracin_tasks.exceptions import (
    CheckpointError,
    ConfigurationError,
    LearningRateError,
    ModelFactoryError,
    NoCheckpointsError,
    RunNotFoundError,
    TrackingServerUnavailableError,
    TrainingDataError,
    UnsafeCheckpointError,
    require_extra,
)
from tracin_tasks.integrations.mlflow_logging import CHECKPOINT_ROOT, DATA_SPEC, FACTORY_SPEC, LR_METRIC
from tracin_tasks.integrations.model_factory import (
    FactoryTrust,
    ModelSpec,
    build_model,
    build_on_meta,
    check_max_parameters,
    check_model_kwargs,
    max_parameters_from_env,
)

mlflow = require_extra("mlflow", "mlflow")
from mlflow.exceptions import MlflowException  # noqa: E402

logger = logging.getLogger(__name__)
T = TypeVar("T")

# MLflow's own HTTP retries back off for minutes; keep each call short and retry here instead.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_SKIP_DIRS = {"training_data", "tracin", "ground_truth", "audit"}
_STEP_RE = re.compile(r"(?:step|epoch|ckpt|checkpoint|iter|iteration)[_\-=]?(\d+)", re.IGNORECASE)
_INT_RE = re.compile(r"(\d+)")
_WEIGHT_SUFFIXES = (".pt", ".pth")
_MAX_SPEC_BYTES = 1024 * 1024  # a run's JSON specs are a few hundred bytes; a bigger one is not downloaded
_STALE_DOWNLOAD_SECONDS = 6 * 3600


@dataclass(frozen=True)
class CheckpointRef:
    """Where one checkpoint lives, before it is downloaded.

    Attributes:
        step: training step or epoch.
        learning_rate: the learning rate in force at that step.
        lr_source: ``"metric"``, ``"metadata"``, ``"default"`` (the source's
            ``default_learning_rate``, with a warning) or ``"missing"`` (before that check).
        kind: ``"artifact"`` (a run artifact file) or ``"logged_model"``.
        location: the artifact path inside the run, or the LoggedModel id.
    """

    step: int
    learning_rate: float
    lr_source: str
    kind: str
    location: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)


def default_cache_dir() -> str:
    return os.environ.get("TRACIN_TASKS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tracin-tasks")


def safe_relpath(path: str) -> str:
    """Refuse artifact paths that could escape the cache folder (absolute, ``..``)."""
    p = PurePosixPath(path.replace("\\", "/"))
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or not p.parts:
        raise CheckpointError(f"Refusing artifact path {path!r}: it must be a relative path without '..'.")
    return str(p)


_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,255}$")


def _safe_id(value: str, what: str) -> str:
    """Run and model ids become folder names in the cache: refuse anything but a plain name."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ConfigurationError(
            f"{what} {value!r} is not an MLflow id (letters, digits, '_' and '-' only); check the value."
        )
    return value


def display_uri(uri: str | None) -> str | None:
    """A tracking URI fit for messages and logs: any password replaced by ``***``."""
    if not uri:
        return uri
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return uri
    if password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc}"))


def _split_credentials(uri: str) -> tuple[str, str | None]:
    """``http://user:pw@host`` → (``http://host``, a Basic ``Authorization`` value or None)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None
    netloc = parts.netloc.rsplit("@", 1)[1]
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return urlunsplit(parts._replace(netloc=netloc)), f"Basic {token}"


def _step_of(path: str) -> int | None:
    matches = _STEP_RE.findall(path)
    if matches:
        return int(matches[-1])
    ints = _INT_RE.findall(PurePosixPath(path).as_posix())
    return int(ints[-1]) if ints else None


class MlflowCheckpointSource:
    """The checkpoints, learning rates, model and training data of one MLflow run.

    The constructor only stores settings; the run is read on first use.

    Args:
        run_id: the training run to audit.
        tracking_uri: MLflow tracking URI; default: MLflow's own default (``MLFLOW_TRACKING_URI``
            or ``sqlite:///mlflow.db`` in the working directory).
        steps: a list of steps to use, or ``"every:K"`` for every K-th checkpoint (counted back
            from the last, so the final checkpoint is always kept).
        max_checkpoints: keep at most this many, evenly spaced, always including the last.
        cache_dir: where downloaded checkpoints and data are kept (default
            ``$TRACIN_TASKS_CACHE_DIR`` or ``~/.cache/tracin-tasks``).
        lr_metric: the run metric holding the learning rate per step.
        artifact_path: look for checkpoint files only under this artifact folder.
        model_factory: ``"module:function"`` to build the model, overriding what the run recorded
            (the caller's choice: trusted).
        model_kwargs: arguments for ``model_factory`` (a JSON object).
        trusted_modules: module prefixes whose factories the run may name (besides
            ``TRACIN_TRUSTED_MODULES``); see :mod:`tracin_tasks.integrations.model_factory`.
        max_parameters: ceiling on the model's and each checkpoint's elements (default
            ``TRACIN_MAX_PARAMETERS`` or 10⁹); checked before anything is allocated.
        allow_pickle: allow checkpoint files that need unpickling (only for runs you trust).
        default_learning_rate: the learning rate of checkpoints the run logged none for (no
            ``lr_metric`` at their step, none in their metadata). ``None`` (the default) refuses
            such checkpoints with :class:`LearningRateError`; ``1.0`` weights them all equally.
        retries: attempts for each call to the tracking server before giving up (default
            ``$TRACIN_TASKS_MLFLOW_RETRIES`` or 3).
        backoff: first wait between attempts, in seconds; doubles each time, at most
            ``$TRACIN_TASKS_MLFLOW_BACKOFF_MAX`` (default 30) (default ``$TRACIN_TASKS_MLFLOW_BACKOFF``
            or 0.5). The retry window covers a tracking server restart when these are raised.

    Example:
        >>> source = MlflowCheckpointSource(run_id, tracking_uri="http://127.0.0.1:5000",
        ...                                 trusted_modules=["my_pkg.models"])  # the run's model code
        >>> tracin = TracIn(source.build_model(), source.checkpoints())
        >>> scores = tracin.self_influence(source.training_table().dataset())
    """

    def __init__(
        self,
        run_id: str,
        tracking_uri: str | None = None,
        *,
        steps: Sequence[int] | str | None = None,
        max_checkpoints: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        lr_metric: str = LR_METRIC,
        artifact_path: str | None = None,
        model_factory: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        allow_pickle: bool = False,
        default_learning_rate: float | None = None,
        retries: int | None = None,
        backoff: float | None = None,
        trusted_modules: Sequence[str] | str | None = None,
        max_parameters: int | None = None,
    ):
        if not isinstance(run_id, str) or not run_id.strip():
            raise ConfigurationError(f"run_id must be a non-empty string, got {run_id!r}.")
        self.run_id = _safe_id(run_id.strip(), "run_id")
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.display_uri = display_uri(self.tracking_uri)  # never the password: for messages and logs
        self.steps = self._parse_steps(steps)
        if max_checkpoints is not None and (not isinstance(max_checkpoints, int) or max_checkpoints < 1):
            raise ConfigurationError(f"max_checkpoints must be a positive integer, got {max_checkpoints!r}.")
        self.max_checkpoints = max_checkpoints
        self.cache_dir = os.fspath(cache_dir) if cache_dir else default_cache_dir()
        self.lr_metric = lr_metric
        self.artifact_path = safe_relpath(artifact_path) if artifact_path else None
        self.model_factory = model_factory
        self.model_kwargs = check_model_kwargs(model_kwargs)
        self.trust = FactoryTrust.from_settings(trusted_modules)
        self.max_parameters = check_max_parameters(max_parameters) or max_parameters_from_env()
        self.allow_pickle = bool(allow_pickle)
        if default_learning_rate is not None and (
            isinstance(default_learning_rate, bool) or not isinstance(default_learning_rate, (int, float))
            or not _usable_lr(float(default_learning_rate))
        ):
            raise ConfigurationError(
                f"default_learning_rate must be a finite number >= 0 or None, got {default_learning_rate!r}."
            )
        self.default_learning_rate = None if default_learning_rate is None else float(default_learning_rate)
        if retries is None:
            retries = int(env_number("TRACIN_TASKS_MLFLOW_RETRIES", 3, int))
        if backoff is None:
            backoff = env_number("TRACIN_TASKS_MLFLOW_BACKOFF", 0.5, float)
        self.retries = max(1, int(retries))
        self.backoff = float(backoff)
        self.max_backoff = env_number("TRACIN_TASKS_MLFLOW_BACKOFF_MAX", 30.0, float)
        self.warnings: list[str] = []
        self._client = None
        self._run = None
        self._refs: list[CheckpointRef] | None = None
        self._cleaned = False

    @staticmethod
    def _parse_steps(steps: Sequence[int] | str | None) -> tuple[list[int] | None, int | None]:
        if steps is None:
            return (None, None)
        if isinstance(steps, str):
            m = re.fullmatch(r"every:(\d+)", steps.strip())
            if not m or int(m.group(1)) < 1:
                raise ConfigurationError(f"steps={steps!r}: expected a list of steps or 'every:K' with K ≥ 1.")
            return (None, int(m.group(1)))
        try:
            wanted = [int(s) for s in steps]
        except (TypeError, ValueError):
            raise ConfigurationError(f"steps must be a list of integers or 'every:K', got {steps!r}.") from None
        if not wanted:
            raise ConfigurationError("steps=[] selects no checkpoint; pass None for all of them.")
        return (wanted, None)

    # -- talking to the tracking server -------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
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
                        f"MLflow at {self.display_uri} has no run {self.run_id!r} ({what}). Check the run "
                        "id and that --tracking-uri points at the server the run was logged to."
                    ) from exc
                if not _is_connection_problem(exc):
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
            f"attempts ({what}): {self._scrub(str(last))}. Check that it is running and reachable from this "
            "machine (retries: TRACIN_TASKS_MLFLOW_RETRIES / TRACIN_TASKS_MLFLOW_BACKOFF)."
        )
        # MLflow's own errors quote the request URL, password included: keep such a cause out of tracebacks
        raise error from (None if self.display_uri != self.tracking_uri else last)

    def _scrub(self, text: str) -> str:
        """``text`` without the tracking URI's password, should a library have quoted it."""
        try:
            password = urlsplit(self.tracking_uri).password
        except ValueError:
            password = None
        if password:
            for form in {password, unquote(password)}:
                text = text.replace(form, "***")
        return text

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def run(self):
        """The MLflow run being audited (fetched once)."""
        if self._run is None:
            self._probe_server()
            self._run = self._call("get_run", lambda: self.client.get_run(self.run_id))
        return self._run

    def _probe_server(self) -> None:
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        # urllib takes user:password@ for part of the host name: send them as a header instead
        base, auth = _split_credentials(self.tracking_uri)
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

        self._call("health check", probe)

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_refs(self) -> list[CheckpointRef]:
        """The run's checkpoints in step order, with learning rates, before any download."""
        if self._refs is None:
            run = self.run()
            found = self._artifact_checkpoints() or self._logged_model_checkpoints(run)
            if not found:
                where = f"under {self.artifact_path!r}" if self.artifact_path else "in its artifacts"
                raise NoCheckpointsError(
                    f"Run {self.run_id} has no checkpoints: no state_dict files ({', '.join(_WEIGHT_SUFFIXES)}) "
                    f"{where} and no LoggedModels linked to it by step. Log them during training with "
                    "tracin_tasks.mlflow.log_checkpoint(model, step=..., learning_rate=...)."
                )
            self._refs = self._checked_learning_rates(self._select(sorted(found, key=lambda r: r.step)))
        return list(self._refs)

    def _select(self, refs: list[CheckpointRef]) -> list[CheckpointRef]:
        wanted, every = self.steps
        if wanted is not None:
            have = {r.step for r in refs}
            missing = [s for s in wanted if s not in have]
            if missing:
                raise NoCheckpointsError(
                    f"Run {self.run_id} has no checkpoint at steps {missing}; it has steps {sorted(have)}."
                )
            refs = [r for r in refs if r.step in set(wanted)]
        if every is not None:
            refs = refs[::-1][::every][::-1]
        if self.max_checkpoints is not None and len(refs) > self.max_checkpoints:
            n, k = len(refs), self.max_checkpoints
            picks = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)}) if k > 1 else [n - 1]
            refs = [refs[i] for i in picks]
        return refs

    def _list(self, path: str | None) -> list:
        return self._call("list_artifacts", lambda: self.client.list_artifacts(self.run_id, path))

    def _walk(self, root: str | None, depth: int = 0) -> list[str]:
        files = []
        for info in self._list(root):
            name = info.path.rsplit("/", 1)[-1]
            if info.is_dir:
                if depth == 0 and root is None and name in _SKIP_DIRS:
                    continue
                if depth < 4:
                    files.extend(self._walk(info.path, depth + 1))
            elif info.path.endswith(_WEIGHT_SUFFIXES):
                files.append(info.path)
        return files

    def _lr_history(self) -> dict[int, float]:
        history = self._call("get_metric_history", lambda: self.client.get_metric_history(self.run_id, self.lr_metric))
        return {int(m.step): float(m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))}

    def _learning_rate(self, step: int, history: dict[int, float], meta: dict[str, Any]) -> tuple[float, str]:
        """The learning rate recorded for ``step``: NaN with source ``"missing"`` when there is none
        (checked, with every other checkpoint's, by :meth:`_checked_learning_rates`)."""
        if step in history:
            return history[step], "metric"
        if "learning_rate" in meta:
            try:
                return float(meta["learning_rate"]), "metadata"
            except (TypeError, ValueError):
                return math.nan, "metadata"
        return math.nan, "missing"

    def _checked_learning_rates(self, refs: list[CheckpointRef]) -> list[CheckpointRef]:
        """Refuse checkpoints whose learning rate is not usable; apply ``default_learning_rate``."""
        bad = [r for r in refs if r.lr_source != "missing" and not _usable_lr(r.learning_rate)]
        if bad:
            listed = ", ".join(
                f"step {r.step}: {_lr_text(r.learning_rate)} (from {self._lr_origin(r)})" for r in bad[:10]
            )
            raise LearningRateError(
                f"Run {self.run_id} has checkpoints whose learning rate is not a finite number >= 0 "
                f"({listed}{' ...' if len(bad) > 10 else ''}). TracIn weights each checkpoint by the learning "
                "rate in force at its step, so the audit cannot use them. Log the right value at each of those "
                f"steps: MlflowClient().log_metric({self.run_id!r}, {self.lr_metric!r}, <lr>, step=<step>) "
                "(the latest value logged at a step wins), or leave those steps out with steps=[...]."
            )
        missing = [r for r in refs if r.lr_source == "missing"]
        if not missing:
            return refs
        steps = [r.step for r in missing]
        shown = f"{steps[:20]}{' ...' if len(steps) > 20 else ''}"
        if self.default_learning_rate is None:
            raise LearningRateError(
                f"Run {self.run_id} has no learning rate for the checkpoints at steps {shown} (no "
                f"{self.lr_metric!r} metric at those steps and none in their metadata), and TracIn weights "
                "each checkpoint by the learning rate in force there. Log it at each step: "
                f"MlflowClient().log_metric({self.run_id!r}, {self.lr_metric!r}, <lr>, step=<step>) "
                "(tracin_tasks.mlflow.log_checkpoint(model, step=..., learning_rate=...) does this while "
                "training); or pass lr_metric= if the run logged it under another name; or pass "
                "default_learning_rate=1.0 to weight every checkpoint equally."
            )
        msg = (
            f"No learning rate for the checkpoints at steps {shown} (no '{self.lr_metric}' metric at those "
            f"steps and none in their metadata); using default_learning_rate={self.default_learning_rate:g}"
            + (", so checkpoints are weighted equally." if len(missing) == len(refs) else
               " for them, beside the logged rates of the other checkpoints.")
        )
        self.warnings.append(msg)
        logger.warning(msg)
        return [
            dataclasses.replace(r, learning_rate=self.default_learning_rate, lr_source="default")
            if r.lr_source == "missing" else r
            for r in refs
        ]

    def _lr_origin(self, ref: CheckpointRef) -> str:
        if ref.lr_source == "metric":
            return f"the {self.lr_metric!r} metric"
        return "its meta.json"

    def _artifact_checkpoints(self) -> list[CheckpointRef]:
        files = self._walk(self.artifact_path)
        by_step: dict[int, list[str]] = {}
        for path in files:
            step = _step_of(path)
            if step is None:
                logger.info("ignoring %s: no step number in its path", path)
                continue
            by_step.setdefault(step, []).append(path)
        if not by_step:
            return []
        history = self._lr_history()
        refs = []
        for step, paths in by_step.items():
            paths = [p for p in paths if "optim" not in p.rsplit("/", 1)[-1].lower()] or paths
            if len(paths) > 1:
                preferred = [p for p in paths if re.search(r"state_dict|model", p.rsplit("/", 1)[-1])]
                if len(preferred) != 1:
                    raise CheckpointError(
                        f"Run {self.run_id} has several weight files for step {step}: {paths}. Pass "
                        "artifact_path= to point at the folder that holds the model checkpoints."
                    )
                paths = preferred
            meta = self._meta_for(paths[0])
            lr, lr_source = self._learning_rate(step, history, meta)
            refs.append(CheckpointRef(step, lr, lr_source, "artifact", paths[0], meta))
        return refs

    def _meta_for(self, path: str) -> dict[str, Any]:
        folder = path.rsplit("/", 1)[0] if "/" in path else ""
        if not folder.startswith(f"{CHECKPOINT_ROOT}/step_"):
            return {}
        try:
            local = self._download(f"{folder}/meta.json")  # cached, like the checkpoint file beside it
        except CheckpointError:
            return {}
        try:
            with open(local, encoding="utf-8") as fh:
                meta = json.load(fh)
        except ValueError:
            logger.warning("ignoring %s/meta.json of run %s: not JSON", folder, self.run_id)
            return {}
        return meta if isinstance(meta, dict) else {}

    def _logged_model_checkpoints(self, run) -> list[CheckpointRef]:
        outputs = getattr(run, "outputs", None)
        model_outputs = list(getattr(outputs, "model_outputs", None) or [])
        if not model_outputs:
            return []
        history = self._lr_history()
        refs = []
        for out in model_outputs:
            lr, lr_source = self._learning_rate(int(out.step), history, {})
            refs.append(CheckpointRef(int(out.step), lr, lr_source, "logged_model", out.model_id))
        return refs

    def fetch(self, ref: CheckpointRef, expected: dict[str, Any] | None = None,
              model_name: str = "the model") -> Checkpoint:
        """Download (once) and read one checkpoint's weights.

        Args:
            ref: the checkpoint.
            expected: the model's state_dict (meta tensors will do, see :meth:`build_meta_model`):
                the file's declared names and shapes are compared with it before any tensor is made.
            model_name: for the mismatch message.
        """
        what = (f"Checkpoint {ref.location!r} of run {self.run_id}" if ref.kind == "artifact"
                else f"LoggedModel {ref.location} (step {ref.step}) of run {self.run_id}")
        limits = {"expected": expected, "max_parameters": self.max_parameters, "step": ref.step,
                  "model_name": model_name, "what": what}
        if ref.kind == "artifact":
            state = read_torch_file(self._download(ref.location), allow_pickle=self.allow_pickle, **limits)
        else:
            state = self._load_logged_model(ref.location, limits)
        meta = {
            "source": f"runs:/{self.run_id}/{ref.location}" if ref.kind == "artifact" else f"models:/{ref.location}",
            "lr_source": ref.lr_source,
            **{k: v for k, v in ref.metadata.items() if k not in ("step", "learning_rate")},
        }
        return Checkpoint(state_dict=state, learning_rate=ref.learning_rate, step=ref.step, metadata=meta)

    def checkpoints(self) -> list[Checkpoint]:
        """Every selected checkpoint, downloaded and read, in step order."""
        return [self.fetch(r) for r in self.checkpoint_refs()]

    def _cache_path(self, *parts: str) -> str:
        # keyed by the URI without its password: no secret-derived folder names, same cache after a rotation
        server = hashlib.sha256(self.display_uri.encode()).hexdigest()[:12]
        return os.path.join(self.cache_dir, "mlflow", server, self.run_id, *parts)

    def _read_json(self, artifact_path: str) -> Any:
        """Download a small JSON artifact afresh (never from the cache: the run's data and model
        specs may be re-logged to fix them) and parse it; ValueError when it is not JSON.

        A spec larger than 1 MiB (real ones are a few hundred bytes) is refused unread.
        """
        rel = safe_relpath(artifact_path)
        folder = rel.rsplit("/", 1)[0] if "/" in rel else None
        listed = {f.path: f.file_size for f in self._list(folder) if not f.is_dir}
        if (listed.get(rel) or 0) > _MAX_SPEC_BYTES:
            raise ConfigurationError(
                f"{rel} of run {self.run_id} is {listed[rel]:,} bytes; a spec is a small JSON file, so the audit "
                "does not read it. Re-log it with tracin_tasks.mlflow."
            )
        with self._fresh_download(rel) as local:
            if os.path.getsize(local) > _MAX_SPEC_BYTES:
                raise ConfigurationError(f"{rel} of run {self.run_id} is larger than a spec can be; not read.")
            with open(local, encoding="utf-8") as fh:
                return json.load(fh)

    @contextlib.contextmanager
    def _fresh_download(self, artifact_path: str) -> Iterator[str]:
        """Download one artifact file of the run to a private temporary folder, removed afterwards."""
        rel = safe_relpath(artifact_path)
        os.makedirs(self._cache_path(), exist_ok=True)
        self._clean_stale_downloads()
        tmp = tempfile.mkdtemp(prefix=_tmp_prefix("fresh"), dir=self._cache_path())
        try:
            yield self._download_into(rel, tmp, None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _clean_stale_downloads(self) -> None:
        """Remove temporary download folders that a killed process left in this run's cache: those of
        a process of this host that no longer runs, and any older than six hours."""
        if self._cleaned:
            return
        self._cleaned = True
        root = self._cache_path()
        for folder, dirs, _ in os.walk(root):
            for name in list(dirs):
                m = _TMP_NAME.match(name)
                if not m:
                    continue
                dirs.remove(name)
                path = os.path.join(folder, name)
                try:
                    age = time.time() - os.path.getmtime(path)
                except OSError:
                    continue
                dead = m.group("host") == _HOST and not _pid_alive(int(m.group("pid")))
                if dead or age > _STALE_DOWNLOAD_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
                    logger.info("removed %s, left by an interrupted download", path)

    def _download(self, artifact_path: str, model_id: str | None = None, version: str | None = None) -> str:
        """Download one artifact file into the cache, atomically, unless it is already there.

        ``version`` (the training data's recorded fingerprint) becomes part of the cached name,
        so data re-logged under the same artifact path with other content is fetched again.
        """
        rel = safe_relpath(artifact_path)
        if model_id is not None:
            _safe_id(model_id, "LoggedModel id")
        if version is not None and not re.fullmatch(r"[0-9a-f]{8,64}", version):
            raise ConfigurationError(f"version {version!r} must be a hex digest.")
        prefix = (["models", model_id] if model_id else []) + ([f"@{version}"] if version else [])
        final = self._cache_path(*prefix, *rel.split("/"))
        if os.path.isfile(final):
            return final
        os.makedirs(os.path.dirname(final), exist_ok=True)
        self._clean_stale_downloads()
        tmp = tempfile.mkdtemp(prefix=_tmp_prefix("download"), dir=os.path.dirname(final))
        try:
            local = self._download_into(rel, tmp, model_id)
            os.replace(local, final)  # appears complete or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _download_into(self, rel: str, tmp: str, model_id: str | None) -> str:
        """Download ``rel`` (of the run, or of a LoggedModel) into the folder ``tmp``; its local path."""
        if model_id:
            location = self._call("get_logged_model", lambda: self.client.get_logged_model(model_id))
            uri = location.artifact_location.rstrip("/") + "/" + rel
            fetch = lambda: mlflow.artifacts.download_artifacts(  # noqa: E731
                artifact_uri=uri, dst_path=tmp, tracking_uri=self.tracking_uri
            )
        else:
            fetch = lambda: self.client.download_artifacts(self.run_id, rel, tmp)  # noqa: E731
        try:
            local = self._call(f"download {rel}", fetch)
        except (MlflowException, FileNotFoundError) as exc:
            raise CheckpointError(f"Could not download {rel!r} from run {self.run_id}: {exc}") from exc
        if not os.path.isfile(local):
            raise CheckpointError(f"Artifact {rel!r} of run {self.run_id} is not a file.")
        return local

    def _load_logged_model(self, model_id: str, limits: dict[str, Any]) -> dict[str, torch.Tensor]:
        files = self._call(
            "list LoggedModel artifacts", lambda: self.client.list_logged_model_artifacts(model_id, "data")
        )
        names = [f.path for f in files if not f.is_dir]
        pt2 = [p for p in names if p.endswith(".pt2")]
        if pt2:
            return read_pt2_file(self._download(pt2[0], model_id=model_id), **limits)
        pickled = [p for p in names if p.endswith((".pth", ".pt"))]
        if pickled:
            if not self.allow_pickle:
                raise UnsafeCheckpointError(
                    f"LoggedModel {model_id} was saved in pickle format ({pickled[0]}); loading it would "
                    "unpickle arbitrary objects. Log models in the default pt2 format, or pass "
                    "allow_pickle=True if you trust this run."
                )
            return read_torch_file(self._download(pickled[0], model_id=model_id), allow_pickle=True, **limits)
        raise CheckpointError(f"LoggedModel {model_id} has no weights file under data/ (found {names}).")

    # -- the model --------------------------------------------------------------------------
    def model_spec(self) -> ModelSpec:
        """How to rebuild the model: the caller's ``model_factory``, else the one the run recorded."""
        if self.model_factory:
            return ModelSpec(self.model_factory, dict(self.model_kwargs), "caller")
        self.run()
        try:
            spec = self._read_json(FACTORY_SPEC)
        except CheckpointError:
            raise ModelFactoryError(
                f"Run {self.run_id} does not say how to build its model (no {FACTORY_SPEC}). Log it "
                "with tracin_tasks.mlflow.log_model_factory('pkg.module:function', ...), or pass "
                "model_factory='pkg.module:function' (CLI: --model-factory, --model-kwargs JSON)."
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # not JSON: said below
            spec = exc
        if (not isinstance(spec, dict) or not isinstance(spec.get("factory"), str)
                or not isinstance(spec.get("kwargs", {}), dict)):
            raise ModelFactoryError(
                f"{FACTORY_SPEC} of run {self.run_id} is not a JSON object with a 'factory' string and "
                "'kwargs'. Re-log it with tracin_tasks.mlflow.log_model_factory('pkg.module:function', ...), "
                "or pass model_factory='pkg.module:function' (CLI: --model-factory, --model-kwargs JSON)."
            )
        return ModelSpec(spec["factory"], {**spec.get("kwargs", {}), **self.model_kwargs}, "run")

    def build_meta_model(self, spec: ModelSpec | None = None) -> nn.Module:
        """The model on PyTorch's meta device (nothing allocated), after the trust and size checks."""
        return build_on_meta(spec or self.model_spec(), self.trust, self.max_parameters)

    def build_model(self, spec: ModelSpec | None = None) -> nn.Module:
        """Build the model: trusted factories only, checked on the meta device before it is built for real."""
        return build_model(spec or self.model_spec(), self.trust, self.max_parameters)

    # -- training data ----------------------------------------------------------------------
    def training_table(self) -> TrainingTable:
        """The run's training data, validated."""
        self.run()
        try:
            spec = self._read_json(DATA_SPEC)
        except CheckpointError:
            spec = self._spec_from_dataset_input()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # not JSON: said below
            spec = exc
        if not isinstance(spec, dict) or not isinstance(spec.get("artifact_path"), str):
            raise TrainingDataError(
                f"{DATA_SPEC} of run {self.run_id} is not a JSON object naming the data file "
                "('artifact_path'). Re-log the data with tracin_tasks.mlflow.log_training_data(df, ...)."
            )
        # the recorded fingerprint versions the cached copy: data re-logged to fix it is fetched again;
        # without one, the file is read afresh every time
        version = spec.get("fingerprint")
        version = version if isinstance(version, str) and re.fullmatch(r"[0-9a-f]{8,64}", version) else None
        try:
            with contextlib.ExitStack() as stack:
                try:
                    local = (self._download(spec["artifact_path"], version=version) if version
                             else stack.enter_context(self._fresh_download(spec["artifact_path"])))
                except CheckpointError as exc:
                    raise TrainingDataError(
                        f"The training data of run {self.run_id} ({spec['artifact_path']}) cannot be "
                        f"downloaded: {exc}. Log it with tracin_tasks.mlflow.log_training_data(df, ...)."
                    ) from exc
                frame = pd.read_parquet(local)
        except TrainingDataError:
            raise
        except Exception as exc:
            raise TrainingDataError(
                f"The training data of run {self.run_id} ({spec['artifact_path']}) is not a readable "
                f"parquet file: {exc}. Re-log it with tracin_tasks.mlflow.log_training_data(df, ...)."
            ) from exc
        return TrainingTable.from_frame(
            frame,
            spec.get("label_column", "label"),
            spec.get("row_id_column", "row_id"),
            spec.get("feature_columns"),
            spec.get("input_shape"),
        )

    def _spec_from_dataset_input(self) -> dict[str, Any]:
        run = self.run()
        marker = f"/{self.run_id}/artifacts/"
        for di in run.inputs.dataset_inputs if run.inputs else []:
            tags = {t.key: t.value for t in di.tags}
            if tags.get("mlflow.data.context") not in (None, "training"):
                continue
            try:
                source = json.loads(di.dataset.source)
            except (ValueError, AttributeError):
                continue
            location = source.get("uri") or source.get("url") or ""
            if marker in location and location.endswith(".parquet"):
                return {"artifact_path": location.split(marker, 1)[1]}
        raise TrainingDataError(
            f"Run {self.run_id} has no training data an audit can read: no {DATA_SPEC} and no training "
            "dataset input whose source is a parquet artifact of the run. Log it with "
            "tracin_tasks.mlflow.log_training_data(df, label_column=..., row_id_column=...)."
        )


def build_from_factory(factory: str, kwargs: dict[str, Any]) -> nn.Module:
    """Build a model from a factory *you* name (``module:function`` and keyword arguments).

    The caller's choice is trusted; a factory a run recorded goes through
    :meth:`MlflowCheckpointSource.build_model` and the operator's trust policy instead.
    """
    return build_model(ModelSpec(factory, dict(kwargs or {}), "caller"), FactoryTrust(()))


def _usable_lr(lr: float) -> bool:
    """Finite and >= 0; MLflow stores an infinite metric as ±sys.float_info.max, so that is out too."""
    return math.isfinite(lr) and 0 <= lr < sys.float_info.max


def _lr_text(lr: float) -> str:
    if math.isfinite(lr) and abs(lr) >= sys.float_info.max:
        return f"{lr:g}, which is how MLflow stores {'-' if lr < 0 else ''}inf"
    return f"{lr:g}"


_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
_TMP_NAME = re.compile(r"^\.(?:download|fresh)-(?:(?P<host>[A-Za-z0-9.]+)-(?P<pid>\d+)-)?")


def _tmp_prefix(kind: str) -> str:
    """Temporary download folders name their host and process, so a later audit can tell a dead one."""
    return f".{kind}-{_HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_connection_problem(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(
        s in text
        for s in ("connection", "max retries", "timed out", "timeout", "refused", "unreachable", "503", "502", "504")
    )
