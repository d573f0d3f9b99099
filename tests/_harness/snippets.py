"""Code blocks of the docs, run as written: a snippet is found by the heading of its section."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def snippet(doc: str, heading: str, index: int = 0, language: str = "python") -> str:
    """The ``index``-th fenced ``language`` block of the section of ``docs/doc`` whose heading contains
    ``heading`` (up to the next heading of the same or a higher level)."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    lines = text.splitlines()
    start = level = None
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"^(#+)\s+(.*)$", line)
        if not m:
            continue
        if start is None and heading in m.group(2):
            start, level = i + 1, len(m.group(1))
        elif start is not None and len(m.group(1)) <= level:
            lines = lines[start:i]
            break
    else:
        if start is None:
            raise LookupError(f"docs/{doc} has no heading containing {heading!r}")
        lines = lines[start:]
    blocks = re.findall(rf"^```{language}\n(.*?)^```", "\n".join(lines) + "\n", re.S | re.M)
    if len(blocks) <= index:
        raise LookupError(f"docs/{doc}, section {heading!r}: no {language} block #{index} (found {len(blocks)})")
    return blocks[index]
