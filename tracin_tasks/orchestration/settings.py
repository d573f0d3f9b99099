"""An audit's settings, one validated object per stage; the flow, the CLI and deployments build them.

* :class:`AuditSettings` — what is audited and how it is scored (stored in the plan; the fields
  that change scores key the cells);
* :class:`RunOptions` — where it runs and where its files go;
* :class:`ReportOptions` — flagging, validation, the report, MLflow;
* :class:`RelabelOptions` — where flagged rows are sent.

Each field is declared once, with its help text and its command-line spelling
(:func:`tracin_tasks._options.option`); ``tracin-tasks audit`` builds its options from these
fields, and every check lives in the class's ``__post_init__``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from tracin_tasks._checks import check_default_learning_rate, check_mlflow_id, check_positive_int, parse_steps
from tracin_tasks._options import option
from tracin_tasks._uris import refuse_uri_credentials
from tracin_tasks.exceptions import ConfigurationError

LOSSES = ("cross_entropy", "mse")


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of ``obj`` (keys of plans and cells)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _layers(values: list[str]) -> str | list[str]:
    return "last" if values == ["last"] else values


def _steps(text: str) -> str | list[int]:
    wanted, every = parse_steps(text)
    return f"every:{every}" if every else wanted


@dataclass(frozen=True)
class AuditSettings:
    """What is audited and how it is scored, as JSON values (so a deployment can schedule it)."""

    run_id: str = option(help="the MLflow run to audit", required=True)
    tracking_uri: str | None = option(
        None, "MLflow tracking URI of the run (default: $MLFLOW_TRACKING_URI or MLflow's default); no password: "
        "see --mlflow-secret-block")
    layers: str | tuple[str, ...] | None = option(
        None, "'last', or module names (default: every trainable layer)", nargs="+", convert=_layers)
    loss: str = option("cross_entropy", "the training loss", choices=LOSSES)
    batch_size: int = option(256, "rows per forward/backward pass", type=int)
    shard_size: int = option(4096, "rows per cell", type=int)
    steps: str | tuple[int, ...] | None = option(
        None, "checkpoints to use: comma-separated steps (3,6,9) or every:K (default: all)", convert=_steps)
    max_checkpoints: int | None = option(
        None, "use at most this many checkpoints, evenly spaced, the last always kept", type=int)
    device: str | None = option(None, "cpu | cuda | cuda:N (default: CUDA where a worker has it)")
    model_factory: str | None = option(
        None, "module:function that builds the model, instead of the one the run recorded (yours: trusted)")
    allow_pickle: bool = option(
        False, "allow checkpoint files that need unpickling (only for runs you trust)", action="store_true")
    default_learning_rate: float | None = option(
        None, "learning rate for checkpoints the run logged none for (e.g. 1.0: equal weights); default: refuse "
        "such a run", type=float)
    model_kwargs: dict[str, Any] | None = option(
        None, "keyword arguments for the model factory, a JSON object (e.g. '{\"hidden\": 128}'); without "
        "--model-factory they override those the run recorded", metavar="JSON")
    trusted_modules: tuple[str, ...] = option(
        (), "trust model factories the run names in this module or package (repeatable; added to "
        "$TRACIN_TRUSTED_MODULES). A run's own factory is refused until its module is trusted",
        flag="--trust-module", action="append", metavar="PREFIX")
    max_parameters: int | None = option(
        None, "refuse models and checkpoints with more elements than this, before allocating them "
        "(default $TRACIN_MAX_PARAMETERS or 1e9)", type=int, metavar="N")
    mlflow_secret_block: str | None = option(
        None, "Prefect Secret block holding the tracking server's password (default: $MLFLOW_TRACKING_USERNAME / "
        "$MLFLOW_TRACKING_PASSWORD); never put it in --tracking-uri", metavar="NAME")
    lr_metric: str = option(
        "lr", "the run metric that holds the learning rate at each step (Hugging Face Trainer: learning_rate)",
        metavar="NAME")
    artifact_path: str | None = option(
        None, "look for checkpoint files only under this artifact folder of the run", metavar="PATH")
    training_data: str | None = option(
        None, "the training rows, when the run did not log them: a parquet file or a Hugging Face datasets folder "
        "(save_to_disk), a path every worker can read", metavar="PATH")
    label_column: str | None = option(
        None, "the column holding each row's class label (default: what the run recorded, else 'label')",
        metavar="NAME")
    row_id_column: str | None = option(
        None, "the column holding each row's stable id (default: what the run recorded, else 'row_id'; a table "
        "without one is numbered by row position)", metavar="NAME")

    def __post_init__(self) -> None:
        from tracin_tasks.integrations.model_factory import (
            check_max_parameters,
            check_model_kwargs,
            parse_trusted_modules,
        )

        object.__setattr__(self, "run_id", check_mlflow_id(self.run_id, "run_id"))
        refuse_uri_credentials(self.tracking_uri, "The tracking URI")
        object.__setattr__(self, "trusted_modules", parse_trusted_modules(self.trusted_modules))
        object.__setattr__(self, "max_parameters", check_max_parameters(self.max_parameters))
        object.__setattr__(self, "model_kwargs", check_model_kwargs(self.model_kwargs) or None)
        if self.mlflow_secret_block is not None and (not isinstance(self.mlflow_secret_block, str)
                                                     or not self.mlflow_secret_block.strip()):
            raise ConfigurationError(f"mlflow_secret_block must be a Prefect Secret block name, got "
                                     f"{self.mlflow_secret_block!r}.")
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.steps is not None:
            wanted, every = parse_steps(list(self.steps) if isinstance(self.steps, tuple) else self.steps)
            object.__setattr__(self, "steps", f"every:{every}" if every else tuple(wanted))
        if self.loss not in LOSSES:
            raise ConfigurationError(
                f"loss={self.loss!r}: an audit flow takes one of {LOSSES} (a custom loss can be "
                "used from Python with tracin_tasks.TracIn)."
            )
        for name in ("batch_size", "shard_size"):
            check_positive_int(getattr(self, name), name, allow_none=False)
        check_positive_int(self.max_checkpoints, "max_checkpoints")
        object.__setattr__(self, "default_learning_rate", check_default_learning_rate(self.default_learning_rate))
        for name in ("lr_metric", "label_column", "row_id_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigurationError(f"{name} must be a non-empty column or metric name, got {value!r}.")
        if not self.lr_metric:
            raise ConfigurationError("lr_metric must name the run metric holding the learning rate, e.g. 'lr'.")
        if self.artifact_path is not None:
            from tracin_tasks.integrations.mlflow.cache import safe_relpath

            object.__setattr__(self, "artifact_path", safe_relpath(self.artifact_path))
        if self.training_data is not None:
            if not isinstance(self.training_data, str) or not self.training_data.strip():
                raise ConfigurationError(f"training_data must be a path, got {self.training_data!r}.")
            refuse_uri_credentials(self.training_data, "The training data's location")
            if "://" not in self.training_data:  # a local path: the same file wherever a worker resolves it
                object.__setattr__(self, "training_data", os.path.abspath(os.path.expanduser(self.training_data)))
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigurationError(f"device must be 'cpu', 'cuda', 'cuda:N' or None, got {self.device!r}.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        d["steps"] = list(self.steps) if isinstance(self.steps, tuple) else self.steps
        d["trusted_modules"] = list(self.trusted_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditSettings:
        return cls(**d)

    def layer_selection(self) -> str | list[str] | None:
        """``layers`` as :class:`tracin_tasks.TracIn` takes it."""
        return list(self.layers) if isinstance(self.layers, tuple) else self.layers

    def scoring_fields(self) -> dict[str, Any]:
        """The settings that change a cell's scores (not batch size, device or sharding)."""
        scoring = {"run_id": self.run_id, "layers": self.to_dict()["layers"], "loss": self.loss,
                   "model_factory": self.model_factory}
        if self.model_kwargs:
            scoring["model_kwargs"] = self.model_kwargs
        # where the checkpoints and rows come from (their contents are keyed too: learning rates and
        # the data's fingerprint); only the settings that differ from the defaults, so older keys hold
        scoring.update({k: getattr(self, k) for k in ("lr_metric", "artifact_path", "training_data", "label_column",
                                                      "row_id_column") if getattr(self, k) != _DEFAULTS[k]})
        return scoring

    def config_hash(self) -> str:
        """A stable hash of the settings that change scores."""
        return stable_hash(self.scoring_fields())


