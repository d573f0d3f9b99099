"""Fixtures of the relabel tests: SQLite and a real PostgreSQL server (the digits run, Prefect's
test server and the environment come from the shared harness, tests/_harness)."""

from __future__ import annotations

import uuid

import pytest

from ._pg import PostgresServer, find_bindir


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
