"""Prefect tasks and flows, task-runner choice and the partition store.

This is the only package (with ``flows/``) that imports Prefect; it needs the ``prefect``
extra (and ``dask`` for Dask runners).
"""

from tracin_tasks.exceptions import require_extra

require_extra("prefect", "prefect")

from tracin_tasks.orchestration.flows import audit_training_run, score_cells  # noqa: E402
from tracin_tasks.orchestration.plan import AuditPlan, AuditSettings, Cell, plan_cells  # noqa: E402
from tracin_tasks.exceptions import CellsMissingError  # noqa: E402
from tracin_tasks.orchestration.store import ResultsStore, aggregate_cells  # noqa: E402

__all__ = [
    "AuditPlan",
    "AuditSettings",
    "Cell",
    "CellsMissingError",
    "ResultsStore",
    "aggregate_cells",
    "audit_training_run",
    "plan_cells",
    "score_cells",
]