_DEFAULTS = {f.name: f.default for f in fields(AuditSettings)}


@dataclass(frozen=True)
class RunOptions:
    """Where an audit runs and where its files go."""

    task_runner: str = option(
        "threads", "threads | dask (a local cluster) | dask://HOST:PORT or tcp://HOST:PORT (an existing Dask "
        "cluster) | ray | ray://HOST:PORT. Anything but threads needs a Prefect server: prefect server start, "
        "then set PREFECT_API_URL")
    max_workers: int | None = option(
        None, "threads, or local Dask worker processes (default: 1 thread; one Dask worker per core)", type=int)
    gpu: bool = option(False, "ask Dask/Ray for one GPU per cell (workers started with --resources GPU=1)",
                       action="store_true")
    output_dir: str | None = option(None, "folder for the audit's files (default: tracin-audit/RUN_ID)",
                                    flag="--output")
    results_uri: str | None = option(
        None, "where finished cells are stored, a folder or fsspec URL all workers reach (default: OUTPUT/cells); "
        "re-running skips finished cells")

    def __post_init__(self) -> None:
        check_positive_int(self.max_workers, "max_workers")
        refuse_uri_credentials(self.results_uri, "The results store URI", "Give the store's credentials to fsspec "
                               "through the workers' environment or configuration instead.")

    def resolved(self, run_id: str) -> RunOptions:
        """With the defaults filled in: ``output_dir`` absolute, ``results_uri`` under it."""
        output = os.path.abspath(self.output_dir or os.path.join("tracin-audit", run_id))
        return RunOptions(self.task_runner, self.max_workers, self.gpu, output,
                          self.results_uri or os.path.join(output, "cells"))


