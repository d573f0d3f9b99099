"""The results store: partial scores of finished cells, on a local folder or any fsspec URL.

Layout under the store's root::

    <audit_key>/plan.json                       the plan the cells belong to
    <audit_key>/cells/<cell name>.npz           one file per finished cell

A cell's file is written under a temporary name and renamed into place, so a cell that crashed
half-way (killed worker, full disk) leaves no file that looks finished; readers ignore anything
that is not a complete ``.npz``. Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import json
import posixpath
import uuid
import zipfile
from typing import Any

import numpy as np

from tracin_tasks.core.passes import PASS_FIELDS, PassSums
from tracin_tasks.exceptions import CellsMissingError, ConfigurationError, ResultsStoreError
from tracin_tasks.orchestration.plan import AuditPlan, Cell

CELL_FIELDS = PASS_FIELDS  # a stored cell is one pass over one shard


class ResultsStore:
    """Finished cells of audits, keyed by audit and cell.

    Args:
        uri: a local folder or an fsspec URL (``s3://bucket/prefix``, ``gcs://...``) that every
            worker can reach.
    """

    def __init__(self, uri: str):
        import fsspec

        if not uri:
            raise ConfigurationError("results_uri must be a folder or an fsspec URL.")
        self.uri = uri
        try:
            self.fs, self.root = fsspec.core.url_to_fs(uri)
        except (ValueError, ImportError) as exc:
            raise ConfigurationError(f"Cannot open the results store {uri!r}: {exc}") from exc

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def cell_path(self, audit_key: str, cell: Cell) -> str:
        return self._path(audit_key, "cells", f"{cell.name}.npz")

    def check_writable(self) -> None:
        """Fail early, with a clear message, when the store cannot be written."""
        probe = self._path(f".write-probe-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(probe, "wb") as fh:
                fh.write(b"ok")
            self.fs.rm(probe)
        except OSError as exc:
            raise ResultsStoreError(
                f"The results store {self.uri!r} is not writable ({exc}). Choose a folder or URL this "
                "process and every worker can write (results_uri= / --results-uri)."
            ) from exc

    def save_plan(self, plan: AuditPlan) -> None:
        self._write_bytes(self._path(plan.audit_key, "plan.json"), json.dumps(plan.to_dict(), indent=1).encode())

    def has(self, audit_key: str, cell: Cell) -> bool:
        return self.fs.exists(self.cell_path(audit_key, cell))

    def missing(self, plan: AuditPlan) -> list[Cell]:
        folder = self._path(plan.audit_key, "cells")
        try:
            present = {posixpath.basename(p) for p in self.fs.ls(folder, detail=False)}
        except FileNotFoundError:
            present = set()
        return [c for c in plan.cells if f"{c.name}.npz" not in present]

    def write_cell(self, audit_key: str, cell: Cell, arrays: dict[str, np.ndarray]) -> str:
        n = cell.row_stop - cell.row_start
        for key in CELL_FIELDS:
            if key not in arrays or len(arrays[key]) != n:
                raise ValueError(f"cell {cell.name}: {key} must hold {n} values")
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(arrays[k]) for k in CELL_FIELDS})
        path = self.cell_path(audit_key, cell)
        self._write_bytes(path, buf.getvalue())
        return path

    def read_cell(self, audit_key: str, cell: Cell) -> dict[str, np.ndarray]:
        """The stored arrays of one cell; anything that is not exactly a cell's arrays is refused.

        Never unpickles: an object array in the file (which only a pickle can hold) is an error.
        """
        path = self.cell_path(audit_key, cell)
        n = cell.row_stop - cell.row_start
        try:
            with self.fs.open(path, "rb") as fh:
                with np.load(io.BytesIO(fh.read()), allow_pickle=False) as data:
                    arrays = {k: data[k] for k in CELL_FIELDS}
            bad = [k for k, v in arrays.items() if v.ndim != 1 or len(v) != n]
            if bad:
                raise ValueError(f"{', '.join(bad)} do not hold {n} values")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ResultsStoreError(
                f"The stored cell {path!r} ({cell.label}) of audit {audit_key} is not a readable cell result "
                f"({type(exc).__name__}: {exc}). Delete it and re-run the audit: only that cell is computed again."
            ) from exc
        return arrays

    def _write_bytes(self, path: str, payload: bytes) -> None:
        """Write to a temporary name next to ``path``, then rename into place."""
        folder = posixpath.dirname(path)
        # the temporary name does not end in .npz/.json, so nothing mistakes it for a finished file
        tmp = posixpath.join(folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            self.fs.makedirs(folder, exist_ok=True)
            with self.fs.open(tmp, "wb") as fh:
                fh.write(payload)
            self.fs.mv(tmp, path)
        except OSError as exc:
            try:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
            except OSError:
                pass
            raise ResultsStoreError(f"Could not write {path!r} to the results store {self.uri!r}: {exc}") from exc


def aggregate_cells(store: ResultsStore, plan: AuditPlan) -> dict[str, Any]:
    """Combine every cell of a plan into per-row arrays; refuses while any cell is missing.

    Returns:
        The sums of :class:`tracin_tasks.core.passes.PassSums`: ``self_influence`` (Σ_c η_c ‖g‖²),
        ``aum`` (mean margin over checkpoints), ``loss_final``, ``predicted`` and ``confidence``
        at the last checkpoint, all in row order.
    """
    missing = store.missing(plan)
    if missing:
        listed = ", ".join(c.label for c in missing[:10])
        raise CellsMissingError(
            f"{len(missing)} of {len(plan.cells)} cells of audit {plan.audit_key} have no stored result "
            f"({listed}{' ...' if len(missing) > 10 else ''}). Run the audit again: finished cells are "
            "skipped and only these are computed."
        )
    sums = PassSums(plan.n_rows, (c.step for c in plan.cells))
    for cell in plan.cells:
        sums.add(cell.step, cell.learning_rate, slice(cell.row_start, cell.row_stop),
                 store.read_cell(plan.audit_key, cell))
    return sums.result()
