"""torchvision's ResNet-18 is scored exactly (tests/core/_resnet18_exact.py against the float64 loop).

torchvision's wheels are built against one torch release each, so where torchvision cannot load
beside the installed torch (this project's CPU build of torch 2.13 and PyPI's torchvision), the
check runs in the vision environment that ``make vision`` builds (``TRACIN_VISION_VENV``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_resnet18_exact.py")
ROOT = Path(__file__).resolve().parents[2]


def _python_with_torchvision() -> str | None:
    candidates = [sys.executable]
    venv = os.environ.get("TRACIN_VISION_VENV")
    if venv:
        candidates.append(str(Path(venv) / "bin" / "python"))
    for python in candidates:
        if not Path(python).exists():
            continue
        probe = subprocess.run([python, "-c", "import torchvision.models"], capture_output=True, timeout=300)
        if probe.returncode == 0:
            return python
    return None


def test_resnet18_matches_the_float64_loop():
    python = _python_with_torchvision()
    if python is None:
        pytest.skip("torchvision does not load beside this torch build and no vision environment is set "
                    "(make vision; TRACIN_VISION_VENV)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([python, str(SCRIPT)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] == 4
    assert result["max_rel_error"] < 1e-9, result
    # every ResNet layer is Conv2d, BatchNorm2d (eval, followed by ReLU(inplace=True)) or Linear
    assert result["fallback"] == [], result
    assert not result["warnings"], result
