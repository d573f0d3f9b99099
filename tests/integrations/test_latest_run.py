"""Which run a nightly audit takes: the latest finished run the helpers tagged, or with
``tagged_only=False`` the latest finished run whatever wrote it."""

from __future__ import annotations

import pytest

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("nightly", artifact_location=(tmp_path / "artifacts").as_uri())

    def run(tags: dict[str, str], status: str = "FINISHED", end: int = 0) -> str:
        r = client.create_run(experiment, tags=tags, start_time=1_000)
        client.set_terminated(r.info.run_id, status=status, end_time=2_000 + end)
        return r.info.run_id

    return uri, run


def test_tagged_runs_only_by_default_and_any_stack_when_asked(store):
    from tracin_tasks.orchestration.flows import find_latest_auditable_run

    uri, run = store
    tagged = run({"tracin.checkpoints": "true"}, end=1)
    trainer = run({}, end=2)  # e.g. a Hugging Face Trainer run: no tracin-tasks tag
    run({"tracin.checkpoints": "true"}, status="FAILED", end=3)
    run({}, status="KILLED", end=4)
    assert find_latest_auditable_run("nightly", uri) == tagged
    assert find_latest_auditable_run("nightly", uri, tagged_only=False) == trainer


def test_no_tagged_run_says_how_to_take_other_runs(store):
    from tracin_tasks.exceptions import NoCheckpointsError, RunNotFoundError
    from tracin_tasks.orchestration.flows import find_latest_auditable_run

    uri, run = store
    run({})
    with pytest.raises(NoCheckpointsError, match="tagged_only=False"):
        find_latest_auditable_run("nightly", uri)
    with pytest.raises(RunNotFoundError, match="no experiment named 'nightlyy'"):
        find_latest_auditable_run("nightlyy", uri)
