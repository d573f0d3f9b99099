"""Plan an audit as cells (checkpoint × shard of rows) with deterministic, settings-keyed names.

Pure functions and frozen dataclasses: nothing here talks to Prefect, MLflow or a file system.
A cell's key hashes everything that changes its scores — the run, the checkpoint (where it is,
its step and learning rate), the layers, the loss, the training data's fingerprint and the row
range — so stored cells are reused exactly when they are still right, and an audit with other
settings never reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tracin_tasks.exceptions import ConfigurationError
from tracin_tasks.orchestration.settings import AuditSettings, stable_hash


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
