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


def torch_save_declaring(sizes: tuple[int, ...], strides: tuple[int, ...], numel: int, payload: bytes, *,
                         name: str = "0.weight", wrap=None) -> bytes:
    """A torch.save zip whose one tensor ``name`` declares ``sizes``/``strides`` over a storage of
    ``numel`` float32 elements, with ``payload`` as the stored bytes (written by hand: torch.save
    cannot be made to lie). ``wrap(state_dict)`` gives the object pickled instead of the bare
    state_dict (e.g. a Lightning-shaped ``{"state_dict": ..., "global_step": 1}``)."""
    import collections
    import io
    import pickle
    import zipfile

    import torch
    from torch._utils import _rebuild_tensor_v2

    class StorageRef:
        pass

    ref = StorageRef()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is ref else None

    class Tensor:
        def __reduce__(self):
            return (_rebuild_tensor_v2, (ref, 0, sizes, strides, False, collections.OrderedDict()))

    state = collections.OrderedDict([(name, Tensor())])
    data = io.BytesIO()
    Pickler(data, protocol=2).dump(wrap(state) if wrap else state)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data.getvalue())
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/data/0", payload)
        zf.writestr("archive/version", "3\n")
    return out.getvalue()
