"""Aggregating an audit: every stored cell combined into one score per row (``scores.parquet``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from tracin_tasks._io import atomic_write
from tracin_tasks.exceptions import OutputWriteError
from tracin_tasks.orchestration.plan import AuditPlan
from tracin_tasks.orchestration.sources import training_table
from tracin_tasks.orchestration.store import ResultsStore, aggregate_cells


def write_output(frame_or_bytes: Any, path: str) -> str:
    """An audit output written atomically; a folder that cannot be written is :class:`OutputWriteError`."""
    try:
        return atomic_write(path, frame_or_bytes)
    except OSError as exc:
        raise OutputWriteError(
            f"Could not write {path!r}: {exc.strerror or exc}. Choose an output folder this process can "
            "write (output_dir= / --output); finished cells stay in the results store, so the re-run "
            "only aggregates."
        ) from exc


def write_scores(plan: AuditPlan, store: ResultsStore, output_dir: str) -> str:
    """Aggregate every cell and write ``scores.parquet`` (row_id, label, self_influence, ...)."""
    agg = aggregate_cells(store, plan)
    table = training_table(plan.settings, plan.fingerprint)
    frame = pd.DataFrame(
        {
            "row_id": table.row_ids,
            "label": table.labels,
            "self_influence": agg["self_influence"],
            "aum": agg["aum"],
            "loss_final": agg["loss_final"],
            "predicted_label": agg["predicted"],
            "predicted_confidence": agg["confidence"],
        }
    )
    return write_output(frame, os.path.join(output_dir, "scores.parquet"))


def scores_summary(path: str, top: int = 5) -> dict[str, Any]:
    """A short description of a scores file (for logs and the CLI)."""
    frame = pd.read_parquet(path)
    s = frame["self_influence"].to_numpy()
    order = np.argsort(-s, kind="stable")[:top]
    return {
        "rows": int(len(frame)),
        "self_influence_median": float(np.nanmedian(s)),
        "self_influence_p99": float(np.nanquantile(s, 0.99)),
        "top_rows": frame.iloc[order][["row_id", "label", "self_influence"]].to_dict("records"),
    }
