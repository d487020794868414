"""Sliding window (Longformer-style local attention, arXiv 2004.05150): keep the most recent tokens.

Mapping onto next-scale models: "recent" is generation order (scale by scale, row-major inside a
scale), so with budget B a layer keeps the last B tokens; at Infinity 1024^2 and 10 % that is the
last ~13.5 rows of the 48x48 map. Nothing is evicted while the cache fits the budget.
"""

from __future__ import annotations

import attrs
import torch

from kvpolicy import Policy, Selection, register_policy


@register_policy("sliding_window")
@attrs.define(kw_only=True)
class SlidingWindow(Policy):
    """Keep the last B tokens in generation order."""

    def promised_positions(self, ctx):
        return torch.arange(ctx.length - ctx.capacity, ctx.length)

    def select(self, keys, values, ctx):
        if ctx.capacity is None or ctx.length <= ctx.capacity:
            return Selection(None, ctx.state)
        batch, heads = keys.shape[:2]
        kept = torch.arange(ctx.length - ctx.capacity, ctx.length, device=keys.device)
        return Selection(kept.expand(batch, heads, -1).clone(), ctx.state)
