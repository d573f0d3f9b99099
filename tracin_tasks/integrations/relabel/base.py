"""What every relabel sink shares: the rows it receives, the decisions it gives back, the protocol.

A *sink* is where flagged rows go for a person to look at them: a SQL queue, a Label Studio
project, a folder of parquet/CSV files. Every sink is idempotent by (dataset fingerprint, row id):
delivering the same batch twice — an audit re-run, a task retry, an outbox replay — never
duplicates a row and never resets a row a person already handled.

Sinks are named by URI so that a Prefect deployment can pass them as JSON parameters:

* ``sqlite:///path/queue.db``, ``postgresql+psycopg://user@host/db`` (any SQLAlchemy URL),
  optionally ``?table=name&schema=name``;
* ``labelstudio://host:port?project=Title&scheme=http`` (API key from a Prefect Secret block
  or ``LABEL_STUDIO_API_KEY``);
* ``file:///folder?format=parquet`` (or ``format=csv``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from tracin_tasks._uris import redact  # noqa: F401  (sinks name themselves with it)
from tracin_tasks.exceptions import DataError

#: the statuses of a queue row; ``pending → in_review → relabeled | confirmed | skipped``
PENDING, IN_REVIEW, RELABELED, CONFIRMED, SKIPPED = "pending", "in_review", "relabeled", "confirmed", "skipped"
STATUSES = (PENDING, IN_REVIEW, RELABELED, CONFIRMED, SKIPPED)
FINAL_STATUSES = (RELABELED, CONFIRMED, SKIPPED)


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@dataclass(frozen=True)
class FlaggedRow:
    """One flagged training row as a reviewer sees it."""

    row_id: str
    rank: int
    score: float
    given_label: int
    suggested_label: int | None = None
    self_influence: float | None = None
    reason: str = ""
    #: what a reviewer looks at: the model input as a flat list (images are reshaped by the sink)
    features: list[float] | None = None


@dataclass(frozen=True)
class FlaggedBatch:
    """The flagged rows of one audit, with what ties them to the run and the data version."""

    run_id: str
    fingerprint: str
    audit_key: str
    rows: tuple[FlaggedRow, ...]
    audit_run_id: str | None = None
    classes: tuple[int, ...] = ()
    input_shape: tuple[int, ...] | None = None
    created_at: str = field(default_factory=lambda: utcnow().isoformat())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rows"] = [asdict(r) for r in self.rows]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlaggedBatch:
        d = dict(d)
        d["rows"] = tuple(FlaggedRow(**r) for r in d["rows"])
        d["classes"] = tuple(d.get("classes") or ())
        d["input_shape"] = tuple(d["input_shape"]) if d.get("input_shape") else None
        return cls(**d)

    @classmethod
    def from_issues(
        cls,
        issues: pd.DataFrame,
        *,
        run_id: str,
        fingerprint: str,
        audit_key: str,
        audit_run_id: str | None = None,
        features: np.ndarray | None = None,
        input_shape: Iterable[int] | None = None,
        classes: Iterable[int] | None = None,
    ) -> FlaggedBatch:
        """The flagged rows of an audit's ``issues`` table (``flagged`` true), most suspicious first.

        ``features`` (same row order as ``issues``) travels with each row so that a reviewer
        can see the example; leave it out for sinks that only need ids.
        """
        needed = {"row_id", "label", "flagged", "rank", "score"}
        missing = needed - set(issues.columns)
        if missing:
            raise DataError(f"The issues table lacks the columns {sorted(missing)}; pass the audit's issues.parquet.")
        mask = issues["flagged"].to_numpy(dtype=bool)
        part = issues[mask].sort_values("rank")
        feats = None
        if features is not None:
            feats = np.asarray(features)[mask][np.argsort(issues["rank"].to_numpy()[mask], kind="stable")]
        rows = []
        for i, rec in enumerate(part.to_dict("records")):
            suggested = rec.get("suggested_label")
            si = rec.get("self_influence")
            rows.append(FlaggedRow(
                row_id=str(rec["row_id"]),
                rank=int(rec["rank"]),
                score=float(rec["score"]),
                given_label=int(rec["label"]),
                suggested_label=None if suggested is None or pd.isna(suggested) or int(suggested) < 0 else int(suggested),
                self_influence=None if si is None or pd.isna(si) else float(si),
                reason=str(rec.get("reason") or ""),
                features=None if feats is None else [float(v) for v in np.ravel(feats[i])],
            ))
        return cls(
            run_id=run_id, fingerprint=fingerprint, audit_key=audit_key, rows=tuple(rows), audit_run_id=audit_run_id,
            classes=tuple(int(c) for c in (classes if classes is not None else sorted(set(issues["label"].tolist())))),
            input_shape=tuple(int(d) for d in input_shape) if input_shape else None,
        )


@dataclass(frozen=True)
class Delivery:
    """What a sink did with one batch."""

    sink: str
    delivered: int  # rows new to the sink
    updated: int  # pending rows refreshed with this audit's score and rank
    unchanged: int  # rows a person already handled (left as they are)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    """A finished human decision about one row."""

    row_id: str
    status: str  # relabeled | confirmed | skipped
    label: int | None  # the corrected label for ``relabeled``; the given label otherwise
    given_label: int | None = None
    decided_by: str | None = None
    decided_at: str | None = None
    audit_run_id: str | None = None
    note: str | None = None

    def __post_init__(self) -> None:
        if self.status not in FINAL_STATUSES:
            raise DataError(f"A decision's status must be one of {FINAL_STATUSES}, got {self.status!r}.")
        if self.status == RELABELED and self.label is None:
            raise DataError(f"Row {self.row_id!r} is marked relabeled but has no new label.")


@runtime_checkable
class RelabelSink(Protocol):
    """One place flagged rows go. Implementations: SQL queue, Label Studio, file drop."""

    #: a printable name without credentials (used in logs, outbox entries and reports)
    name: str

    def deliver(self, batch: FlaggedBatch) -> Delivery:
        """Put the batch's rows in the sink, idempotently. Raise :class:`SinkUnavailableError`
        when the sink cannot be reached (the caller retries, then keeps the batch in an outbox)."""
        ...

    def decisions(self, fingerprint: str) -> list[Decision]:
        """The finished decisions about rows of this dataset version."""
        ...

    def close(self) -> None:
        ...


def sink_key(uri: str) -> str:
    """A stable, credential-free key for a sink (names its outbox folder)."""
    import hashlib

    return hashlib.sha256(redact(uri).encode()).hexdigest()[:16]
