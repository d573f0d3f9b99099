"""Opening a relabel sink from its URI: one entry per kind of sink.

``sqlite:///…``, ``postgresql+psycopg://…`` (any SQLAlchemy URL) → the SQL queue;
``labelstudio://host:port?project=…`` → Label Studio; ``file:///folder?format=…`` → a file drop.
A new kind of sink is one class with ``from_uri`` and one :func:`register_sink` call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from tracin_tasks._uris import redact
from tracin_tasks.exceptions import ConfigurationError
from tracin_tasks.integrations.relabel.base import RelabelSink

#: reads a secret by name (a Prefect Secret block): passed in by the orchestration layer or the CLI
SecretReader = Callable[[str], str]

#: (URI schemes or scheme prefixes, "module:Class", whether the sink takes a ``secret_reader``)
_SINKS: list[tuple[tuple[str, ...], str, bool]] = [
    (("sqlite", "postgresql", "postgres", "mysql", "mssql", "oracle"),
     "tracin_tasks.integrations.relabel.sql_queue:SqlQueue", False),
    (("labelstudio", "label-studio", "ls"), "tracin_tasks.integrations.relabel.labelstudio:LabelStudioSink", True),
    (("file",), "tracin_tasks.integrations.relabel.file_drop:FileDrop", False),
]


def register_sink(schemes: Sequence[str], target: str, takes_secrets: bool = False) -> None:
    """Open URIs whose scheme starts with one of ``schemes`` with ``target`` (``"module:Class"``)."""
    _SINKS.insert(0, (tuple(schemes), target, takes_secrets))


def open_sink(uri: str, *, secrets: SecretReader | None = None, **options: Any) -> RelabelSink:
    """Open the sink a URI names; ``secrets`` reads a Secret block a sink's URI names."""
    if not isinstance(uri, str) or "://" not in uri and not uri.startswith("sqlite:"):
        raise ConfigurationError(
            f"Relabel sink {uri!r} is not a URI. Expected sqlite:///path.db, postgresql+psycopg://..., "
            "labelstudio://host:port?project=..., or file:///folder?format=parquet."
        )
    scheme = urlsplit(uri).scheme.lower()
    for schemes, target, takes_secrets in _SINKS:
        if scheme.startswith(schemes):
            module, _, name = target.partition(":")
            cls = getattr(importlib.import_module(module), name)
            return cls.from_uri(uri, **({"secret_reader": secrets} if takes_secrets else {}), **options)
    raise ConfigurationError(
        f"Unknown relabel sink scheme {scheme!r} in {redact(uri)!r}; use sqlite://, postgresql+psycopg://, "
        "labelstudio:// or file://."
    )
