"""The core imports no orchestration or tracking library, so it runs on a bare GPU box."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

HEAVY = ("prefect", "mlflow", "great_expectations", "dask", "sqlalchemy", "distributed", "ray")

# Runs each statement in turn and prints, after each, the HEAVY modules in sys.modules.
_SCRIPT = """
import json, sys
heavy = set(json.loads(sys.argv[2]))
seen = []
for statement in json.loads(sys.argv[1]):
    exec(statement)
    seen.append(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
print(json.dumps(seen))
"""

_CONTROL = next((m for m in ("sqlalchemy", "dask", "ray") if importlib.util.find_spec(m) is not None), None)

# ``import tracin_tasks.core`` runs tracin_tasks/__init__.py first, so one fresh interpreter
# checked after each statement covers both imports (torch's import dominates the run time).
STATEMENTS = ["import tracin_tasks.core", "import tracin_tasks", "from tracin_tasks import Checkpoint, TracIn, exceptions"]


@pytest.fixture(scope="module")
def loaded() -> list[list[str]]:
    statements = STATEMENTS + ([f"import {_CONTROL}"] if _CONTROL else [])
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(statements), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("i,statement", list(enumerate(STATEMENTS)), ids=["core", "package", "names"])
def test_import_loads_nothing_heavy(loaded, i, statement):
    assert loaded[i] == [], f"after {statement!r}"


def test_the_check_sees_a_heavy_import(loaded):
    """Control: the same interpreter reports a heavy package once one is imported."""
    if _CONTROL is None:
        pytest.skip("none of the heavy packages is installed here")
    assert _CONTROL in loaded[-1]
