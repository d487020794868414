"""Policy-agnostic scoring primitives: attention from a set of queries, pooling, top-k with forced
positions, position ranges. ``ScoredPolicy`` and user ``score()`` methods build on them; the rules
of particular methods (SnapKV's recent window, ScaleKV's patch window) live in ``policies.common``.

All functions are vectorised over batch rows and heads. Query heads may outnumber key/value heads
(grouped-query attention): scores are computed per query head and averaged within each group, so a
cache stored per KV head is scored per KV head.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import attrs
import torch
import torch.nn.functional as F

# Largest number of attention entries materialised at once (per call) when scoring in blocks.
_BLOCK_ELEMENTS = 1 << 24


def group_queries(queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, n, D) -> (B, Hkv, Hq // Hkv, n, D): the query heads of each key/value head."""
    batch, q_heads, n, dim = queries.shape
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    return queries.reshape(batch, kv_heads, q_heads // kv_heads, n, dim)


def attention_scores(queries: torch.Tensor, keys: torch.Tensor, *, softmax: bool = True,
                     scale: float = 1.0, exclude: torch.Tensor | None = None,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over queries of the attention each key receives: (B, Hkv, L), float32.

    ``softmax=True`` sums probabilities softmax(scale * q k^T) over the whole cache; ``False``
    sums the raw logits ``scale * q k^T``. ``exclude`` (1-D positions) gets -inf logits before
    the softmax/sum and -inf in the result. Queries are processed in blocks so that at most
    ~16M attention entries exist at a time (a 4096-query scale over a 10k cache stays small).
    ``valid`` (B, Hkv, L) bool marks the real positions of a ragged (left-padded) view: the others
    get -inf logits, so they receive probability 0 (``softmax=True``) or -inf (``False``).
    """
    batch, kv_heads, length, dim = keys.shape
    grouped = group_queries(queries, kv_heads)
    group, n = grouped.shape[2], grouped.shape[3]
    total = torch.zeros(batch, kv_heads, length, dtype=torch.float32, device=keys.device)
    block = max(1, _BLOCK_ELEMENTS // max(1, batch * kv_heads * group * length))
    # On CPU, window policies (one query block) convert a half-precision cache block by block
    # inside the product instead of copying all of it to float32 first (the copy dominated: 43 of
    # 68 ms at B=2, H=16, L=6425, D=128 bf16, one thread). Many query blocks (H2O) convert once;
    # so does a GPU, where the copy is cheap and many small products would cost launches.
    keys32 = keys.float() if n > block or keys.device.type != "cpu" else None
    for start in range(0, n, block):
        q = grouped[:, :, :, start:start + block].float()
        logits = _logits(q, keys) if keys32 is None else torch.einsum("bhgqd,bhld->bhgql", q, keys32)
        if scale != 1.0:
            logits = logits * scale
        if exclude is not None and exclude.numel():
            logits[..., exclude] = float("-inf")
        if valid is not None:
            logits = logits.masked_fill(~valid[:, :, None, None, :], float("-inf"))
        if softmax:
            logits = torch.softmax(logits, dim=-1)
        total += logits.sum(dim=3).mean(dim=2) if group > 1 else logits.sum(dim=3)[:, :, 0]
    if exclude is not None and exclude.numel():
        total[..., exclude] = float("-inf")
    return total


# Cache positions converted to float32 at a time in _logits (measured best at 256 on a CPU).
_LOGIT_BLOCK_POSITIONS = 256


def _logits(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q (B, H, G, n, D) float32 · keys (B, H, L, D)ᵀ -> (B, H, G, n, L) float32, the keys converted
    in blocks of positions (no float32 copy of the whole cache)."""
    batch, heads, group, n, dim = q.shape
    length = keys.shape[2]
    if keys.dtype == torch.float32:
        return torch.einsum("bhgqd,bhld->bhgql", q, keys)
    out = torch.empty(batch, heads, group * n, length, dtype=torch.float32, device=keys.device)
    flat = q.reshape(batch, heads, group * n, dim)
    for start in range(0, length, _LOGIT_BLOCK_POSITIONS):
        stop = min(length, start + _LOGIT_BLOCK_POSITIONS)
        torch.matmul(flat, keys[:, :, start:stop].float().transpose(-1, -2), out=out[..., start:stop])
    return out.view(batch, heads, group, n, length)


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str = "max") -> torch.Tensor:
    """1-D pooling along the flattened cache (stride 1, 'same' padding). Kernel must be odd."""
    if kernel_size <= 1:
        return scores
    if kernel_size % 2 == 0:
        raise ValueError(f"pooling kernel_size must be odd (same-length output), got {kernel_size}")
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if pooling in ("max", "maxpool"):
        out = F.max_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)
    elif pooling in ("avg", "avgpool", "mean"):
        out = F.avg_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)
    else:
        raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
    return out.reshape(shape)


