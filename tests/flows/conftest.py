"""Environment and fixtures of the flow tests: a Prefect test server, a trained MLflow run.

The environment (Prefect home, caches, telemetry off) is set when this file is imported, before
any test module imports Prefect: see ``tests/orchestration/_support.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_NAME = "_tracin_orchestration_test_support"


def _load_support():
    if _NAME not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "orchestration" / "_support.py"
        spec = importlib.util.spec_from_file_location(_NAME, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[_NAME]


support_module = _load_support()


@pytest.fixture(scope="module", autouse=True)
def _our_environment():
    """Our state folders in os.environ while our tests run (another folder's conftest may set its own)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in support_module.quiet_env(support_module.STATE).items():
            mp.setenv(key, value)
        yield


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with support_module.one_torch_thread():
        yield


@pytest.fixture(scope="session")
def support():
    return support_module


@pytest.fixture(scope="session")
def digits_run():
    """One real MLflow training run (digits, MLP, 3 epochs) in a sqlite store under tmp."""
    return support_module.digits_run()


@pytest.fixture(scope="session")
def prefect_api(request):
    """The session's Prefect test server (tests/conftest.py); the run trains while it starts."""
    trainer = support_module.train_in_background()
    url = request.getfixturevalue("prefect_harness")
    trainer.join()
    return url
