"""One conformance suite over every relabel sink that runs here without a separate server venv:
the SQL queue on SQLite and on a real PostgreSQL server, and the file drop (CSV and parquet).
The Label Studio sink has the same checks against a real Label Studio in test_labelstudio.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tracin_tasks.exceptions import DataError
from tracin_tasks.integrations.relabel import FlaggedBatch, RelabelSink, open_sink
from tracin_tasks.integrations.relabel.sql_queue import SqlQueue

FP = "a" * 64


def issues_table(n: int = 12, flagged: int = 5, seed: int = 0, id_prefix: str = "r") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    score = np.sort(rng.random(n))[::-1]
    return pd.DataFrame({
        "row_id": [f"{id_prefix}{i}" for i in range(n)],
        "label": rng.integers(0, 3, n),
        "self_influence": score * 2,
        "score": score,
        "rank": np.arange(1, n + 1),
        "flagged": np.arange(n) < flagged,
        "reason": "top 40%",
        "suggested_label": rng.integers(0, 3, n),
    })


def batch(audit_key: str = "audit1", **kw) -> FlaggedBatch:
    table = issues_table(**kw)
    return FlaggedBatch.from_issues(table, run_id="run1", fingerprint=FP, audit_key=audit_key,
                                    features=np.arange(len(table) * 4, dtype=float).reshape(len(table), 4))


@pytest.fixture(params=["sqlite", "postgres", "file-csv", "file-parquet"])
def sink_uri(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'q.db'}"
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    fmt = request.param.split("-")[1]
    return f"{(tmp_path / 'drop').as_uri()}?format={fmt}"


def decide_all(sink_uri: str, sink: RelabelSink, decisions: dict[str, tuple[str, int | None]], tmp=None) -> None:
    """Record decisions the way each sink's reviewers do: through the queue, or a decisions file."""
    if isinstance(sink, SqlQueue):
        for row_id, (status, label) in decisions.items():
            sink.decide(row_id, FP, status, label, by="reviewer@example.com")
    else:
        frame = pd.DataFrame([{"row_id": r, "status": s, "label": lab, "decided_by": "team"}
                              for r, (s, lab) in decisions.items()])
        frame.to_csv(sink._path("decisions", FP, "csv"), index=False)


def test_is_a_relabel_sink(sink_uri):
    sink = open_sink(sink_uri)
    assert isinstance(sink, RelabelSink)
    assert "://" in sink.name
    sink.close()


def test_delivery_is_idempotent_by_row_id(sink_uri):
    sink = open_sink(sink_uri)
    first = sink.deliver(batch())
    assert first.delivered == 5
    again = sink.deliver(batch())  # a retried task or a re-run audit
    assert again.delivered == 0
    assert again.updated + again.unchanged == 5
    later = sink.deliver(batch(audit_key="audit2", flagged=7))  # a later audit flags two more rows
    assert later.delivered == 2
    if isinstance(sink, SqlQueue):
        rows = sink.rows(fingerprint=FP)
        assert sorted(rows["row_id"]) == sorted(f"r{i}" for i in range(7))
        assert rows.set_index("row_id").loc["r0", "times_flagged"] == 2
    else:
        frame = pd.read_csv(sink._path("flagged", FP, "csv")) if sink.format == "csv" else \
            pd.read_parquet(sink._path("flagged", FP, "parquet"))
        assert sorted(frame["row_id"].astype(str)) == sorted(f"r{i}" for i in range(7))
    sink.close()


def test_decisions_come_back(sink_uri):
    sink = open_sink(sink_uri)
    b = batch()
    sink.deliver(b)
    given = {r.row_id: r.given_label for r in b.rows}
    new_label = (given["r0"] + 1) % 3
    decide_all(sink_uri, sink, {"r0": ("relabeled", new_label), "r1": ("confirmed", None), "r2": ("skipped", None)})
    got = {d.row_id: d for d in sink.decisions(FP)}
    assert set(got) == {"r0", "r1", "r2"}
    assert got["r0"].status == "relabeled" and got["r0"].label == new_label
    assert got["r1"].status == "confirmed"
    assert got["r2"].status == "skipped"
    assert sink.decisions("b" * 64) == []  # another data version has none
    sink.close()


def test_handled_rows_survive_a_rerun(sink_uri):
    """Re-running the audit never resets what a person decided."""
    sink = open_sink(sink_uri)
    sink.deliver(batch())
    decide_all(sink_uri, sink, {"r0": ("relabeled", 2), "r3": ("confirmed", None)})
    sink.deliver(batch(audit_key="audit-rerun"))
    got = {d.row_id: d.status for d in sink.decisions(FP)}
    assert got == {"r0": "relabeled", "r3": "confirmed"}
    if isinstance(sink, SqlQueue):
        counts = sink.counts(FP)
        assert counts == {"relabeled": 1, "confirmed": 1, "pending": 3}
    sink.close()


def test_hostile_text_round_trips(sink_uri):
    """Row ids and reasons are data: stored verbatim, never interpreted (bound parameters)."""
    table = issues_table(n=3, flagged=3)
    table["row_id"] = ["x'); DROP TABLE tracin_relabel_queue; --", "<script>alert(1)</script>", "ünï\"cøde"]
    table["reason"] = "'; DELETE FROM x; --"
    b = FlaggedBatch.from_issues(table, run_id="run1", fingerprint=FP, audit_key="k")
    sink = open_sink(sink_uri)
    sink.deliver(b)
    sink.deliver(b)
    if isinstance(sink, SqlQueue):
        rows = sink.rows(fingerprint=FP)
        assert sorted(rows["row_id"]) == sorted(table["row_id"])
        assert set(rows["reason"]) == {"'; DELETE FROM x; --"}
    else:
        path = sink._path("flagged", FP, sink.format)
        frame = pd.read_csv(path, dtype={"row_id": str}) if sink.format == "csv" else pd.read_parquet(path)
        assert sorted(frame["row_id"]) == sorted(table["row_id"])
    sink.close()


def test_file_drop_rejects_bad_decisions(tmp_path):
    sink = open_sink(f"{(tmp_path / 'drop').as_uri()}?format=csv")
    sink.deliver(batch())
    pd.DataFrame([{"row_id": "r0", "status": "relabeled", "label": None}]).to_csv(
        sink._path("decisions", FP, "csv"), index=False)
    with pytest.raises(DataError, match="relabeled but has no new label"):
        sink.decisions(FP)
    pd.DataFrame([{"row_id": "r0", "status": "maybe", "label": 1}]).to_csv(sink._path("decisions", FP, "csv"), index=False)
    with pytest.raises(DataError, match="must be one of"):
        sink.decisions(FP)
