"""PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling", arXiv 2406.02069): SnapKV scoring with per-layer capacities that decrease linearly with
depth (lower layers keep more), the layer mean equal to the budget.

Capacity rule (KVCache-Factory form, ScaleKV reference §7.2), per scale with budget B, window w,
m = B - w and length = the schedule's uncompressed cache length after that scale:

- length < B: every layer gets B (nothing to evict);
- length < 2m: every layer gets B (= top m + window, uniform);
- otherwise min = m // beta, max = 2m - min, and if max >= length - w then max = length - w,
  min = 2m - max; layer l keeps (max - l (max - min) / (L - 1)) + w tokens.

Mapping onto next-scale models: as SnapKV (window = last w raster tokens of the current map), with
this plan evaluated at every scale. Deviation: the reference uses an integer step
(max - min) // (L - 1), whose layer mean exceeds B by up to (L - 2) / 2 tokens; here the linear
ramp is exact and rounded by largest remainders, so the mean capacity equals B exactly (the issue
asks for a layer mean equal to the budget). A single-layer model keeps B.
"""

from __future__ import annotations

import attrs

from kvpolicy import register_policy
from policies.common import PyramidAllocation, RecentWindowSelector
from policies.common.allocations import pyramid_capacities

__all__ = ["PyramidKV", "pyramid_capacities"]


@register_policy("pyramidkv")
@attrs.define(kw_only=True)
class PyramidKV(PyramidAllocation, RecentWindowSelector):
    """SnapKV scoring with a linear per-layer pyramid of capacities (lower layers keep more)."""

    # kvpolicy check: a window that fits small budgets; the values it draws for each option.
    check_options = {"window_size": 4, "kernel_size": 3, "beta": 4}
    check_option_values = {"window_size": (1, 2, 3, 4, 6), "kernel_size": (1, 3, 5), "pooling": ("max", "avg"),
                           "beta": (1, 2, 4, 8, 20)}