@dataclass(frozen=True)
class ReportOptions:
    """Flagging, validation, the report and MLflow (the flagging policy itself is
    :class:`tracin_tasks.core.flagging.FlagPolicy`, whose fields are options too)."""

    report: bool = option(True, "flag, validate and write report.html", cli=False)
    validate_results: bool = option(True, "skip the Great Expectations validation", flag="--no-validate",
                                    invert=True)
    on_validation_failure: str = option("fail", "a failed validation fails the run, or only warns",
                                        choices=["fail", "warn"])
    extra_expectations: list[dict[str, Any]] | None = option(None, "more GX expectations", cli=False)
    log_to_mlflow: bool = option(
        True, "do not log the report and tables to MLflow (they are still written to --output)",
        flag="--no-mlflow-report", invert=True)
    flag: dict[str, Any] | None = option(None, "the flagging policy, FlagPolicy's fields", cli=False)

    def __post_init__(self) -> None:
        from tracin_tasks.core.flagging import FlagPolicy

        if self.on_validation_failure not in ("fail", "warn"):
            raise ConfigurationError(
                f"on_validation_failure must be 'fail' or 'warn', got {self.on_validation_failure!r}.")
        FlagPolicy.from_dict(self.flag)  # a policy that cannot be satisfied fails before any work
        json.dumps(self.extra_expectations)


@dataclass(frozen=True)
class RelabelOptions:
    """Where flagged rows are sent."""

    relabel: tuple[str, ...] = option(
        (), "send the flagged rows here (repeatable): sqlite:///queue.db, postgresql+psycopg://..., "
        "labelstudio://HOST:PORT?project=TITLE, file:///FOLDER?format=csv", action="append", metavar="URI")
    outbox_dir: str | None = option(
        None, "where rows wait while a sink is down (default OUTPUT/outbox); the next run delivers them",
        flag="--outbox")

    def __post_init__(self) -> None:
        from tracin_tasks.orchestration.relabel import check_sinks

        object.__setattr__(self, "relabel", tuple(check_sinks(list(self.relabel) if self.relabel else None)))
