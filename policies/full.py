"""Full cache: keep every token (the reference every other policy is measured against)."""

from __future__ import annotations

import attrs

from kvpolicy import CapacityPlan, Policy, Selection, register_policy


@register_policy("full")
@attrs.define(kw_only=True)
class FullCache(Policy):
    """Never evicts: every layer keeps every token of every scale (the budget, if any, is ignored)."""

    requires_budget = False

    def make_plan(self, schedule, num_layers, budget_tokens):
        return CapacityPlan(capacities=[[None] * num_layers] * schedule.num_scales, budget_tokens=None,
                            policy=self.name, cumulative=schedule.cumulative)

    def plan(self, schedule, num_layers, budget=None):
        return super().plan(schedule, num_layers)  # a budget never changes the full cache

    def select(self, keys, values, ctx):
        return Selection(None, ctx.state)
