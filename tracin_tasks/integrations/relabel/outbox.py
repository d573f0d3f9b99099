"""A durable outbox for flagged rows a sink could not take.

When a sink is down after its retries, the batch is written as JSON to
``<outbox>/<sink key>/<fingerprint>-<audit key>.json`` (temporary name, then rename) and the
audit goes on. The next delivery to that sink — the next audit, or ``tracin-tasks relabel flush``
— first replays what is waiting there. Sinks are idempotent by (fingerprint, row id), so a batch
delivered twice (replayed after a delivery that did reach the sink but timed out) is not
duplicated; an entry is removed only after its delivery succeeded.

Entries are plain JSON (never pickles) and hold no credentials: the sink's URI is stored redacted
and is only used to tell the reader which sink an entry waits for.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tracin_tasks._io import atomic_write
from tracin_tasks.exceptions import SinkUnavailableError
from tracin_tasks.integrations.relabel.base import Delivery, FlaggedBatch, RelabelSink, sink_key

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What happened to one batch at one sink."""

    sink: str
    status: str  # "delivered" | "outboxed"
    delivery: Delivery | None = None
    replayed: list[Delivery] = field(default_factory=list)
    outbox_path: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "sink": self.sink, "status": self.status, "error": self.error, "outbox_path": self.outbox_path,
            "delivery": self.delivery.to_dict() if self.delivery else None,
            "replayed": [d.to_dict() for d in self.replayed],
        }


class Outbox:
    """Batches waiting for a sink, one JSON file each (see the module docstring)."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)

    def _dir(self, uri: str) -> str:
        return os.path.join(self.folder, sink_key(uri))

    def put(self, uri: str, sink_name: str, batch: FlaggedBatch, error: str) -> str:
        folder = self._dir(uri)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{batch.fingerprint[:16]}-{batch.audit_key}.json")
        entry = {"sink": sink_name, "error": error, "queued_at": time.time(), "batch": batch.to_dict()}
        # a re-queued batch of the same audit replaces the older entry
        return atomic_write(path, json.dumps(entry), durable=True)

    def pending(self, uri: str) -> list[str]:
        folder = self._dir(uri)
        if not os.path.isdir(folder):
            return []
        return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".json"))

    def all_pending(self) -> dict[str, list[str]]:
        """Every waiting entry by sink name (for ``relabel status``)."""
        out: dict[str, list[str]] = {}
        if not os.path.isdir(self.folder):
            return out
        for key in sorted(os.listdir(self.folder)):
            folder = os.path.join(self.folder, key)
            for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                if f.endswith(".json"):
                    with open(os.path.join(folder, f)) as fh:
                        out.setdefault(json.load(fh)["sink"], []).append(os.path.join(folder, f))
        return out

    def replay(self, uri: str, sink: RelabelSink) -> list[Delivery]:
        """Deliver what waits for this sink, oldest first; stops at the first failure (raised)."""
        done = []
        for path in self.pending(uri):
            with open(path) as fh:
                entry = json.load(fh)
            batch = FlaggedBatch.from_dict(entry["batch"])
            done.append(sink.deliver(batch))
            os.remove(path)
            logger.info("delivered %d waiting rows of audit %s to %s from the outbox",
                        len(batch.rows), batch.audit_key, sink.name)
        return done


def deliver_with_outbox(
    uri: str,
    batch: FlaggedBatch,
    outbox: Outbox,
    *,
    attempts: int = 3,
    backoff: float = 2.0,
    open_sink: Callable[[str], RelabelSink] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    """Replay the sink's outbox, then deliver ``batch``; after ``attempts`` failures keep it in the outbox.

    Only :class:`SinkUnavailableError` (the sink is down) is retried and outboxed; a sink that
    refuses the batch for another reason (bad configuration, a schema error) raises at once.
    """
    if open_sink is None:
        from tracin_tasks.integrations.relabel.registry import open_sink as _open

        open_sink = _open
    from tracin_tasks._uris import redact

    name = redact(uri)
    last: Exception | None = None
    for attempt in range(max(1, attempts)):
        sink = None
        try:
            sink = open_sink(uri)
            name = sink.name
            replayed = outbox.replay(uri, sink)
            delivery = sink.deliver(batch)
            return Outcome(name, "delivered", delivery, replayed)
        except SinkUnavailableError as exc:
            last = exc
            logger.warning("relabel sink %s unavailable (attempt %d of %d): %s", name, attempt + 1, attempts, exc)
            if attempt + 1 < attempts:
                sleep(backoff * (2 ** attempt))
        finally:
            if sink is not None:
                sink.close()
    path = outbox.put(uri, name, batch, str(last))
    logger.warning("kept %d flagged rows for %s in the outbox %s; they are delivered on the next run",
                   len(batch.rows), name, path)
    return Outcome(name, "outboxed", None, [], path, str(last))
