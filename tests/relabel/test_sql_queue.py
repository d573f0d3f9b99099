"""The SQL queue: safe claims under concurrency, status transitions, schema versions, an unreachable server."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import sqlalchemy as sa

from tracin_tasks.exceptions import (
    ConfigurationError,
    InvalidTransitionError,
    QueueSchemaError,
    SinkUnavailableError,
    UnknownRowIdsError,
)
from tracin_tasks.integrations.relabel.sql_queue import SCHEMA_VERSION, SqlQueue

from .test_sinks import FP, batch


def _claim_loop(url: str, worker: str, n: int, out, connected, claimed) -> None:
    queue = SqlQueue(url)
    connected.wait(timeout=240)  # every worker connected: now they race
    got = [r["row_id"] for r in queue.claim(worker, n)]
    claimed.wait(timeout=240)  # every worker holds its first claim before any claims again
    while True:
        rows = queue.claim(worker, n)
        if not rows:
            break
        got.extend(r["row_id"] for r in rows)
    queue.close()
    out.put((worker, got))


@pytest.mark.parametrize("per_claim", [1, 3])
def test_concurrent_workers_never_get_the_same_row(queue_url, per_claim):
    queue = SqlQueue(queue_url)
    queue.deliver(batch(n=120, flagged=120))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    connected, claimed = ctx.Barrier(3), ctx.Barrier(3)
    procs = [ctx.Process(target=_claim_loop, args=(queue_url, f"w{i}", per_claim, out, connected, claimed))
             for i in range(3)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    claimed = [r for rows in results.values() for r in rows]
    assert len(claimed) == len(set(claimed)) == 120  # every row once, none twice
    # the barriers make all three claim while all three are connected, before any claims twice:
    # so each holds at least its first batch, however the machine schedules them
    assert all(len(rows) >= per_claim for rows in results.values()), {w: len(r) for w, r in results.items()}
    table = queue.rows(fingerprint=FP)
    assert set(table["status"]) == {"in_review"}
    owner = dict(zip(table["row_id"], table["claimed_by"]))
    for worker, rows in results.items():
        assert all(owner[r] == worker for r in rows)


def test_claim_order_and_release(sqlite_url):
    queue = SqlQueue(sqlite_url)
    queue.deliver(batch(n=10, flagged=6))
    first = queue.claim("ann", 2)
    assert [r["row_id"] for r in first] == ["r0", "r1"]  # most suspicious first
    assert [r["row_id"] for r in queue.claim("bob", 2)] == ["r2", "r3"]
    assert queue.release("ann") == 2
    assert [r["row_id"] for r in queue.claim("bob", 10)] == ["r0", "r1", "r4", "r5"]
    assert queue.claim("cy", 1) == []
    with pytest.raises(ConfigurationError):
        queue.claim("cy", 0)


def test_transitions(sqlite_url):
    queue = SqlQueue(sqlite_url)
    b = batch()
    queue.deliver(b)
    given = {r.row_id: r.given_label for r in b.rows}
    queue.claim("ann", 1)
    assert queue.decide("r0", FP, "relabeled", (given["r0"] + 1) % 3, by="ann") == "relabeled"
    # relabeling to the label it already has is a confirmation
    assert queue.decide("r1", FP, "relabeled", given["r1"]) == "confirmed"
    with pytest.raises(InvalidTransitionError, match="already decided"):
        queue.decide("r0", FP, "skipped")
    with pytest.raises(InvalidTransitionError, match="needs the new label"):
        queue.decide("r2", FP, "relabeled")
    with pytest.raises(InvalidTransitionError, match="must be one of"):
        queue.decide("r2", FP, "pending")
    with pytest.raises(UnknownRowIdsError) as err:
        queue.decide("nope", FP, "skipped")
    assert err.value.row_ids == ["nope"]


def test_table_without_version_is_refused_untouched(sqlite_url):
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE tracin_relabel_queue (id INTEGER PRIMARY KEY, payload TEXT)")
        conn.exec_driver_sql("INSERT INTO tracin_relabel_queue (payload) VALUES ('theirs')")
    with pytest.raises(QueueSchemaError, match="not created by tracin-tasks"):
        SqlQueue(sqlite_url)
    with engine.begin() as conn:
        assert conn.exec_driver_sql("SELECT payload FROM tracin_relabel_queue").all() == [("theirs",)]
        assert not sa.inspect(conn).has_table("tracin_relabel_queue_meta")


@pytest.mark.parametrize("version, advice", [(SCHEMA_VERSION + 1, "Upgrade tracin-tasks"), (0, "new table")])
def test_other_schema_version_is_refused(queue_url, version, advice):
    SqlQueue(queue_url).deliver(batch())
    engine = sa.create_engine(queue_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE tracin_relabel_queue_meta SET value = '{version}' WHERE key = 'schema_version'")
    with pytest.raises(QueueSchemaError, match=advice) as err:
        SqlQueue(queue_url)
    assert f"schema version {version}" in str(err.value)
    with engine.begin() as conn:  # nothing was changed
        assert conn.exec_driver_sql("SELECT count(*) FROM tracin_relabel_queue").scalar() == 5
    engine.dispose()


def test_altered_table_is_refused(sqlite_url):
    SqlQueue(sqlite_url).deliver(batch())
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE tracin_relabel_queue DROP COLUMN note")
    with pytest.raises(QueueSchemaError, match=r"lacks the columns \['note'\]"):
        SqlQueue(sqlite_url)


@pytest.mark.parametrize("table", ["x; DROP TABLE y", "1abc", "a-b", "", "a" * 60])
def test_table_names_are_validated(sqlite_url, table):
    with pytest.raises(ConfigurationError, match="not a plain SQL name"):
        SqlQueue(sqlite_url, table=table)


def test_own_table_and_schema(postgres, pg_url):
    import psycopg

    with psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA labeling")
    queue = SqlQueue.from_uri(pg_url + "?table=digits_queue&schema=labeling")
    assert queue.deliver(batch()).delivered == 5
    assert SqlQueue(pg_url, table="digits_queue", schema="labeling").counts() == {"pending": 5}
    assert SqlQueue(pg_url).counts() == {}  # the default table is another queue


def test_unreachable_server_is_sink_unavailable(postgres):
    url = f"postgresql+psycopg://tracin:hunter2-secret@127.0.0.1:{postgres.port + 1}/nowhere"
    with pytest.raises(SinkUnavailableError) as err:
        SqlQueue(url, connect_timeout=2)
    assert "hunter2-secret" not in str(err.value)
    assert "***" in str(err.value)
