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

from kvpolicy import register_policy
from policies.common import SinksRecentSelector, UniformAllocation


@register_policy("streamingllm")
@attrs.define(kw_only=True)
class StreamingLLM(UniformAllocation, SinksRecentSelector):
    """Attention sinks (first tokens) plus the most recent tokens."""

    check_option_values = {"num_sinks": (0, 1, 2, 4, 8)}
