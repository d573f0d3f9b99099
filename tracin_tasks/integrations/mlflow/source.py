"""One MLflow run as an audit sees it: checkpoints, learning rates, the model, the training data.

:class:`MlflowCheckpointSource` composes the parts: :mod:`.client` (calls, retries, the probe),
:mod:`.cache` (downloads), :mod:`.layouts` (where checkpoints are, a registry of readers),
:mod:`.learning_rates`, :mod:`.data` (the training table) and
:mod:`tracin_tasks.integrations.model_factory` (trusted model code, built on ``meta`` first).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from tracin_tasks._checks import check_default_learning_rate, check_mlflow_id, check_positive_int, parse_steps
from tracin_tasks.core.checkpoint import Checkpoint
from tracin_tasks.core.table import TrainingTable
from tracin_tasks.exceptions import CheckpointError, ConfigurationError, ModelFactoryError, NoCheckpointsError
from tracin_tasks.integrations.mlflow.cache import MAX_SPEC_BYTES, RunCache, read_small_json, safe_relpath
from tracin_tasks.integrations.mlflow.client import TrackingClient
from tracin_tasks.integrations.mlflow.data import read_training_table
from tracin_tasks.integrations.mlflow.layouts import (
    ARTIFACT_KINDS,
    WEIGHT_SUFFIXES,
    CheckpointLayout,
    CheckpointRef,
    find_checkpoints_with_layout,
    read_checkpoint,
)
from tracin_tasks.integrations.mlflow import hf_layout  # noqa: F401  (registers the Hugging Face Trainer layout)
from tracin_tasks.integrations.mlflow import lightning_layout  # noqa: F401  (registers the Lightning layout)
from tracin_tasks.integrations.mlflow.learning_rates import checked_learning_rates
from tracin_tasks.integrations.mlflow.logging import FACTORY_SPEC, LR_METRIC
from tracin_tasks.integrations.model_factory import (
    FactoryTrust,
    ModelSpec,
    build_model,
    build_on_meta,
    check_max_parameters,
    check_model_kwargs,
    max_parameters_from_env,
)


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
        training_data: the training rows when the run did not log them: a parquet file or a Hugging
            Face ``datasets`` folder (``save_to_disk``).
        label_column, row_id_column: the label and row-id columns of the training data (default:
            what the run recorded, else ``label`` / ``row_id``; without a row-id column rows are
            numbered by position).
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
        training_data: str | os.PathLike[str] | None = None,
        label_column: str | None = None,
        row_id_column: str | None = None,
    ):
        self.run_id = check_mlflow_id(run_id, "run_id")
        self.client = TrackingClient(tracking_uri, retries, backoff)
        self.tracking_uri = self.client.uri
        self.cache = RunCache(self.client, self.run_id, cache_dir)
        self.steps = parse_steps(steps)
        self.max_checkpoints = check_positive_int(max_checkpoints, "max_checkpoints")
        self.lr_metric = lr_metric
        self.artifact_path = safe_relpath(artifact_path) if artifact_path else None
        self.model_factory = model_factory
        self.model_kwargs = check_model_kwargs(model_kwargs)
        self.trust = FactoryTrust.from_settings(trusted_modules)
        self.max_parameters = check_max_parameters(max_parameters) or max_parameters_from_env()
        self.allow_pickle = bool(allow_pickle)
        self.default_learning_rate = check_default_learning_rate(default_learning_rate)
        self.training_data = os.fspath(training_data) if training_data is not None else None
        self.label_column = label_column
        self.row_id_column = row_id_column
        self.warnings: list[str] = []
        self._run = None
        self._refs: list[CheckpointRef] | None = None
        self._layout_found: tuple[CheckpointLayout | None, list[CheckpointRef]] | None = None

    @property
    def display_uri(self) -> str | None:
        """The tracking URI without its password, for messages and logs."""
        return self.client.display_uri

    # -- what the layouts ask of the run (tracin_tasks.integrations.mlflow.layouts.RunFiles) -------
    def run(self):
        """The MLflow run being audited (fetched once)."""
        if self._run is None:
            self._run = self.client.get_run(self.run_id)
        return self._run

    def list(self, path: str | None) -> list:
        return self.client.call("list_artifacts", lambda: self.client.mlflow.list_artifacts(self.run_id, path))

    def download(self, artifact_path: str, model_id: str | None = None) -> str:
        return self.cache.download(artifact_path, model_id=model_id)

    def metric_history(self, name: str) -> dict[int, float]:
        """A metric of the run, step → value (the latest value logged at a step wins)."""
        history = self.client.call("get_metric_history",
                                   lambda: self.client.mlflow.get_metric_history(self.run_id, name))
        return {int(m.step): float(m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))}

    def lr_history(self) -> dict[int, float]:
        return self.metric_history(self.lr_metric)

    def list_logged_model(self, model_id: str, path: str | None = "data") -> list:
        """The files of a LoggedModel under ``path`` (paths relative to the model's artifact root)."""
        return self.client.call("list LoggedModel artifacts",
                                lambda: self.client.mlflow.list_logged_model_artifacts(model_id, path))

    def logged_model(self, model_id: str) -> Any:
        """An MLflow ``LoggedModel`` (its name, tags, params, step)."""
        return self.client.call("get LoggedModel", lambda: self.client.mlflow.get_logged_model(model_id))

    def read_json(self, path: str, model_id: str | None = None, max_bytes: int = MAX_SPEC_BYTES,
                  listed_size: int | None = None) -> Any:
        """A JSON file of the run (or of one of its LoggedModels), refused unread above ``max_bytes``.

        ``listed_size``: the size a listing the caller already made gives (saves listing again).

        Raises:
            CheckpointError: the file is missing or is not JSON.
            ConfigurationError: it is larger than ``max_bytes``.
        """
        rel = safe_relpath(path)
        where = f"{rel} of LoggedModel {model_id}" if model_id else f"{rel} of run {self.run_id}"
        if listed_size is None:
            folder = rel.rsplit("/", 1)[0] if "/" in rel else None
            listing = self.list_logged_model(model_id, folder) if model_id else self.list(folder)
            sizes = {f.path: f.file_size for f in listing if not f.is_dir}
            if rel not in sizes:
                raise CheckpointError(f"{where} does not exist.")
            listed_size = sizes[rel] or 0

        def refuse(size: int) -> None:
            raise ConfigurationError(f"{where} is larger than {max_bytes:,} bytes ({size:,}): such a file is small, "
                                     "so the audit does not read it.")

        if listed_size > max_bytes:
            refuse(listed_size)
        local = self.download(rel, model_id=model_id)
        if os.path.getsize(local) > max_bytes:  # the listing may understate it
            refuse(os.path.getsize(local))
        try:
            with open(local, encoding="utf-8") as fh:
                return json.load(fh)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{where} is not JSON ({exc}).") from None

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_refs(self) -> list[CheckpointRef]:
        """The run's checkpoints in step order, with learning rates, before any download."""
        if self._refs is None:
            found = self._found()[1]
            if not found:
                where = f"under {self.artifact_path!r}" if self.artifact_path else "in its artifacts"
                raise NoCheckpointsError(
                    f"Run {self.run_id} has no checkpoints: no state_dict files ({', '.join(WEIGHT_SUFFIXES)}) "
                    f"{where} and no LoggedModels linked to it by step. Log them during training with "
                    "tracin_tasks.mlflow.log_checkpoint(model, step=..., learning_rate=...)."
                )
            refs, warnings = checked_learning_rates(self._select(found), run_id=self.run_id,
                                                    lr_metric=self.lr_metric, default=self.default_learning_rate)
            self.warnings.extend(warnings)
            self._refs = refs
        return list(self._refs)

    def _found(self) -> tuple[CheckpointLayout | None, list[CheckpointRef]]:
        """The layout that found the run's checkpoints, and all of them (searched once)."""
        if self._layout_found is None:
            self.run()
            self._layout_found = find_checkpoints_with_layout(self)
        return self._layout_found

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

    def fetch(self, ref: CheckpointRef, expected: dict[str, Any] | None = None,
              model_name: str = "the model") -> Checkpoint:
        """Download (once) and read one checkpoint's weights.

        Args:
            ref: the checkpoint.
            expected: the model's state_dict (meta tensors will do, see :meth:`build_meta_model`):
                the file's declared names and shapes are compared with it before any tensor is made.
            model_name: for the mismatch message.
        """
        what = (f"Checkpoint {ref.location!r} of run {self.run_id}" if ref.kind in ARTIFACT_KINDS
                else f"LoggedModel {ref.location} (step {ref.step}) of run {self.run_id}")
        limits = {"expected": expected, "max_parameters": self.max_parameters, "step": ref.step,
                  "model_name": model_name, "what": what}
        state = read_checkpoint(self, ref, limits)
        meta = {
            "source": (f"runs:/{self.run_id}/{ref.location}" if ref.kind in ARTIFACT_KINDS
                       else f"models:/{ref.location}"),
            "lr_source": ref.lr_source,
            **{k: v for k, v in ref.metadata.items() if k not in ("step", "learning_rate")},
        }
        return Checkpoint(state_dict=state, learning_rate=ref.learning_rate, step=ref.step, metadata=meta)

    def checkpoints(self) -> list[Checkpoint]:
        """Every selected checkpoint, downloaded and read, in step order."""
        return [self.fetch(r) for r in self.checkpoint_refs()]

    # -- the model --------------------------------------------------------------------------
    def model_spec(self) -> ModelSpec:
        """How to rebuild the model: the caller's ``model_factory``, else the one the run recorded."""
        if self.model_factory:
            return ModelSpec(self.model_factory, dict(self.model_kwargs), "caller")
        self.run()
        layout, found = self._found()
        from_layout = getattr(layout, "model_spec", None)
        spec = from_layout(self, self._select(found)) if from_layout and found else None
        if spec is not None:  # the checkpoints describe their own architecture (e.g. a config.json)
            return ModelSpec(spec.factory, {**spec.kwargs, **self.model_kwargs}, spec.origin)
        try:
            spec = read_small_json(self.cache, FACTORY_SPEC)
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
        if self.training_data is not None:
            from tracin_tasks.integrations.training_data import read_table

            return read_table(self.training_data, self.label_column, self.row_id_column)
        return read_training_table(self.cache, self.run(), self.label_column, self.row_id_column)


def build_from_factory(factory: str, kwargs: dict[str, Any]) -> nn.Module:
    """Build a model from a factory *you* name (``module:function`` and keyword arguments).

    The caller's choice is trusted; a factory a run recorded goes through
    :meth:`MlflowCheckpointSource.build_model` and the operator's trust policy instead.
    """
    return build_model(ModelSpec(factory, dict(kwargs or {}), "caller"), FactoryTrust(()))
