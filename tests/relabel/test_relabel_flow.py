"""Flagged rows leave the audit flow and come back corrected, with real parts throughout:
the Prefect flow on a Prefect test server, a real MLflow run, SQLite and PostgreSQL queues.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
import os
import time
import urllib.request

import pandas as pd
import pytest

from tracin_tasks.exceptions import LabelOutOfRangeError, UnknownRowIdsError
from tracin_tasks.integrations.relabel import open_sink
from tracin_tasks.integrations.relabel.sql_queue import SqlQueue

from ._pg import PostgresServer, find_bindir


def audit(run, out, **kw):
    from tracin_tasks.orchestration import audit_training_run

    return audit_training_run(run_id=run.run_id, tracking_uri=run.tracking_uri, output_dir=str(out), batch_size=512,
                              validate_results=False, log_to_mlflow=kw.pop("log_to_mlflow", False), **kw)


def read_events(api_url: str, name: str, matching, since: str, timeout: float = 180.0) -> list[dict]:
    """The events of that name since ``since`` (ISO time) that ``matching`` accepts, as the Prefect
    server stored them. Events arrive asynchronously, and other tests emit events of the same name:
    wait for a matching one."""
    deadline = time.time() + timeout
    while True:
        body = json.dumps({"filter": {"event": {"name": [name]}, "occurred": {"since": since}}, "limit": 50}).encode()
        req = urllib.request.Request(f"{api_url}/events/filter", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            events = [e for e in json.load(resp)["events"] if matching(e)]
        if events or time.time() > deadline:
            return events
        time.sleep(1)


@pytest.fixture(scope="module")
def first(prefect_api, digits_run, tmp_path_factory):
    """One audit of the digits run sending its flagged rows to a SQLite queue and a CSV file drop."""
    root = tmp_path_factory.mktemp("relabel-flow")
    queue = f"sqlite:///{root / 'queue.db'}"
    drop = f"{(root / 'drop').as_uri()}?format=csv"
    started = datetime.now(timezone.utc).isoformat()
    result = audit(digits_run, root / "audit", relabel=[queue, drop], log_to_mlflow=True)
    return {"root": root, "queue": queue, "drop": drop, "result": result, "started": started}


def test_flagged_rows_land_in_every_sink_once(first):
    result = first["result"]
    issues = pd.read_parquet(result["files"]["issues.parquet"])
    flagged = issues[issues["flagged"]]
    assert len(flagged) == result["flagged"] > 0
    assert [o["status"] for o in result["relabel"]] == ["delivered", "delivered"]
    assert result["relabel"][0]["delivery"]["delivered"] == len(flagged)

    queue = SqlQueue(first["queue"])
    rows = queue.rows()
    assert sorted(rows["row_id"]) == sorted(flagged["row_id"].astype(str))
    by_id = rows.set_index("row_id")
    for rec in flagged.head(20).itertuples():
        assert by_id.loc[str(rec.row_id), "rank"] == rec.rank
        assert by_id.loc[str(rec.row_id), "given_label"] == rec.label
        assert by_id.loc[str(rec.row_id), "suggested_label"] == rec.suggested_label
    assert set(rows["status"]) == {"pending"}
    assert set(rows["audit_run_id"]) == {result["mlflow_run"]["run_id"]}

    drop = open_sink(first["drop"])
    files = [f for f in os.listdir(drop.folder) if f.startswith("flagged_")]
    frame = pd.read_csv(os.path.join(drop.folder, files[0]), dtype={"row_id": str})
    assert sorted(frame["row_id"]) == sorted(flagged["row_id"].astype(str))
    # each row carries the model input a reviewer looks at (8x8 digits)
    assert all(len(json.loads(f)) == 64 for f in frame["features"])


def test_audit_flagged_event_reaches_the_server(first, prefect_api, digits_run):
    mine = read_events(prefect_api, "tracin.audit.flagged",
                       lambda e: e["payload"]["output_dir"] == first["result"]["output_dir"], first["started"])
    assert mine, "the audit's tracin.audit.flagged event never reached the server"
    event = mine[0]
    assert event["resource"]["prefect.resource.id"] == f"mlflow.run.{digits_run.run_id}"
    assert event["payload"]["flagged"] == first["result"]["flagged"]
    assert event["payload"]["rows"] == digits_run.n_rows
    assert event["payload"]["audit_run_id"] == first["result"]["mlflow_run"]["run_id"]
    assert [s["status"] for s in event["payload"]["sinks"]] == ["delivered", "delivered"]


def test_rerun_never_duplicates_or_resets(first, digits_run):
    queue = SqlQueue(first["queue"])
    pending = queue.rows(status="pending")
    fp = pending["fingerprint"].iloc[0]
    a, b = pending["row_id"].iloc[0], pending["row_id"].iloc[1]
    given = dict(zip(pending["row_id"], pending["given_label"]))
    queue.claim("ann", 1)
    queue.decide(a, fp, "relabeled", (int(given[a]) + 1) % 10, by="ann")
    queue.decide(b, fp, "confirmed", by="ann")
    before = queue.rows().set_index("row_id")

    again = audit(digits_run, first["root"] / "audit", relabel=[first["queue"]])
    assert again["computed"] == 0  # the audit itself reused every cell
    assert again["relabel"][0]["delivery"]["delivered"] == 0
    after = queue.rows().set_index("row_id")
    assert len(after) == len(before)
    assert after.loc[a, "status"] == "relabeled" and after.loc[b, "status"] == "confirmed"
    assert after.loc[a, "decided_label"] == before.loc[a, "decided_label"]


@pytest.mark.skipif(find_bindir() is None, reason="PostgreSQL server binaries not found")
def test_sink_down_keeps_rows_in_the_outbox_and_the_next_run_delivers(prefect_api, digits_run, tmp_path):
    server = PostgresServer(find_bindir())
    try:
        server.init()
        server.start()
        url = server.create_database("relabel")
        server.stop()  # the queue is down while the audit runs
        down = audit(digits_run, tmp_path / "audit", relabel=[url])
        outcome = down["relabel"][0]
        assert outcome["status"] == "outboxed"
        assert "cannot be reached" in outcome["error"]
        waiting = [os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path / "audit" / "outbox") for f in fs]
        assert len(waiting) == 1 and waiting[0].endswith(".json")
        with open(waiting[0]) as fh:
            assert len(json.load(fh)["batch"]["rows"]) == down["flagged"]

        server.start()  # back up: the next run delivers what waited, and this run's rows, once
        up = audit(digits_run, tmp_path / "audit", relabel=[url])
        outcome = up["relabel"][0]
        assert outcome["status"] == "delivered"
        assert [d["delivered"] for d in outcome["replayed"]] == [down["flagged"]]
        assert outcome["delivery"]["delivered"] == 0
        rows = SqlQueue(url).rows()
        assert len(rows) == rows["row_id"].nunique() == down["flagged"]
        assert not any(f.endswith(".json") for _, _, fs in os.walk(tmp_path / "audit" / "outbox") for f in fs)
    finally:
        server.cleanup()


def test_corrections_become_a_new_dataset_in_mlflow(first, digits_run, tmp_path):
    import mlflow

    from tracin_tasks.cli import main
    from tracin_tasks.integrations.relabel.corrections import load_corrected_training_data

    queue = SqlQueue(first["queue"])
    fp = queue.rows()["fingerprint"].iloc[0]
    decided = {d.row_id: d for d in queue.decisions(fp)}
    pending = queue.rows(status="pending")
    extra = pending["row_id"].iloc[0]
    assert main(["relabel", "decide", "--queue", first["queue"], "--run-id", digits_run.run_id, "--row-id", extra,
                 "--label", str((int(pending["given_label"].iloc[0]) + 2) % 10), "--by", "cli"]) == 0
    skipped = pending["row_id"].iloc[1]
    assert main(["relabel", "decide", "--queue", first["queue"], "--run-id", digits_run.run_id, "--row-id", skipped,
                 "--skip"]) == 0
    decided = {d.row_id: d for d in queue.decisions(fp)}
    relabeled = {r: d.label for r, d in decided.items() if d.status == "relabeled"}
    assert len(relabeled) >= 2

    out = tmp_path / "corrected"
    assert main(["relabel", "apply", "--queue", first["queue"], "--run-id", digits_run.run_id,
                 "--tracking-uri", digits_run.tracking_uri, "--output", str(out)]) == 0
    changes = pd.read_csv(out / "changes.csv", dtype={"row_id": str})
    assert set(changes["row_id"]) == set(decided)
    assert dict(zip(changes.loc[changes["changed"], "row_id"], changes.loc[changes["changed"], "new_label"])) == relabeled

    corrected = pd.read_parquet(out / "training_data.parquet")
    client = mlflow.MlflowClient(tracking_uri=digits_run.tracking_uri)
    relabel_run_id = client.get_run(digits_run.run_id).data.tags["tracin.latest_relabel_run"]
    relabel_run = client.get_run(relabel_run_id)
    assert relabel_run.data.tags["mlflow.parentRunId"] == digits_run.run_id
    assert relabel_run.data.metrics["changed"] == len(relabeled)
    assert [d.dataset.name for d in relabel_run.inputs.dataset_inputs] == ["training_data"]

    loaded = load_corrected_training_data(digits_run.run_id, tracking_uri=digits_run.tracking_uri)
    pd.testing.assert_frame_equal(loaded.reset_index(drop=True), corrected.reset_index(drop=True))
    ids = corrected["row_id"].astype(str)
    for row_id, label in relabeled.items():
        assert corrected.loc[ids == row_id, "label"].item() == label
    from tracin_tasks.integrations.mlflow.source import MlflowCheckpointSource

    original_frame = MlflowCheckpointSource(digits_run.run_id, tracking_uri=digits_run.tracking_uri).training_table().frame
    untouched = ~ids.isin(set(relabeled))
    assert (corrected.loc[untouched, "label"].to_numpy() == original_frame.loc[untouched.to_numpy(), "label"].to_numpy()).all()
    assert (corrected.drop(columns="label").to_numpy() == original_frame.drop(columns="label").to_numpy()).all()


def test_unknown_row_ids_are_rejected_with_a_list_and_nothing_is_written(digits_run, tmp_path, first):
    from tracin_tasks.integrations.relabel.corrections import apply_from_sink

    drop = open_sink(first["drop"])
    flagged = [f for f in os.listdir(drop.folder) if f.startswith("flagged_")][0]
    fp_key = flagged[len("flagged_"):-len(".csv")]
    decisions = os.path.join(drop.folder, f"decisions_{fp_key}.csv")
    pd.DataFrame([{"row_id": "ghost-1", "status": "relabeled", "label": 3},
                  {"row_id": "ghost-2", "status": "confirmed", "label": None}]).to_csv(decisions, index=False)
    out = tmp_path / "never"
    try:
        with pytest.raises(UnknownRowIdsError) as err:
            apply_from_sink(digits_run.run_id, first["drop"], tracking_uri=digits_run.tracking_uri, output_dir=str(out))
        assert err.value.row_ids == ["ghost-1", "ghost-2"]
        assert "ghost-1" in str(err.value) and "Nothing was written" in str(err.value)
        assert not out.exists()

        real = pd.read_csv(os.path.join(drop.folder, flagged), dtype={"row_id": str})["row_id"].iloc[0]
        pd.DataFrame([{"row_id": real, "status": "relabeled", "label": 42}]).to_csv(decisions, index=False)
        with pytest.raises(LabelOutOfRangeError, match="42"):
            apply_from_sink(digits_run.run_id, first["drop"], tracking_uri=digits_run.tracking_uri, output_dir=str(out))
        assert not out.exists()
    finally:
        os.remove(decisions)


def test_cli_works_the_queue(first, digits_run, capsys):
    from tracin_tasks.cli import main

    assert main(["relabel", "list", "--queue", first["queue"], "--run-id", digits_run.run_id, "--limit", "3"]) == 0
    text = capsys.readouterr().out
    assert "3 of" in text and "pending" in text
    assert main(["relabel", "claim", "--queue", first["queue"], "--worker", "zoe", "-n", "2"]) == 0
    assert "2 rows claimed by zoe" in capsys.readouterr().out
    assert main(["relabel", "release", "--queue", first["queue"], "--worker", "zoe"]) == 0
    assert "2 rows back to pending" in capsys.readouterr().out
    assert main(["relabel", "list", "--queue", first["queue"].replace("queue.db", "absent.db")]) == 2
    assert "no queue table" in capsys.readouterr().err


@pytest.mark.skipif(find_bindir() is None, reason="PostgreSQL server binaries not found")
def test_cli_flush_delivers_the_outbox(tmp_path, capsys):
    from tracin_tasks.cli import main
    from tracin_tasks.integrations.relabel.outbox import Outbox, deliver_with_outbox

    from .test_sinks import batch

    server = PostgresServer(find_bindir())
    try:
        server.init()
        server.start()
        url = server.create_database("flush")
        server.stop()
        outcome = deliver_with_outbox(url, batch(), Outbox(str(tmp_path / "outbox")), attempts=2, sleep=lambda s: None)
        assert outcome.status == "outboxed"
        server.start()
        assert main(["relabel", "flush", "--outbox", str(tmp_path / "outbox"), "--sink", url]) == 0
        assert "1 waiting batches delivered (5 new rows" in capsys.readouterr().out
        assert SqlQueue(url).counts() == {"pending": 5}
        assert Outbox(str(tmp_path / "outbox")).pending(url) == []
    finally:
        server.cleanup()


def test_label_studio_key_from_a_prefect_secret_block(prefect_api, monkeypatch):
    """The sink reads a Secret block through the reader the orchestration layer gives it (the
    integrations do not import Prefect); without a block it reads the environment variable."""
    from prefect.blocks.system import Secret

    from tracin_tasks.exceptions import ConfigurationError
    from tracin_tasks.orchestration.sources import prefect_secret

    Secret(value="planted-key-123").save("tracin-test-ls-key", overwrite=True)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "from-env")
    base = "labelstudio://127.0.0.1:9?project=p"
    assert open_sink(f"{base}&secret_block=tracin-test-ls-key", secrets=prefect_secret)._read_key() == "planted-key-123"
    assert open_sink(base, secrets=prefect_secret)._read_key() == "from-env"
    with pytest.raises(ConfigurationError, match="does not exist") as err:
        open_sink(f"{base}&secret_block=no-such-block", secrets=prefect_secret)._read_key()
    assert "from-env" not in str(err.value)
    with pytest.raises(ConfigurationError, match="nothing here reads Secret blocks"):
        open_sink(f"{base}&secret_block=tracin-test-ls-key")._read_key()
