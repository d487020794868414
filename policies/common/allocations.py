"""Allocations several policies share: how many tokens each (scale, layer[, head]) may keep.

Each is a part for ``kvpolicy.compose`` (an attrs class with ``slots=False``) whose ``make_plan``
ends with the selector's ``check_plan``.

- ``UniformAllocation``: the budget in every layer at every scale;
- ``PyramidAllocation``: PyramidKV's linear ramp over depth, layer mean = budget;
- ``HeadWeightsAllocation``: a wrapper placed before a layer-wise allocation that splits every
  layer's capacity over its heads in proportion to fixed weights (a static head-wise plan).
"""

from __future__ import annotations

import numbers

import attrs

from kvpolicy import CapacityPlan, Policy
from kvpolicy.validators import check_positive_int


@attrs.define(kw_only=True, slots=False)
class UniformAllocation(Policy):
    """The same capacity (the budget) in every layer at every scale."""

    def make_plan(self, schedule, num_layers, budget_tokens):
        return self.check_plan(Policy.make_plan(self, schedule, num_layers, budget_tokens), schedule)


def pyramid_capacities(budget: int, window: int, length: int, num_layers: int, beta: int) -> list[int]:
    """Per-layer capacities (window included) for one scale; their sum is budget * num_layers."""
    m = budget - window
    if length <= budget:  # nothing to evict, whatever the window (the same B as the rule below)
        return [budget] * num_layers
    if m < 0:
        raise ValueError(f"pyramidkv: budget {budget} is smaller than the observation window {window}")
    if length < 2 * m or num_layers == 1:
        return [budget] * num_layers
    low = m // beta
    high = 2 * m - low
    if high >= length - window:
        high = length - window
        low = 2 * m - high
    # Exact ramp high - l * (high - low) / (L - 1) in units of 1/(L - 1); floors plus the remainder
    # handed to the largest fractional parts (ties to the lower layer) keep the sum at L * m.
    span, denom = high - low, num_layers - 1
    exact = [high * denom - l * span for l in range(num_layers)]
    floors = [e // denom for e in exact]
    remainder = num_layers * m - sum(floors)
    order = sorted(range(num_layers), key=lambda l: (-(exact[l] % denom), l))
    for l in order[:remainder]:
        floors[l] += 1
    return [f + window for f in floors]


@attrs.define(kw_only=True, slots=False)
class PyramidAllocation(Policy):
    """PyramidKV's capacities: decreasing linearly with depth, the layer mean equal to the budget,
    the selector's observation window (``window_size``, 0 without one) on top of the ramp."""

    beta: int = attrs.field(default=20, validator=check_positive_int)

    def make_plan(self, schedule, num_layers, budget_tokens):
        if budget_tokens is None:
            return self.check_plan(Policy.make_plan(self, schedule, num_layers, budget_tokens), schedule)
        window = getattr(self, "window_size", 0)
        if budget_tokens < window and budget_tokens < schedule.total:  # a budget >= every token never evicts
            raise ValueError(f"{self.name}: budget {budget_tokens} tokens is smaller than the observation window "
                             f"window_size={window}; use a budget >= {window} or a smaller window")
        rows = [pyramid_capacities(budget_tokens, window, length, num_layers, self.beta)
                for length in schedule.cumulative]
        plan = CapacityPlan(capacities=rows, budget_tokens=budget_tokens, policy=self.name,
                            cumulative=schedule.cumulative)
        return self.check_plan(plan, schedule)


def split_by_weights(capacity: int, weights) -> tuple[int, ...]:
    """H per-head capacities proportional to ``weights`` summing to exactly H x capacity (floors,
    then the remainder to the largest fractional parts, ties to the lower head)."""
    heads, total_weight = len(weights), float(sum(weights))
    total = heads * capacity
    exact = [w * total / total_weight for w in weights]
    floors = [int(e) for e in exact]
    order = sorted(range(heads), key=lambda h: (-(exact[h] - floors[h]), h))
    for h in order[:total - sum(floors)]:
        floors[h] += 1
    return tuple(floors)


def _weights(value):
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"head_weights must be a list of H positive numbers, got {value!r}")
    return tuple(value)


def _check_weights(instance, attribute, value):
    if value is None:
        raise ValueError(f"{instance.name or type(instance).__name__} needs head_weights=[w_0, ..., w_H-1] (one "
                         "positive number per head: its share of the layer's capacity)")
    if not value or not all(isinstance(w, numbers.Real) and not isinstance(w, bool) and w > 0 for w in value):
        raise ValueError(f"head_weights must be positive numbers, one per head, got {list(value)!r}")


@attrs.define(kw_only=True, slots=False)
class HeadWeightsAllocation(Policy):
    """Head-wise wrapper: every capacity of the allocation after it (in the part order) is split
    over the H heads in proportion to ``head_weights`` (sum exactly H x the layer's capacity), so
    some heads keep more than the layer average and others less."""

    head_weights: tuple = attrs.field(default=None, converter=_weights, validator=_check_weights)

    def make_plan(self, schedule, num_layers, budget_tokens):
        plan = super().make_plan(schedule, num_layers, budget_tokens)
        heads = [[None if cap is None else split_by_weights(cap, self.head_weights) for cap in row]
                 for row in plan.capacities]
        return self.check_plan(attrs.evolve(plan, head_capacities=heads), schedule)
