"""Which code an audit runs to rebuild a model: only what the operator trusts, built before it allocates.

A training run records how to rebuild its model (``tracin/model_factory.json``:
``"pkg.module:function"`` and keyword arguments). Whoever can write to the tracking server can
write that file, so an audit imports and calls a factory only when

* **the caller passed it** (``model_factory=`` / ``--model-factory``, with ``model_kwargs=`` /
  ``--model-kwargs JSON``): the operator chose that code; or
* **the run names it and its module is trusted**: ``TRACIN_TRUSTED_MODULES`` (comma-separated
  module prefixes), ``--trust-module PREFIX`` (repeatable) or the flow parameter
  ``trusted_modules``; empty by default. A prefix trusts a module and its submodules only
  (``acme`` trusts ``acme.models``, not ``acme_evil``), and the callable the path resolves to
  must itself be defined in a trusted module: ``my_pkg.models:torch.load`` reaches torch's
  ``load`` through an attribute and is refused. Nothing is imported before that check.

The run's recorded keyword arguments are then data for that trusted callable only: plain JSON
values, never resolved to callables, classes or import paths.

Before anything real exists, the model is built on PyTorch's ``meta`` device and its size is
checked against a ceiling (``max_parameters``): arguments such as ``hidden=2e9`` are refused
without allocating a byte.

Example:
    >>> trust = FactoryTrust.from_settings(["my_pkg.models"])
    >>> model = build_model(ModelSpec("my_pkg.models:build_cnn", {"n_classes": 10}, "run"), trust)
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tracin_tasks._env import env_number
from tracin_tasks.core.weights import DEFAULT_MAX_PARAMETERS
from tracin_tasks.exceptions import (
    ConfigurationError,
    ModelFactoryError,
    ModelTooLargeError,
    UntrustedModelFactoryError,
)

logger = logging.getLogger(__name__)

#: Comma-separated module prefixes whose model factories an audit may import and call.
TRUSTED_MODULES_ENV = "TRACIN_TRUSTED_MODULES"
#: The ceiling on a model's elements (parameters and buffers), when no setting gives one.
MAX_PARAMETERS_ENV = "TRACIN_MAX_PARAMETERS"

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
# attributes after the colon: public names only (no _private, no __dunder__ walks)
_ATTRIBUTE = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z][A-Za-z0-9_]*)*")
_HOW_TO_TRUST = (
    "To trust it, add its module (or a package prefix) to TRACIN_TRUSTED_MODULES, pass --trust-module "
    "PREFIX, or set the flow parameter trusted_modules; or pass the factory yourself with "
    "model_factory='pkg.module:function' (--model-factory) and model_kwargs (--model-kwargs JSON)."
)


def parse_trusted_modules(value: str | Iterable[str] | None, what: str = "trusted_modules") -> tuple[str, ...]:
    """Module prefixes from a comma-separated string or a list; each must be a dotted module name."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigurationError(f"{what}: {item!r} is not a module name.")
        item = item.strip()
        if not item:
            continue
        if not _MODULE.fullmatch(item):
            raise ConfigurationError(
                f"{what}: {item!r} is not a module prefix (dotted Python names like 'my_pkg.models')."
            )
        if item not in out:
            out.append(item)
    return tuple(out)


def max_parameters_from_env() -> int:
    """``TRACIN_MAX_PARAMETERS`` or :data:`DEFAULT_MAX_PARAMETERS`."""
    return int(env_number(MAX_PARAMETERS_ENV, DEFAULT_MAX_PARAMETERS, lambda raw: int(float(raw)), minimum=1))


def check_max_parameters(value: Any) -> int | None:
    """A ``max_parameters`` setting: a positive integer, or None for the environment's/default ceiling."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise ConfigurationError(f"max_parameters must be a positive integer, got {value!r}.")
    return int(value)


def check_model_kwargs(value: Any, what: str = "model_kwargs") -> dict[str, Any]:
    """Keyword arguments for a factory: a JSON object (string keys, JSON values), or a JSON string of one."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ConfigurationError(f"{what} is not valid JSON ({exc}); expected an object like "
                                     "'{\"hidden\": 128, \"n_classes\": 10}'.") from None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigurationError(f"{what} must be a JSON object of keyword arguments, got {type(value).__name__}.")

    def plain(v: Any, where: str) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [plain(x, where) for x in v]
        if isinstance(v, Mapping) and all(isinstance(k, str) for k in v):
            return {k: plain(x, f"{where}.{k}") for k, x in v.items()}
        raise ConfigurationError(f"{what}[{where!r}] is a {type(v).__name__}; factory arguments must be plain "
                                 "JSON values (numbers, strings, booleans, lists, objects).")

    return {k: plain(v, k) for k, v in value.items()}


