"""Processes the tests start: free ports, output in files, waiting for them, stopping them.

Every process is stopped by the id these tests got when they started it (or by its process
group, which it leads), never by name.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path | None, n: int = 4000) -> str:
    """The last ``n`` characters of a log file."""
    try:
        return path.read_text(errors="replace")[-n:] if path is not None else "<no log>"
    except OSError:
        return "<no log>"


def start_logged(cmd: Sequence[str], *, env: Mapping[str, str], cwd: Path, log: Path, err: Path | None = None,
                 new_session: bool = False) -> subprocess.Popen:
    """``cmd`` with its output in ``log`` (and its errors in ``err``, or in ``log`` too): files, not
    pipes, which would stall it while nobody reads. ``new_session``: it leads its own process group."""
    with contextlib.ExitStack() as files:
        out = files.enter_context(open(log, "wb"))
        errors = files.enter_context(open(err, "wb")) if err is not None else subprocess.STDOUT
        return subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdout=out, stderr=errors,
                                stdin=subprocess.DEVNULL, start_new_session=new_session)


def start_cli(args: Sequence[str], env: Mapping[str, str], logs: Path, *, cwd: Path | None = None,
              name: str = "cli") -> subprocess.Popen:
    """``python -m tracin_tasks.cli ARGS`` in its own process group (so :func:`kill_group` ends it and
    whatever it spawned), output in ``logs/NAME.out`` and ``logs/NAME.err``, working in ``cwd`` (``logs``)."""
    logs.mkdir(parents=True, exist_ok=True)
    return start_logged([sys.executable, "-m", "tracin_tasks.cli", *args], env=env, cwd=cwd or logs,
                        log=logs / f"{name}.out", err=logs / f"{name}.err", new_session=True)


def cli_output(logs: Path, name: str = "cli") -> tuple[str, str]:
    """(stdout, stderr) of a CLI started by :func:`start_cli`."""
    return (logs / f"{name}.out").read_text(errors="replace"), (logs / f"{name}.err").read_text(errors="replace")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition",
             proc: subprocess.Popen | None = None, log: Path | None = None) -> T:
    """Poll ``predicate`` until it returns something true, and return that. TimeoutError after
    ``timeout`` seconds; RuntimeError as soon as ``proc`` (the process meant to make it true) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{Path(str(proc.args[0])).name} exited with {proc.returncode} "
                               f"before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f}s" + (f":\n{tail(log)}" if log else ""))
        time.sleep(interval)


def answers(url: str, timeout: float = 3) -> bool:
    """Whether ``url`` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, http.client.HTTPException):
        return False


def wait_for_http(url: str, proc: subprocess.Popen, log: Path | None, timeout: float, interval: float = 0.25) -> None:
    """Wait until ``url`` answers 200 (the server ``proc`` started, logging to ``log``)."""
    wait_for(lambda: answers(url), timeout, interval, what=f"an answer from {url}", proc=proc, log=log)


def stop_process(proc: subprocess.Popen, grace: float = 15, *, group: bool = False,
                 sig: signal.Signals = signal.SIGTERM) -> None:
    """``sig`` to a process these tests started (to its process group when ``group``), then SIGKILL
    after ``grace`` seconds."""
    if proc.poll() is not None:
        return

    def send(s: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, s)
            else:
                proc.send_signal(s)

    send(sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(timeout=30)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group a process these tests started leads (it and anything it spawned)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
