"""Shared bases for policies that rank cached tokens by the votes of an observation window.

Two families share their configuration and selection here, because policies may not import each
other (``policies`` import only ``kvpolicy``):

- ``RecentWindowPolicy``: SnapKV's rule (window = the last w raster tokens of the current map,
  softmax votes, pooling, top-k + window), used by ``snapkv`` and ``pyramidkv``;
- ``PatchWindowPolicy``: ScaleKV's rule (window = patch centres spread over the current map,
  ``scoring.observation_window_select``), used by ``scalekv`` and ``uniform``.

Both keep everything while the cache fits the capacity. Neither is registered: the concrete
policies subclass them and bring the capacity plan.
"""

from __future__ import annotations

from typing import Optional

import attrs
import torch

from .plan import CapacityPlan
from .policy import Policy, ScoredPolicy, Selection
from . import scoring
from .validators import check_choice, check_positive_int

PATCH_WINDOW_MODES = ("attention", "reference")
_POOLING = {"max": "max", "maxpool": "max", "avg": "avg", "avgpool": "avg", "mean": "avg"}


def _label(instance) -> str:
    return instance.name or type(instance).__name__


def check_odd_kernel(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"{_label(instance)} {attribute.name} must be an odd int >= 1 (1 = no pooling; odd keeps "
                         f"the pooled length), got {value!r}")


def _pooling(value):
    """'max'/'avg' (and the aliases 'maxpool', 'avgpool', 'mean'); None = the mode's default."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in _POOLING:
        raise ValueError(f"pooling must be 'max' or 'avg' (or 'maxpool'/'avgpool'/'mean'), got {value!r}")
    return _POOLING[value]


def _check_pooling_name(instance, attribute, value):
    if value not in ("max", "avg"):
        raise ValueError(f"{_label(instance)} pooling must be 'max' or 'avg', got {value!r}")


def _check_square_window(instance, attribute, value):
    check_positive_int(instance, attribute, value)
    root = int(value ** 0.5 + 0.5)
    if root * root != value:
        raise ValueError(f"{_label(instance)} window_size must be a perfect square (the centres of a √w × √w grid "
                         f"of patches: 4, 9, 16, ...), got {value!r}")


def check_window_fits(plan: CapacityPlan, schedule, window, name: str, window_size: int) -> CapacityPlan:
    """Every capacity that can evict must hold the observation window (``window(scale)`` tokens)."""
    for scale, row in enumerate(plan.capacities):
        for layer, capacity in enumerate(row):
            if capacity is not None and capacity < schedule.cumulative_length(scale) and capacity < window(scale):
                raise ValueError(
                    f"{name}: capacity {capacity} at scale {scale}, layer {layer} is smaller than that scale's "
                    f"observation window ({window(scale)} tokens, window_size={window_size} capped by the map); "
                    f"budgets of at least {window_size} tokens always fit, or choose a smaller window_size")
    return plan


@attrs.define(kw_only=True)
class RecentWindowPolicy(ScoredPolicy):
    """SnapKV's selection: the last ``window_size`` tokens of the current map vote (softmax
    probabilities over the whole cache, summed over the window queries); the non-window votes are
    pooled (1-D, 'same' padding) and the top (capacity − window) kept with the window. A current
    map smaller than the window makes the whole map the window."""

    needs_queries = True

    window_size: int = attrs.field(default=32, validator=check_positive_int)
    kernel_size: int = attrs.field(default=7, validator=check_odd_kernel)
    pooling: str = attrs.field(default="max", validator=_check_pooling_name)

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
        votes = scoring.attention_scores(ctx.queries[:, :, ctx.n_current - window:], keys, softmax=True)
        # Pool only the candidates: window tokens are kept anyway and must not spread their votes.
        candidates = scoring.pool_scores(votes[..., : ctx.length - window], self.kernel_size, self.pooling)
        return torch.cat([candidates, votes[..., ctx.length - window:]], dim=-1)


@attrs.define(kw_only=True)
class PatchWindowPolicy(Policy):
    """ScaleKV's selection (``scoring.observation_window_select``): the centres of a √w × √w patch
    grid on the current map are kept and vote; ``mode="attention"`` uses the model's queries and
    softmax probabilities (average pooling by default), ``mode="reference"`` the raw query
    projection and raw logits as the released code (max pooling by default)."""

    mode: str = attrs.field(default="attention", validator=check_choice(PATCH_WINDOW_MODES))
    window_size: int = attrs.field(default=16, validator=_check_square_window)
    kernel_size: int = attrs.field(default=5, validator=check_odd_kernel)
    pooling: Optional[str] = attrs.field(default=None, converter=_pooling)

    @property
    def effective_pooling(self) -> str:
        return self.pooling or ("max" if self.mode == "reference" else "avg")

    @property
    def needs_queries(self) -> bool:
        return self.mode == "attention"

    @property
    def needs_raw_queries(self) -> bool:
        return self.mode == "reference"

    def check_plan(self, plan: CapacityPlan, schedule) -> CapacityPlan:
        # The patch window has window_size tokens at every scale (small maps fall back to the last
        # window_size cache tokens), so the check does not depend on the scale.
        return check_window_fits(plan, schedule, lambda s: self.window_size, self.name, self.window_size)

    def select(self, keys, values, ctx):
        if ctx.capacity is None or ctx.length <= ctx.capacity:
            return Selection(None, ctx.state)
        indices = scoring.observation_window_select(keys, ctx, raw=self.mode == "reference",
                                                    window_size=self.window_size, kernel_size=self.kernel_size,
                                                    pooling=self.effective_pooling)
        return Selection(indices, ctx.state)
