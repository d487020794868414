"""The adapters' one validators module: attrs validators for configuration classes and argument
checks for ``generate``. Every error names the field or argument, the bad value and what is allowed.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional


def positive_int(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be a positive int, got {value!r}")


def positive_real(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be a positive finite number, got {value!r}")


def int_argument(name: str, value, *, low: Optional[int] = None, high: Optional[int] = None, note: str = "") -> int:
    """An int (bools refused) in [low, high]; the error says the range and ``note``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (low is not None and value < low) or (
            high is not None and value > high):
        if low == 1 and high is None:
            allowed = "a positive int"
        elif high is None:
            allowed = f"an int >= {low}" if low is not None else "an int"
        else:
            allowed = f"an int in {low}..{high}"
        raise ValueError(f"{name} must be {allowed}{note}, got {value!r}")
    return int(value)


def real_argument(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
                  low_open: bool = False, note: str = "") -> float:
    """A finite real number (bools refused) in [low, high] (``low_open``: (low, high]); NaN refused."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    ok = ok and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:
        if low is not None and high is not None:
            allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        elif low is not None:
            allowed = f"a real number {'>' if low_open else '>='} {low:g}"
        else:
            allowed = "a finite number"
        raise ValueError(f"{name} must be {allowed}{note}, got {value!r}")
    return float(value)


def seed_argument(seed) -> int:
    """A generation seed: an int (not a bool); the same error in every family."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return int(seed)
