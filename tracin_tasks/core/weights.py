"""Read checkpoint weights from files someone else wrote: no code run, no size taken on trust.

A checkpoint file declares its tensors (names, shapes, dtypes) apart from the bytes that hold
them. An audit reads the declaration first, checks it, and only then touches the data:

* **what it declares against what it stores**: a tensor may not claim more elements than the
  bytes stored for it (an empty payload behind a 100000×100000 shape, a stride-0 view that
  would expand to gigabytes);
* **a ceiling**: at most ``max_parameters`` elements in all (:data:`DEFAULT_MAX_PARAMETERS`;
  the operator raises it for big models);
* **against the model**: with ``expected`` (the model's state_dict, built on the ``meta``
  device, so nothing real exists yet), names and shapes must match before any tensor is made.

Formats:

* ``torch.save`` files (zip format): the declaration is read with
  ``torch.load(map_location="meta", weights_only=True)``, which reads no tensor data; the data
  then with ``weights_only=True, mmap=True``, so the tensors are views of the mapped file until
  a model copies them. Pickled objects are refused (:class:`UnsafeCheckpointError`) unless the
  caller opts in with ``allow_pickle=True``; so are files in torch's pre-1.6 format, whose
  reader allocates every storage at its declared size before reading it.
* ``.pt2`` archives (``torch.export``, MLflow 3's default model format): a JSON description and
  raw bytes per weight, read by :func:`read_pt2_file` without ``torch.export.load`` (which can
  fall back to full unpickling).
* whole training checkpoints (Lightning's, or any ``{"state_dict": ..., "optimizer_states": ...}``
  bundle) whose pickle also names classes that ``weights_only=True`` refuses (hyper-parameters):
  :func:`read_full_checkpoint` reads the pickle with a restricted unpickler that never imports,
  calls or constructs what it names, checks the declarations the same way, and returns the
  state_dict's tensors and the rest as plain data (numbers, strings, lists, dicts).

Only torch and the standard library are used here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from tracin_tasks.core.inert_pickle import MAX_PICKLE_BYTES, Declared, InertUnpickler, plain
from tracin_tasks.exceptions import (
    CheckpointError,
    ModelTooLargeError,
    UnsafeCheckpointError,
)

logger = logging.getLogger(__name__)

#: Default ceiling on the elements (parameters and buffers) of a model or checkpoint: 10⁹, 4 GB in
#: float32. An operator auditing bigger models raises it (``max_parameters=``,
#: ``--max-parameters``, ``TRACIN_MAX_PARAMETERS``).
DEFAULT_MAX_PARAMETERS = 1_000_000_000

#: A ``.pt2`` weight description larger than this is not parsed (real ones are kilobytes).
_MAX_PT2_CONFIG_BYTES = 64 * 1024 * 1024

_DATA_RECORD = re.compile(r"^[^/]+/data/[^/]+$")

# torch.export's serialized ScalarType numbering (torch/_export/serde/schema.py)
_PT2_DTYPES = {
    1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64,
    6: torch.float16, 7: torch.float32, 8: torch.float64, 12: torch.bool, 13: torch.bfloat16,
}

PICKLE_ADVICE = (
    "Log state_dicts instead (torch.save(model.state_dict(), path), or "
    "tracin_tasks.mlflow.log_checkpoint), or pass allow_pickle=True (CLI: --allow-pickle) only if you "
    "trust whoever can write to this run."
)


def _name(path: str, what: str | None) -> str:
    return what or f"Checkpoint {os.path.basename(path)!r}"


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a (nested) mapping or list, with a dotted name."""
    if isinstance(obj, torch.Tensor):
        yield prefix or "<tensor>", obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def _span_elements(shape: tuple[int, ...], strides: tuple[int, ...], offset: int) -> int:
    """Elements of storage a strided view reaches (0 for an empty tensor)."""
    if any(s == 0 for s in shape):
        return 0
    if any(s < 0 for s in strides) or offset < 0:
        return -1
    return offset + 1 + sum((n - 1) * s for n, s in zip(shape, strides))


