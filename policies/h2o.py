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

import attrs

from kvpolicy import register_policy
from policies.common import HeavyHitterSelector, UniformAllocation


@register_policy("h2o")
@attrs.define(kw_only=True)
class H2O(UniformAllocation, HeavyHitterSelector):
    """Heavy hitters by attention accumulated over every query of every scale + recent window."""

    check_option_values = {"heavy_ratio": (0.0, 0.25, 0.5, 0.75, 1.0)}
