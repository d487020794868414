"""H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023, arXiv 2306.14048): keep the tokens that received the most attention so far
("heavy hitters") plus the most recent tokens.

Mapping onto next-scale models (ScaleKV reference §7.1-7.2): every query of every scale is a step
of H2O. After a layer's attention at scale k, the softmax probabilities of all h_k x w_k queries
over the whole cache (kept history + current map, softmax scale 1: ``queries @ keys^T`` are the
model's logits) are summed over queries and added to each token's running total; tokens of the
current map start at 0. The totals are the policy state, aligned with the cached positions and
gathered with the kept indices, so they follow the compact cache. When the cache exceeds the
layer capacity B it keeps the last ``recent = B - heavy`` tokens (generation order) and the
``heavy = floor(heavy_ratio * B)`` older tokens with the largest totals, per batch row and head.

Deviations from the original: totals are per batch row (the original sums over the batch, which
couples the rows; each CFG row is compressed as if alone here); the split is half heavy / half
recent by default (H2O's README uses 10 % + 10 % of the prompt; the split for a given budget is not
fixed officially); probabilities are computed in query blocks instead of materialising the full
attention matrix; the cache is physically compacted (the original scripts only mask logits).
Totals accumulate at every scale, including scales at which nothing is evicted.
"""

from __future__ import annotations

import math

import attrs
import torch

from kvpolicy import Policy, Selection, register_policy, scoring


def _check_ratio(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
        raise ValueError(f"h2o {attribute.name} must be a number in [0, 1] (fraction of the capacity given "
                         f"to heavy hitters; the rest is the recent window), got {value!r}")


@register_policy("h2o")
@attrs.define(kw_only=True)
class H2O(Policy):
    """Heavy hitters by attention accumulated over every query of every scale + recent window."""

    needs_queries = True
    stateful = True

    heavy_ratio: float = attrs.field(default=0.5, validator=_check_ratio)

    check_option_values = {"heavy_ratio": (0.0, 0.25, 0.5, 0.75, 1.0)}

    def split(self, capacity: int) -> tuple[int, int]:
        """(heavy, recent) token counts for a capacity; recent gets the odd token."""
        heavy = math.floor(self.heavy_ratio * capacity + 1e-9)
        return heavy, capacity - heavy

    def accumulate(self, keys: torch.Tensor, ctx) -> torch.Tensor:
        """Running attention totals (B, H, L) after adding the current scale's queries."""
        batch, heads, length, _ = keys.shape
        previous = length - ctx.n_current
        state = ctx.state
        if state is None:
            if previous != 0:
                raise ValueError(f"h2o got no accumulated-attention state for a cache of {length} tokens at "
                                 f"scale {ctx.scale}; pass the state returned by the previous compress call")
            totals = torch.zeros(batch, heads, 0, dtype=torch.float32, device=keys.device)
        else:
            if not isinstance(state, torch.Tensor) or tuple(state.shape) != (batch, heads, previous):
                raise ValueError(f"h2o state {getattr(state, 'shape', type(state).__name__)} does not match the "
                                 f"cached history (B={batch}, H={heads}, {previous} tokens before scale "
                                 f"{ctx.scale}); a stale state from another generation? reset the cache")
            totals = state.to(device=keys.device, dtype=torch.float32)
        totals = torch.cat([totals, totals.new_zeros(batch, heads, ctx.n_current)], dim=2)
        return totals + scoring.attention_scores(ctx.queries, keys, softmax=True)

    def promised_positions(self, ctx):
        """The recent window (capacity - heavy tokens) is always kept."""
        return scoring.recent_positions(ctx.length, self.split(ctx.capacity)[1])

    def select(self, keys, values, ctx):
        totals = self.accumulate(keys, ctx)
        if ctx.capacity is None or ctx.length <= ctx.capacity:
            return Selection(None, totals)
        _, recent = self.split(ctx.capacity)
        # scoring.recent_positions(length, 0) is empty (no "-0:" slice that would select everything).
        forced = scoring.recent_positions(ctx.length, recent, device=keys.device)
        indices = scoring.topk_with_forced(totals, forced, ctx.capacity)
        return Selection(indices, torch.gather(totals, 2, indices))
