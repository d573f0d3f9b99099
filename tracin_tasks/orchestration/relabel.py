"""Send an audit's flagged rows to relabel sinks, and announce them with a Prefect event.

Kept apart from the flows so that the CLI and tests can call it directly; the flows wrap it in
tasks. Nothing here raises because a sink is down: after bounded retries the batch waits in the
outbox and the outcome says so.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import numpy as np
import pandas as pd

from tracin_tasks.exceptions import ConfigurationError, DataError
from tracin_tasks._uris import redact
from tracin_tasks.integrations.relabel.base import FlaggedBatch
from tracin_tasks.integrations.relabel.outbox import Outbox, deliver_with_outbox
from tracin_tasks.integrations.relabel.registry import open_sink
from tracin_tasks.orchestration.sources import prefect_secret
from tracin_tasks.orchestration.plan import AuditPlan

logger = logging.getLogger(__name__)

AUDIT_FLAGGED = "tracin.audit.flagged"


def check_sinks(sinks: list[str] | str | None) -> list[str]:
    """The sink URIs as a list; a malformed one fails before any work (without its credentials)."""

    if sinks is None:
        return []
    if isinstance(sinks, str):
        sinks = [sinks]
    from tracin_tasks._uris import SINK_CREDENTIALS_ADVICE, refuse_uri_credentials

    out = []
    for uri in sinks:
        if not isinstance(uri, str) or "://" not in uri and not uri.startswith("sqlite:"):
            raise ConfigurationError(
                f"Relabel sink {redact(str(uri))!r} is not a URI; expected sqlite:///queue.db, "
                "postgresql+psycopg://…, labelstudio://host:port?project=…, or file:///folder."
            )
        refuse_uri_credentials(uri, "The relabel sink URI", SINK_CREDENTIALS_ADVICE)
        out.append(uri)
    return out


def batch_for_audit(plan: AuditPlan, output_dir: str, audit_run_id: str | None = None,
                    with_features: bool = True) -> FlaggedBatch:
    """The flagged rows of a finished audit (its ``issues.parquet``), with each row's model input.

    ``output_dir`` is the audit's output folder: the audit is found there by its key and checked
    against its manifest, so a later audit into the same folder is never sent instead.
    """
    from tracin_tasks.orchestration.outputs import find_finished_audit

    folder, _ = find_finished_audit(output_dir, plan.audit_key)
    path = os.path.join(folder, "issues.parquet")
    if not os.path.exists(path):
        raise DataError(f"{path} does not exist: the audit has not flagged rows yet (run it with report=True).")
    issues = pd.read_parquet(path)
    features = None
    shape = None
    if with_features:
        from tracin_tasks.orchestration.sources import training_table

        table = training_table(plan.settings, plan.fingerprint)
        with_features = not table.sequence_columns  # token ids are no use to a reviewer: rows go by id
    if with_features:
        shape = table.input_shape
        flagged = issues["flagged"].to_numpy(dtype=bool)
        positions = pd.Index(table.row_ids).get_indexer(issues["row_id"])
        features = np.zeros((len(issues), len(table.feature_columns)), dtype=np.float32)
        if flagged.any():
            features[flagged] = table.features()[positions[flagged]].reshape(int(flagged.sum()), -1)
    return FlaggedBatch.from_issues(
        issues, run_id=plan.settings.run_id, fingerprint=plan.fingerprint, audit_key=plan.audit_key,
        audit_run_id=audit_run_id, features=features, input_shape=shape,
    )


def push_flagged(batch: FlaggedBatch, sinks: list[str], outbox_dir: str, attempts: int = 3,
                 backoff: float = 2.0) -> list[dict[str, Any]]:
    """Deliver to every sink (outbox replay first); a sink that stays down keeps the batch in the outbox."""
    outbox = Outbox(outbox_dir)
    outcomes = []
    for uri in sinks:
        outcome = deliver_with_outbox(uri, batch, outbox, attempts=attempts, backoff=backoff,
                                      open_sink=functools.partial(open_sink, secrets=prefect_secret))
        outcomes.append(outcome.to_dict())
        if outcome.status == "delivered":
            d = outcome.delivery
            logger.info("%s: %d new rows, %d refreshed, %d already handled by a reviewer (kept)",
                        outcome.sink, d.delivered, d.updated, d.unchanged)
    return outcomes


def emit_audit_flagged(batch: FlaggedBatch, *, rows: int, output_dir: str, results_uri: str,
                       tracking_uri: str | None, outcomes: list[dict[str, Any]]) -> Any:
    """The ``tracin.audit.flagged`` event: an Automation can start the relabel deployment from it."""
    from prefect.events import emit_event

    from tracin_tasks.orchestration.events import run_resource

    related = []
    if batch.audit_run_id:
        related.append({"prefect.resource.id": f"mlflow.run.{batch.audit_run_id}",
                        "prefect.resource.role": "audit-run", "prefect.resource.name": batch.audit_run_id})

    return emit_event(
        event=AUDIT_FLAGGED,
        resource=run_resource(batch.run_id),
        related=related,
        payload={
            "run_id": batch.run_id,
            "audit_run_id": batch.audit_run_id,
            "audit_key": batch.audit_key,
            "fingerprint": batch.fingerprint,
            "rows": int(rows),
            "flagged": len(batch.rows),
            "output_dir": output_dir,
            "results_uri": redact(results_uri),
            "tracking_uri": redact(tracking_uri),
            "sinks": [{"sink": o["sink"], "status": o["status"]} for o in outcomes],
        },
    )
