"""Parts that several policies share (``kvpolicy.compose``): allocations (how many tokens each
(scale, layer[, head]) keeps) and selectors (which ones), with their options.

A policy imports ``kvpolicy`` and ``policies.common``, never a sibling policy. Nothing here
registers a policy, so this package has no entry point.
"""

from .allocations import HeadWeightsAllocation, PyramidAllocation, UniformAllocation, pyramid_capacities
from .options import check_odd_kernel, check_window_fits, mask_padding
from .patch_window import (PatchWindowPolicy, PatchWindowSelector, observation_window_positions,
                           observation_window_scores, observation_window_select, summed_window_logits,
                           topk_plus_forced_exact, window_queries)
from .recent_window import RecentWindowPolicy, RecentWindowSelector
from .selectors import HeavyHitterSelector, SinksRecentSelector, SlidingWindowSelector

__all__ = ["HeadWeightsAllocation", "PyramidAllocation", "UniformAllocation", "pyramid_capacities",
           "check_odd_kernel", "check_window_fits", "mask_padding", "PatchWindowPolicy", "PatchWindowSelector",
           "observation_window_positions", "observation_window_scores", "observation_window_select",
           "summed_window_logits", "topk_plus_forced_exact", "window_queries", "RecentWindowPolicy",
           "RecentWindowSelector", "HeavyHitterSelector", "SinksRecentSelector", "SlidingWindowSelector"]
