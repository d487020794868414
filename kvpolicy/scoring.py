"""Scoring primitives shared by policies: attention from a set of queries, pooling, top-k.

All functions are vectorised over batch rows and heads. Query heads may outnumber key/value heads
(grouped-query attention): scores are computed per query head and averaged within each group, so a
cache stored per KV head is scored per KV head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Largest number of attention entries materialised at once (per call) when scoring in blocks.
_BLOCK_ELEMENTS = 1 << 24


def _group_queries(queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    batch, q_heads, n, dim = queries.shape
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    return queries.reshape(batch, kv_heads, q_heads // kv_heads, n, dim)


def attention_scores(queries: torch.Tensor, keys: torch.Tensor, *, softmax: bool = True,
                     scale: float = 1.0, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over queries of the attention each key receives: (B, Hkv, L), float32.

    ``softmax=True`` sums probabilities softmax(scale * q k^T) over the whole cache; ``False``
    sums the raw logits ``scale * q k^T``. ``exclude`` (1-D positions) gets -inf logits before
    the softmax/sum and -inf in the result. Queries are processed in blocks so that at most
    ~16M attention entries exist at a time (a 4096-query scale over a 10k cache stays small).
    """
    batch, kv_heads, length, dim = keys.shape
    grouped = _group_queries(queries, kv_heads)
    group, n = grouped.shape[2], grouped.shape[3]
    keys32 = keys.float()
    total = torch.zeros(batch, kv_heads, length, dtype=torch.float32, device=keys.device)
    block = max(1, _BLOCK_ELEMENTS // max(1, batch * kv_heads * group * length))
    for start in range(0, n, block):
        q = grouped[:, :, :, start:start + block].float()
        logits = torch.einsum("bhgqd,bhld->bhgql", q, keys32)
        if scale != 1.0:
            logits = logits * scale
        if exclude is not None and exclude.numel():
            logits[..., exclude] = float("-inf")
        if softmax:
            logits = torch.softmax(logits, dim=-1)
        total += logits.sum(dim=3).mean(dim=2) if group > 1 else logits.sum(dim=3)[:, :, 0]
    if exclude is not None and exclude.numel():
        total[..., exclude] = float("-inf")
    return total


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


def topk_with_forced(scores: torch.Tensor, forced: torch.Tensor, capacity: int) -> torch.Tensor:
    """Keep ``forced`` positions plus the top (capacity - len(forced)) others, per row and head.

    scores: (B, H, L); forced: 1-D unique positions shared by every row and head. Returns (B, H,
    capacity) int64 indices, ascending. Ties are broken by ``torch.topk`` (as the reference
    implementations do). Non-forced -inf scores are lifted to the lowest finite value so that a
    forced position can never be picked twice.
    """
    batch, heads, length = scores.shape
    n_forced = int(forced.numel())
    if capacity >= length:
        return torch.arange(length, device=scores.device).expand(batch, heads, length).clone()
    if n_forced > capacity:
        raise ValueError(f"{n_forced} positions are forced to stay but the capacity is {capacity}")
    masked = scores.float().clone()
    lowest = torch.finfo(masked.dtype).min
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
