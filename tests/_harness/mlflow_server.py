"""A real ``mlflow server`` for the tests, and a TCP gate that can cut clients off from it."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from pathlib import Path

from .env import BIN, server_env
from .procs import answers, free_port, kill_group, start_logged, stop_process, wait_for, wait_for_http

#: seconds a server may take to answer /health (generous: a loaded 2-core machine is slow)
START_TIMEOUT = 240


class MlflowServer:
    """``mlflow server`` on 127.0.0.1:<free port>, sqlite backend, artifacts under ``root``, leading
    its own process group; crashable and restartable on the same port.

    ``start`` returns at once, so the server boots while other work runs; ``wait_healthy`` waits
    for it. ``crash`` SIGKILLs the server and its workers (its process group) at once, like a
    machine going away; ``stop`` SIGTERMs it, then SIGKILLs whatever is left of its group.

    Args:
        root: its folder (databases, artifacts, one log per start).
        app_name: ``--app-name`` (``"basic-auth"``: MLflow's own authentication).
        env: variables added to its environment.
    """

    def __init__(self, root: Path, app_name: str | None = None, env: dict[str, str] | None = None):
        self.root = root
        self.app_name = app_name
        self.extra_env = dict(env or {})
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = root / "srv.db"
        self.artifacts = root / "artifacts"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @staticmethod
    def available() -> bool:
        """Whether an ``mlflow`` executable is next to this Python (mlflow-skinny has no server)."""
        return (BIN / "mlflow").exists()

    @property
    def log(self) -> Path:
        return self.root / f"server-{self.starts}.log"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination", str(self.artifacts),
               "--workers", "1", *(["--app-name", self.app_name] if self.app_name else [])]
        self.starts += 1
        self.proc = start_logged(cmd, env=server_env(**self.extra_env), cwd=self.root, log=self.log,
                                 new_session=True)

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        wait_for_http(f"{self.uri}/health", self.proc, self.log, timeout)

    def ensure_up(self) -> None:
        """Started (again, when a test crashed it) and healthy."""
        self.start()
        self.wait_healthy()

    def crash(self) -> None:
        """SIGKILL the server and its workers at once; returns once the port is free again."""
        if not self.running():
            return
        kill_group(self.proc)
        # the port is free again only once the workers are gone
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not answers(f"{self.uri}/health", timeout=1), timeout=30, interval=0.1)

    def stop(self) -> None:
        """SIGTERM (the server ends its workers), then SIGKILL whatever is left of its group."""
        if not self.running():
            return
        stop_process(self.proc, grace=20)
        kill_group(self.proc)

    def __enter__(self) -> MlflowServer:
        """Started (not waited for); stopped when the block ends."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TcpGate:
    """A TCP forwarder on 127.0.0.1 in front of a server: ``close()`` refuses new connections and
    cuts open ones (to a client, the server is gone), ``open()`` listens on the same port again.

    Used where a test needs the tracking server unreachable without paying for its restart.
    """

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.open()

    def open(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="tcp-gate", daemon=True).start()

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
