"""Sliding window (Longformer-style local attention, arXiv 2004.05150): keep the most recent tokens.

Mapping onto next-scale models: "recent" is generation order (scale by scale, row-major inside a
scale), so with budget B a layer keeps the last B tokens; at Infinity 1024^2 and 10 % that is the
last ~13.5 rows of the 48x48 map. Nothing is evicted while the cache fits the budget.
"""

from __future__ import annotations

import attrs

from kvpolicy import register_policy
from policies.common import SlidingWindowSelector, UniformAllocation


@register_policy("sliding_window")
@attrs.define(kw_only=True)
class SlidingWindow(UniformAllocation, SlidingWindowSelector):
    """Keep the last B tokens in generation order."""
