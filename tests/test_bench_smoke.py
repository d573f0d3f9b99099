"""benchmarks/bench_core.py --quick runs end to end and prints its table (no timing checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_core.py")


@pytest.mark.skipif(not os.path.exists(BENCH), reason="benchmarks/ is not part of this checkout")
def test_bench_core_quick(tmp_path):
    out_json = tmp_path / "bench.json"
    # one intra-op thread: at these tiny sizes it is the fastest setting, and it keeps the smoke
    # test quick on a machine whose cores are busy with other tests
    cmd = [sys.executable, BENCH, "--quick", "--threads", "1", "--json", str(out_json)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, f"bench_core.py --quick failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    text = proc.stdout
    for expected in (
        "device       : CPU",
        "torch        :",
        "threads: 1 intra-op",
        "[mlp] MLP 40→128→64→10",
        "[cnn] CNN 8×8",
        "training epoch (SGD step per batch)",
        "tracin_tasks, all layers",
        'tracin_tasks, layers="last"',
        "torch.func vmap(grad), all layers",
        "Captum TracInCP (hooks), all layers",
        "Captum TracInCPFast (final fc weight)",
        "Peak memory of tracin_tasks all-layer self-influence",
        "Targets",
        "QUICK MODE",
    ):
        assert expected in text, f"{expected!r} missing from the benchmark's output:\n{text}"
    payload = json.loads(out_json.read_text())
    assert payload["quick"] is True
    assert set(payload["models"]) == {"mlp", "cnn"}
    for kind, res in payload["models"].items():
        assert res["epoch_s"] > 0 and res["tracin_all_s"] > 0 and res["tracin_last_s"] > 0, kind
    assert {v["what"].split(":")[0] for v in payload["verdicts"]} == {"mlp", "cnn"}
    assert set(payload["memory"]) == {"mlp", "cnn"}
