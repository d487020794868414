"""Full cache: keep every token (the reference every other policy is measured against)."""

from __future__ import annotations

import attrs

from kvpolicy import CapacityPlan, Policy, Selection, register_policy


@register_policy("full")
@attrs.define(kw_only=True)
class FullCache(Policy):
    """Never evicts: every layer keeps every token of every scale (takes no budget)."""

    requires_budget = False
    keeps_everything = True

    def __attrs_post_init__(self):
        if self.budget is not None:  # a budget would be silently meaningless
            raise ValueError(f"policy 'full' keeps every token and takes no budget, got budget={self.budget}; "
                             "drop the budget or pick a compressing policy")

    def make_plan(self, schedule, num_layers, budget_tokens):
        return CapacityPlan(capacities=[[None] * num_layers] * schedule.num_scales, budget_tokens=None,
                            policy=self.name, cumulative=schedule.cumulative)

    def plan(self, schedule, num_layers, budget=None):
        if budget is not None:
            raise ValueError(f"policy 'full' keeps every token and takes no budget, got budget={budget!r}")
        return super().plan(schedule, num_layers)

    def select(self, keys, values, ctx):
        return Selection(None, ctx.state)
