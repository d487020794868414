"""SnapKV's selector: the last w raster tokens of the current map vote for the cached tokens
(softmax probabilities summed over the window queries), the votes of the other tokens are pooled
along the cache and the top (capacity − w) kept with the window. Used by ``snapkv`` and
``pyramidkv`` and composable with any allocation (``kvpolicy.compose``)."""

from __future__ import annotations

import attrs
import torch

from kvpolicy import CapacityPlan, ScoredPolicy, scoring
from kvpolicy.validators import check_positive_int

from .options import check_odd_kernel, check_pooling_name, check_window_fits, mask_padding


@attrs.define(kw_only=True, slots=False)
class RecentWindowSelector(ScoredPolicy):
    """SnapKV's selection: the last ``window_size`` tokens of the current map vote (softmax
    probabilities over the whole cache, summed over the window queries); the non-window votes are
    pooled (1-D, 'same' padding) and the top (capacity − window) kept with the window. A current
    map smaller than the window makes the whole map the window. Over a ragged cache each (row,
    head) is scored as if alone (padding gets no votes and pools like the 'same' padding)."""

    needs_queries = True

    window_size: int = attrs.field(default=32, validator=check_positive_int)
    kernel_size: int = attrs.field(default=7, validator=check_odd_kernel)
    pooling: str = attrs.field(default="max", validator=check_pooling_name)

    def window(self, ctx) -> int:
        """Observation-window length at this scale: w, or the whole current map if it is smaller."""
        return min(self.window_size, ctx.n_current)

    def check_plan(self, plan: CapacityPlan, schedule) -> CapacityPlan:
        return check_window_fits(plan, schedule, lambda s: min(self.window_size, schedule.tokens(s)),
                                 self.name, self.window_size)

    def forced_positions(self, ctx):
        return scoring.recent_positions(ctx.length, self.window(ctx))

    def score(self, keys, ctx):
        window = self.window(ctx)
        valid = ctx.valid_mask()
        votes = scoring.attention_scores(ctx.queries[:, :, ctx.n_current - window:], keys, softmax=True, valid=valid)
        # Pool only the candidates: window tokens are kept anyway and must not spread their votes.
        candidates = votes[..., : ctx.length - window]
        if valid is not None:
            candidates = mask_padding(candidates, valid[..., : ctx.length - window], self.pooling)
        candidates = scoring.pool_scores(candidates, self.kernel_size, self.pooling)
        return torch.cat([candidates, votes[..., ctx.length - window:]], dim=-1)


RecentWindowPolicy = RecentWindowSelector  # the name the selector had in kvpolicy.windowed
