"""Relabel queues: where flagged rows go for review, and how corrections come back.

Sinks (one protocol, :class:`RelabelSink`): :class:`~.sql_queue.SqlQueue` (SQLite, Postgres),
:class:`~.labelstudio.LabelStudioSink`, :class:`~.file_drop.FileDrop`. Open one by URI with
:func:`open_sink`. :mod:`.outbox` keeps batches a sink could not take; :mod:`.corrections` writes
the corrected training data back to MLflow.
"""

from tracin_tasks.integrations.relabel.base import (
    CONFIRMED,
    FINAL_STATUSES,
    IN_REVIEW,
    PENDING,
    RELABELED,
    SKIPPED,
    STATUSES,
    Decision,
    Delivery,
    FlaggedBatch,
    FlaggedRow,
    RelabelSink,
    redact,
)
from tracin_tasks.integrations.relabel.registry import open_sink, register_sink

__all__ = [
    "CONFIRMED", "FINAL_STATUSES", "IN_REVIEW", "PENDING", "RELABELED", "SKIPPED", "STATUSES",
    "Decision", "Delivery", "FlaggedBatch", "FlaggedRow", "RelabelSink", "open_sink", "redact",
    "register_sink",
]
