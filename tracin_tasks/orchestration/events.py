"""Prefect events that tie training runs and audits together.

A training pipeline calls :func:`emit_training_finished` when its MLflow run ends; the
``audit-on-training-finished`` deployment in ``deployments/prefect.yaml`` has a trigger on that
event and starts an audit of the run, its parameters templated from the event's payload.
"""

from __future__ import annotations

from typing import Any

from prefect.events import emit_event

TRAINING_FINISHED = "tracin.training.finished"


def run_resource(run_id: str) -> dict[str, str]:
    """The Prefect resource that stands for an MLflow run."""
    return {"prefect.resource.id": f"mlflow.run.{run_id}", "prefect.resource.name": run_id}


def emit_training_finished(run_id: str, tracking_uri: str | None = None, experiment: str | None = None) -> Any:
    """Announce that an MLflow training run finished and can be audited."""
    return emit_event(
        event=TRAINING_FINISHED,
        resource=run_resource(run_id),
        payload={"run_id": run_id, "tracking_uri": tracking_uri, "experiment": experiment},
    )
