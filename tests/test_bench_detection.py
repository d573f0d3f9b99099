"""benchmarks/bench_detection.py: --quick runs end to end, and its audit table is the flow's.

The smoke test checks the shape of the JSON, that every recall and AUROC is a share, and that
TracIn finds flipped digits far better than chance (an assertion that fails if scoring breaks,
e.g. ranks the wrong way round or scores the wrong rows). No timing is checked here: the
subprocess timeout only guards against a hang.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench_detection.py")
pytestmark = pytest.mark.skipif(not os.path.exists(BENCH), reason="benchmarks/ is not part of this checkout")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_detection", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_detection"] = module  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules["bench_detection"])
    return sys.modules["bench_detection"]


def test_bench_detection_quick(tmp_path):
    pytest.importorskip("cleanlab")
    pytest.importorskip("sklearn")
    out_json, out_png = tmp_path / "detection.json", tmp_path / "recall.png"
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, BENCH, "--quick", "--json", str(out_json), "--plot", str(out_png)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"bench_detection.py --quick failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "QUICK MODE" in proc.stdout
    assert "Default audit vs the best alternative" in proc.stdout
    assert out_png.stat().st_size > 10_000

    payload = json.loads(out_json.read_text())
    assert payload["quick"] is True
    methods = set(payload["methods"])
    assert {"default", "tracin_all", "tracin_last", "tracin_final", "tracin_every_k", "final_loss", "final_margin",
            "aum", "cleanlab"} <= methods
    # digits and wine, both flip types, both regimes, one seed each
    keys = {(s["dataset"], s["flip"], s["regime"]) for s in payload["summary"]}
    assert keys == {(d, f, r) for d in ("digits", "wine") for f in ("uniform", "confusable") for r in ("short", "long")}
    assert len(payload["cases"]) == 8
    for case in payload["cases"]:
        assert case["flipped"] == round(0.1 * case["rows"])
        assert 0.0 <= case["fit_flipped"] <= 1.0 and 0.0 <= case["fit_clean"] <= 1.0
        assert set(case["methods"]) == methods
        for name, m in case["methods"].items():
            assert set(m["recall"]) == {"0.05", "0.1", "0.2"}, name
            assert all(0.0 <= v <= 1.0 for v in m["recall"].values()), (name, m["recall"])
            # inspecting more rows never finds fewer flips
            assert m["recall"]["0.05"] <= m["recall"]["0.1"] <= m["recall"]["0.2"], (name, m["recall"])
            assert 0.0 <= m["auroc"] <= 1.0, name
            assert m["seconds"] >= 0.0
            assert m["extra_trainings"] == (5 if name == "cleanlab" else 0)
        cl = case["cleanlab_find_label_issues"]
        assert 0.0 <= cl["precision"] <= 1.0 and 0.0 <= cl["recall"] <= 1.0
    for s in payload["summary"]:
        for m in s["methods"].values():
            assert len(m["curve"]) == len(payload["curve_shares"])
            assert all(0.0 <= v <= 1.0 for v in m["curve"])

    # random order finds 20% of the flips in the top 20% (AUROC 0.5); TracIn must do far better
    digits = {(s["flip"], s["regime"]): s["methods"] for s in payload["summary"] if s["dataset"] == "digits"}
    for flip, regime in digits:
        tracin = digits[(flip, regime)]["tracin_all"]
        assert tracin["recall@0.2"]["mean"] >= 0.6, (flip, regime, tracin["recall@0.2"])
        assert tracin["auroc"]["mean"] >= 0.8, (flip, regime, tracin["auroc"])
        assert digits[(flip, regime)]["default"]["recall@0.1"]["mean"] >= 0.4, (flip, regime)


def test_audit_table_matches_the_flow_aggregation(tmp_path):
    """The benchmark's per-row table is what aggregate_cells + write_scores give the policy."""
    pytest.importorskip("prefect")
    import torch

    from tracin_tasks import Checkpoint, TracIn
    from tracin_tasks.orchestration.plan import AuditSettings, plan_cells
    from tracin_tasks.orchestration.store import ResultsStore, aggregate_cells

    bench = load_bench()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(23, 5), torch.randint(0, 3, (23,))
    checkpoints = []
    for step, lr in ((1, 0.3), (2, 0.2), (3, 0.05)):
        state = {k: v + 0.1 * step * torch.randn_like(v) for k, v in model.state_dict().items()}
        checkpoints.append(Checkpoint(state_dict=state, learning_rate=lr, step=step))
    data = torch.utils.data.TensorDataset(x, y)
    passes = list(TracIn(model, checkpoints).checkpoint_passes(data, batch_size=8))
    labels, row_id = y.numpy(), np.arange(100, 123)
    table = bench.audit_scores_table(passes, row_id, labels)

    settings = AuditSettings(run_id="bench", shard_size=10)  # three shards per checkpoint
    plan = plan_cells(settings, [{"step": c.step, "learning_rate": c.learning_rate, "kind": "state_dict",
                                  "location": f"mem/{c.step}"} for c in checkpoints], len(y), "fingerprint")
    store = ResultsStore(str(tmp_path / "store"))
    by_step = {p.step: p for p in passes}
    for cell in plan.cells:
        rows = slice(cell.row_start, cell.row_stop)
        p = by_step[cell.step]
        store.write_cell(plan.audit_key, cell, {k: getattr(p, k)[rows] for k in
                                                ("squared_norm", "loss", "margin", "predicted", "confidence")})
    agg = aggregate_cells(store, plan)
    np.testing.assert_allclose(table["self_influence"], agg["self_influence"], rtol=1e-12)
    np.testing.assert_allclose(table["aum"], agg["aum"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(table["loss_final"], agg["loss_final"], rtol=1e-12)
    np.testing.assert_array_equal(table["predicted_label"], agg["predicted"])
    np.testing.assert_allclose(table["predicted_confidence"], agg["confidence"], rtol=1e-12)
    assert table["row_id"].tolist() == row_id.tolist() and table["label"].tolist() == labels.tolist()


def _z(x):
    x = np.asarray(x, dtype=np.float64)
    return (x - x.mean()) / x.std()


def test_default_score_adds_the_final_loss_only_where_the_label_is_not_fitted():
    """The default the benchmark chose: z(log SI) − z(AUM) + z(log max(final loss, log 2))."""
    import pandas as pd

    from tracin_tasks.core.flagging import FlagPolicy, compute_score, find_label_issues

    si = np.array([0.5, 3.0, 1.0, 2.0, 0.1, 0.7])
    aum = np.array([2.0, -1.0, 0.5, 3.0, 1.0, 1.5])
    loss = np.array([0.01, 2.5, 0.3, 0.05, 1.2, 0.6])  # rows 1 and 4 are given less than even odds
    frame = pd.DataFrame({"row_id": range(6), "label": [0, 1, 0, 1, 0, 1], "self_influence": si, "aum": aum,
                          "loss_final": loss})
    issues, summary, info = find_label_issues(frame, FlagPolicy(top_k=2, top_fraction=None))
    assert info["score"] == "self_influence_aum_loss"
    assert "final loss" in summary["policy"]
    expected = _z(np.log(si)) - _z(aum) + _z(np.log(np.maximum(loss, np.log(2))))
    got = issues.sort_values("row_id")["score"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # every fitted row (loss below log 2) gets the same final-loss term
    extra = got - (_z(np.log(si)) - _z(aum))
    assert np.ptp(extra[[0, 2, 3, 5]]) < 1e-12 and extra[1] > extra[4] > extra[0]
    assert issues.loc[issues.flagged, "row_id"].tolist() == np.argsort(-expected)[:2].tolist()
    # the raw self-influence stays in the output
    assert issues.sort_values("row_id")["self_influence"].tolist() == si.tolist()

    # when the final model fits every label the final loss adds nothing
    fitted = frame.assign(loss_final=loss * 0.1)
    np.testing.assert_allclose(
        compute_score(si, aum, "self_influence_aum_loss", fitted["loss_final"].to_numpy()),
        compute_score(si, aum, "self_influence_aum"), rtol=1e-12)
    # a table without the final loss (older audits, Python callers) falls back to SI + AUM
    _, _, info = find_label_issues(frame.drop(columns="loss_final"), FlagPolicy())
    assert info["score"] == "self_influence_aum"
    with pytest.raises(ValueError, match="loss_final"):
        compute_score(si, aum, "self_influence_aum_loss", None)
