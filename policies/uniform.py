"""Uniform: ScaleKV's token selection with the same capacity in every layer (the ablation baseline).

Isolates what ScaleKV's drafter/refiner budgets add: every layer keeps B tokens once its cache
exceeds B (the same trigger as ScaleKV, reference/scalekv.md §3.5), chosen exactly as ScaleKV
chooses them (``policies.common.observation_window_select``): the 4 × 4 patch-centre window of
the current map plus the top (B − 16) tokens by the window queries' pooled scores. ``mode``,
``window_size``, ``kernel_size`` and ``pooling`` mean what they mean for ``scalekv``:
"attention" (default: real queries, softmax, average pooling) or "reference" (raw queries, raw
logits, max pooling, as the released code).
"""

from __future__ import annotations

import attrs

from kvpolicy import register_policy
from policies.common import PatchWindowSelector, UniformAllocation


@register_policy("uniform")
@attrs.define(kw_only=True)
class Uniform(UniformAllocation, PatchWindowSelector):
    """ScaleKV's selection with one capacity for every layer (no drafters or refiners)."""

    # kvpolicy check: a window that fits small budgets; the values it draws for each option.
    check_options = {"window_size": 4, "kernel_size": 3}
    check_option_values = {"mode": ("attention", "reference"), "pooling": (None, "max", "avg")}

    def make_plan(self, schedule, num_layers, budget_tokens):
        if budget_tokens < self.window_size and budget_tokens < schedule.total:  # a budget >= every token never evicts
            raise ValueError(f"uniform: budget {budget_tokens} tokens per layer is below window_size={self.window_size}; "
                             "the observation window alone would overflow it (raise the budget or lower window_size)")
        return super().make_plan(schedule, num_layers, budget_tokens)
