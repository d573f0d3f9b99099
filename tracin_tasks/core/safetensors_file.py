"""Read ``.safetensors`` files someone else wrote: the header checked in full before any tensor is made.

A safetensors file is an 8-byte little-endian header length, a JSON header (name → dtype, shape,
``data_offsets`` into the data section) and the raw bytes. Nothing in it is pickled, but the header
is still untrusted: it may declare a 100000×100000 tensor over 4 bytes, offsets past the end of
the file, or a header of gigabytes. So, before anything is allocated:

* the header length is capped (:data:`MAX_HEADER_BYTES`) and must fit in the file;
* every entry must name a known dtype, a shape of non-negative integers, and offsets inside the
  data section spanning exactly ``numel × itemsize`` bytes, no two entries overlapping;
* the elements in all must be under ``max_parameters`` (:func:`~tracin_tasks.core.weights.check_declared_sizes`,
  the ceiling every checkpoint reader applies);
* with ``expected`` (the model's state_dict, meta tensors will do), names and shapes must match it
  (the same check :mod:`tracin_tasks.core.weights` makes), **tied weights accounted for**: Hugging
  Face's ``save_pretrained`` stores a weight shared by two names once (e.g. a language-model
  decoder tied to the word embeddings), so a name the file lacks is filled from the name it is tied
  to, but only when the model itself ties them (the two names share one tensor in ``expected``);
  any other missing or extra name is a :class:`StateDictMismatchError`.

Only then is each tensor allocated at its checked size and filled from the file. Only torch and
the standard library are used (no ``safetensors`` package needed).

Example:
    >>> state = read_safetensors_file("checkpoint-30/model.safetensors", expected=meta_model.state_dict())
    >>> model.load_state_dict(state)
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tracin_tasks.core.weights import DEFAULT_MAX_PARAMETERS, _check_against, check_declared_sizes
from tracin_tasks.exceptions import CheckpointError, ModelTooLargeError

#: A header larger than this is not read (real ones are kilobytes to a few MB; the ``safetensors``
#: package itself refuses headers over 100 MB).
MAX_HEADER_BYTES = 64 * 1024 * 1024

#: safetensors dtype names → torch dtypes (those torch can hold)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor the header declares: its dtype, shape and byte range in the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _label(path: str, what: str | None) -> str:
    return what or f"Weights file {os.path.basename(path)!r}"


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the name {key!r} appears twice")
        seen[key] = value
    return seen


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_safetensors_header(path: str | os.PathLike[str], *, max_parameters: int | None = DEFAULT_MAX_PARAMETERS,
                            what: str | None = None) -> tuple[dict[str, TensorEntry], int]:
    """The declared tensors of a safetensors file, every declaration checked; no tensor is made.

    Returns:
        ``(entries, data_start)``: name → :class:`TensorEntry`, and the file offset of the data section.

    Raises:
        ModelTooLargeError: a header over :data:`MAX_HEADER_BYTES`, a tensor claiming more bytes than
            the file holds for it, or more elements in all than ``max_parameters``.
        CheckpointError: not a safetensors file, a malformed header, an unknown dtype, overlapping data.
    """
    path = os.fspath(path)
    label = _label(path, what)
    if sys.byteorder != "little":  # safetensors data is little-endian; this reader does not swap bytes
        raise CheckpointError(f"{label}: safetensors files are little-endian; this machine is not, so the audit "
                              "cannot read it here.")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{label} is {size} bytes, too short to be a safetensors file (8-byte header "
                                      "length, JSON header, data); re-log it from the training run.")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise ModelTooLargeError(
                    f"{label} declares a header of {header_len:,} bytes, more than the {MAX_HEADER_BYTES:,} a real "
                    "safetensors header needs (they are kilobytes); it was not read. The file is damaged or crafted; "
                    "re-log it from the training run.")
            if header_len > size - 8:
                raise CheckpointError(
                    f"{label} declares a header of {header_len:,} bytes but the file holds only {size - 8:,} after "
                    "the length field: it is truncated or not a safetensors file. Re-log it from the training run.")
            raw = fh.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{label} cannot be read: {exc}.") from exc
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{label}'s header is not a JSON object ({str(exc)[:200]}); the file is damaged or "
                              "not a safetensors file. Re-log it from the training run.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{label}'s header is a JSON {type(header).__name__}, not an object of tensors.")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{label}'s __metadata__ is not an object of strings; the file is damaged.")
    data_start = 8 + header_len
    data_size = size - data_start
    entries: dict[str, TensorEntry] = {}
    declared = {}
    for name, info in header.items():
        entry = _entry(name, info, label, data_size)
        entries[name] = entry
        nbytes = entry.end - entry.begin
        declared[name] = (entry.shape, _contiguous_strides(entry.shape), 0, entry.dtype, nbytes)
    # shape against bytes stored, and the ceiling on all elements: the check every reader applies
    check_declared_sizes(declared, max_parameters=max_parameters, what=label)
    spans = sorted((e.begin, e.end, n) for n, e in entries.items() if e.end > e.begin)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{label} stores tensors {n0!r} and {n1!r} in overlapping bytes ([{b0}, {e0}) and "
                                  f"[{b1}, {e1})); the file is damaged or crafted. Re-log it from the training run.")
    return entries, data_start


def _entry(name: str, info: Any, label: str, data_size: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise CheckpointError(f"{label} declares tensor {name!r} as a {type(info).__name__}, not an object with "
                              "dtype, shape and data_offsets; the file is damaged.")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CheckpointError(f"{label} declares tensor {name!r} with dtype {dtype_name!r}, which this reader does "
                              f"not know (known: {', '.join(DTYPES)}). Save the checkpoint in one of those.")
    if not isinstance(shape, list) or not all(_is_int(s) for s in shape):
        raise CheckpointError(f"{label} declares tensor {name!r} with shape {shape!r}; a shape is a list of "
                              "integers. The file is damaged.")
    if any(s < 0 for s in shape):
        raise CheckpointError(f"{label} declares tensor {name!r} with a negative size {tuple(shape)}; it is damaged.")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{label} declares tensor {name!r} at data_offsets {offsets!r}; expected [begin, end] "
                              "with 0 <= begin <= end. The file is damaged.")
    begin, end = offsets
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if end > data_size:
        raise ModelTooLargeError(
            f"{label} declares tensor {name!r} of shape {tuple(shape)} in bytes [{begin:,}, {end:,}) of a data section "
            f"of {data_size:,} bytes: the file claims more data than it holds (truncated, or crafted to make the "
            "reader allocate memory). Nothing was allocated; re-log the checkpoint from the training run.")
    if end - begin > numel * itemsize:
        raise CheckpointError(
            f"{label} declares tensor {name!r} of shape {tuple(shape)} ({dtype_name}: {numel * itemsize:,} bytes) over "
            f"{end - begin:,} bytes; the two must agree exactly. The file is damaged; re-log it from the training run.")
    # fewer bytes than the shape needs: refused by check_declared_sizes, with the memory message
    return TensorEntry(dtype, tuple(shape), begin, end)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def tied_names(expected: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Names of a state_dict that the model ties together: name → the other names sharing its tensor.

    ``model.state_dict()`` lists a shared parameter under each of its names; their tensors share one
    storage, shape, strides and offset (also on the ``meta`` device), which is how a tie is told here.
    """
    groups: dict[tuple, list[str]] = {}
    for name, t in expected.items():
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        key = (t.untyped_storage()._cdata, tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype)
        groups.setdefault(key, []).append(name)
    return {n: tuple(m for m in names if m != n) for names in groups.values() if len(names) > 1 for n in names}


