"""Plan an audit as cells (checkpoint × shard of rows) with deterministic, settings-keyed names.

Pure functions and frozen dataclasses: nothing here talks to Prefect, MLflow or a file system.
A cell's key hashes everything that changes its scores — the run, the checkpoint (where it is,
its step and learning rate), the layers, the loss, the training data's fingerprint and the row
range — so stored cells are reused exactly when they are still right, and an audit with other
settings never reads them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tracin_tasks.exceptions import ConfigurationError

_LOSSES = ("cross_entropy", "mse")


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class AuditSettings:
    """Everything an audit needs to know, as JSON values (so a deployment can schedule it).

    Attributes:
        run_id: the MLflow training run to audit.
        tracking_uri: MLflow tracking URI the run lives on (None: MLflow's default).
        layers: None (all), "last", or a list of module names.
        loss: "cross_entropy" or "mse".
        batch_size: rows per forward/backward pass inside a cell.
        shard_size: rows per cell.
        steps: checkpoints to use: None (all), a list of steps, or "every:K".
        max_checkpoints: keep at most this many checkpoints, evenly spaced.
        device: "cpu", "cuda", or None (CUDA when the worker has it).
        model_factory: override the run's recorded "module:function" (the caller's choice: trusted).
        model_kwargs: keyword arguments for ``model_factory`` (a JSON object); without
            ``model_factory``, they override those the run recorded for its own factory.
        trusted_modules: module prefixes whose model factories a run may name; the flow stores
            them resolved (its own ``TRACIN_TRUSTED_MODULES`` included), so every worker applies
            the same policy.
        max_parameters: ceiling on the model's and each checkpoint's elements (None: the
            worker's ``TRACIN_MAX_PARAMETERS`` or 10⁹).
        mlflow_secret_block: a Prefect Secret block holding the tracking server's password (or
            ``{"username": ..., "password": ...}``); read by each process that talks to MLflow.
        allow_pickle: allow checkpoint files that need unpickling.
        default_learning_rate: the learning rate of checkpoints the run logged none for; None
            (the default) refuses them, 1.0 weights every such checkpoint equally.
    """

    run_id: str
    tracking_uri: str | None = None
    layers: str | tuple[str, ...] | None = None
    loss: str = "cross_entropy"
    batch_size: int = 256
    shard_size: int = 4096
    steps: str | tuple[int, ...] | None = None
    max_checkpoints: int | None = None
    device: str | None = None
    model_factory: str | None = None
    allow_pickle: bool = False
    default_learning_rate: float | None = None
    model_kwargs: dict[str, Any] | None = None
    trusted_modules: tuple[str, ...] = ()
    max_parameters: int | None = None
    mlflow_secret_block: str | None = None

    def __post_init__(self) -> None:
        from tracin_tasks._uris import refuse_uri_credentials
        from tracin_tasks.integrations.model_factory import (
            check_max_parameters,
            check_model_kwargs,
            parse_trusted_modules,
        )

        if not isinstance(self.run_id, str) or not self.run_id.strip():
            raise ConfigurationError(f"run_id must be a non-empty string, got {self.run_id!r}.")
        refuse_uri_credentials(self.tracking_uri, "The tracking URI")
        object.__setattr__(self, "trusted_modules", parse_trusted_modules(self.trusted_modules))
        object.__setattr__(self, "max_parameters", check_max_parameters(self.max_parameters))
        kwargs = check_model_kwargs(self.model_kwargs)
        object.__setattr__(self, "model_kwargs", kwargs or None)
        if self.mlflow_secret_block is not None and (not isinstance(self.mlflow_secret_block, str)
                                                     or not self.mlflow_secret_block.strip()):
            raise ConfigurationError(f"mlflow_secret_block must be a Prefect Secret block name, got "
                                     f"{self.mlflow_secret_block!r}.")
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.steps, list):
            object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        if self.loss not in _LOSSES:
            raise ConfigurationError(
                f"loss={self.loss!r}: an audit flow takes one of {_LOSSES} (a custom loss can be "
                "used from Python with tracin_tasks.TracIn)."
            )
        for name in ("batch_size", "shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer, got {value!r}.")
        lr = self.default_learning_rate
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0):
            raise ConfigurationError(f"default_learning_rate must be a finite number >= 0 or None, got {lr!r}.")
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
        fields = {"run_id": self.run_id, "layers": self.to_dict()["layers"], "loss": self.loss,
                  "model_factory": self.model_factory}
        if self.model_kwargs:
            fields["model_kwargs"] = self.model_kwargs
        return fields

    def config_hash(self) -> str:
        """A stable hash of the settings that change scores."""
        return stable_hash(self.scoring_fields())


@dataclass(frozen=True)
class Cell:
    """One unit of work: one checkpoint over one contiguous range of rows."""

    step: int
    learning_rate: float
    kind: str
    location: str
    row_start: int
    row_stop: int
    key: str

    @property
    def name(self) -> str:
        """A readable, deterministic name (also the stored file's name)."""
        return f"step{self.step:06d}_rows{self.row_start:09d}-{self.row_stop:09d}_{self.key}"

    @property
    def label(self) -> str:
        return f"checkpoint step {self.step}, rows {self.row_start}-{self.row_stop - 1}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cell:
        return cls(**d)


@dataclass(frozen=True)
class AuditPlan:
    """The cells of one audit, and what they were planned from."""

    settings: AuditSettings
    audit_key: str
    fingerprint: str
    n_rows: int
    cells: tuple[Cell, ...]
    checkpoints: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    warnings: tuple[str, ...] = field(default_factory=tuple)
    model: dict[str, Any] | None = None  # the ModelSpec the plan was checked with: every cell builds this

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "settings": self.settings.to_dict(),
            "audit_key": self.audit_key,
            "fingerprint": self.fingerprint,
            "n_rows": self.n_rows,
            "cells": [c.to_dict() for c in self.cells],
            "checkpoints": list(self.checkpoints),
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditPlan:
        return cls(
            settings=AuditSettings.from_dict(d["settings"]),
            audit_key=d["audit_key"],
            fingerprint=d["fingerprint"],
            n_rows=int(d["n_rows"]),
            cells=tuple(Cell.from_dict(c) for c in d["cells"]),
            checkpoints=tuple(d.get("checkpoints", ())),
            warnings=tuple(d.get("warnings", ())),
            model=d.get("model"),
        )


def plan_cells(
    settings: AuditSettings,
    checkpoints: Sequence[dict[str, Any]],
    n_rows: int,
    fingerprint: str,
    warnings: Sequence[str] = (),
    model: dict[str, Any] | None = None,
) -> AuditPlan:
    """Split the audit into checkpoint × shard cells.

    Args:
        settings: the audit's settings.
        checkpoints: one dict per checkpoint with ``step``, ``learning_rate``, ``kind``, ``location``.
        n_rows: rows in the training data.
        fingerprint: content hash of the training data.
        warnings: said to the user with the result.
        model: the model spec (factory, kwargs, origin) the cells build; part of every key.
    """
    if not checkpoints:
        raise ConfigurationError("An audit needs at least one checkpoint.")
    if n_rows < 1:
        raise ConfigurationError("An audit needs at least one training row.")
    base = {**settings.scoring_fields(), "fingerprint": fingerprint}
    if model is not None:
        base["model"] = {k: model[k] for k in ("factory", "kwargs")}
    audit_key = stable_hash({**base, "checkpoints": [
        {k: c[k] for k in ("step", "learning_rate", "kind", "location")} for c in checkpoints
    ]})
    cells = []
    for c in checkpoints:
        for start in range(0, n_rows, settings.shard_size):
            stop = min(n_rows, start + settings.shard_size)
            key = stable_hash({**base, "step": c["step"], "learning_rate": c["learning_rate"], "kind": c["kind"],
                               "location": c["location"], "rows": [start, stop]}, 12)
            cells.append(Cell(int(c["step"]), float(c["learning_rate"]), c["kind"], c["location"], start, stop, key))
    return AuditPlan(settings, audit_key, fingerprint, n_rows, tuple(cells), tuple(dict(c) for c in checkpoints),
                     tuple(warnings), model)
