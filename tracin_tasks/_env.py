"""Settings read from environment variables, checked the same way everywhere."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from tracin_tasks.exceptions import ConfigurationError


def env_number(name: str, default: float, kind: Callable[[str], float] = float, minimum: float = 0) -> float:
    """``$name`` parsed with ``kind``, or ``default`` when unset or empty; at least ``minimum``.

    Raises:
        ConfigurationError: not a number, or below ``minimum``, naming the variable and its value.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except (ValueError, OverflowError):  # OverflowError: int(float("inf"))
        raise ConfigurationError(f"{name}={raw!r} is not a finite number.") from None
    if not math.isfinite(value):
        raise ConfigurationError(f"{name}={raw!r} is not a finite number.")
    if value < minimum:
        raise ConfigurationError(f"{name}={raw!r} must be at least {minimum:g}.")
    return value
