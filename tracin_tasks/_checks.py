"""Checks of settings that several entry points take (the flow, the CLI, ``MlflowCheckpointSource``),
written once so that they say the same thing everywhere."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from typing import Any

from tracin_tasks.exceptions import ConfigurationError

_MLFLOW_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,255}$")


def check_mlflow_id(value: Any, what: str = "run_id") -> str:
    """Run and model ids become folder names in caches and outputs: nothing but a plain id."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{what} must be a non-empty string, got {value!r}.")
    if not _MLFLOW_ID.match(value.strip()):
        raise ConfigurationError(
            f"{what} {value!r} is not an MLflow id (letters, digits, '_' and '-' only); check the value."
        )
    return value.strip()


def parse_steps(steps: Sequence[int] | str | None) -> tuple[list[int] | None, int | None]:
    """``None`` (every checkpoint), a list of steps, ``"3,6,9"``, or ``"every:K"`` → (steps, K)."""
    if steps is None:
        return (None, None)
    if isinstance(steps, str):
        m = re.fullmatch(r"every:(\d+)", steps.strip())
        if m:
            if int(m.group(1)) < 1:
                raise ConfigurationError(f"steps={steps!r}: K in every:K must be at least 1.")
            return (None, int(m.group(1)))
        steps = [s for s in steps.split(",") if s.strip()]
    try:
        wanted = [int(s) for s in steps]
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"steps must be a list of integers (3,6,9) or 'every:K', got {steps!r}."
        ) from None
    if not wanted:
        raise ConfigurationError("steps=[] selects no checkpoint; pass None for all of them.")
    return (wanted, None)


def usable_lr(lr: float) -> bool:
    """Finite and >= 0; MLflow stores an infinite metric as ±sys.float_info.max, so that is out too."""
    return math.isfinite(lr) and 0 <= lr < sys.float_info.max


def check_default_learning_rate(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not usable_lr(float(value)):
        raise ConfigurationError(f"default_learning_rate must be a finite number >= 0 or None, got {value!r}.")
    return float(value)


def check_positive_int(value: Any, what: str, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{what} must be a positive integer, got {value!r}.")
    return value
