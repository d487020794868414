"""AdaKV (Feng, Lv, Cao, Xie, Zhou, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
Allocation for Efficient LLM Inference", NeurIPS 2025, arXiv 2407.11550; code FFY0/AdaKV, read
for facts): a layer's budget is shared among its heads by score mass instead of split evenly.

Rule (paper, Algorithm "Ada-SnapKV", with its safeguard): with per-head budget B (the layer holds
H·B tokens per row) and a scored selector whose observation window w is always kept, the
m = B − w scored slots per head are allocated as follows: every head first gets a floor of
⌊α·m⌋ slots (``floor_alpha`` α; the paper's experiments use 0.2, its code's default is 0.5),
then the remaining H·(m − ⌊α·m⌋) slots go to the highest scores among all heads of the row
together; a head keeps its top-(floor + its share) tokens by its own scores, plus the window.
So the sum over heads is exactly H·B (at most the cache), and a head whose scores concentrate
keeps few tokens while a head with spread-out scores keeps many.

Mapping onto this framework: ``AdaptiveHeads`` is a wrapper part (``kvpolicy.compose``) over any
scored selector; ``adakv`` is AdaptiveHeads × UniformAllocation (capacity B per layer) × SnapKV's
selector (the last w raster queries of the current map vote, pooled). Each (batch row, head)
keeps its own number of tokens, stored physically ragged by the cache (``Selection.lengths``). Deviations: the released code
takes the global top-(H·m) counts c_h and rounds c_h·(1 − α) + ⌊α·B⌋ per head, whose sum can
exceed the budget by rounding; here the floor comes first and the remainder is allocated by a
second global top-k, so the sum is exact. The floor is taken on the scored part (m), not on B,
because the window is kept by every head anyway. Options: ``floor_alpha`` (default 0.2, the
paper's experiments) and SnapKV's ``window_size``, ``kernel_size``, ``pooling`` (defaults 32, 7,
max, as ``snapkv``).
"""

from __future__ import annotations

import math

import attrs
import torch

from kvpolicy import ScoredPolicy, register_policy, scoring
from policies.common import RecentWindowSelector, UniformAllocation


def adaptive_head_lengths(scores: torch.Tensor, slots_per_head: int, floor_alpha: float) -> torch.Tensor:
    """How many scored tokens each (row, head) keeps: (B, H) long, summing to H·slots per row.

    ``scores`` (B, H, n): the candidates' scores (window tokens excluded); every head first gets
    ⌊α·slots⌋ of its own best, the rest of the row's H·slots goes to the highest remaining scores
    of all heads together. A head never gets more than its n candidates.
    """
    batch, heads, n = scores.shape
    if not 0 <= floor_alpha <= 1:
        raise ValueError(f"floor_alpha must be in [0, 1], got {floor_alpha!r}")
    slots = min(slots_per_head, n)
    floor = math.floor(floor_alpha * slots)
    lengths = torch.full((batch, heads), floor, dtype=torch.long, device=scores.device)
    remaining = heads * slots - heads * floor
    if remaining <= 0:
        return lengths
    ordered = scores.float().sort(dim=-1, descending=True).values
    # NaN/-inf never win a slot over a real score; a head's own floor tokens are not competed for.
    rest = ordered[..., floor:]
    rest = torch.where(torch.isnan(rest), torch.full_like(rest, float("-inf")), rest)
    winners = rest.reshape(batch, -1).topk(remaining, dim=-1).indices // rest.shape[-1]
    lengths += torch.zeros_like(lengths).scatter_add_(1, winners, torch.ones_like(winners))
    return lengths


