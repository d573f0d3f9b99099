"""An audit's output folder: one finished audit visible at a time, and one writer at a time.

A reader of ``<output>/`` sees the whole of one finished audit — its scores, issues, report and
Data Docs — or, before the first audit finishes, nothing; never one audit's scores beside
another's report. Each audit writes into a folder of its own and is then switched in by
replacing one symbolic link, which is atomic::

    <output>/scores.parquet   -> .audit/current/scores.parquet    stable names, links made once
    <output>/issues.parquet   -> .audit/current/issues.parquet
    <output>/report.html, gx, *.png, audit.json                   likewise
    <output>/.audit/current   -> <version>                         the switch
    <output>/.audit/<version>/                                     one audit's files; audit.json last
    <output>/.audit/lock                                           held (flock) by the audit writing
    <output>/cells/, <output>/outbox/                              results store and outbox (shared)

``audit.json`` (the manifest) names the audit (key, run, time) and the sha256 of each of its
files; :func:`find_finished_audit` checks it, so a reader asking for a given audit never gets
another one, nor a file changed after the audit finished.

Two audits into one folder take turns: the second waits for the lock (``TRACIN_OUTPUT_LOCK_TIMEOUT``
seconds, default 6 hours, then :class:`OutputFolderBusyError`), then reuses the first's cells. An
audit killed part-way leaves an unfinished version folder that nothing links to; the next audit
of the folder removes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from tracin_tasks._env import env_number
from tracin_tasks._io import atomic_write
from tracin_tasks.exceptions import (
    OutputFolderBusyError,
    OutputWriteError,
    UnfinishedAuditError,
)

logger = logging.getLogger(__name__)

AUDIT_DIR = ".audit"
CURRENT = "current"
MANIFEST = "audit.json"
MANIFEST_FORMAT = 1
LOCK_TIMEOUT_ENV = "TRACIN_OUTPUT_LOCK_TIMEOUT"
_DEFAULT_LOCK_TIMEOUT = 6 * 3600.0
#: names an earlier release wrote straight into the output folder (moved aside once, see publish)
_LEGACY_NAMES = ("scores.parquet", "issues.parquet", "report.html", "gx", MANIFEST)
#: names in the output folder that belong to no single audit
_SHARED_NAMES = {AUDIT_DIR, "cells", "outbox"}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _lock_timeout() -> float:
    return env_number(LOCK_TIMEOUT_ENV, _DEFAULT_LOCK_TIMEOUT)


def _replace_link(target: str, link: str) -> None:
    """Point ``link`` at ``target`` in one atomic step (a new link renamed over the old name)."""
    tmp = os.path.join(os.path.dirname(link), f".{os.path.basename(link)}.{uuid.uuid4().hex}.link")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class OutputFolder:
    """The output folder of audits (see the module docstring).

    Args:
        path: the folder; created when an audit starts writing.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.path.abspath(os.fspath(path))
        self.audits = os.path.join(self.path, AUDIT_DIR)

    # -- one writer at a time -----------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, timeout: float | None = None, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the folder's lock; wait for another audit that holds it (``flock``: released when a
        holder exits or is killed, so a crashed audit never leaves the folder locked)."""
        timeout = _lock_timeout() if timeout is None else timeout
        try:
            os.makedirs(self.audits, exist_ok=True)
            fd = os.open(os.path.join(self.audits, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputWriteError(
                f"Cannot use the output folder {self.path!r}: {exc.strerror or exc}. Choose an output folder this "
                "process can write (output_dir= / --output)."
            ) from exc
        try:
            deadline = time.monotonic() + timeout
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                if not told and on_wait is not None:
                    on_wait(f"another audit is writing to {self.path}; waiting for it to finish")
                    told = True
                if time.monotonic() >= deadline:
                    raise OutputFolderBusyError(
                        f"Another audit has been writing to {self.path} for more than {timeout:g} s. Wait for it, "
                        f"choose another output folder (--output), or raise {LOCK_TIMEOUT_ENV}."
                    )
                time.sleep(0.2)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- versions -------------------------------------------------------------------------------
    def current(self) -> str | None:
        """The folder of the finished audit the output folder shows, or None."""
        link = os.path.join(self.audits, CURRENT)
        if not os.path.islink(link):
            return None
        target = os.path.realpath(link)
        return target if os.path.isfile(os.path.join(target, MANIFEST)) else None

    def new_version(self, audit_key: str) -> str:
        """A fresh folder for one audit's outputs (call while holding :meth:`lock`); folders left by
        interrupted audits are removed first."""
        self._collect_garbage()
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        version = os.path.join(self.audits, f"{stamp}-{audit_key[:16]}-{uuid.uuid4().hex[:8]}")
        try:
            os.makedirs(version)
        except OSError as exc:
            raise OutputWriteError(
                f"Cannot write to the output folder {self.path!r}: {exc.strerror or exc}. Choose an output folder "
                "this process can write (output_dir= / --output)."
            ) from exc
        return version

    def discard(self, version: str) -> None:
        """Remove an unfinished version (its audit failed); the folder still shows the previous audit."""
        if os.path.dirname(os.path.abspath(version)) == self.audits and version != self.current():
            shutil.rmtree(version, ignore_errors=True)

    def publish(self, version: str, facts: dict[str, Any]) -> dict[str, Any]:
        """Finish ``version``: write its manifest, then switch the output folder to it.

        Every step keeps the folder showing one whole audit: names the new audit adds are linked
        before the switch (they resolve to nothing until then), the switch is one rename, and links
        to names the new audit lacks are removed after it (they resolve to nothing by then).

        Args:
            version: the folder from :meth:`new_version`, holding the audit's files.
            facts: what identifies the audit (``audit_key``, ``run_id``, ...), stored in the manifest.

        Returns:
            The manifest.
        """
        version = os.path.abspath(version)
        names = sorted(n for n in os.listdir(version) if not n.startswith(".") and n != MANIFEST)
        manifest = {
            "format": MANIFEST_FORMAT,
            **facts,
            "version": os.path.basename(version),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": {n: {"sha256": _sha256(os.path.join(version, n)), "bytes": os.path.getsize(os.path.join(version, n))}
                      for n in names if os.path.isfile(os.path.join(version, n))},
            "folders": [n for n in names if os.path.isdir(os.path.join(version, n))],
        }
        try:
            atomic_write(os.path.join(version, MANIFEST), json.dumps(manifest, indent=1))
            self._move_legacy_outputs_aside()
            for name in [*names, MANIFEST]:
                link = os.path.join(self.path, name)
                target = os.path.join(AUDIT_DIR, CURRENT, name)
                if not (os.path.islink(link) and os.readlink(link) == target):
                    _replace_link(target, link)
            _replace_link(os.path.basename(version), os.path.join(self.audits, CURRENT))  # the switch
            for name in os.listdir(self.path):
                link = os.path.join(self.path, name)
                if name not in _SHARED_NAMES and os.path.islink(link) and not os.path.exists(link):
                    os.remove(link)  # a name the new audit does not have
        except OSError as exc:
            raise OutputWriteError(
                f"Could not publish the audit in {self.path!r}: {exc.strerror or exc}. The folder still shows the "
                "previous audit; the cells are kept, so a re-run only aggregates and reports."
            ) from exc
        self._collect_garbage()
        return manifest

    def _move_legacy_outputs_aside(self) -> None:
        """Outputs an earlier release wrote straight into the folder (no manifest) go into a version
        folder of their own, so they are never shown beside a new audit's files."""
        legacy = [n for n in os.listdir(self.path)
                  if (n in _LEGACY_NAMES or n.endswith(".png")) and not os.path.islink(os.path.join(self.path, n))]
        if not legacy:
            return
        aside = os.path.join(self.audits, f"legacy-{uuid.uuid4().hex[:8]}")
        os.makedirs(aside)
        for name in legacy:
            os.replace(os.path.join(self.path, name), os.path.join(aside, name))
        logger.warning("moved the outputs of an earlier audit without a manifest (%s) to %s", ", ".join(legacy), aside)

    def _collect_garbage(self) -> None:
        """Keep the current audit and the one before it (a reader may still be reading it); remove
        other finished versions and every unfinished one. Call while holding the lock."""
        if not os.path.isdir(self.audits):
            return
        current = self.current()
        finished = []
        for name in os.listdir(self.audits):
            path = os.path.join(self.audits, name)
            if name in (CURRENT, "lock") or name.startswith(".") or not os.path.isdir(path) or os.path.islink(path):
                if name.startswith(".") and name.endswith(".link"):
                    with contextlib.suppress(OSError):
                        os.remove(path)  # a switch interrupted before its rename
                continue
            if path == current:
                continue
            if os.path.isfile(os.path.join(path, MANIFEST)):
                finished.append((os.path.getmtime(os.path.join(path, MANIFEST)), path))
            else:
                shutil.rmtree(path, ignore_errors=True)  # unfinished: its audit was interrupted
        for _, path in sorted(finished)[:-1]:
            shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(self.path):
            if name.startswith(".") and name.endswith(".link"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.path, name))


