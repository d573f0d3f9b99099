"""Read the weights of a ``torch.export`` (``.pt2``) archive without unpickling anything.

``torch.export.load`` falls back to ``torch.load(weights_only=False)`` for some payloads, so an
audit does not call it on files from a run. MLflow 3's default ``pytorch`` model format stores
each weight as raw bytes plus a JSON description (dtype, sizes, strides); this reads exactly that.
Weights stored as pickles are refused.
"""

from __future__ import annotations

import json
import zipfile

import torch

from tracin_tasks.exceptions import CheckpointError, UnsafeCheckpointError

# torch.export's serialized ScalarType numbering (torch/_export/serde/schema.py)
_DTYPES = {
    1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64,
    6: torch.float16, 7: torch.float32, 8: torch.float64, 12: torch.bool, 13: torch.bfloat16,
}


def _as_int(value) -> int:
    return int(value["as_int"]) if isinstance(value, dict) else int(value)


def read_pt2_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Return the parameters and persistent buffers stored in a ``.pt2`` archive."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path!r} is not a readable .pt2 archive: {exc}.") from exc
    with archive:
        names = archive.namelist()
        configs = [n for n in names if n.endswith("data/weights/model_weights_config.json")]
        if not configs:
            raise CheckpointError(f"{path!r} has no weights description (data/weights/model_weights_config.json).")
        base = configs[0].rsplit("/", 1)[0]
        config = json.loads(archive.read(configs[0]))["config"]
        state: dict[str, torch.Tensor] = {}
        for fqn, meta in config.items():
            if meta.get("use_pickle"):
                raise UnsafeCheckpointError(
                    f"Weight {fqn!r} in {path!r} is stored as a pickle; reading it could run code from "
                    "the file. Re-log the model, or opt in with allow_pickle=True if you trust the run."
                )
            tm = meta["tensor_meta"]
            dtype = _DTYPES.get(int(tm["dtype"]))
            if dtype is None:
                raise CheckpointError(f"Weight {fqn!r} in {path!r} has an unsupported dtype code {tm['dtype']}.")
            raw = archive.read(f"{base}/{meta['path_name']}")
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.zeros(0, dtype=dtype)
            sizes = [_as_int(s) for s in tm["sizes"]]
            strides = [_as_int(s) for s in tm["strides"]]
            offset = _as_int(tm.get("storage_offset", 0))
            if not raw:
                state[fqn] = torch.zeros(sizes, dtype=dtype)
            else:
                state[fqn] = torch.as_strided(flat, sizes, strides, offset).clone()
        return state
