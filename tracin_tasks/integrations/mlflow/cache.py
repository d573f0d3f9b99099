"""The local download cache of one run's artifacts, safe against what a run's paths may say.

Files land under ``<cache dir>/mlflow/<server key>/<run id>/…`` (the server key hashes the
tracking URI *without* its password). A file is downloaded into a temporary folder named after
this host and process, then renamed into place, so it appears whole or not at all; folders that
a killed download left behind are removed by the next audit of the run. Artifact paths and ids
from a run are checked before they become file names.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import PurePosixPath

from tracin_tasks._checks import check_mlflow_id
from tracin_tasks.exceptions import CheckpointError, ConfigurationError

logger = logging.getLogger(__name__)

_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
_TMP_NAME = re.compile(r"^\.(?:download|fresh)-(?:(?P<host>[A-Za-z0-9.]+)-(?P<pid>\d+)-)?")
_STALE_SECONDS = 6 * 3600


def default_cache_dir() -> str:
    return os.environ.get("TRACIN_TASKS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tracin-tasks")


def safe_relpath(path: str) -> str:
    """Refuse artifact paths that could escape the cache folder (absolute, ``..``)."""
    p = PurePosixPath(path.replace("\\", "/"))
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or not p.parts:
        raise CheckpointError(f"Refusing artifact path {path!r}: it must be a relative path without '..'.")
    return str(p)


def safe_id(value: str, what: str) -> str:
    """Run and model ids become folder names in the cache: refuse anything but a plain name."""
    return check_mlflow_id(value, what)


def _tmp_prefix(kind: str) -> str:
    """Temporary download folders name their host and process, so a later audit can tell a dead one."""
    return f".{kind}-{_HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunCache:
    """Downloaded artifacts of one run.

    Args:
        client: the run's :class:`~tracin_tasks.integrations.mlflow.client.TrackingClient`.
        run_id: the run (already checked with :func:`safe_id`).
        cache_dir: the cache's root (default ``$TRACIN_TASKS_CACHE_DIR`` or ``~/.cache/tracin-tasks``).
    """

    def __init__(self, client, run_id: str, cache_dir: str | os.PathLike[str] | None = None):
        self.client = client
        self.run_id = run_id
        self.root = os.fspath(cache_dir) if cache_dir else default_cache_dir()
        self._cleaned = False

    def path(self, *parts: str) -> str:
        # keyed by the URI without its password: no secret-derived folder names, same cache after a rotation
        server = hashlib.sha256(self.client.display_uri.encode()).hexdigest()[:12]
        return os.path.join(self.root, "mlflow", server, self.run_id, *parts)

    def download(self, artifact_path: str, model_id: str | None = None, version: str | None = None) -> str:
        """Download one artifact file into the cache, atomically, unless it is already there.

        ``version`` (the training data's recorded fingerprint) becomes part of the cached name,
        so data re-logged under the same artifact path with other content is fetched again.
        """
        rel = safe_relpath(artifact_path)
        if model_id is not None:
            safe_id(model_id, "LoggedModel id")
        if version is not None and not re.fullmatch(r"[0-9a-f]{8,64}", version):
            raise ConfigurationError(f"version {version!r} must be a hex digest.")
        prefix = (["models", model_id] if model_id else []) + ([f"@{version}"] if version else [])
        final = self.path(*prefix, *rel.split("/"))
        if os.path.isfile(final):
            return final
        os.makedirs(os.path.dirname(final), exist_ok=True)
        self.clean_stale()
        tmp = tempfile.mkdtemp(prefix=_tmp_prefix("download"), dir=os.path.dirname(final))
        try:
            local = self._download_into(rel, tmp, model_id)
            os.replace(local, final)  # appears complete or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    @contextlib.contextmanager
    def fresh(self, artifact_path: str) -> Iterator[str]:
        """Download one artifact file of the run to a private temporary folder, removed afterwards."""
        rel = safe_relpath(artifact_path)
        os.makedirs(self.path(), exist_ok=True)
        self.clean_stale()
        tmp = tempfile.mkdtemp(prefix=_tmp_prefix("fresh"), dir=self.path())
        try:
            yield self._download_into(rel, tmp, None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _download_into(self, rel: str, tmp: str, model_id: str | None) -> str:
        """Download ``rel`` (of the run, or of a LoggedModel) into the folder ``tmp``; its local path."""
        import mlflow

        from mlflow.exceptions import MlflowException

        client = self.client
        if model_id:
            location = client.call("get_logged_model", lambda: client.mlflow.get_logged_model(model_id))
            uri = location.artifact_location.rstrip("/") + "/" + rel
            fetch = lambda: mlflow.artifacts.download_artifacts(  # noqa: E731
                artifact_uri=uri, dst_path=tmp, tracking_uri=client.uri
            )
        else:
            fetch = lambda: client.mlflow.download_artifacts(self.run_id, rel, tmp)  # noqa: E731
        try:
            local = client.call(f"download {rel}", fetch)
        except (MlflowException, FileNotFoundError) as exc:
            raise CheckpointError(f"Could not download {rel!r} from run {self.run_id}: {exc}") from exc
        if not os.path.isfile(local):
            raise CheckpointError(f"Artifact {rel!r} of run {self.run_id} is not a file.")
        return local

    def clean_stale(self) -> None:
        """Remove temporary download folders that a killed process left in this run's cache: those of
        a process of this host that no longer runs, and any older than six hours."""
        if self._cleaned:
            return
        self._cleaned = True
        for folder, dirs, _ in os.walk(self.path()):
            for name in list(dirs):
                m = _TMP_NAME.match(name)
                if not m:
                    continue
                dirs.remove(name)
                path = os.path.join(folder, name)
                try:
                    age = time.time() - os.path.getmtime(path)
                except OSError:
                    continue
                dead = m.group("host") == _HOST and not _pid_alive(int(m.group("pid")))
                if dead or age > _STALE_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
                    logger.info("removed %s, left by an interrupted download", path)


#: a run's JSON specs are a few hundred bytes; a bigger one is not downloaded
MAX_SPEC_BYTES = 1024 * 1024


def read_small_json(cache: RunCache, artifact_path: str):
    """Download a small JSON artifact afresh (never from the cache: a run's specs may be re-logged to
    fix them) and parse it; ``json.JSONDecodeError`` when it is not JSON.

    A file over 1 MiB (:data:`MAX_SPEC_BYTES`) is refused unread.
    """
    import json

    rel = safe_relpath(artifact_path)
    folder = rel.rsplit("/", 1)[0] if "/" in rel else None
    client = cache.client
    listed = {f.path: f.file_size for f in client.call("list_artifacts", lambda: client.mlflow.list_artifacts(
        cache.run_id, folder)) if not f.is_dir}
    if (listed.get(rel) or 0) > MAX_SPEC_BYTES:
        raise ConfigurationError(
            f"{rel} of run {cache.run_id} is {listed[rel]:,} bytes; a spec is a small JSON file, so the audit "
            "does not read it. Re-log it with tracin_tasks.mlflow."
        )
    with cache.fresh(rel) as local:
        if os.path.getsize(local) > MAX_SPEC_BYTES:
            raise ConfigurationError(f"{rel} of run {cache.run_id} is larger than a spec can be; not read.")
        with open(local, encoding="utf-8") as fh:
            return json.load(fh)