def check_declared_sizes(
    declared: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], int, torch.dtype, int]],
    *,
    max_parameters: int | None,
    what: str,
) -> int:
    """Refuse declarations that are implausible before any tensor is made; return the element count.

    Args:
        declared: name → (shape, strides, storage offset, dtype, bytes of data stored for it).
        max_parameters: the ceiling on elements in all (None: no ceiling).
        what: how to name the file in messages.
    """
    total = 0
    for name, (shape, strides, offset, dtype, stored) in declared.items():
        if any(int(s) < 0 for s in shape):
            raise CheckpointError(f"{what} declares tensor {name!r} with a negative size {tuple(shape)}; it is damaged.")
        numel = math.prod(int(s) for s in shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        span = _span_elements(tuple(shape), tuple(strides), int(offset))
        needed = max(numel, span) * itemsize
        if span < 0 or needed > stored:
            raise ModelTooLargeError(
                f"{what} declares tensor {name!r} of shape {tuple(shape)} ({numel * itemsize:,} bytes) but stores "
                f"{stored:,} bytes for it: the file claims more data than it holds (damaged, or crafted to make "
                "the reader allocate memory). Nothing was allocated; re-log the checkpoint from the training run."
            )
        total += numel
    if max_parameters is not None and total > max_parameters:
        raise ModelTooLargeError(
            f"{what} declares {total:,} elements, above this audit's ceiling of {max_parameters:,} "
            "(max_parameters). Nothing was allocated. If the model really is that large, raise the ceiling "
            "(max_parameters= / --max-parameters / TRACIN_MAX_PARAMETERS)."
        )
    return total


def _check_against(expected: Mapping[str, Any] | None, shapes: Mapping[str, tuple[int, ...]], step: Any,
                   model_name: str) -> None:
    if expected is None:
        return
    from tracin_tasks.core.engine import check_state_dict_fits

    check_state_dict_fits(expected, {k: torch.empty(s, device="meta") for k, s in shapes.items()}, step, model_name)


def _unwrap(state: Any) -> Any:
    """The common ``{"state_dict": ..., "epoch": ...}`` bundle → its state_dict."""
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        return state["state_dict"]
    return state


def _starts_like_a_pickle(path: str) -> bool:
    """Pickle protocols 2-5 begin with the PROTO opcode (0x80) and the protocol number."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def read_torch_file(
    path: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    expected: Mapping[str, Any] | None = None,
    max_parameters: int | None = DEFAULT_MAX_PARAMETERS,
    step: Any = None,
    model_name: str = "the model",
    what: str | None = None,
    advice: str = PICKLE_ADVICE,
) -> dict[str, torch.Tensor]:
    """The state_dict in a ``torch.save`` file, checked before its data is touched.

    Args:
        path: the file.
        allow_pickle: unpickle whatever the file holds (only for files you trust).
        expected: the model's state_dict (meta tensors will do); names and shapes must match.
        max_parameters: ceiling on the elements the file may declare (None: none).
        step, model_name: for the mismatch message.
        what: how to name the file in messages (default ``Checkpoint '<file name>'``).
        advice: what a refused pickle's message tells the user to do.

    Raises:
        UnsafeCheckpointError: the file holds pickled objects and ``allow_pickle`` is False.
        ModelTooLargeError: declared sizes beyond the stored data or the ceiling.
        StateDictMismatchError: names or shapes differ from ``expected``.
        CheckpointError: not a readable ``torch.save`` file.
    """
    path = os.fspath(path)
    label = _name(path, what)
    if not zipfile.is_zipfile(path):
        if allow_pickle:
            logger.warning("allow_pickle=True: unpickling %s", path)
            return _trusted_load(path, label)
        if _starts_like_a_pickle(path):
            raise UnsafeCheckpointError(
                f"{label} holds pickled Python objects (a plain pickle, or torch's pre-1.6 format), not only "
                f"tensors in torch.save's format; reading it would unpickle them, which can run code. {advice}"
            )
        raise CheckpointError(
            f"{label} is not a torch.save file (it may be truncated or damaged); re-log it from the training run."
        )
    try:
        declared_obj = torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{label} holds pickled Python objects, not only tensors; reading it would unpickle them, which "
                f"can run code. {advice}"
            ) from None
        logger.warning("allow_pickle=True: unpickling %s", path)
        return _trusted_load(path, label)
    except Exception as exc:  # damaged archive: torch raises RuntimeError and friends
        raise CheckpointError(
            f"{label} is not a readable torch.save file ({type(exc).__name__}: {_first_line(exc)}). It may be "
            "truncated or damaged; re-log it from the training run."
        ) from None
    state = _unwrap(declared_obj)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{label} holds a {type(state).__name__}, not a state_dict.")
    _check_torch_records(path, declared_obj, label, max_parameters)
    _check_against(expected, {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)},
                   step, model_name)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(
            f"{label} could not be read after its description was checked ({type(exc).__name__}: "
            f"{_first_line(exc)}); it may have changed on disk or be damaged."
        ) from None
    return dict(_unwrap(loaded))


def _check_torch_records(path: str, declared_obj: Any, label: str, max_parameters: int | None) -> None:
    """Declared storages (read on the meta device) against the data records of the zip."""
    with zipfile.ZipFile(path) as archive:
        records = [i for i in archive.infolist() if _DATA_RECORD.match(i.filename)]
    if any(i.compress_type != zipfile.ZIP_STORED for i in records):
        raise CheckpointError(f"{label} stores compressed tensor data, which torch.save never writes; it is not "
                              "a torch.save file. Re-log it from the training run.")
    storages: dict[int, int] = {}
    declared = {}
    for name, t in _tensors(declared_obj):
        storage = t.untyped_storage()
        storages.setdefault(storage._cdata, storage.nbytes())
        declared[name] = (tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype, storage.nbytes())
    stored = sorted(i.file_size for i in records)
    claimed = sorted(storages.values())
    if claimed != stored:
        raise ModelTooLargeError(
            f"{label} declares tensor storages of {sum(claimed):,} bytes in all but stores {sum(stored):,} bytes "
            "of tensor data: the file claims more data than it holds (damaged, or crafted to make the reader "
            "allocate memory). Nothing was allocated; re-log the checkpoint from the training run."
        )
    check_declared_sizes(declared, max_parameters=max_parameters, what=label)


# -- whole training checkpoints: the pickle read without importing or constructing what it names ---
def read_full_checkpoint(
    path: str | os.PathLike[str],
    *,
    tensors: bool = True,
    expected: Mapping[str, Any] | None = None,
    max_parameters: int | None = DEFAULT_MAX_PARAMETERS,
    step: Any = None,
    model_name: str = "the model",
    what: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state_dict of a whole training checkpoint, and the rest as plain data; nothing unpickled.

    For ``torch.save`` files whose pickle names classes ``weights_only=True`` refuses (Lightning's
    hyper-parameters, optimizer extras). :class:`~tracin_tasks.core.inert_pickle.InertUnpickler` reads
    it: no class or function it names is imported, called or constructed. Every declared storage is
    checked against the bytes of its zip record, the state_dict's tensors against ``max_parameters``
    and ``expected``, before any tensor exists; the tensors are then views of the memory-mapped file.
    ``tensors=False`` maps nothing and returns an empty state_dict. Other arguments as for
    :func:`read_torch_file`.

    Raises:
        ModelTooLargeError: a storage declared larger than its record, or sizes beyond the ceiling.
        StateDictMismatchError: names or shapes differ from ``expected``.
        CheckpointError: not a ``torch.save`` zip with tensors under ``state_dict``.

    Returns:
        ``(state_dict, rest)``: every other top-level entry as dicts, lists, numbers, strings and None
        (other tensors, and objects of other classes, are None; a dict subclass keeps its items).

    Example:
        >>> state, rest = read_full_checkpoint("epoch=3-step=400.ckpt", expected=meta_model.state_dict())
        >>> rest["optimizer_states"][0]["param_groups"][0]["lr"]
    """
    path, label = os.fspath(path), _name(os.fspath(path), what)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = {i.filename: i for i in archive.infolist()}
            pickles = [n for n in infos if re.fullmatch(r"[^/]+/data\.pkl", n)]
            if len(pickles) != 1 or infos[pickles[0]].file_size > MAX_PICKLE_BYTES:
                raise CheckpointError(f"{label} is not a torch.save file with one data.pkl of at most "
                                      f"{MAX_PICKLE_BYTES:,} bytes; re-log it from the training run.")
            prefix = pickles[0].rsplit("/", 1)[0]
            if f"{prefix}/byteorder" in infos and archive.read(f"{prefix}/byteorder").strip() != b"little":
                raise CheckpointError(f"{label} was saved on a big-endian machine; re-save it on a little-endian one.")
            unpickler = InertUnpickler(archive.read(pickles[0]))
            obj = unpickler.load()
    except CheckpointError:
        raise
    except Exception as exc:  # not a zip, a damaged pickle, declarations that are not sizes
        raise CheckpointError(f"{label} is not a readable torch.save file ({type(exc).__name__}: "
                              f"{_first_line(exc)}); re-log it from the training run.") from None
    records = {key: infos.get(f"{prefix}/data/{key}") for key in unpickler.storages}
    for key, storage in unpickler.storages.items():
        if records[key] is None or records[key].compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{label} declares tensor data {key!r} that it does not hold as torch.save "
                                  "stores it; it is damaged. Re-log it from the training run.")
        if storage.nbytes != records[key].file_size:
            raise ModelTooLargeError(
                f"{label} declares a tensor storage of {storage.nbytes:,} bytes but stores {records[key].file_size:,} "
                "bytes for it: the file does not hold what it claims (damaged, or crafted to make the reader allocate "
                "memory). Nothing was allocated; re-log the checkpoint from the training run.")
    state = _unwrap(obj)
    declared = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, Declared)} \
        if isinstance(state, Mapping) else {}
    if not declared:
        raise CheckpointError(f"{label} holds no tensors under 'state_dict'; it is not a training checkpoint.")
    check_declared_sizes({k: (d.size, d.stride, d.offset, d.storage.dtype, d.storage.nbytes)
                          for k, d in declared.items()}, max_parameters=max_parameters, what=label)
    _check_against(expected, {k: d.size for k, d in declared.items()}, step, model_name)
    try:
        rest = plain({k: v for k, v in obj.items() if k != "state_dict"}) if state is not obj else {}
    except ValueError as exc:
        raise CheckpointError(f"{label} {exc}; it is not a training checkpoint this audit reads.") from None
    if not tensors:
        return {}, rest
    size, views = os.path.getsize(path), {}
    whole = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)  # a private mapping, as mmap=True
    with open(path, "rb") as fh:
        for key in {d.storage.key for d in declared.values()}:
            fh.seek(records[key].header_offset)
            head = fh.read(30)  # the local header: its name and extra field come before the data
            start = records[key].header_offset + 30 + sum(struct.unpack("<HH", head[26:30])) if len(head) == 30 else size
            if head[:4] != b"PK\x03\x04" or start + records[key].file_size > size:
                raise CheckpointError(f"{label} has a damaged record for tensor data {key!r}; re-log it.")
            views[key] = whole[start:start + records[key].file_size]
    return {k: torch.empty(0, dtype=d.storage.dtype).set_(views[d.storage.key], d.offset, d.size, d.stride)
            for k, d in declared.items()}, rest


