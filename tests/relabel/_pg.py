"""A real PostgreSQL server for the queue tests: initdb into a temporary folder, start, stop by PID.

Debian's ``postgresql`` package (installed by ``make test``) puts the server binaries under
``/usr/lib/postgresql/<version>/bin``. PostgreSQL refuses to run as root, so as root the
cluster belongs to the ``postgres`` system user and the server runs as that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from _harness.procs import free_port, start_logged, stop_process, wait_for


def find_bindir() -> Path | None:
    for candidate in [os.environ.get("TRACIN_PG_BINDIR"), *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        if candidate and (Path(candidate) / "initdb").exists() and (Path(candidate) / "postgres").exists():
            return Path(candidate)
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path and shutil.which("postgres") else None


class PostgresServer:
    """One cluster on 127.0.0.1 with trust authentication, in its own temporary folder."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="tracin-pg-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._user = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")

    def _as_owner(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if self._user else cmd

    def _own(self) -> None:
        if self._user:
            for path in (self.root, self.sock):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def init(self) -> None:
        self.sock.mkdir()
        self._own()
        subprocess.run(
            self._as_owner([str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "tracin",
                            "--no-sync", "-E", "UTF8", "--locale=C"]),
            check=True, capture_output=True, timeout=180,
        )

    def start(self, timeout: float = 180) -> None:
        self.proc = start_logged(
            self._as_owner([str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                            "-k", str(self.sock), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                            "-c", "max_connections=40"]),
            env=os.environ, cwd=self.root, log=self.log, new_session=True,
        )
        wait_for(self._accepts, timeout, interval=0.3, what="postgres accepting connections", proc=self.proc,
                 log=self.log)

    def _accepts(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(f"host=127.0.0.1 port={self.port} user=tracin dbname=postgres", connect_timeout=2):
                return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=30, group=True, sig=signal.SIGINT)  # SIGINT: a "fast" shutdown

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=tracin dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # test-chosen name, not user input
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://tracin@127.0.0.1:{self.port}/{database}"

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
