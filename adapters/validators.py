"""attrs validators shared by the adapters' configuration classes; errors name the class, the field
and the bad value."""

from __future__ import annotations

import math


def positive_int(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be a positive int, got {value!r}")


def positive_real(instance, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be a positive finite number, got {value!r}")
