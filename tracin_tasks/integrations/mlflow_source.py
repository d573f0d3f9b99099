"""Audit side: find a run's checkpoints, learning rates, model and training data in MLflow.

:class:`MlflowCheckpointSource` implements the checkpoint-source protocol of
:mod:`tracin_tasks.core.source`. It understands three layouts, tried in this order:

1. runs logged with :mod:`tracin_tasks.mlflow` (``checkpoints/step_<N>/state_dict.pt``);
2. plain artifact folders of state_dicts, the step read from the path
   (``ckpt/epoch_3.pt``, ``checkpoint-300/model.pth``...), with an ``lr`` metric;
3. MLflow 3 LoggedModels linked to the run by step (``mlflow.pytorch.log_model(..., step=N)``);
   their ``.pt2`` weights are read without unpickling; pickle-format models need
   ``allow_pickle=True``.

Files are downloaded once into a local cache keyed by tracking server, run and artifact path,
and loaded with ``torch.load(weights_only=True)`` unless the user opts in to pickles.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, TypeVar

import pandas as pd
import torch
from torch import nn

from tracin_tasks.core.checkpoint import Checkpoint
from tracin_tasks.core.table import TrainingTable
from tracin_tasks.exceptions import (
    CheckpointError,
    ConfigurationError,
    ModelFactoryError,
    NoCheckpointsError,
    RunNotFoundError,
    TrackingServerUnavailableError,
    TrainingDataError,
    UnsafeCheckpointError,
    require_extra,
)
from tracin_tasks.integrations.mlflow_logging import CHECKPOINT_ROOT, DATA_SPEC, FACTORY_SPEC, LR_METRIC
from tracin_tasks.integrations.pt2 import read_pt2_state_dict

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


@dataclass(frozen=True)
class CheckpointRef:
    """Where one checkpoint lives, before it is downloaded.

    Attributes:
        step: training step or epoch.
        learning_rate: the learning rate in force at that step.
        lr_source: ``"metric"``, ``"metadata"`` or ``"default"`` (1.0, with a warning).
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
        model_factory: ``"module:function"`` to build the model, overriding what the run recorded.
        model_kwargs: arguments for ``model_factory``.
        allow_pickle: allow checkpoint files that need unpickling (only for runs you trust).
        retries: attempts for each call to the tracking server before giving up.
        backoff: first wait between attempts, in seconds; doubles each time.

    Example:
        >>> source = MlflowCheckpointSource(run_id, tracking_uri="http://127.0.0.1:5000")
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
        retries: int = 3,
        backoff: float = 0.5,
    ):
        if not isinstance(run_id, str) or not run_id.strip():
            raise ConfigurationError(f"run_id must be a non-empty string, got {run_id!r}.")
        self.run_id = run_id.strip()
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.steps = self._parse_steps(steps)
        if max_checkpoints is not None and (not isinstance(max_checkpoints, int) or max_checkpoints < 1):
            raise ConfigurationError(f"max_checkpoints must be a positive integer, got {max_checkpoints!r}.")
        self.max_checkpoints = max_checkpoints
        self.cache_dir = os.fspath(cache_dir) if cache_dir else default_cache_dir()
        self.lr_metric = lr_metric
        self.artifact_path = safe_relpath(artifact_path) if artifact_path else None
        self.model_factory = model_factory
        self.model_kwargs = dict(model_kwargs or {})
        self.allow_pickle = bool(allow_pickle)
        self.retries = max(1, int(retries))
        self.backoff = float(backoff)
        self.warnings: list[str] = []
        self._client = None
        self._run = None
        self._refs: list[CheckpointRef] | None = None

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
                        f"MLflow at {self.tracking_uri} has no run {self.run_id!r} ({what}). Check the run "
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
                logger.warning("MLflow at %s did not answer (%s); retrying in %.1fs", self.tracking_uri, what, delay)
                time.sleep(delay)
                delay *= 2
        raise TrackingServerUnavailableError(
            f"The MLflow tracking server at {self.tracking_uri} did not answer after {self.retries} "
            f"attempts ({what}): {last}. Check that it is running and reachable from this machine."
        ) from last

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
        url = self.tracking_uri.rstrip("/") + "/health"

        def probe() -> None:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - user-chosen URI
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
            self._refs = self._select(sorted(found, key=lambda r: r.step))
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
        if step in history:
            return history[step], "metric"
        if "learning_rate" in meta:
            return float(meta["learning_rate"]), "metadata"
        msg = (
            f"No learning rate for the checkpoint at step {step} (no '{self.lr_metric}' metric at that "
            "step and none in its metadata); using 1.0, so checkpoints are weighted equally."
        )
        self.warnings.append(msg)
        logger.warning(msg)
        return 1.0, "default"

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
            local = self._download(f"{folder}/meta.json")
        except CheckpointError:
            return {}
        with open(local) as fh:
            return json.load(fh)

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

    def fetch(self, ref: CheckpointRef) -> Checkpoint:
        """Download (once) and read one checkpoint's weights."""
        if ref.kind == "artifact":
            local = self._download(ref.location)
            state = self._load_weights(local)
        else:
            state = self._load_logged_model(ref.location)
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
        server = hashlib.sha256(self.tracking_uri.encode()).hexdigest()[:12]
        return os.path.join(self.cache_dir, "mlflow", server, self.run_id, *parts)

    def _download(self, artifact_path: str, model_id: str | None = None) -> str:
        """Download one artifact file into the cache, atomically, unless it is already there."""
        rel = safe_relpath(artifact_path)
        final = self._cache_path(*(["models", model_id] if model_id else []), *rel.split("/"))
        if os.path.isfile(final):
            return final
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".download-", dir=os.path.dirname(final))
        try:
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
            os.replace(local, final)  # appears complete or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _load_weights(self, local: str) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as exc:
            # torch names the disallowed class when the file holds pickled objects
            holds_objects = "Unsupported global" in str(exc)
            if not holds_objects:
                raise CheckpointError(
                    f"Checkpoint {local!r} is not a readable torch checkpoint "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). It may be truncated or "
                    "not a torch.save file; re-log it."
                ) from exc
            if not self.allow_pickle:
                raise UnsafeCheckpointError(
                    f"Checkpoint {local!r} holds pickled Python objects, not only tensors; reading it "
                    "would unpickle them, which can run code. Log state_dicts instead, or pass "
                    "allow_pickle=True if you trust this run."
                ) from exc
            logger.warning("allow_pickle=True: unpickling %s", local)
            try:
                state = torch.load(local, map_location="cpu", weights_only=False)
            except Exception as exc2:
                raise CheckpointError(f"Checkpoint {local!r} could not be unpickled: {exc2}") from exc2
        if isinstance(state, nn.Module):
            state = state.state_dict()
        if not isinstance(state, dict):
            raise CheckpointError(f"Checkpoint {local!r} holds a {type(state).__name__}, not a state_dict.")
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]  # the common {"state_dict": ..., "epoch": ...} bundle
        return state

    def _load_logged_model(self, model_id: str) -> dict[str, torch.Tensor]:
        files = self._call(
            "list LoggedModel artifacts", lambda: self.client.list_logged_model_artifacts(model_id, "data")
        )
        names = [f.path for f in files if not f.is_dir]
        pt2 = [p for p in names if p.endswith(".pt2")]
        if pt2:
            return read_pt2_state_dict(self._download(pt2[0], model_id=model_id))
        pickled = [p for p in names if p.endswith((".pth", ".pt"))]
        if pickled:
            if not self.allow_pickle:
                raise UnsafeCheckpointError(
                    f"LoggedModel {model_id} was saved in pickle format ({pickled[0]}); loading it would "
                    "unpickle arbitrary objects. Log models in the default pt2 format, or pass "
                    "allow_pickle=True if you trust this run."
                )
            return self._load_weights(self._download(pickled[0], model_id=model_id))
        raise CheckpointError(f"LoggedModel {model_id} has no weights file under data/ (found {names}).")

    # -- the model --------------------------------------------------------------------------
    def model_spec(self) -> tuple[str, dict[str, Any]]:
        """The ``module:function`` and arguments that rebuild the model."""
        if self.model_factory:
            return self.model_factory, dict(self.model_kwargs)
        self.run()
        try:
            local = self._download(FACTORY_SPEC)
        except CheckpointError:
            raise ModelFactoryError(
                f"Run {self.run_id} does not say how to build its model (no {FACTORY_SPEC}). Log it "
                "with tracin_tasks.mlflow.log_model_factory('pkg.module:function', ...), or pass "
                "model_factory='pkg.module:function'."
            ) from None
        with open(local) as fh:
            spec = json.load(fh)
        return spec["factory"], {**spec.get("kwargs", {}), **self.model_kwargs}

    def build_model(self) -> nn.Module:
        """Import the model factory and call it."""
        factory, kwargs = self.model_spec()
        return build_from_factory(factory, kwargs)

    # -- training data ----------------------------------------------------------------------
    def training_table(self) -> TrainingTable:
        """The run's training data, validated."""
        self.run()
        try:
            with open(self._download(DATA_SPEC)) as fh:
                spec = json.load(fh)
        except CheckpointError:
            spec = self._spec_from_dataset_input()
        try:
            local = self._download(spec["artifact_path"])
        except CheckpointError as exc:
            raise TrainingDataError(
                f"The training data of run {self.run_id} ({spec['artifact_path']}) cannot be downloaded: "
                f"{exc}. Log it with tracin_tasks.mlflow.log_training_data(df, ...)."
            ) from exc
        try:
            frame = pd.read_parquet(local)
        except Exception as exc:
            raise TrainingDataError(
                f"The training data of run {self.run_id} ({spec['artifact_path']}) is not a readable "
                f"parquet file: {exc}."
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
    """Import ``module:function`` and call it with ``kwargs``; the result must be an nn.Module."""
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise ModelFactoryError(f"Model factory {factory!r} is not of the form 'package.module:function'.")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelFactoryError(
            f"Cannot import {module_name!r} for the model factory {factory!r}: {exc}. Install the package "
            "that defines the model in the audit's environment (every worker needs it)."
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelFactoryError(f"{module_name!r} has no attribute {attr!r} (model factory {factory!r}).")
        obj = getattr(obj, part)
    try:
        model = obj(**kwargs)
    except Exception as exc:
        raise ModelFactoryError(f"Calling the model factory {factory}(**{kwargs}) failed: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelFactoryError(f"The model factory {factory!r} returned a {type(model).__name__}, not an nn.Module.")
    return model


def _is_connection_problem(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(
        s in text
        for s in ("connection", "max retries", "timed out", "timeout", "refused", "unreachable", "503", "502", "504")
    )
