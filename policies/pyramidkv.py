"""PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", arXiv 2406.02069): SnapKV scoring with per-layer capacities that decrease linearly with
depth (lower layers keep more), the layer mean equal to the budget.

Capacity rule (KVCache-Factory form, ScaleKV reference §7.2), per scale with budget B, window w,
m = B - w and length = the schedule's uncompressed cache length after that scale:

- length < B: every layer gets B (nothing to evict);
- length < 2m: every layer gets B (= top m + window, uniform);
- otherwise min = m // beta, max = 2m - min, and if max >= length - w then max = length - w,
  min = 2m - max; layer l keeps (max - l (max - min) / (L - 1)) + w tokens.

Mapping onto next-scale models: as SnapKV (window = last w raster tokens of the current map), with
this plan evaluated at every scale. Deviation: the reference uses an integer step
(max - min) // (L - 1), whose layer mean exceeds B by up to (L - 2) / 2 tokens; here the linear
ramp is exact and rounded by largest remainders, so the mean capacity equals B exactly (the issue
asks for a layer mean equal to the budget). A single-layer model keeps B.
"""

from __future__ import annotations

import attrs

from kvpolicy import CapacityPlan, register_policy
from kvpolicy.validators import check_positive_int
from policies.common import RecentWindowPolicy


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


@register_policy("pyramidkv")
@attrs.define(kw_only=True)
class PyramidKV(RecentWindowPolicy):
    """SnapKV scoring with a linear per-layer pyramid of capacities (lower layers keep more)."""

    beta: int = attrs.field(default=20, validator=check_positive_int)

    # kvpolicy check: a window that fits small budgets; the values it draws for each option.
    check_options = {"window_size": 4, "kernel_size": 3, "beta": 4}
    check_option_values = {"window_size": (1, 2, 3, 4, 6), "kernel_size": (1, 3, 5), "pooling": ("max", "avg"),
                           "beta": (1, 2, 4, 8, 20)}

    def make_plan(self, schedule, num_layers, budget_tokens):
        if budget_tokens is None:
            return super().make_plan(schedule, num_layers, budget_tokens)
        if budget_tokens < self.window_size and budget_tokens < schedule.total:  # a budget >= every token never evicts
            raise ValueError(f"pyramidkv: budget {budget_tokens} tokens is smaller than the observation window "
                             f"window_size={self.window_size}; use a budget >= {self.window_size} or a smaller window")
        rows = [pyramid_capacities(budget_tokens, self.window_size, length, num_layers, self.beta)
                for length in schedule.cumulative]
        plan = CapacityPlan(capacities=rows, budget_tokens=budget_tokens, policy=self.name,
                            cumulative=schedule.cumulative)
        return self.check_plan(plan, schedule)
