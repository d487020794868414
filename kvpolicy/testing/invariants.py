"""The invariants ``kvpolicy.testing`` checks, and the error raised when one does not hold.

Every check raises a subclass of ``InvariantViolation`` per invariant (so hypothesis shrinks each
broken invariant to its own minimal case); the message names the invariant, the policy, the case
and what went wrong where.
"""

from __future__ import annotations

from typing import Optional

# name -> what must hold (the table ``kvpolicy check`` prints, in this order).
INVARIANTS: dict[str, str] = {
    "completes": "whole generations run without an error (every geometry, dtype and accepted budget)",
    "capacity": "kept <= capacity per (scale, layer, row, head)",
    "budget": "mean kept tokens over layers and heads <= the budget at every scale (run and plan)",
    "no_early_eviction": "nothing is evicted while the cache fits the capacity",
    "indices": "kept indices are int64, unique, ascending and in range",
    "bit_exact": "the cache holds the generated keys/values of the kept tokens, bit for bit",
    "promises": "positions the policy promises (Policy.promised_positions) are kept",
    "bytes": "counted bytes equal the bytes of the tensors held (compact, no padding)",
    "rows_alone": "each row is compressed exactly as if it were alone in the batch",
    "determinism": "the same inputs give the same selection (fresh policy, fresh cache)",
    "no_stale_state": "a reset cache used for another generation behaves like a fresh one",
    "full_budget": "a budget >= the full length behaves exactly like the full cache",
    "config": "to_config() is JSON and Policy.from_config() rebuilds an equal policy",
    "bad_options": "bad options and budgets raise a clear ValueError/TypeError naming the value",
}


class InvariantViolation(AssertionError):
    """An invariant does not hold for a policy on a case (``invariant``, ``policy``, ``case``, ``detail``)."""

    invariant: str = ""

    def __init__(self, policy: str, detail: str, case=None):
        self.policy = policy
        self.detail = detail
        self.case = case
        super().__init__(self.message())

    def message(self) -> str:
        lines = [f"policy {self.policy!r} breaks invariant {self.invariant!r}: {INVARIANTS[self.invariant]}"]
        if self.case is not None:
            lines.append(f"  minimal failing case: {self.case!r}")
        lines.append(f"  {self.detail}")
        return "\n".join(lines)


_VIOLATIONS: dict[str, type] = {}


def violation_class(invariant: str) -> type:
    """The ``InvariantViolation`` subclass of one invariant (e.g. ``CapacityViolation``)."""
    if invariant not in INVARIANTS:
        raise KeyError(f"unknown invariant {invariant!r}; known: {', '.join(INVARIANTS)}")
    cls = _VIOLATIONS.get(invariant)
    if cls is None:
        name = "".join(part.title() for part in invariant.split("_")) + "Violation"
        cls = type(name, (InvariantViolation,), {"invariant": invariant, "__module__": __name__})
        _VIOLATIONS[invariant] = cls
    return cls


def violation(invariant: str, policy: str, detail: str, case=None) -> InvariantViolation:
    return violation_class(invariant)(policy, detail, case)


def check_invariant_names(names: Optional[object]) -> tuple[str, ...]:
    """Validate a user's selection of invariants (None = all), in table order."""
    if names is None:
        return tuple(INVARIANTS)
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    names = [str(n).strip() for n in names]
    unknown = [n for n in names if n not in INVARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown invariant(s) {unknown or names!r}; choose from {', '.join(INVARIANTS)}")
    return tuple(n for n in INVARIANTS if n in names)
