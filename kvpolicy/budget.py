"""Budget types. A budget is never an overloaded float: it is a ``Ratio`` or a ``Tokens``.

``Ratio(r)`` is a fraction of N_ref, the longest cache the last scale reads (see
``ScaleSchedule.reference_length``): ``round(r * N_ref)`` tokens per layer on average, rounding
halves up. For Infinity 1024^2 N_ref = 6425, so ``Ratio(0.1)`` is 643 tokens.

The ScaleKV paper's "4 % / 10 % / 20 %" settings were the token counts 265 / 650 / 1300 (no
single rounding of r * 6425 gives all three); reproduce them with ``Tokens(265)``, ``Tokens(650)``
and ``Tokens(1300)``.

At the edges (CLI, ``get_policy(budget=...)``) ``parse_budget`` accepts ``"10%"``, ``0.1``,
``"0.1"``, ``650`` and ``"650"``.
"""

from __future__ import annotations

import math
import numbers
from typing import Union

import attrs

from .schedule import ScaleSchedule


def _check_fraction(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Ratio needs a real number in (0, 1], got {value!r} ({type(value).__name__})")
    if math.isnan(value) or not 0 < value <= 1:
        raise ValueError(f"Ratio must be in (0, 1] (a fraction of the cache; 0.1 = 10%), got {value!r}")


def _check_count(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Tokens needs a whole number >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"Tokens must be >= 1 token per layer, got {value!r}")


@attrs.frozen
class Ratio:
    """A fraction in (0, 1] of the reference length N_ref of a schedule."""

    fraction: float = attrs.field(validator=_check_fraction, converter=lambda v: v if isinstance(v, bool) else (float(v) if isinstance(v, numbers.Real) else v))

    def tokens(self, schedule: ScaleSchedule) -> int:
        # Round half up (not Python's half-to-even): 10% of 6425 = 642.5 -> 643. The small epsilon
        # absorbs binary representation error such as 0.1 * 6425 = 642.5000000000001.
        reference = schedule.reference_length
        count = math.floor(self.fraction * reference + 0.5 + 1e-9)
        if count < 1:  # a budget of 0 tokens is refused, never lifted silently to 1
            raise ValueError(f"budget {self} of N_ref = {reference} tokens is {self.fraction * reference:.3g} tokens "
                             f"per layer, which rounds to 0; use a ratio >= {0.5 / reference:.3g} or Tokens(1)")
        return count

    def __str__(self) -> str:
        return f"{self.fraction * 100:g}%"


@attrs.frozen
class Tokens:
    """An average number of cached tokens per layer."""

    count: int = attrs.field(validator=_check_count, converter=lambda v: int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v)

    def tokens(self, schedule: ScaleSchedule) -> int:
        return self.count

    def __str__(self) -> str:
        return str(self.count)


Budget = Union[Ratio, Tokens]


def parse_budget(value) -> Budget:
    """Turn ``"10%"``, ``0.1``, ``"0.1"``, ``650``, ``"650"``, a Ratio or a Tokens into a budget."""
    if isinstance(value, (Ratio, Tokens)):
        return value
    if isinstance(value, bool) or value is None:
        raise TypeError(f"budget {value!r} is not a budget: use a percentage like '10%', a fraction "
                        "in (0, 1] like 0.1, or a token count like 650")
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.endswith("%"):
                number = float(text[:-1].strip())
                if math.isnan(number) or not 0 < number <= 100:
                    raise ValueError
                return Ratio(number / 100)
            if text.lstrip("+-").isdigit():
                return Tokens(int(text))
            return parse_budget(float(text))
        except (ValueError, TypeError):
            raise ValueError(f"budget {value!r} is not understood: use a percentage in (0%, 100%] "
                             "like '10%', a fraction in (0, 1] like '0.1', or a token count >= 1 "
                             "like '650'") from None
    if isinstance(value, numbers.Integral):
        return Tokens(int(value))
    if isinstance(value, numbers.Real):
        if math.isnan(value) or not 0 < value <= 1:
            raise ValueError(f"budget {value!r}: a float budget is a fraction in (0, 1]; for a token "
                             "count pass an int (650), for a percentage a string ('10%')")
        return Ratio(float(value))
    raise TypeError(f"budget {value!r} ({type(value).__name__}) is not a budget: use '10%', 0.1 or 650")


def budget_to_json(budget: Budget | None):
    """A JSON-friendly form that ``parse_budget`` reads back exactly."""
    if budget is None:
        return None
    if isinstance(budget, Ratio):
        return budget.fraction  # a float: parse_budget reads it back as the same Ratio
    return budget.count
