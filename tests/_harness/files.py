"""What an audit left on disk: its results store's cells, its output folder, secrets in any file."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from urllib.parse import quote

import numpy as np

#: the arrays every stored cell holds
CELL_FIELDS = ("squared_norm", "loss", "margin", "predicted", "confidence")


def cell_files(results: Path) -> dict[str, tuple[int, str]]:
    """name → (mtime_ns, sha256) of every finished cell file under a results folder."""
    return {str(p.relative_to(results)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(results.rglob("*.npz"))}


def assert_complete_cells(results: Path) -> int:
    """Every ``*.npz`` under ``results`` is a whole cell (all fields, one length); returns how many."""
    from tracin_tasks.orchestration.plan import Cell

    n = 0
    for plan_path in results.glob("*/plan.json"):
        plan = json.loads(plan_path.read_text())
        cells = [Cell.from_dict(c) for c in plan["cells"]]
        sizes = {f"{c.name}.npz": c.row_stop - c.row_start for c in cells}
        for path in (plan_path.parent / "cells").glob("*.npz"):
            assert path.name in sizes, f"{path.name} is not a cell of the plan"
            with np.load(path, allow_pickle=False) as data:
                assert sorted(data.files) == sorted(CELL_FIELDS), path
                for key in CELL_FIELDS:
                    assert len(data[key]) == sizes[path.name], (path, key)
            n += 1
    return n


def leftovers(output_dir: Path) -> list[str]:
    """Files a failed audit left under ``output_dir`` that are, or look like, results: everything
    but a plan (``<results>/<audit key>/plan.json``) and the folder's lock (``.audit/lock``), which
    mark nothing as finished."""
    if not output_dir.exists():
        return []
    return sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*")
                  if p.is_file() and p.name != "plan.json" and p.relative_to(output_dir).as_posix() != ".audit/lock")


def files_containing(root: Path, needle: bytes, user: str = "auditor") -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle``, URL-quoted, base64, or as the
    base64 of a Basic ``Authorization`` header for ``user``."""
    forms = {needle, quote(needle.decode()).encode(), base64.b64encode(needle),
             base64.b64encode(user.encode() + b":" + needle)}
    hits = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(f in data for f in forms):
                hits.append(str(path))
    return hits
