"""Writing a file so that it appears whole or not at all.

Everything an audit writes that someone may read while it is written (scores, issues, the
report, plots, manifests, queue files, outbox entries, corrected data) goes through
:func:`atomic_write`: the content goes to a temporary name in the same folder — ending in
``.tmp``, so no reader mistakes it for a result — and is then renamed over the final name.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from typing import Any


def atomic_write(path: str | os.PathLike[str], data: bytes | str | Callable[[str], Any] | Any,
                 durable: bool = False) -> str:
    """Write ``data`` to ``path`` atomically and return the path.

    Args:
        path: the final name; its folder is created when missing.
        data: bytes, text (UTF-8), a pandas DataFrame (written as parquet), or a function that
            writes the content to the temporary path it is given.
        durable: flush the content to disk before the rename (for files that must survive a
            power cut, such as outbox entries).

    Raises:
        OSError: the folder or file cannot be written (nothing is left behind); callers say what
            it means for them.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        if isinstance(data, (bytes, bytearray)):
            with open(tmp, "wb") as fh:
                fh.write(data)
        elif isinstance(data, str):
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(data)
        elif callable(data):
            data(tmp)
        elif hasattr(data, "to_parquet"):
            data.to_parquet(tmp, index=False)
        else:
            raise TypeError(f"atomic_write cannot write a {type(data).__name__}")
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path
