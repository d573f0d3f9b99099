"""Deployable entry points (see deployments/prefect.yaml).

    prefect deploy --prefect-file deployments/prefect.yaml --all

The flows themselves live in the package (``tracin_tasks.orchestration``), so a user's own
flows can call them as subflows too.
"""

from tracin_tasks.orchestration.flows import audit_latest_run, audit_training_run

__all__ = ["audit_latest_run", "audit_training_run"]

if __name__ == "__main__":  # python flows/audit.py RUN_ID [TRACKING_URI]
    import sys

    print(audit_training_run(run_id=sys.argv[1], tracking_uri=sys.argv[2] if len(sys.argv) > 2 else None))
