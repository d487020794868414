"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453): keep the first S "sink" tokens and the most recent B - S.

Mapping onto next-scale models: the sinks are the first tokens in generation order (with the
default S = 4 for Infinity/VAR: the 1x1 start token and 3 of the 4 tokens of the 2x2 map). The
original re-indexes positions inside the cache; here keys carry their positions already (2-D RoPE
baked into Infinity's cached keys, absolute embeddings in VAR), so no position shift is applied.
If the budget is smaller than S, only the first B sinks are kept.
"""

from __future__ import annotations

import attrs
import torch

from kvpolicy import Policy, Selection, register_policy, scoring
from kvpolicy.validators import check_int_at_least


@register_policy("streamingllm")
@attrs.define(kw_only=True)
class StreamingLLM(Policy):
    """Attention sinks (first tokens) plus the most recent tokens."""

    num_sinks: int = attrs.field(default=4, validator=check_int_at_least(0))

    check_option_values = {"num_sinks": (0, 1, 2, 4, 8)}

    def promised_positions(self, ctx):
        sinks = min(self.num_sinks, ctx.capacity)
        return torch.cat([scoring.first_positions(ctx.length, sinks),
                          scoring.recent_positions(ctx.length, ctx.capacity - sinks)])

    def select(self, keys, values, ctx):
        if ctx.capacity is None or ctx.length <= ctx.capacity:
            return Selection(None, ctx.state)
        sinks = min(self.num_sinks, ctx.capacity)
        recent = ctx.capacity - sinks
        kept = torch.cat([scoring.first_positions(ctx.length, sinks, device=keys.device),
                          scoring.recent_positions(ctx.length, recent, device=keys.device)])
        batch, heads = keys.shape[:2]
        return Selection(kept.expand(batch, heads, -1).clone(), ctx.state)
