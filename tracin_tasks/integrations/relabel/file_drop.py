"""A folder of parquet or CSV files, for labeling teams with their own tooling.

Per dataset version (fingerprint) the folder holds:

* ``flagged_<fp>.parquet`` (or ``.csv``): the flagged rows, one per row id, most suspicious first.
  In CSV, a text cell that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``...)
  starts with ``'``; reading the file back (and a decisions CSV) removes it again.
  A re-delivery merges by row id (score and rank refreshed, ``first_flagged_at`` kept), so the
  file never holds a row twice. Written to a temporary name and renamed.
* ``decisions_<fp>.csv`` or ``.parquet``, written by the team: ``row_id``, ``status``
  (``relabeled`` / ``confirmed`` / ``skipped``), ``label`` (the corrected label when relabeled),
  and optionally ``decided_by``, ``note``. ``tracin-tasks relabel apply`` reads it.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pandas as pd

from tracin_tasks._io import atomic_write
from tracin_tasks._text import from_csv_frame, write_csv
from tracin_tasks.exceptions import ConfigurationError, DataError, SinkUnavailableError
from tracin_tasks.integrations.relabel.base import Decision, Delivery, FlaggedBatch, utcnow

_KEY = 16


class FileDrop:
    """Flagged rows as files in a folder (see the module docstring)."""

    def __init__(self, folder: str, format: str = "parquet"):
        if format not in ("parquet", "csv"):
            raise ConfigurationError(f"File drop format must be 'parquet' or 'csv', got {format!r}.")
        self.folder = os.path.abspath(folder)
        self.format = format
        self.name = f"file://{self.folder}?format={format}"

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> FileDrop:
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ConfigurationError(f"File drop URI {uri!r} names a host; use file:///absolute/folder.")
        query = dict(parse_qsl(parts.query))
        return cls(unquote(parts.path), format=options.pop("format", query.get("format", "parquet")))

    def _path(self, kind: str, fingerprint: str, fmt: str) -> str:
        return os.path.join(self.folder, f"{kind}_{fingerprint[:_KEY]}.{fmt}")

    def _read(self, path: str) -> pd.DataFrame:
        if path.endswith(".csv"):
            return from_csv_frame(pd.read_csv(path, dtype={"row_id": str}))
        return pd.read_parquet(path)

    def deliver(self, batch: FlaggedBatch) -> Delivery:
        path = self._path("flagged", batch.fingerprint, self.format)
        now = utcnow().isoformat()
        new = pd.DataFrame([{
            "row_id": r.row_id, "rank": r.rank, "score": r.score, "self_influence": r.self_influence,
            "given_label": r.given_label, "suggested_label": r.suggested_label, "reason": r.reason,
            "run_id": batch.run_id, "audit_key": batch.audit_key, "audit_run_id": batch.audit_run_id,
            "fingerprint": batch.fingerprint, "first_flagged_at": now, "last_flagged_at": now,
            "features": json.dumps(r.features) if r.features is not None else None,
        } for r in batch.rows])
        try:
            os.makedirs(self.folder, exist_ok=True)
            old = self._read(path) if os.path.exists(path) else None
            updated = 0
            if old is not None and len(old):
                old["row_id"] = old["row_id"].astype(str)
                seen = set(old["row_id"])
                first = dict(zip(old["row_id"], old["first_flagged_at"]))
                if len(new):
                    updated = int(new["row_id"].isin(seen).sum())
                    new["first_flagged_at"] = [first.get(rid, now) for rid in new["row_id"]]
                merged = pd.concat([old[~old["row_id"].isin(set(new["row_id"]) if len(new) else set())], new])
            else:
                merged = new
            merged = merged.sort_values(["rank", "row_id"], kind="stable").reset_index(drop=True)
            # in CSV, no cell a spreadsheet would run as a formula
            atomic_write(path, (lambda tmp: write_csv(merged, tmp)) if self.format == "csv" else merged)
        except OSError as exc:
            raise SinkUnavailableError(f"Cannot write the file drop {self.folder}: {exc.strerror or exc}.") from None
        return Delivery(self.name, delivered=len(new) - updated, updated=updated, unchanged=0)

    def decisions(self, fingerprint: str) -> list[Decision]:
        for fmt in ("csv", "parquet"):
            path = self._path("decisions", fingerprint, fmt)
            if os.path.exists(path):
                break
        else:
            return []
        frame = self._read(path)
        missing = {"row_id", "status"} - set(frame.columns)
        if missing:
            raise DataError(f"{path} lacks the columns {sorted(missing)}; it needs row_id, status and label.")
        out = []
        for i, rec in enumerate(frame.to_dict("records")):
            label = rec.get("label")
            try:
                label = None if label is None or pd.isna(label) else int(label)
            except (TypeError, ValueError):
                raise DataError(f"{path}, line {i + 2}: label {label!r} is not a class number.") from None
            try:
                out.append(Decision(
                    row_id=str(rec["row_id"]), status=str(rec["status"]).strip().lower(), label=label,
                    decided_by=None if pd.isna(rec.get("decided_by", None)) else str(rec.get("decided_by")),
                    note=None if pd.isna(rec.get("note", None)) else str(rec.get("note")),
                ))
            except DataError as exc:
                raise DataError(f"{path}, line {i + 2}: {exc}") from None
        return out

    def close(self) -> None:
        pass
