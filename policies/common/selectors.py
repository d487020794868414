"""Position-based selectors: the most recent tokens (sliding window), attention sinks + the most
recent tokens (StreamingLLM), and heavy hitters + the most recent tokens (H2O, with its state).

Each keeps exactly what its policy always kept for layer-wise plans; with head-wise capacities or
a ragged cache every (row, head) applies the same rule to its own tokens and its own capacity.
"""

from __future__ import annotations

import math

import attrs
import torch

from kvpolicy import Policy, Selection, scoring
from kvpolicy.validators import check_int_at_least


def _recency(ctx, batch, heads, device):
    """Scores that rank later positions higher (every (row, head) keeps its most recent tokens)."""
    return torch.arange(ctx.length, device=device, dtype=torch.float32).expand(batch, heads, ctx.length)


def _head_promises(ctx, first_count, last_count):
    """Promised positions under head-wise capacities or a ragged cache: per (row, head), its first
    ``first_count(cap)`` and last ``last_count(cap)`` real tokens for its own capacity ``cap``, as a
    (B, H, P) tensor padded with -1 (None in the layer-wise case: the caller's rule applies)."""
    if ctx.head_capacities is None and ctx.lengths is None:
        return None
    if ctx.lengths is not None:
        real = ctx.lengths.tolist()
        batch, heads = len(real), len(real[0])
    else:
        heads = int(ctx.head_capacities.numel())
        batch, real = 1, [[ctx.length] * heads]
    caps = ctx.head_capacities.tolist() if ctx.head_capacities is not None else [ctx.capacity] * heads
    rows = []
    for b in range(batch):
        row = []
        for h in range(heads):
            length, cap = real[b][h], min(caps[h], real[b][h])
            start = ctx.length - length  # left padding in the view
            first = min(first_count(cap), cap)
            last = min(last_count(cap), cap - first)
            row.append([start + i for i in range(first)] + list(range(ctx.length - last, ctx.length)))
        rows.append(row)
    width = max((len(p) for row in rows for p in row), default=0)
    out = torch.full((batch, heads, width), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        for h, positions in enumerate(row):
            out[b, h, :len(positions)] = torch.tensor(positions, dtype=torch.long)
    return out if ctx.lengths is not None else out[0]


def _fits(ctx) -> bool:
    return ctx.capacity is None or (ctx.length <= ctx.capacity and ctx.head_capacities is None)


def _head_budgets(keys, ctx):
    """(batch, heads, budgets): budgets are the (B, H) capacities of head-wise plans or a ragged cache,
    None in the layer-wise case (one capacity for every row and head)."""
    batch, heads = keys.shape[:2]
    return batch, heads, ctx.capacities_per_head(batch, heads)


@attrs.define(kw_only=True, slots=False)
class SlidingWindowSelector(Policy):
    """The last ``capacity`` tokens in generation order."""

    def promised_positions(self, ctx):
        per_head = _head_promises(ctx, lambda cap: 0, lambda cap: cap)
        return per_head if per_head is not None else torch.arange(ctx.length - ctx.capacity, ctx.length)

    def select(self, keys, values, ctx):
        if _fits(ctx):
            return Selection(None, ctx.state)
        batch, heads, budgets = _head_budgets(keys, ctx)
        if budgets is None:
            kept = torch.arange(ctx.length - ctx.capacity, ctx.length, device=keys.device)
            return Selection(kept.expand(batch, heads, -1).clone(), ctx.state)
        return Selection(scoring.per_head_topk(_recency(ctx, batch, heads, keys.device), budgets,
                                               valid=ctx.valid_mask()), ctx.state)


@attrs.define(kw_only=True, slots=False)
class SinksRecentSelector(Policy):
    """The first ``num_sinks`` tokens (attention sinks) plus the most recent ones."""

    num_sinks: int = attrs.field(default=4, validator=check_int_at_least(0))

    def promised_positions(self, ctx):
        per_head = _head_promises(ctx, lambda cap: min(self.num_sinks, cap), lambda cap: cap - min(self.num_sinks, cap))
        if per_head is not None:
            return per_head
        sinks = min(self.num_sinks, ctx.capacity)
        return torch.cat([scoring.first_positions(ctx.length, sinks),
                          scoring.recent_positions(ctx.length, ctx.capacity - sinks)])

    def select(self, keys, values, ctx):
        if _fits(ctx):
            return Selection(None, ctx.state)
        batch, heads, budgets = _head_budgets(keys, ctx)
        if budgets is None:
            sinks = min(self.num_sinks, ctx.capacity)
            recent = ctx.capacity - sinks
            kept = torch.cat([scoring.first_positions(ctx.length, sinks, device=keys.device),
                              scoring.recent_positions(ctx.length, recent, device=keys.device)])
            return Selection(kept.expand(batch, heads, -1).clone(), ctx.state)
        # Per (row, head): its first min(S, capacity) real tokens are forced, the rest most recent.
        start = ctx.padding() if ctx.lengths is not None else torch.zeros_like(budgets)
        sinks = torch.clamp(budgets, max=self.num_sinks)
        positions = torch.arange(ctx.length, device=keys.device)
        forced = (positions >= start.unsqueeze(-1)) & (positions < (start + sinks).unsqueeze(-1))
        return Selection(scoring.per_head_topk(_recency(ctx, batch, heads, keys.device), budgets, forced=forced,
                                               valid=ctx.valid_mask()), ctx.state)


def _check_ratio(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
        raise ValueError(f"h2o {attribute.name} must be a number in [0, 1] (fraction of the capacity given "
                         f"to heavy hitters; the rest is the recent window), got {value!r}")


@attrs.define(kw_only=True, slots=False)
class HeavyHitterSelector(Policy):
    """H2O's selection: heavy hitters by attention accumulated over every query of every scale (the
    policy state: totals aligned with the cached positions) plus a recent window."""

    needs_queries = True
    stateful = True

    heavy_ratio: float = attrs.field(default=0.5, validator=_check_ratio)

    def split(self, capacity: int) -> tuple[int, int]:
        """(heavy, recent) token counts for a capacity; recent gets the odd token."""
        heavy = math.floor(self.heavy_ratio * capacity + 1e-9)
        return heavy, capacity - heavy

    def promised_positions(self, ctx):
        """The recent window (capacity - heavy tokens) is always kept."""
        per_head = _head_promises(ctx, lambda cap: 0, lambda cap: self.split(cap)[1])
        return per_head if per_head is not None else scoring.recent_positions(ctx.length, self.split(ctx.capacity)[1])

    def accumulate(self, keys: torch.Tensor, ctx) -> torch.Tensor:
        """Running attention totals (B, H, L) after adding the current scale's queries."""
        batch, heads, length, _ = keys.shape
        previous = length - ctx.n_current
        state = ctx.state
        if state is None:
            if previous != 0:
                raise ValueError(f"h2o got no accumulated-attention state for a cache of {length} tokens at "
                                 f"scale {ctx.scale}; pass the state returned by the previous compress call")
            totals = torch.zeros(batch, heads, 0, dtype=torch.float32, device=keys.device)
        else:
            if not isinstance(state, torch.Tensor) or tuple(state.shape) != (batch, heads, previous):
                raise ValueError(f"h2o state {getattr(state, 'shape', type(state).__name__)} does not match the "
                                 f"cached history (B={batch}, H={heads}, {previous} tokens before scale "
                                 f"{ctx.scale}); a stale state from another generation? reset the cache")
            totals = state.to(device=keys.device, dtype=torch.float32)
        totals = torch.cat([totals, totals.new_zeros(batch, heads, ctx.n_current)], dim=2)
        return totals + scoring.attention_scores(ctx.queries, keys, softmax=True, valid=ctx.valid_mask())

    def select(self, keys, values, ctx):
        totals = self.accumulate(keys, ctx)
        if _fits(ctx):
            return Selection(None, totals)
        batch, heads, budgets = _head_budgets(keys, ctx)
        if budgets is None:
            _, recent = self.split(ctx.capacity)
            # scoring.recent_positions(length, 0) is empty (no "-0:" slice that would select everything).
            forced = scoring.recent_positions(ctx.length, recent, device=keys.device)
            indices = scoring.topk_with_forced(totals, forced, ctx.capacity)
            return Selection(indices, torch.gather(totals, 2, indices))
        heavy = torch.floor(budgets.double() * self.heavy_ratio + 1e-9).long()
        recent = budgets - heavy
        forced = torch.arange(ctx.length, device=keys.device) >= (ctx.length - recent).unsqueeze(-1)
        # The next scale sees this (row, head)'s kept tokens at the end of its left-padded view.
        return Selection(scoring.per_head_topk(
            totals, budgets, forced=forced, valid=ctx.valid_mask(),
            state_from=lambda indices, lengths: scoring.left_align(torch.gather(totals, 2, indices), lengths)), None)
