"""Text that comes from data, made safe for where it is shown.

Row ids, labels and reasons come from whoever wrote the training data. On a terminal, control
characters in them could move the cursor, rewrite earlier lines or hide text; in a CSV file, a
cell starting with ``=``, ``+``, ``-`` or ``@`` runs as a formula when a reviewer opens the file in
a spreadsheet. Files keep the exact value (CSV cells are quoted reversibly); displays shorten it.
"""

from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

#: what a shown id is cut to; the full value stays in every file
DISPLAY_LIMIT = 80
#: first characters that make a spreadsheet treat a cell as a formula, and the escape itself
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def for_terminal(value: Any, limit: int | None = DISPLAY_LIMIT) -> str:
    """``value`` as one printable line: control and format characters (escape sequences, NUL,
    bidirectional overrides, newlines) shown as ``\\xNN``/``\\uNNNN``, cut to ``limit`` characters."""
    out = []
    for ch in str(value):
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    text = "".join(out)
    if limit is not None and len(text) > limit:
        text = text[: max(1, limit - 1)] + "…"
    return text


def csv_cell(value: Any) -> Any:
    """A string that would start a spreadsheet formula, with a leading ``'`` (the spreadsheet
    convention for "text"); a string already starting with ``'`` gets one more, so
    :func:`from_csv_cell` gives back the exact value. Other values pass unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def from_csv_cell(value: Any) -> Any:
    """The inverse of :func:`csv_cell`."""
    if isinstance(value, str) and len(value) > 1 and value[0] == "'" and value[1] in _FORMULA_START:
        return value[1:]
    return value


def csv_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with every text cell passed through :func:`csv_cell`."""
    import pandas as pd

    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object or pd.api.types.is_string_dtype(out[column].dtype):
            out[column] = out[column].map(csv_cell).astype(object)
    return out


def write_csv(frame: pd.DataFrame, target: Any) -> None:
    """``frame`` as CSV that a spreadsheet opens safely: formula-like cells neutralised
    (:func:`csv_frame`), every text cell quoted, so a carriage return or newline inside an id
    stays inside its cell."""
    import csv

    csv_frame(frame).to_csv(target, index=False, quoting=csv.QUOTE_NONNUMERIC)


def from_csv_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A frame read back from a CSV written with :func:`csv_frame`."""
    import pandas as pd

    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object or pd.api.types.is_string_dtype(out[column].dtype):
            out[column] = out[column].map(from_csv_cell)
    return out
