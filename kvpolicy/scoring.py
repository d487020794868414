"""Scoring primitives shared by policies: attention from a set of queries, pooling, top-k.

All functions are vectorised over batch rows and heads. Query heads may outnumber key/value heads
(grouped-query attention): scores are computed per query head and averaged within each group, so a
cache stored per KV head is scored per KV head.
"""

from __future__ import annotations

import math

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


# -- observation windows spread over the current map (ScaleKV) -------------------------------------

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


def summed_window_logits(window_q: torch.Tensor, keys: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Released ScaleKV score: raw logits q·Kᵀ/√D summed over the window queries, window columns −∞
    -> (B, Hkv, L), float32 (float64 for float64 keys).

    By linearity Σ_j q_j·k/√D = (Σ_j q_j)·k/√D, so the window queries (and grouped query heads) are
    summed first and every key meets one vector: one multiply-add per key element instead of one
    per window query (16×). The value is mathematically the released one; its float rounding
    differs (the released code rounds each logit, divides, then sums), so on general float inputs a
    score can differ in its last bits. On the golden inputs every product and partial sum is exact
    (golden README, "Exact arithmetic"), so they match bit for bit. The window columns are set to
    −∞ after the sum instead of before (−∞ either way).
    """
    batch, kv_heads, length, dim = keys.shape
    acc = torch.float64 if keys.dtype == torch.float64 else torch.float32
    q = _group_queries(window_q.to(acc), kv_heads)
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
    batch, heads, length = scores.shape
    n_forced = _check_forced(scores, forced, capacity)
    if n_forced is None:
        return torch.arange(length, device=scores.device).expand(batch, heads, length).clone()
    keep = min(capacity - n_forced, length - n_forced)
    # Unsorted: torch.topk picks its set before ordering it (ties included), and we sort indices anyway.
    top = scores.topk(keep, dim=-1, sorted=False)
    if keep and bool(torch.isneginf(top.values).any() | torch.isnan(top.values).any()):
        return topk_with_forced(scores, forced, capacity)
    chosen = torch.cat([top.indices, forced.to(scores.device).view(1, 1, -1).expand(batch, heads, -1)], dim=-1)
    return chosen.sort(dim=-1).values


def observation_window_select(keys: torch.Tensor, ctx, *, raw: bool, window_size: int = 16,
                              kernel_size: int = 5, pooling: str = "max") -> torch.Tensor:
    """ScaleKV's selection for one (scale, layer): (B, H, capacity) kept indices, ascending.

    The window (``observation_window_positions`` on the current map) is always kept; the rest is
    ranked by the window queries' scores, pooled along the flattened cache. ``raw=True`` is the
    released rule (``ctx.raw_queries``, summed raw logits with the window masked before and after
    pooling, ``topk_plus_forced_exact``), the window queries summed before the product with the
    keys (``summed_window_logits``: bit-identical on the golden inputs, last-bit float differences
    possible elsewhere); ``raw=False`` is the paper's (``ctx.queries`` whose products with the keys
    are the model's logits, softmax probabilities summed over the window queries, window masked
    only after pooling).
    """
    h, w = ctx.current_shape
    window = observation_window_positions(h, w, window_size, ctx.current_start, length=ctx.length,
                                          device=keys.device)
    if raw:
        q = window_queries(ctx.raw_queries, window, ctx.current_start)
        scores = summed_window_logits(q, keys, window)
    else:
        q = window_queries(ctx.queries, window, ctx.current_start)
        scores = attention_scores(q, keys, softmax=True)
    # pool_scores returns a fresh tensor (or the fresh scores themselves): mask it in place.
    pooled = pool_scores(scores, kernel_size, pooling).index_fill_(-1, window, float("-inf"))
    # Attention mode: probabilities are finite, so this is exactly topk_with_forced's choice without
    # its lifting copies (a NaN or −∞ reaching the top-k falls back to topk_with_forced).
    return topk_plus_forced_exact(pooled, window, ctx.capacity)