def _check_forced(scores: torch.Tensor, forced: torch.Tensor, capacity: int):
    """Number of forced positions, or None when the capacity holds every position (keep all)."""
    if capacity >= scores.shape[-1]:
        return None
    n_forced = int(forced.numel())
    if n_forced > capacity:
        raise ValueError(f"{n_forced} positions are forced to stay but the capacity is {capacity}")
    return n_forced


def topk_with_forced(scores: torch.Tensor, forced: torch.Tensor, capacity: int) -> torch.Tensor:
    """Keep ``forced`` positions plus the top (capacity - len(forced)) others, per row and head.

    scores: (B, H, L); forced: 1-D unique positions shared by every row and head. Returns (B, H,
    capacity) int64 indices, ascending. Ties are broken by ``torch.topk`` (as the reference
    implementations do). Non-forced -inf scores are lifted to the lowest finite value so that a
    forced position can never be picked twice.
    """
    batch, heads, length = scores.shape
    n_forced = _check_forced(scores, forced, capacity)
    if n_forced is None:
        return torch.arange(length, device=scores.device).expand(batch, heads, length).clone()
    masked = scores.float()
    lowest = torch.finfo(masked.dtype).min
    # torch.where returns a new tensor, so the caller's scores are never modified below.
    masked = torch.where(torch.isneginf(masked) | torch.isnan(masked), torch.full_like(masked, lowest), masked)
    if n_forced:
        masked[..., forced] = float("-inf")
    chosen = masked.topk(capacity - n_forced, dim=-1).indices
    if n_forced:
        chosen = torch.cat([chosen, forced.view(1, 1, -1).expand(batch, heads, -1)], dim=-1)
    return chosen.sort(dim=-1).values


def recent_positions(length: int, count: int, device=None) -> torch.Tensor:
    """The last ``count`` positions of a cache of ``length`` tokens (count 0 gives none)."""
    count = max(0, min(count, length))
    return torch.arange(length - count, length, device=device)


def first_positions(length: int, count: int, device=None) -> torch.Tensor:
    return torch.arange(max(0, min(count, length)), device=device)



# ScaleKV's observation-window helpers lived here before the core stopped holding policy code; an
# old import gets a message naming the new place instead of a bare AttributeError.
_MOVED = {name: "policies.common.patch_window" for name in (
    "observation_window_positions", "window_queries", "summed_window_logits", "topk_plus_forced_exact",
    "observation_window_select", "_rows_dot")}


def __getattr__(name: str):
    if name in _MOVED:
        raise ImportError(f"kvpolicy.scoring.{name} moved to {_MOVED[name]} (the core holds no policy-specific "
                             f"code): use `from {_MOVED[name]} import {name}`")
    raise AttributeError(f"module 'kvpolicy.scoring' has no attribute {name!r}")