def read_manifest(folder: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def verify_audit(folder: str, manifest: dict[str, Any]) -> None:
    """Every file the manifest names is there with its recorded content."""
    for name, meta in (manifest.get("files") or {}).items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or _sha256(path) != meta.get("sha256"):
            raise UnfinishedAuditError(
                f"{path} is not the file audit {manifest.get('audit_key')} wrote (missing or changed since). "
                "Re-run the audit."
            )


def find_finished_audit(output_dir: str, audit_key: str | None = None) -> tuple[str, dict[str, Any]]:
    """The folder and manifest of a finished audit in ``output_dir``, checked against its manifest.

    Args:
        output_dir: an audit output folder (or a version folder inside one).
        audit_key: the audit wanted; None for whichever the folder shows now.

    Raises:
        UnfinishedAuditError: no finished audit there, or not the one asked for.
    """
    output = OutputFolder(output_dir)
    candidates = []
    if os.path.isfile(os.path.join(output.path, MANIFEST)):
        candidates.append(os.path.realpath(os.path.join(output.path, MANIFEST)).rsplit(os.sep, 1)[0])
    if audit_key is not None and os.path.isdir(output.audits):
        candidates += sorted((os.path.join(output.audits, n) for n in os.listdir(output.audits)
                              if n not in (CURRENT, "lock") and not n.startswith(".")), reverse=True)
    for folder in candidates:
        manifest = read_manifest(folder)
        if manifest is None or (audit_key is not None and manifest.get("audit_key") != audit_key):
            continue
        verify_audit(folder, manifest)
        return folder, manifest
    what = f"finished audit {audit_key}" if audit_key else "finished audit"
    raise UnfinishedAuditError(
        f"{output.path} holds no {what} (no {MANIFEST} naming it): the audit has not finished, failed, or was "
        "replaced by later ones. Run the audit (again)."
    )