def read_safetensors_file(
    path: str | os.PathLike[str],
    *,
    expected: Mapping[str, Any] | None = None,
    max_parameters: int | None = DEFAULT_MAX_PARAMETERS,
    step: Any = None,
    model_name: str = "the model",
    what: str | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, read only after its header passed every check.

    Args:
        path: the file.
        expected: the model's state_dict (meta tensors will do): names and shapes must match, except
            that a name the file lacks is filled from a name the model ties it to.
        max_parameters: ceiling on the elements the file may declare (None: none).
        step, model_name: for the mismatch message.
        what: how to name the file in messages (default ``Weights file '<file name>'``).

    Returns:
        name → tensor (on the CPU, each allocated at its declared size); tied names share one tensor.

    Raises:
        ModelTooLargeError: declared sizes beyond the stored data, the header cap or the ceiling.
        StateDictMismatchError: names or shapes differ from ``expected``.
        CheckpointError: not a readable safetensors file.
    """
    path = os.fspath(path)
    label = _label(path, what)
    entries, data_start = read_safetensors_header(path, max_parameters=max_parameters, what=label)
    shapes = {name: e.shape for name, e in entries.items()}
    fill: dict[str, str] = {}
    if expected is not None:
        ties = tied_names(expected)
        for name in expected:
            if name not in shapes:
                source = next((other for other in ties.get(name, ()) if other in entries), None)
                if source is not None:
                    fill[name] = source
        _check_against(expected, {**shapes, **{n: shapes[s] for n, s in fill.items()}}, step, model_name)
    state: dict[str, torch.Tensor] = {}
    try:
        with open(path, "rb") as fh:
            for name, e in entries.items():
                tensor = torch.empty(e.shape, dtype=e.dtype)
                nbytes = e.end - e.begin
                if nbytes:
                    fh.seek(data_start + e.begin)
                    got = fh.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
                    if got != nbytes:
                        raise CheckpointError(f"{label} ended while tensor {name!r} was read ({got:,} of {nbytes:,} "
                                              "bytes); it changed on disk or is truncated. Re-log it.")
                state[name] = tensor
    except OSError as exc:
        raise CheckpointError(f"{label} cannot be read: {exc}.") from exc
    for name, source in fill.items():
        state[name] = state[source]  # the same tensor, as the model ties them
    return state