@dataclass(frozen=True)
class FactoryTrust:
    """The module prefixes an operator trusts for model factories a run names.

    Attributes:
        modules: prefixes; ``acme`` trusts ``acme`` and ``acme.*``, nothing else.
    """

    modules: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, modules: str | Iterable[str] | None = None, *, use_env: bool = True) -> FactoryTrust:
        """The given prefixes plus, unless ``use_env`` is False, those in ``TRACIN_TRUSTED_MODULES``."""
        given = parse_trusted_modules(modules)
        env = parse_trusted_modules(os.environ.get(TRUSTED_MODULES_ENV), TRUSTED_MODULES_ENV) if use_env else ()
        return cls(tuple(dict.fromkeys((*given, *env))))

    def trusts(self, module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in self.modules)


#: tracin-tasks' own model builders: a checkpoint layout may name one with the run's own description of
#: the model (``origin="builtin"``); they treat that description as data (no remote code, no download).
BUILTIN_FACTORIES = frozenset({"tracin_tasks.integrations.huggingface:model_from_config"})


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model: ``"pkg.module:function"``, its keyword arguments, and who named it.

    Attributes:
        factory: the import path.
        kwargs: plain JSON keyword arguments.
        origin: ``"caller"`` (the operator passed it: trusted), ``"run"`` (recorded by the run:
            trusted only through :class:`FactoryTrust`) or ``"builtin"`` (one of tracin-tasks' own
            builders in :data:`BUILTIN_FACTORIES`, e.g. a Hugging Face model rebuilt from its
            ``config.json``; the kwargs the run supplies are data for that builder only).
    """

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    origin: str = "run"

    def __post_init__(self) -> None:
        if self.origin not in ("caller", "run", "builtin"):
            raise ConfigurationError(f"ModelSpec.origin must be 'caller', 'run' or 'builtin', got {self.origin!r}.")
        if self.origin == "builtin" and self.factory not in BUILTIN_FACTORIES:
            raise UntrustedModelFactoryError(
                f"{self.factory!r} is not one of tracin-tasks' own model builders ({', '.join(sorted(BUILTIN_FACTORIES))}); "
                "a spec that claims so was changed by someone else. Nothing was imported."
            )
        if not isinstance(self.factory, str):
            raise ModelFactoryError(f"A model factory must be a 'package.module:function' string, got {self.factory!r}.")
        object.__setattr__(self, "kwargs", check_model_kwargs(self.kwargs, "the factory's kwargs"))

    def to_dict(self) -> dict[str, Any]:
        return {"factory": self.factory, "kwargs": dict(self.kwargs), "origin": self.origin}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        return cls(d["factory"], dict(d.get("kwargs") or {}), d.get("origin", "run"))


def _split(factory: str) -> tuple[str, str]:
    module_name, sep, attr = factory.partition(":")
    if not sep or not _MODULE.fullmatch(module_name) or not _ATTRIBUTE.fullmatch(attr):
        raise ModelFactoryError(
            f"Model factory {factory!r} is not of the form 'package.module:function' (public names only)."
        )
    return module_name, attr


def resolve_factory(spec: ModelSpec, trust: FactoryTrust) -> Callable[..., Any]:
    """Import the factory's module and find the callable, checking trust before the import and after.

    Raises:
        UntrustedModelFactoryError: a run-recorded factory outside the trusted modules (nothing
            imported), or one that resolves to a callable defined elsewhere.
        ModelFactoryError: malformed path, import failure, missing attribute, not callable.
    """
    module_name, attr = _split(spec.factory)
    run_named = spec.origin == "run"  # "builtin" specs are checked against BUILTIN_FACTORIES when made
    if run_named and not trust.trusts(module_name):
        trusted = ", ".join(trust.modules) if trust.modules else "none"
        raise UntrustedModelFactoryError(
            f"The run names the model factory {spec.factory!r}, but module {module_name!r} is not trusted "
            f"(trusted modules: {trusted}). An audit imports and calls a factory a run names only from modules "
            f"the operator trusts, since anyone who can write to the tracking server can name one. {_HOW_TO_TRUST}"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelFactoryError(
            f"Cannot import {module_name!r} for the model factory {spec.factory!r}: {exc}. Install the package "
            "that defines the model in the audit's environment (every worker needs it)."
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelFactoryError(f"{module_name!r} has no attribute {attr!r} (model factory {spec.factory!r}).")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelFactoryError(f"The model factory {spec.factory!r} is a {type(obj).__name__}, not a function or class.")
    defined_in = getattr(obj, "__module__", None)
    if run_named and not (isinstance(defined_in, str) and trust.trusts(defined_in)):
        raise UntrustedModelFactoryError(
            f"The run names the model factory {spec.factory!r}, which resolves to "
            f"{defined_in or 'a built-in'}.{getattr(obj, '__qualname__', type(obj).__name__)}, defined outside "
            f"the trusted modules ({', '.join(trust.modules)}); it was not called. Name a function or class "
            f"defined in a trusted module. {_HOW_TO_TRUST}"
        )
    return obj


def _call(fn: Callable[..., Any], spec: ModelSpec) -> nn.Module:
    try:
        model = fn(**spec.kwargs)
    except ModelFactoryError:
        raise
    except Exception as exc:
        raise ModelFactoryError(
            f"Calling the model factory {spec.factory}(**{_short(spec.kwargs)}) failed: "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelFactoryError(f"The model factory {spec.factory!r} returned a {type(model).__name__}, not an nn.Module.")
    return model


def _short(kwargs: Mapping[str, Any]) -> str:
    text = json.dumps(kwargs, default=str)
    return text if len(text) <= 200 else text[:200] + "…"


def count_elements(model: nn.Module) -> int:
    """Parameters and buffers, in elements (a tied parameter counts once)."""
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen.setdefault(id(t), t.numel())
    return sum(seen.values())


def build_on_meta(spec: ModelSpec, trust: FactoryTrust, max_parameters: int | None = None) -> nn.Module:
    """The model with every tensor on the ``meta`` device (nothing allocated), checked against the ceiling.

    Raises:
        ModelTooLargeError: more elements than ``max_parameters`` (default
            ``TRACIN_MAX_PARAMETERS`` or :data:`DEFAULT_MAX_PARAMETERS`).
    """
    fn = resolve_factory(spec, trust)
    limit = max_parameters if max_parameters is not None else max_parameters_from_env()
    try:
        with torch.device("meta"):
            model = _call(fn, spec)
    except ModelFactoryError as exc:
        cause = exc.__cause__
        if cause is None:
            raise
        raise ModelFactoryError(
            f"Calling the model factory {spec.factory}(**{_short(spec.kwargs)}) failed on PyTorch's meta device, "
            "where an audit builds the model first to check its size before allocating anything: "
            f"{type(cause).__name__}: {str(cause)[:300]}. Check the factory's arguments; a factory must build its "
            "layers without reading tensor values (no .item() or .tolist() on weights while building)."
        ) from cause
    total = count_elements(model)
    if total > limit:
        raise ModelTooLargeError(
            f"The model factory {spec.factory}(**{_short(spec.kwargs)}) builds a model of {total:,} parameters "
            f"and buffers, above this audit's ceiling of {limit:,} (max_parameters). Nothing was allocated. Check "
            "the factory's arguments; if the model really is that large, raise the ceiling (max_parameters= / "
            "--max-parameters / TRACIN_MAX_PARAMETERS)."
        )
    return model


def build_model(spec: ModelSpec, trust: FactoryTrust, max_parameters: int | None = None) -> nn.Module:
    """Resolve, check on ``meta``, then build the real model (see the module docstring)."""
    build_on_meta(spec, trust, max_parameters)
    return _call(resolve_factory(spec, trust), spec)