def adakv_head_budgets(scores: torch.Tensor, forced: torch.Tensor, capacity: int, floor_alpha: float,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H) tokens each (row, head) keeps: its forced positions (the selector's window, kept by
    every head) plus its floor and its share of the row's remaining scored slots.

    ``scores`` (B, H, L); ``forced`` 1-D positions; ``valid`` (B, H, L) bool (False: padding of a
    ragged view) or None. The row's heads hold at most H · capacity tokens together (exactly that
    unless some head has fewer candidates than its allocation). Reads the device once (the most
    forced positions any (row, head) holds); ``AdaptiveHeads`` defers that read (see there).
    """
    return _adakv_budgets(scores, forced, capacity, floor_alpha, valid, None)[0]


def _adakv_budgets(scores, forced, capacity, floor_alpha, valid, most_forced):
    """``adakv_head_budgets`` with the most forced positions of any (row, head) given on the host
    (``most_forced``; None: read it) -> (budgets, the (B, H) forced counts it assumed the most of)."""
    batch, heads, length = scores.shape
    forced_mask = torch.zeros(length, dtype=torch.bool, device=scores.device)
    forced_mask[forced.to(scores.device)] = True
    forced_mask = forced_mask.expand(batch, heads, length)
    if valid is not None:
        forced_mask = forced_mask & valid
    candidates = scores.float().masked_fill(forced_mask, float("-inf"))
    if valid is not None:
        candidates = candidates.masked_fill(~valid, float("-inf"))
    n_forced = forced_mask.sum(dim=-1)
    available = torch.isfinite(candidates).sum(dim=-1)
    # The scored slots per head, a host number: it sizes the global top-k below.
    slots = capacity - (int(n_forced.max()) if most_forced is None else most_forced)
    counts = adaptive_head_lengths(candidates, max(0, slots), floor_alpha)
    budgets = torch.minimum(counts, available) + n_forced
    # A row whose heads hold at most H x capacity together fits: it keeps everything (decided per
    # row, so that a row is compressed as if alone whatever the other rows hold).
    held = valid.sum(dim=-1) if valid is not None else torch.full_like(budgets, length)
    fits = (held.sum(dim=-1, keepdim=True) <= heads * capacity)
    return torch.where(fits, held, budgets), n_forced


def _check_floor(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"adakv floor_alpha must be a number in [0, 1] (the share of each head's scored slots it "
                         f"keeps whatever the other heads score), got {value!r}")


@attrs.define(kw_only=True, slots=False)
class AdaptiveHeads(ScoredPolicy):
    """Head-adaptive wrapper part (AdaKV): placed before any scored selector, it shares a layer's
    H x capacity among the heads of each row by score, every head floored at ⌊α·(capacity − w)⌋
    scored slots (``floor_alpha`` α) plus its window. Compose it with an allocation and a scored
    selector: ``kvpolicy.compose("adakv_patch", AdaptiveHeads, UniformAllocation, PatchWindowSelector)``."""

    head_adaptive = True

    floor_alpha: float = attrs.field(default=0.2, validator=_check_floor)

    def head_budgets(self, scores, forced, ctx):
        return adakv_head_budgets(scores, forced, ctx.capacity, self.floor_alpha, ctx.valid_mask())

    def head_budgets_deferred(self, scores, forced, ctx):
        """The budgets without a device read: the (row, head) that holds the whole view (no left
        padding; compress's view is as long as its longest (row, head)) has every forced position,
        so the most any (row, head) holds is len(forced) when those are unique positions in range,
        as every built-in selector's are; where not (counted on the device, read with compress's
        checks), ``head_budgets`` redoes it reading the count."""
        if type(self).head_budgets is not AdaptiveHeads.head_budgets:  # a subclass's own allocation
            return super().head_budgets_deferred(scores, forced, ctx)
        budgets, n_forced = _adakv_budgets(scores, forced, ctx.capacity, self.floor_alpha, ctx.valid_mask(),
                                           forced.numel())
        return budgets, n_forced.max() != forced.numel()


@register_policy("adakv")
@attrs.define(kw_only=True)
class AdaKV(AdaptiveHeads, UniformAllocation, RecentWindowSelector):
    """AdaKV over SnapKV's selector: a layer's budget shared among its heads by score, each floored."""

    # kvpolicy check: a window that fits small budgets; avg pooling (max pooling ties neighbours
    # exactly and torch.topk splits ties by position, which a ragged view's left padding shifts)
    check_options = {"window_size": 4, "kernel_size": 3, "pooling": "avg"}
    check_option_values = {"window_size": (1, 2, 4, 6), "kernel_size": (1, 3, 5), "floor_alpha": (0.0, 0.2, 0.5, 1.0)}

    def promised_positions(self, ctx):
        return scoring.recent_positions(ctx.length, self.window(ctx))