def _trusted_load(path: str, label: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{label} could not be unpickled ({type(exc).__name__}: {_first_line(exc)}).") from None
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    state = _unwrap(state)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{label} holds a {type(state).__name__}, not a state_dict.")
    return dict(state)


def _first_line(exc: BaseException) -> str:
    """What a library said, cut to its first line and without escape codes or its advice to
    disable safety checks (torch suggests ``weights_only=False``)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    line = m.group(1) if m else (text.splitlines()[0] if text else "")
    line = re.split(r"(?i)\s*(?:re-running|if you are seeing|this is an internal|do those steps)", line)[0]
    return line[:200]


def _as_int(value: Any) -> int:
    return int(value["as_int"]) if isinstance(value, dict) else int(value)


def read_pt2_file(
    path: str | os.PathLike[str],
    *,
    expected: Mapping[str, Any] | None = None,
    max_parameters: int | None = DEFAULT_MAX_PARAMETERS,
    step: Any = None,
    model_name: str = "the model",
    what: str | None = None,
) -> dict[str, torch.Tensor]:
    """The parameters and persistent buffers of a ``.pt2`` archive, checked before they are made.

    Raises:
        UnsafeCheckpointError: a weight is stored as a pickle.
        ModelTooLargeError: declared sizes beyond the stored bytes or the ceiling.
        StateDictMismatchError: names or shapes differ from ``expected``.
        CheckpointError: not a readable ``.pt2`` archive.
    """
    path = os.fspath(path)
    label = what or f"Weights file {os.path.basename(path)!r}"
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{label} is not a readable .pt2 archive: {exc}.") from exc
    with archive:
        infos = {i.filename: i for i in archive.infolist()}
        configs = [n for n in infos if n.endswith("data/weights/model_weights_config.json")]
        if not configs:
            raise CheckpointError(f"{label} has no weights description (data/weights/model_weights_config.json).")
        if infos[configs[0]].file_size > _MAX_PT2_CONFIG_BYTES:
            raise ModelTooLargeError(f"{label}'s weights description is {infos[configs[0]].file_size:,} bytes; "
                                     "real ones are kilobytes. Not read.")
        base = configs[0].rsplit("/", 1)[0]
        try:
            config = json.loads(archive.read(configs[0]))["config"]
            entries = {}
            for fqn, meta in config.items():
                if meta.get("use_pickle"):
                    raise UnsafeCheckpointError(
                        f"Weight {fqn!r} in {label} is stored as a pickle; reading it could run code from the file. "
                        "Re-log the model, or opt in with allow_pickle=True if you trust the run."
                    )
                tm = meta["tensor_meta"]
                dtype = _PT2_DTYPES.get(int(tm["dtype"]))
                if dtype is None:
                    raise CheckpointError(f"Weight {fqn!r} in {label} has an unsupported dtype code {tm['dtype']}.")
                member = f"{base}/{meta['path_name']}"
                if member not in infos:
                    raise CheckpointError(f"Weight {fqn!r} in {label} names {meta['path_name']!r}, which the archive "
                                          "does not hold.")
                entries[fqn] = (tuple(_as_int(s) for s in tm["sizes"]), tuple(_as_int(s) for s in tm["strides"]),
                                _as_int(tm.get("storage_offset", 0)), dtype, infos[member].file_size, member)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{label} has a malformed weights description ({type(exc).__name__}: {exc}).") from None
        check_declared_sizes({k: v[:5] for k, v in entries.items()}, max_parameters=max_parameters, what=label)
        _check_against(expected, {k: v[0] for k, v in entries.items()}, step, model_name)
        state: dict[str, torch.Tensor] = {}
        for fqn, (sizes, strides, offset, dtype, _, member) in entries.items():
            raw = archive.read(member)
            if math.prod(sizes) == 0:
                state[fqn] = torch.empty(sizes, dtype=dtype)
                continue
            itemsize = torch.empty((), dtype=dtype).element_size()
            flat = torch.frombuffer(bytearray(raw[: len(raw) - len(raw) % itemsize]), dtype=dtype)
            state[fqn] = torch.as_strided(flat, sizes, strides, offset).clone()
        return state
