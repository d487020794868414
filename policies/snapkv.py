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
import torch

from kvpolicy import CapacityPlan, ScoredPolicy, register_policy, scoring


def _check_positive_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{instance.name or type(instance).__name__} {attribute.name} must be an int >= 1, got {value!r}")


def _check_kernel(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"{instance.name or type(instance).__name__} kernel_size must be an odd int >= 1 "
                         f"(1 = no pooling), got {value!r}")


def _check_pooling(instance, attribute, value):
    if value not in ("max", "avg"):
        raise ValueError(f"{instance.name or type(instance).__name__} pooling must be 'max' or 'avg', got {value!r}")


@register_policy("snapkv")
@attrs.define(kw_only=True)
class SnapKV(ScoredPolicy):
    """Observation window of the last w raster queries, pooled attention votes, top-k + window."""

    needs_queries = True

    window_size: int = attrs.field(default=32, validator=_check_positive_int)
    kernel_size: int = attrs.field(default=7, validator=_check_kernel)
    pooling: str = attrs.field(default="max", validator=_check_pooling)

    def window(self, ctx) -> int:
        """Observation-window length at this scale: w, or the whole current map if it is smaller."""
        return min(self.window_size, ctx.n_current)

    def make_plan(self, schedule, num_layers, budget_tokens):
        plan = super().make_plan(schedule, num_layers, budget_tokens)
        self.check_plan(plan, schedule)
        return plan

    def check_plan(self, plan: CapacityPlan, schedule) -> None:
        """Every capacity that can evict must hold the observation window."""
        for scale, row in enumerate(plan.capacities):
            window = min(self.window_size, schedule.tokens(scale))
            for layer, capacity in enumerate(row):
                if capacity is not None and capacity < schedule.cumulative_length(scale) and capacity < window:
                    raise ValueError(
                        f"{self.name}: capacity {capacity} at scale {scale}, layer {layer} is smaller than the "
                        f"observation window ({window} tokens); use a budget >= window_size={self.window_size} "
                        f"tokens or a smaller window_size")

    def forced_positions(self, ctx):
        return scoring.recent_positions(ctx.length, self.window(ctx))

    def score(self, keys, ctx):
        window = self.window(ctx)
        votes = scoring.attention_scores(ctx.queries[:, :, ctx.n_current - window:], keys, softmax=True)
        # Pool only the candidates: window tokens are kept anyway and must not spread their votes.
        candidates = scoring.pool_scores(votes[..., : ctx.length - window], self.kernel_size, self.pooling)
        return torch.cat([candidates, votes[..., ctx.length - window:]], dim=-1)
