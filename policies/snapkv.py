"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
arXiv 2404.14469): an observation window of the last w queries votes for the cached tokens; the
votes are pooled along the sequence and the top ones are kept together with the window itself.

Mapping onto next-scale models (ScaleKV reference §7.1-7.2): the observation window is the last
``window_size`` tokens of the current map in raster order (its bottom rows), exactly what ScaleKV
replaces with spread-out patch centres. Their queries attend (softmax scale 1, no causal mask:
queries of a scale see the whole scale) over the whole cache; the probabilities are summed over
the window queries, the scores of the non-window tokens are pooled (1-D, 'same' padding, kernel
``kernel_size``, ``max`` or ``avg``) and the top (B - w) of them are kept plus the w window tokens,
per batch row and head. Nothing is evicted while the cache fits the capacity B.

Defaults follow the SnapKV LongBench configs (w = 32, kernel 7, max pooling), as issue 2 asks;
the framework setting suggested in reference §7.4 (ScaleKV's own hyper-parameters, so that only the
window placement differs) is ``window_size=16, kernel_size=5``. When the current map has fewer than
w tokens the whole current map is the window. A budget smaller than the window raises at plan time.
Deviation: no causal mask inside the window (queries of a scale see the whole scale).
"""

from __future__ import annotations

import attrs

from kvpolicy import register_policy
from policies.common import RecentWindowSelector, UniformAllocation


@register_policy("snapkv")
@attrs.define(kw_only=True)
class SnapKV(UniformAllocation, RecentWindowSelector):
    """Observation window of the last w raster queries, pooled attention votes, top-k + window."""

    # kvpolicy check: a window that fits small budgets; the values it draws for each option.
    check_options = {"window_size": 4, "kernel_size": 3}
    check_option_values = {"window_size": (1, 2, 3, 4, 6), "kernel_size": (1, 3, 5), "pooling": ("max", "avg")}
