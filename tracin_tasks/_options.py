"""Settings that are dataclass fields, with what a command line needs to offer them.

A setting is declared once, as a field made with :func:`option`: its default, its help text, and
how a command line spells it. :func:`add_options` builds the command-line options of a settings
class from its fields; :func:`values_from` reads them back by field name, so a new setting is
added in one place and the CLI offers it.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, flag: str | None = None, cli: bool = True,
           convert: Callable[[Any], Any] | None = None, invert: bool = False, default_factory: Any = _MISSING,
           **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: the field's default (omit for a required setting).
        help: what it means (shown by ``--help`` and kept with the field).
        flag: the option's name (default ``--`` + the field name with dashes).
        cli: False for a setting that has no command-line option.
        convert: turns what argparse read into the field's value (e.g. ``"3,6,9"`` → ``[3, 6, 9]``).
        invert: a ``--no-…`` switch: the field is True unless the switch is given.
        argparse_kwargs: ``type``, ``choices``, ``action``, ``nargs``, ``metavar``, ``required``.
    """
    metadata = {"help": help, "flag": flag, "cli": cli, "convert": convert, "invert": invert,
                "argparse": argparse_kwargs}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    if default is _MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _cli_fields(cls: type) -> Iterable[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]


def add_options(parser: argparse.ArgumentParser | Any, cls: type) -> None:
    """Add one option per field of ``cls`` made with :func:`option` (``cli=True``)."""
    for f in _cli_fields(cls):
        meta = f.metadata
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        kwargs = dict(meta["argparse"])
        if meta["invert"]:
            kwargs.setdefault("action", "store_true")
        elif kwargs.get("action") not in ("store_true", "append"):
            kwargs.setdefault("default", None)
        if kwargs.get("action") != "store_true" and "choices" not in kwargs:
            kwargs.setdefault("metavar", f.name.upper())
        default = f.default if f.default is not _MISSING else None
        shown = "" if meta["invert"] or default in (None, False, ()) or kwargs.get("required") else f" (default {default})"
        parser.add_argument(flag, dest=f"{cls.__name__}.{f.name}", help=meta["help"] + shown, **kwargs)


def values_from(args: argparse.Namespace, cls: type, given_only: bool = False) -> dict[str, Any]:
    """The values of ``cls``'s options as field name → value (the field's default where an option was
    not given; with ``given_only``, only the options that were given)."""
    out = {}
    for f in _cli_fields(cls):
        meta = f.metadata
        raw = getattr(args, f"{cls.__name__}.{f.name}")
        if meta["invert"]:
            if given_only and not raw:
                continue
            out[f.name] = not raw
            continue
        if raw is None or raw is False and given_only:
            if given_only:
                continue
            out[f.name] = f.default if f.default is not _MISSING else None
            continue
        out[f.name] = meta["convert"](raw) if meta["convert"] else raw
    return out
