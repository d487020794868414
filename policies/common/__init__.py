"""Parts that several policies share: selectors (which tokens to keep) and their options.

A policy imports ``kvpolicy`` and ``policies.common``, never a sibling policy. Nothing here
registers a policy, so this package has no entry point.
"""

from .options import check_odd_kernel, check_window_fits
from .patch_window import (PatchWindowPolicy, observation_window_positions, observation_window_select,
                           summed_window_logits, topk_plus_forced_exact, window_queries)
from .recent_window import RecentWindowPolicy

__all__ = ["check_odd_kernel", "check_window_fits", "PatchWindowPolicy", "observation_window_positions",
           "observation_window_select", "summed_window_logits", "topk_plus_forced_exact", "window_queries",
           "RecentWindowPolicy"]
