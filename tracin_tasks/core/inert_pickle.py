"""Read the pickle of a ``torch.save`` file without importing, calling or constructing anything it names.

A whole training checkpoint (Lightning's ``.ckpt``, a ``{"state_dict": ..., "optimizer_states":
...}`` bundle) pickles more than tensors: hyper-parameters of any class, optimizer extras.
``torch.load(weights_only=True)`` refuses such a file whole; a full unpickle would run whatever the
file names. :class:`InertUnpickler` reads it as data instead:

* ``find_class`` never returns the global the pickle names. torch's tensor rebuilds become
  :class:`Declared` (storage, offset, sizes, strides: nothing allocated), storage types their
  dtype, ``OrderedDict``/``Counter`` a plain dict, and every other name an inert stand-in class
  whose constructor, ``__setstate__``, ``append`` and ``extend`` keep nothing but dict items;
* ``persistent_load`` records each storage (key, dtype, declared bytes) for the caller to check
  against the file's records before anything is made (:func:`tracin_tasks.core.weights.read_full_checkpoint`);
* :func:`plain` turns the result into dicts, lists, tuples, numbers, strings and None, within a
  budget of objects (a pickle can share one list a million times).

Only torch and the standard library are used here.
"""

from __future__ import annotations

import io
import pickle
from collections import namedtuple
from typing import Any

import torch

_STORAGE_DTYPES = {"Float": torch.float32, "Double": torch.float64, "Half": torch.float16, "BFloat16": torch.bfloat16,
                   "Long": torch.int64, "Int": torch.int32, "Short": torch.int16, "Char": torch.int8,
                   "Byte": torch.uint8, "Bool": torch.bool, "Untyped": torch.uint8}
#: data.pkl holds references to the tensor data, not the data: real ones are kilobytes
MAX_PICKLE_BYTES = 64 * 1024 * 1024
#: objects :func:`plain` converts at most (Lightning's loop and callback states are a few hundred)
MAX_PLAIN_OBJECTS = 200_000

Storage = namedtuple("Storage", "key dtype nbytes")
Declared = namedtuple("Declared", "storage offset size stride")  # a tensor as declared: nothing allocated


class _Opaque(dict):
    """Stands for every class and function the pickle names, never imported or called: arguments and
    state are dropped; items given to it (a dict subclass, e.g. Lightning's ``AttributeDict``) are kept."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        return dict.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    __setstate__ = append = extend = __init__


class _Dict(dict):
    """What ``OrderedDict`` and ``Counter`` become; their attributes (``_metadata``) are dropped."""

    __setstate__ = _Opaque.__init__


def _declare(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> Declared:
    if not (isinstance(storage, Storage) and isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and len(size) == len(stride) and all(type(i) is int for i in (offset, *size, *stride))):
        raise pickle.UnpicklingError("a tensor declared without a storage, sizes and strides")
    return Declared(storage, offset, tuple(size), tuple(stride))


def _keep_data(data: Any, *_: Any) -> Any:  # a Parameter is its data here
    return data


def _from_type(func: Any, _type: Any, args: Any, _state: Any) -> Any:
    return func(*args) if func is _declare and isinstance(args, tuple) else None


_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _declare,
    ("torch._utils", "_rebuild_parameter"): _keep_data,
    ("torch._utils", "_rebuild_parameter_with_state"): _keep_data,
    ("torch._tensor", "_rebuild_from_type_v2"): _from_type,
    ("collections", "OrderedDict"): _Dict,
    ("collections", "Counter"): _Dict,
    ("builtins", "dict"): _Dict,
}


class InertUnpickler(pickle.Unpickler):
    """Unpickle ``data`` (a zip's ``data.pkl``) as data: see the module's docstring.

    Attributes:
        storages: storage key → :class:`Storage` (dtype and declared bytes), filled while loading.

    Example:
        >>> unpickler = InertUnpickler(archive.read("archive/data.pkl"))
        >>> obj = unpickler.load()  # tensors are Declared; check unpickler.storages against the records
    """

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _FUNCTIONS:
            return _FUNCTIONS[module, name]
        if module in ("torch", "torch.storage") and name.endswith("Storage") and name[:-7] in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name[:-7]]
        return _Opaque  # one inert class for every other name (NEWOBJ needs a type): nothing is imported

    def persistent_load(self, pid: Any) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and type(pid[4]) is int and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:80]!r}")
        storage = Storage(pid[2], pid[1], pid[4] * torch.empty((), dtype=pid[1]).element_size())
        if self.storages.setdefault(storage.key, storage) != storage:
            raise pickle.UnpicklingError(f"storage {storage.key!r} declared twice, differently")
        return storage


def plain(obj: Any, budget: int = MAX_PLAIN_OBJECTS) -> Any:
    """``obj`` (what :class:`InertUnpickler` loaded) as dicts, lists, tuples, numbers, strings and None.

    Declared tensors and stand-ins without items become None; dict keys that are not numbers or
    strings are left out; nesting deeper than 64 is cut (None).

    Raises:
        ValueError: more than ``budget`` objects to convert.
    """
    left = [budget]

    def convert(value: Any, depth: int) -> Any:
        left[0] -= 1
        if left[0] < 0:
            raise ValueError(f"holds more than {budget:,} objects besides its tensors")
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if depth >= 64 or isinstance(value, (Declared, Storage)) or (isinstance(value, _Opaque) and not value):
            return None
        if isinstance(value, dict):
            return {k: convert(v, depth + 1) for k, v in value.items() if isinstance(k, (str, int, float, bool))}
        if isinstance(value, (list, tuple)):
            items = [convert(v, depth + 1) for v in value]
            return items if isinstance(value, list) else tuple(items)
        return None

    return convert(obj, 0)
