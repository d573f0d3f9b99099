"""Fixtures of the relabel tests: SQLite and a real PostgreSQL server, a trained MLflow run, Prefect.

The environment (Prefect home, caches, telemetry off) comes from tests/orchestration/_support.py,
loaded by path like tests/flows does, so one training run serves every folder of a session.
"""

from __future__ import annotations

import importlib.util
import sys
import uuid
from pathlib import Path

import pytest

from ._pg import PostgresServer, find_bindir

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
    with pytest.MonkeyPatch.context() as mp:
        for key, value in support_module.quiet_env(support_module.STATE).items():
            mp.setenv(key, value)
        yield


@pytest.fixture(scope="session")
def support():
    return support_module


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on 127.0.0.1 for the session (skipped only where it is not installed)."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (make test installs Debian's postgresql package)")
    server = PostgresServer(bindir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_url(postgres):
    """A fresh database on the session's server."""
    return postgres.create_database(f"q_{uuid.uuid4().hex[:10]}")


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'queue.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def queue_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def digits_run():
    return support_module.digits_run()


@pytest.fixture(scope="session")
def prefect_api(request):
    """The session's Prefect test server (tests/conftest.py); the run trains while it starts."""
    trainer = support_module.train_in_background()
    url = request.getfixturevalue("prefect_harness")
    trainer.join()
    return url
