"""Deployable relabel entry points (see deployments/prefect.yaml).

* ``relabel_flagged``: send a finished audit's flagged rows to relabel sinks; the
  ``relabel-on-audit-flagged`` deployment runs it on every ``tracin.audit.flagged`` event.
* ``apply_relabels``: turn the reviewers' decisions into a corrected dataset in MLflow.
"""

from tracin_tasks.orchestration.flows import apply_relabels, relabel_flagged

__all__ = ["apply_relabels", "relabel_flagged"]