def topk_per_head(scores: torch.Tensor, budgets: torch.Tensor, *, forced: torch.Tensor | None = None,
                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (row, head) keeps its own number of tokens: its forced positions plus its best-scored others.

    scores (B, H, L); budgets (B, H) int64 tokens per (row, head); ``forced`` 1-D positions shared by
    every row and head or a (B, H, L) bool mask; ``valid`` (B, H, L) bool, False for padding (never
    kept), or None. A (row, head) with no more real positions than its budget keeps all of them.
    Returns (indices (B, H, k) int64, lengths (B, H) int64) with k the largest length:
    ``indices[b, h, :lengths[b, h]]`` ascending, the rest 0 (padding). Ties follow ``torch.topk``;
    non-forced -inf/NaN scores are lifted to the lowest finite value, as in ``topk_with_forced``.

    Reads the device twice (the forced-count check and k); a policy's ``Selection`` can hand the
    same choice to ``compress`` unread instead: ``per_head_topk``.
    """
    return per_head_topk(scores, budgets, forced=forced, valid=valid).resolve()


@attrs.frozen(eq=False)
class PerHeadTopk:
    """``topk_per_head``'s choice before any device read: what ``per_head_topk`` returns.

    The width of the kept indices (the longest (row, head)'s length) is data-dependent, and which of
    equal scores ``torch.topk`` keeps depends on the k it is asked for, so the top-k itself waits for
    that number. A policy returns this as ``Selection.indices``: ``compress`` reads the lengths with
    its checks in its one device->host read and then forms the indices (valid by construction);
    ``resolve()`` does the same reads for anyone else.
    """

    ranked: torch.Tensor  # (B, H, L) float32: forced +inf, padding -inf, other -inf/NaN the lowest finite value
    lengths: torch.Tensor  # (B, H) int64 tokens each (row, head) keeps
    overfull: torch.Tensor  # 0-d bool: some (row, head) must keep more forced positions than its budget
    too_many: torch.Tensor  # (B, H) bool: which (the error names the first)
    forced_counts: torch.Tensor  # (B, H) int64
    budgets: torch.Tensor  # (B, H) int64
    # The policy state for the next call from the kept (indices, lengths), for state kept per token
    # (H2O's totals); None: the Selection's state as given.
    state_from: Optional[Callable[[torch.Tensor, torch.Tensor], Any]] = None

    def check(self) -> None:
        """Raise ``topk_per_head``'s error where a (row, head) has more forced positions than its
        budget (reads the device)."""
        if bool(self.overfull):
            b, h = (int(v) for v in self.too_many.nonzero()[0])
            raise ValueError(f"{int(self.forced_counts[b, h])} positions are forced to stay in (row {b}, head {h}) "
                             f"but its capacity is {int(self.budgets[b, h])}")

    def indices(self, longest: int) -> torch.Tensor:
        """(B, H, longest) kept positions, each (row, head)'s first lengths[b, h] ascending, then 0;
        ``longest`` must be the largest length (the k of the top-k)."""
        length = self.ranked.shape[-1]
        top = self.ranked.topk(longest, dim=-1).indices  # best first: forced (+inf), then by score
        real_slot = torch.arange(longest, device=top.device) < self.lengths.unsqueeze(-1)
        ordered = torch.where(real_slot, top, torch.full_like(top, length)).sort(dim=-1).values
        return torch.where(ordered == length, torch.zeros_like(ordered), ordered)

    def resolve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, lengths) as ``topk_per_head`` returns them (two device reads)."""
        self.check()
        longest = int(self.lengths.max()) if self.lengths.numel() else 0
        return self.indices(longest), self.lengths

    def __getattr__(self, name):
        # Code written when a head-wise Selection.indices was always a tensor (sel.indices.shape,
        # .tolist(), ...) gets told what changed and how to get the tensors, not a bare AttributeError.
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"PerHeadTopk has no attribute {name!r}: a head-wise Selection.indices is a deferred "
                             "per-(row, head) top-k (compress forms the indices after its one device read); call "
                             "selection.resolved() or PerHeadTopk.resolve() for the (indices, lengths) tensors")


def per_head_topk(scores: torch.Tensor, budgets: torch.Tensor, *, forced: torch.Tensor | None = None,
                  valid: torch.Tensor | None = None,
                  state_from: Optional[Callable[[torch.Tensor, torch.Tensor], Any]] = None) -> PerHeadTopk:
    """``topk_per_head`` (same arguments, same choice) without reading the device: a ``PerHeadTopk``
    for ``Selection.indices``. ``state_from(indices, lengths)``, optional, gives the policy state
    once the indices exist."""
    batch, heads, length = scores.shape
    device = scores.device
    masked = scores.float()
    masked = torch.where(torch.isneginf(masked) | torch.isnan(masked),
                         torch.full_like(masked, torch.finfo(masked.dtype).min), masked)
    if forced is None:
        forced_mask = torch.zeros(batch, heads, length, dtype=torch.bool, device=device)
    elif forced.dtype == torch.bool:
        forced_mask = forced.to(device).expand(batch, heads, length)
    else:
        forced_mask = torch.zeros(length, dtype=torch.bool, device=device)
        forced_mask[forced.to(device)] = True
        forced_mask = forced_mask.expand(batch, heads, length)
    if valid is not None:
        forced_mask = forced_mask & valid
        masked = masked.masked_fill(~valid, float("-inf"))
        real = valid.sum(dim=-1)
    else:
        real = torch.full((batch, heads), length, dtype=torch.long, device=device)
    budgets = budgets.to(device=device, dtype=torch.long).expand(batch, heads)
    lengths = torch.minimum(budgets, real)
    forced_counts = forced_mask.sum(dim=-1)
    too_many = (forced_counts > lengths) & (budgets < real)
    return PerHeadTopk(masked.masked_fill(forced_mask, float("inf")), lengths, too_many.any(), too_many,
                       forced_counts, budgets, state_from)


def left_align(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, H, k) values whose first lengths[b, h] entries are real -> the same entries at the END of
    each row (zeros before): the layout of the left-padded view a policy sees at the next scale.
    For policy state kept per cached token (H2O's totals) under a ragged cache."""
    batch, heads, kept = values.shape
    shift = kept - lengths.unsqueeze(-1)  # (B, H, 1)
    source = torch.arange(kept, device=values.device) - shift
    gathered = values.gather(-1, source.clamp_min(0))
    return torch.where(source >= 0, gathered, torch.zeros_like(gathered))
