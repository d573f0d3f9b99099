"""A real Label Studio server for the sink tests: its own virtual environment, 127.0.0.1, state in a temp folder.

Label Studio 1.23 cannot share the project's virtual environment (it pins python-json-logger 2.0.4;
Prefect needs >= 2.0.7), so the server runs from a venv of its own: ``$TRACIN_LABEL_STUDIO_VENV``, or
``<repo>/.state/label-studio/venv`` as ``make label-studio`` creates it. Without one the tests skip.

A first start migrates a fresh SQLite database (25-75 s here), so the first session initialises a
*template* data folder once (``.state/label-studio/template``, built in a temporary folder and
renamed into place, rebuilt when the server version changes) with a known admin user and a legacy
API token; every session then starts from a copy of it in a few seconds.

Run this file to build the template ahead of the tests: ``python tests/relabel/_labelstudio.py``.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

if __name__ == "__main__":  # run as a script: the harness is in the folder above
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness.procs import free_port, stop_process, start_logged, tail, wait_for_http  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = REPO_ROOT / ".state" / "label-studio"
TEMPLATE_DIR = STATE_DIR / "template"
VENV_ENV = "TRACIN_LABEL_STUDIO_VENV"

ADMIN_EMAIL = "admin@tracin.test"
ADMIN_PASSWORD = "tracin-test-password"
#: the admin's legacy API token (a test server on 127.0.0.1 only); DRF keys are at most 40 characters
TOKEN = "tracintest0123456789abcdef0123456789abcd"

# everything that could point the server at another configuration, database or Python
_DROPPED_PREFIXES = ("LABEL_STUDIO_", "HEARTEX_", "DJANGO_", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
                     "PREFECT_", "MLFLOW_", "SENTRY_")


def find_venv() -> tuple[Path | None, str]:
    """The server's venv, or ``None`` and why not (the skip reason)."""
    configured = os.environ.get(VENV_ENV)
    venv = Path(configured) if configured else STATE_DIR / "venv"
    if (venv / "bin" / "label-studio").exists():
        return venv, ""
    where = f"${VENV_ENV}={configured}" if configured else f"{venv} (or set ${VENV_ENV})"
    return None, (f"no Label Studio server venv at {where}; create it with `make label-studio` "
                  "(python3 -m venv .state/label-studio/venv && .state/label-studio/venv/bin/pip install "
                  "'label-studio==1.23.2')")


def server_version(venv: Path) -> str:
    found = glob.glob(str(venv / "lib" / "python*" / "site-packages" / "label_studio-*.dist-info"))
    return Path(found[0]).name[len("label_studio-"):-len(".dist-info")] if found else "unknown"


def server_env(venv: Path, root: Path, data_dir: Path) -> dict[str, str]:
    """The server's environment: state under ``root``, no analytics, error reports or version checks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_PREFIXES)}
    home = root / "home"
    env.update({
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_CONVERTER_DOWNLOAD_RESOURCES": "false",
        # an empty DSN turns Sentry off (the default sends errors to Label Studio's Sentry)
        "LABEL_STUDIO_SENTRY_DSN": "",
        "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
        "LABEL_STUDIO_LOG_LEVEL": "WARNING",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def ensure_template(venv: Path, timeout: float = 900.0) -> Path:
    """The initialised data folder (built once per server version; atomic, safe with concurrent sessions)."""
    version = server_version(venv)
    marker = TEMPLATE_DIR / "template.json"
    if marker.exists():
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("version") == version and info.get("token") == TOKEN:
            return TEMPLATE_DIR
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".template-", dir=STATE_DIR))
    try:
        data = build / "data"
        log = build / "init.log"
        started = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.run(
                [str(venv / "bin" / "label-studio"), "init", "--quiet", "--no-browser",
                 "--username", ADMIN_EMAIL, "--password", ADMIN_PASSWORD, "--user-token", TOKEN,
                 "--enable-legacy-api-token"],
                cwd=build, env=server_env(venv, build, data), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, timeout=timeout,
            )
        if proc.returncode != 0 or not (data / "label_studio.sqlite3").exists():
            raise RuntimeError(f"label-studio init failed (exit {proc.returncode}):\n{tail(log)}")
        shutil.rmtree(build / "home", ignore_errors=True)  # per-run state, not part of the template
        (build / "template.json").write_text(json.dumps({
            "version": version, "token": TOKEN, "admin": ADMIN_EMAIL,
            "init_seconds": round(time.monotonic() - started, 1),
        }))
        stale = None
        if TEMPLATE_DIR.exists():  # another version's template: move it aside, then swap
            stale = STATE_DIR / f".stale-{uuid.uuid4().hex}"
            try:
                TEMPLATE_DIR.rename(stale)
            except OSError:
                stale = None
        try:
            build.rename(TEMPLATE_DIR)
        except OSError:  # another session finished first; use theirs
            shutil.rmtree(build, ignore_errors=True)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    return TEMPLATE_DIR


class LabelStudioServer:
    """One server on 127.0.0.1 from a copy of the template, in its own process group."""

    def __init__(self, venv: Path, template: Path, root: Path):
        self.venv = venv
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = TOKEN
        self.admin_email = ADMIN_EMAIL
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(template / "data", self.data)

    def start(self, timeout: float = 240.0) -> None:
        started = time.monotonic()
        self.proc = start_logged(
            [str(self.venv / "bin" / "label-studio"), "start", "--no-browser",
             "--internal-host", "127.0.0.1", "--port", str(self.port)],
            env=server_env(self.venv, self.root, self.data), cwd=self.root, log=self.log, new_session=True,
        )
        try:
            wait_for_http(f"{self.url}/health", self.proc, self.log, timeout)
        except TimeoutError as exc:
            self.stop()
            raise RuntimeError(f"Label Studio did not answer on {self.url}/health within {timeout:.0f} s "
                               f"(it moves to another port when {self.port} is taken)") from exc
        self.start_seconds = time.monotonic() - started

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, grace=20, group=True)  # start_new_session: the server leads its own group

    def client(self):
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=self.token, timeout=30)


if __name__ == "__main__":
    found, reason = find_venv()
    if found is None:
        sys.exit(reason)
    t0 = time.monotonic()
    path = ensure_template(found)
    print(f"Label Studio {server_version(found)} template ready at {path} ({time.monotonic() - t0:.1f} s)")
