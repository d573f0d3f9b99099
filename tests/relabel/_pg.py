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
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def find_bindir() -> Path | None:
    for candidate in [os.environ.get("TRACIN_PG_BINDIR"), *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        if candidate and (Path(candidate) / "initdb").exists() and (Path(candidate) / "postgres").exists():
            return Path(candidate)
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path and shutil.which("postgres") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One cluster on 127.0.0.1 with trust authentication, in its own temporary folder."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="tracin-pg-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log = self.root / "server.log"
        self.port = _free_port()
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

    def start(self, timeout: float = 60) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self._as_owner([str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                                "-k", str(self.sock), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                "-c", "max_connections=40"]),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                import psycopg

                with psycopg.connect(f"host=127.0.0.1 port={self.port} user=tracin dbname=postgres", connect_timeout=2):
                    return
            except Exception:
                time.sleep(0.3)
        raise RuntimeError(f"postgres did not accept connections in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGINT)  # "fast" shutdown
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

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
