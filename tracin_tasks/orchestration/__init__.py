"""Prefect tasks and flows, task-runner choice and the partition store.

This is the only package (with ``flows/``) that imports Prefect; it needs the ``prefect``
extra (and ``dask`` for Dask runners). The names below are imported on first use, so that the
settings (:mod:`tracin_tasks.orchestration.settings`, which the command line reads to build its
options) import without Prefect: the CLI sets Prefect's environment (home, analytics, loggers)
before anything imports Prefect.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "audit_training_run": "tracin_tasks.orchestration.flows",
    "score_cells": "tracin_tasks.orchestration.flows",
    "AuditPlan": "tracin_tasks.orchestration.plan",
    "Cell": "tracin_tasks.orchestration.plan",
    "plan_cells": "tracin_tasks.orchestration.plan",
    "AuditSettings": "tracin_tasks.orchestration.settings",
    "CellsMissingError": "tracin_tasks.exceptions",
    "ResultsStore": "tracin_tasks.orchestration.store",
    "aggregate_cells": "tracin_tasks.orchestration.store",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _WHERE[name] != "tracin_tasks.exceptions":
        from tracin_tasks.exceptions import require_extra

        require_extra("prefect", "prefect")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


__all__ = sorted(_WHERE)
