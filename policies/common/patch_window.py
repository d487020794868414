"""ScaleKV's selector: an observation window of patch centres spread over the current map keeps its
tokens and votes for the others (both the paper's "attention" rule and the released code's
"reference" rule). Shared by ``scalekv`` and ``uniform``, which bring their own capacity plans.

Paper: Li et al., arXiv 2505.19602; released code StargazerX0/ScaleKV @ eb0615a (facts:
shared/reference/scalekv.md §4).
"""

from __future__ import annotations

import math
from typing import Optional

import attrs
import torch

from kvpolicy import CapacityPlan, ScoredPolicy, Selection
from kvpolicy.scoring import _check_forced, attention_scores, group_queries, pool_scores, topk_with_forced
from kvpolicy.validators import check_choice

from .released_scores import (released_pooled_scores_checked, released_topk, released_topk_deferred,
                              released_window_logits)
from .options import (PATCH_WINDOW_MODES, check_odd_kernel, check_square_window, check_window_fits, mask_padding,
                      pooling_option)

def observation_window_positions(h: int, w: int, size: int = 16, start: int = 0, *,
                                 length: int | None = None, device=None) -> torch.Tensor:
    """ScaleKV's observation window: the centres of a √size x √size grid of patches on an h x w map.

    Patches have size (h // g, w // g) with g = √size; the centre of patch (i, j) is row
    i·ph + (ph − 1)//2, column j·pw + (pw − 1)//2, at cache position ``start + row·w + col``
    (ascending, row-major). For square maps this is exactly the released code's rule (ScaleKV
    ``scale_kv.py``, reference/scalekv.md §4.2); non-square maps use the same formula per axis
    (§4.4), where the released code would misread the map. When h < g or w < g (maps too small for
    the grid) the window is the last ``size`` tokens of the cache, ending at ``length`` (default
    ``start + h·w``), as released; it may then reach into earlier scales.
    """
    grid = math.isqrt(size) if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 0
    if grid * grid != size or size < 1:
        raise ValueError(f"observation window size must be a positive perfect square (4, 9, 16, ...), got {size!r}")
    if h < 1 or w < 1 or start < 0:
        raise ValueError(f"map ({h}, {w}) at start {start}: sides must be >= 1 and start >= 0")
    end = start + h * w if length is None else int(length)
    if end < start + h * w:
        raise ValueError(f"cache length {end} is shorter than the map's end {start + h * w}")
    if h < grid or w < grid:
        count = min(size, end)
        return torch.arange(end - count, end, device=device)
    rows = torch.arange(grid, device=device) * (h // grid) + (h // grid - 1) // 2
    cols = torch.arange(grid, device=device) * (w // grid) + (w // grid - 1) // 2
    return start + (rows[:, None] * w + cols[None, :]).reshape(-1)


def window_queries(queries: torch.Tensor, window: torch.Tensor, current_start: int) -> torch.Tensor:
    """The rows of the current map's queries (B, H, n, D) at the window positions that lie in the
    current map (a fallback window may reach into history, which has no queries here)."""
    local = window[window >= current_start] - current_start
    if local.numel() and int(local.max()) >= queries.shape[2]:
        raise ValueError(f"window position {int(local.max()) + current_start} is past the current map "
                         f"({queries.shape[2]} queries from position {current_start})")
    return queries.index_select(2, local.to(queries.device))


def _window_query_rows(h: int, w: int, size: int, start: int, length: int, n_queries: int, device) -> torch.Tensor:
    """``window_queries``' rows (window positions in the current map, minus ``start``) from the
    window's geometry alone: no read of the window tensor (a device->host sync each on a GPU). Grid
    centres always lie in the map; the small-map fallback window is the last ``size`` positions
    before ``length``."""
    grid = math.isqrt(size)
    if h >= grid and w >= grid:
        rows = observation_window_positions(h, w, size, 0, device=device)
        last = ((grid - 1) * (h // grid) + (h // grid - 1) // 2) * w + (grid - 1) * (w // grid) + (w // grid - 1) // 2
    else:
        first = max(length - min(size, length), start)
        rows = torch.arange(first - start, length - start, device=device)
        last = length - 1 - start
    if rows.numel() and last >= n_queries:
        raise ValueError(f"window position {last + start} is past the current map "
                         f"({n_queries} queries from position {start})")
    return rows


def summed_window_logits(window_q: torch.Tensor, keys: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """The released ScaleKV score by linearity, (Σ_j q_j)·k/√D with window columns −∞ -> (B, Hkv, L),
    float32 (float64 for float64 keys). Not what ``mode="reference"`` uses.

    Summing the window queries (and grouped query heads) first makes every key meet one vector: one
    multiply-add per key element instead of one per window query (16×). Mathematically the released
    value, but the released code rounds each logit in the operands' dtype, divides and then sums, so
    the rounding differs: in bf16 other tokens are kept in most (row, head) pairs, in float32 ties on
    pooling plateaus can flip. Reference mode therefore follows the release's own order
    (``released_scores``); this stays as the fast algebra for callers who want it.
    """
    batch, kv_heads, length, dim = keys.shape
    acc = torch.float64 if keys.dtype == torch.float64 else torch.float32
    q = group_queries(window_q.to(acc), kv_heads)
    summed = q.reshape(batch, kv_heads, q.shape[2] * q.shape[3], dim).sum(dim=2)
    scores = _rows_dot(keys, summed).div_(math.sqrt(dim))
    return scores.index_fill_(-1, window.to(keys.device), float("-inf")) if window.numel() else scores


# Elements of the (B, H, block, D) product buffer in _rows_dot (2 MiB in float32), at least 128
# positions per block (measured best on a 2-core CPU at B = 2 and 16, H = 16, D = 128).
_DOT_BLOCK_ELEMENTS = 1 << 19


def _rows_dot(keys: torch.Tensor, vectors: torch.Tensor, *, blocked: bool | None = None) -> torch.Tensor:
    """keys (B, H, L, D) · vectors (B, H, D) -> (B, H, L) in the vectors' dtype, keys read once and
    never copied whole (no dtype conversion of the cache).

    On CPU a batched matrix-vector product (MKL gemv through bmm) reads the keys at a fraction of
    the memory speed (measured: 3-5× slower than a multiply and a row sum), so the product is
    formed in blocks of cache positions that fit in cache; elsewhere one batched matmul.
    ``blocked`` forces either form (tests compare them).
    """
    batch, heads, length, dim = keys.shape
    if blocked is None:
        blocked = keys.device.type == "cpu"
    if not blocked:
        return torch.matmul(keys, vectors.to(keys.dtype).unsqueeze(-1)).squeeze(-1).to(vectors.dtype)
    out = torch.empty(batch, heads, length, dtype=vectors.dtype, device=keys.device)
    rows = max(128, _DOT_BLOCK_ELEMENTS // max(1, batch * heads * dim))
    buffer = torch.empty(batch, heads, min(rows, length), dim, dtype=vectors.dtype, device=keys.device)
    vec = vectors.unsqueeze(2)
    for start in range(0, length, rows):
        stop = min(length, start + rows)
        product = buffer[:, :, :stop - start]
        torch.mul(keys[:, :, start:stop], vec, out=product)
        torch.sum(product, dim=-1, out=out[:, :, start:stop])
    return out


def topk_plus_forced_exact(scores: torch.Tensor, forced: torch.Tensor, capacity: int) -> torch.Tensor:
    """``torch.topk(scores, capacity − len(forced))`` on the scores exactly as given (forced
    positions must already be −inf), then the forced positions appended and everything sorted:
    the released ScaleKV/SnapKV form, tie for tie.

    ``topk_with_forced`` lifts non-forced −inf scores first, which can change how torch.topk
    splits a group of equal scores; this keeps the reference's choice. If the top-k had to reach
    into −inf scores (fewer finite candidates than slots, where the reference would return a forced
    position twice), it falls back to ``topk_with_forced``.
    """
    indices, redo_if, redo = topk_plus_forced_exact_deferred(scores, forced, capacity)
    return redo() if bool(redo_if) else indices


def topk_plus_forced_exact_deferred(scores: torch.Tensor, forced: torch.Tensor, capacity: int):
    """``topk_plus_forced_exact`` without reading the device: (indices, ``redo_if``, ``redo``),
    ``redo_if`` a 0-d bool tensor, True when the top-k reached into −∞/NaN scores and ``redo()``
    (``topk_with_forced``) gives the selection (``Selection.redo_if``/``redo``)."""
    batch, heads, length = scores.shape
    no_redo = torch.zeros((), dtype=torch.bool, device=scores.device)
    n_forced = _check_forced(scores, forced, capacity)
    if n_forced is None:
        return torch.arange(length, device=scores.device).expand(batch, heads, length).clone(), no_redo, None
    keep = min(capacity - n_forced, length - n_forced)
    # Unsorted: torch.topk picks its set before ordering it (ties included), and we sort indices anyway.
    top = scores.topk(keep, dim=-1, sorted=False)
    redo_if = (torch.isneginf(top.values).any() | torch.isnan(top.values).any()).reshape(()) if keep else no_redo
    chosen = torch.cat([top.indices, forced.to(scores.device).view(1, 1, -1).expand(batch, heads, -1)], dim=-1)
    return chosen.sort(dim=-1).values, redo_if, lambda: topk_with_forced(scores, forced, capacity)


def observation_window_scores(keys: torch.Tensor, ctx, *, raw: bool, window_size: int = 16, kernel_size: int = 5,
                              pooling: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """ScaleKV's scores for one (scale, layer): (pooled scores (B, H, L) with the window at −∞, the
    window positions). See ``observation_window_select`` for the two rules. Over a ragged view
    (``ctx.lengths``) padding gets no attention and pools like the 'same' padding (each (row, head)
    as if alone)."""
    return _observation_window_scores(keys, ctx, raw=raw, window_size=window_size, kernel_size=kernel_size,
                                      pooling=pooling)[:2]


def _observation_window_scores(keys, ctx, *, raw, window_size, kernel_size, pooling):
    """``observation_window_scores`` plus, where the released arithmetic proved it while scoring, a
    device bool that is True only if every key is finite (else None)."""
    h, w = ctx.current_shape
    window = observation_window_positions(h, w, window_size, ctx.current_start, length=ctx.length,
                                          device=keys.device)
    valid = ctx.valid_mask()
    rows = _window_query_rows(h, w, window_size, ctx.current_start, ctx.length, ctx.n_current, keys.device)
    if raw:
        q = ctx.raw_queries.index_select(2, rows)
        if valid is None:  # the released arithmetic, operation for operation
            pooled, keys_finite = released_pooled_scores_checked(q, keys, window, kernel_size=kernel_size,
                                                                 pooling=pooling)
            return pooled, window, keys_finite
        scores = released_window_logits(q, keys, window)
    else:
        q = ctx.queries.index_select(2, rows)
        scores = attention_scores(q, keys, softmax=True, valid=valid)
    if valid is not None:
        scores = mask_padding(scores, valid, pooling)
    # pool_scores returns a fresh tensor (or the fresh scores themselves): mask it in place.
    return pool_scores(scores, kernel_size, pooling).index_fill_(-1, window, float("-inf")), window, None


def observation_window_select(keys: torch.Tensor, ctx, *, raw: bool, window_size: int = 16,
                              kernel_size: int = 5, pooling: str = "max") -> torch.Tensor:
    """ScaleKV's selection for one (scale, layer): (B, H, capacity) kept indices, ascending.

    The window (``observation_window_positions`` on the current map) is always kept; the rest is
    ranked by the window queries' scores, pooled along the flattened cache. ``raw=True`` is the
    released rule, reproduced operation for operation (``released_scores``: ``ctx.raw_queries``,
    the window queries' raw logits in the release's dtype, summed, pooled, the window masked before
    and after pooling, a sorted top-k); ``raw=False`` is the paper's (``ctx.queries`` whose products
    with the keys are the model's logits, softmax probabilities summed over the window queries,
    window masked only after pooling).
    """
    pooled, window = observation_window_scores(keys, ctx, raw=raw, window_size=window_size,
                                               kernel_size=kernel_size, pooling=pooling)
    if raw:
        return released_topk(pooled, window, ctx.capacity)
    # Attention mode: probabilities are finite, so this is exactly topk_with_forced's choice without
    # its lifting copies (a NaN or −∞ reaching the top-k falls back to topk_with_forced).
    return topk_plus_forced_exact(pooled, window, ctx.capacity)


@attrs.define(kw_only=True, slots=False)
class PatchWindowSelector(ScoredPolicy):
    """ScaleKV's selection (``observation_window_select``): the centres of a √w × √w patch
    grid on the current map are kept and vote; ``mode="attention"`` uses the model's queries and
    softmax probabilities (average pooling by default), ``mode="reference"`` the raw query
    projection and raw logits as the released code (max pooling by default). A scored selector:
    head-wise capacities and head-adaptive wrappers apply (``ScoredPolicy.head_budgets``)."""

    mode: str = attrs.field(default="attention", validator=check_choice(PATCH_WINDOW_MODES))
    window_size: int = attrs.field(default=16, validator=check_square_window)
    kernel_size: int = attrs.field(default=5, validator=check_odd_kernel)
    pooling: Optional[str] = attrs.field(default=None, converter=pooling_option)

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

    def _scores(self, keys, ctx):
        return _observation_window_scores(keys, ctx, raw=self.mode == "reference", window_size=self.window_size,
                                          kernel_size=self.kernel_size, pooling=self.effective_pooling)

    def forced_positions(self, ctx):
        h, w = ctx.current_shape
        return observation_window_positions(h, w, self.window_size, ctx.current_start, length=ctx.length)

    def score(self, keys, ctx):
        return self._scores(keys, ctx)[0]

    def select(self, keys, values, ctx):
        if ctx.capacity is None or (ctx.length <= ctx.capacity and ctx.head_capacities is None):
            return Selection(None, ctx.state)
        pooled, window, keys_finite = self._scores(keys, ctx)
        # The released sums' proof covers the window queries too (a non-finite query row makes all
        # its sums non-finite), and those are the only query rows the selection reads.
        proofs = {"keys_finite": keys_finite, "queries_finite": keys_finite}
        per_head = self.per_head_selection(pooled, window, ctx, **proofs)
        if per_head is not None:  # head-wise capacities or a head-adaptive wrapper
            return per_head
        # layer-wise: the released tie-for-tie top-k, its check left to compress's one read
        pick = released_topk_deferred if self.mode == "reference" else topk_plus_forced_exact_deferred
        indices, redo_if, redo = pick(pooled, window, ctx.capacity)
        return Selection(indices, ctx.state, redo_if=redo_if if redo else None,
                         redo=redo and (lambda: Selection(redo(), ctx.state, **proofs)), **proofs)


PatchWindowPolicy = PatchWindowSelector  # the name the selector had in kvpolicy.windowed
