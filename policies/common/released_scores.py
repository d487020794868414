"""ScaleKV's released scoring arithmetic, reproduced operation for operation (``mode="reference"``).

The released ``ScaleKVCluster.update_kv`` (StargazerX0/ScaleKV @ eb0615a, ``scale_kv.py``; facts in
shared/reference/scalekv.md §4.2) scores a layer's cache like this, for all rows and heads at once:

1. the 16 window queries (B, H, 16, D) are multiplied with every key: one batched ``matmul`` whose
   (B, H, 16, L) result is in the operands' dtype. In the real pipeline it runs under bf16 autocast
   with float32 cached keys and bf16 queries, so both operands are bf16 then;
2. the product is divided by √D in that dtype, the window columns are set to −∞;
3. the 16 rows are summed (``sum(dim=2)``, in that dtype);
4. 1-D pooling (kernel 5, stride 1, 'same' padding) over the (B, H, L) scores;
5. the window positions are set to −∞ again and ``topk(capacity − 16)`` (sorted, as released) picks
   the rest; the window is appended and everything sorted.

Which tokens tie on a max-pooling plateau, and which of the tied ones ``topk`` keeps, depends on
every rounding above, so each step here is the same operation on the same dtype and memory layout
as the release (a different order — summing the queries before the product, scoring in float32 —
keeps different tokens in 16-32 of 32 (row, head) pairs in bf16). What this module saves over the
release is the work around that arithmetic: the window positions are computed once for all rows
and heads (the release loops over every (row, head) with ``torch.unique``), the window columns are
set to −∞ in the (B, H, L) sum instead of the whole product (the same values: each column's sum
involves that column alone), and that sum proves the keys and the window queries finite, so
``compress`` reads neither the cache nor the current map's other queries again; max pooling of
half-precision scores runs in float32 (exact); the kept indices are put in order by a mask where
most of the cache is kept (instead of a sort).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kvpolicy.scoring import topk_with_forced

_HALF = (torch.bfloat16, torch.float16)


def released_compute_dtype(query_dtype: torch.dtype, key_dtype: torch.dtype) -> torch.dtype:
    """The dtype the release's product runs in: the operands' own when they agree, else autocast's
    lower precision (bf16 or fp16 queries against float32 keys, as under ``torch.autocast``)."""
    if query_dtype == key_dtype:
        return key_dtype
    low = {query_dtype, key_dtype} & set(_HALF)
    if len(low) == 1:
        return low.pop()
    raise ValueError(f"reference-mode queries are {query_dtype} and keys {key_dtype}: the released code "
                     "multiplies them as they are (equal dtypes) or under autocast (one of them bf16/fp16)")


def released_window_logits(window_q: torch.Tensor, keys: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Steps 1-3: (B, Hkv, L) summed window logits in the release's compute dtype, window at −∞.

    ``window_q`` is (B, Hq, w, D) raw query projections at the window positions; grouped query heads
    (Hq a multiple of Hkv, which the release does not have) contribute their g·w rows to the sum of
    their key/value head.
    """
    return released_window_scores(window_q, keys, window)[0]


def released_window_scores(window_q: torch.Tensor, keys: torch.Tensor,
                           window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``released_window_logits`` and a device bool that is True only if every key is finite.

    The release sets the window columns of the (B, H, 16, L) product to −∞ and then sums the 16
    rows; each column's sum involves that column alone, so summing first and setting the window
    columns of the (B, H, L) sum to −∞ gives the same values bit for bit, and the sum read before
    that proves the keys finite for free: a NaN or ±inf in a key makes every product with it NaN
    or ±inf (IEEE: inf · 0 = NaN), so a finite sum in every column means finite keys; and finite
    window queries, as a non-finite query row makes every sum of its head non-finite. False proves
    nothing (finite keys whose products overflow, or non-finite window queries): callers then read
    the keys and queries themselves (``Selection.keys_finite``, ``queries_finite``).
    """
    batch, kv_heads, length, dim = keys.shape
    q_heads, rows = window_q.shape[1], window_q.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    compute = released_compute_dtype(window_q.dtype, keys.dtype)
    q = window_q.reshape(batch, kv_heads, (q_heads // kv_heads) * rows, dim).to(compute)
    if keys.device.type == "cpu":
        scores = _blocked_window_sums(q, keys, compute)
    else:
        logits = torch.matmul(q, keys.transpose(2, 3)) if keys.dtype == compute else _cast_blocked_matmul(q, keys, compute)
        scores = logits.div_(math.sqrt(dim)).sum(dim=2)
    if scores.numel():
        low, high = torch.aminmax(scores)  # NaN propagates through both
        keys_finite = torch.isfinite(low) & torch.isfinite(high)
    else:
        keys_finite = torch.ones((), dtype=torch.bool, device=scores.device)
    if window.numel():
        scores.index_fill_(-1, window.to(keys.device), float("-inf"))
    return scores, keys_finite


# Cache positions cast per block in the mixed flow (bf16 copy of 512 x D keys per (row, head) stays in cache).
_CAST_BLOCK = 512


def _cast_blocked_matmul(q: torch.Tensor, keys: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """``matmul(q, keys.to(compute)ᵀ)`` without a whole compute-dtype copy of the keys.

    Autocast casts the whole float32 cache to bf16 before the product; casting a block of positions
    into a small reused buffer and multiplying it gives the same products (each logit is one dot
    product over D; checked bit for bit against the whole-cache product in the tests) at half the
    time on a CPU (B=2, H=16, L=6425, D=128, one thread of the busy 2-core dev machine: 305 -> 157 ms), as the copy is never
    written to and read back from memory.
    """
    batch, heads, length, dim = keys.shape
    out = torch.empty(batch, heads, q.shape[2], length, dtype=compute, device=keys.device)
    block = min(_CAST_BLOCK, length)
    buffer = torch.empty(batch, heads, block, dim, dtype=compute, device=keys.device)
    for start in range(0, length, block):
        stop = min(length, start + block)
        part = buffer[:, :, :stop - start]
        part.copy_(keys[:, :, start:stop])
        torch.matmul(q, part.transpose(2, 3), out=out[..., start:stop])
    return out


# Elements of the product block in _blocked_window_sums (1 MiB of float32: blocks of positions) and
# _row_blocked_window_sums (2 MiB), which stays in the CPU's cache from the product through the
# division and the sum.
_SUM_BLOCK_ELEMENTS = 1 << 18
_ROW_BLOCK_ELEMENTS = 1 << 19
_THREADED_CAST_BLOCK_ELEMENTS = 1 << 21  # the mixed flow's blocks at more than one thread (_row_block_size)
_SUM_BLOCK_ALIGN = 64


def _blocked_window_sums(q: torch.Tensor, keys: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """``(q · keysᵀ / √D).sum(dim=2)`` in ``compute`` -> (B, H, L), block by block.

    The release forms the whole (B, H, rows, L) product, divides it and sums it: three passes over
    a tensor 16x the scores (172 MB at B=16, L=10521, float32), newly allocated at every call (on
    CPU mostly page faults). The same operations on blocks whose product stays in cache give the
    same values bit for bit (each logit is one dot product over D, each sum one column's; checked
    against the whole product in the tests) and skip that traffic.

    Float32 keys are cut into blocks of positions over every (row, head). Half-precision keys, or
    keys cast to the compute dtype (the mixed flow), would have to be staged block by block into a
    contiguous buffer there (a batched bf16 product of strided blocks is slow), so a contiguous
    cache of them is cut into blocks of whole (row, head)s instead: contiguous (L, D) matrices read
    in place (cast once into a buffer in the mixed flow, as autocast casts the cache), each product
    the whole product's own matrix. Interleaved medians, one thread, H=16, D=128, busy 2-core
    machine, positions -> (row, head)s: B=16 bf16 68.4 -> 62.3 ms (L=6425), 108.1 -> 103.0 ms
    (L=10521); mixed 112.6 -> 79.9, 190.7 -> 138.4; B=2 bf16 12.2 -> 11.7, 14.9 -> 13.3; mixed
    15.2 -> 13.0, 18.9 -> 18.6 (float32 1.04-1.06x faster at B=16 but 0.89-0.96x at B=2: kept on
    positions). A block holds at least 2 (row, head)s: a one-matrix bf16 product of 16 x 10521 took
    50 against 14 ms for the same sums in blocks of positions (B=2).
    """
    batch, heads, length, dim = keys.shape
    rows = q.shape[2]
    if (keys.dtype != compute or keys.dtype in _HALF) and keys.is_contiguous() and q.is_contiguous():
        return _row_blocked_window_sums(q, keys, compute)
    scores = torch.empty(batch, heads, length, dtype=compute, device=keys.device)
    # Blocks start at multiples of _SUM_BLOCK_ALIGN positions: MKL's float32 product computes a
    # block's last columns off its kernel's panel width with another rounding than the whole
    # product's same columns (B=3 at the 2B geometry, 341-position blocks: 12539 sums differed).
    step = _SUM_BLOCK_ELEMENTS // max(1, batch * heads * rows) // _SUM_BLOCK_ALIGN * _SUM_BLOCK_ALIGN
    step = max(1, min(length, max(_SUM_BLOCK_ALIGN, step)))
    if torch.get_num_threads() > 1:
        step = length  # one block: see _row_block_size
    # (One block of half-precision keys is the cache itself: nothing to stage.)
    staged = keys.dtype != compute or (keys.dtype in _HALF and step < length)
    key_buffer = torch.empty(batch, heads, step, dim, dtype=compute, device=keys.device) if staged else None
    product = torch.empty(batch, heads, rows, step, dtype=compute, device=keys.device)
    root = math.sqrt(dim)
    for start in range(0, length, step):
        stop = min(length, start + step)
        part = keys[:, :, start:stop]
        if staged:
            part = key_buffer[:, :, :stop - start].copy_(part)
        block = product if stop - start == step else product[..., :stop - start]
        torch.matmul(q, part.transpose(2, 3), out=block)
        block.div_(root)
        torch.sum(block, dim=2, out=scores[:, :, start:stop])
    return scores


def _row_blocked_window_sums(q: torch.Tensor, keys: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """``_blocked_window_sums`` of a contiguous cache in blocks of whole (row, head)s."""
    batch, heads, length, dim = keys.shape
    rows, pairs = q.shape[2], batch * heads
    flat_keys, flat_q = keys.view(pairs, length, dim), q.view(pairs, rows, dim)
    scores = torch.empty(pairs, length, dtype=compute, device=keys.device)
    step = _row_block_size(pairs, rows, length, cast=keys.dtype != compute)
    key_buffer = (torch.empty(step, length, dim, dtype=compute, device=keys.device)
                  if keys.dtype != compute else None)
    product = torch.empty(step, rows, length, dtype=compute, device=keys.device)
    root = math.sqrt(dim)
    for start in range(0, pairs, step):
        stop = min(pairs, start + step)
        part = flat_keys[start:stop]
        if key_buffer is not None:
            part = key_buffer[:stop - start].copy_(part)
        block = product[:stop - start]
        torch.matmul(flat_q[start:stop], part.transpose(1, 2), out=block)
        block.div_(root)
        torch.sum(block, dim=1, out=scores[start:stop])
    return scores.view(batch, heads, length)


def _row_block_size(pairs: int, rows: int, length: int, *, cast: bool) -> int:
    """(row, head)s per block of ``_row_blocked_window_sums``: a (block, rows, L) product of about
    ``_ROW_BLOCK_ELEMENTS`` at 1 thread, at least 2 (row, head)s. ``cast``: the keys are cast to the
    compute dtype block by block (the mixed flow)."""
    if torch.get_num_threads() > 1:
        # With several threads every block's product, division and sum is a parallel region, and on
        # a machine whose cores are busy each region waits for a core (measured on the shared 2-core
        # machine, 2 threads: 8 ms per op on a (2, 16, 16, 512) block vs 0.03-1.4 ms at 1 thread; the
        # blocked sums at B=2, L=6425 took 660-820 ms against 17 ms at 1 thread): one block, the
        # release's own three ops (and its transient (B, H, rows, L) product). Except where the keys
        # are cast: one block casts the whole float32 cache (690 MB of bf16 at B=16, L=10521), and
        # blocks 4x the 1-thread size measured faster at every B=2/16, L=6425/10521 on this 2-core
        # machine, quiet (3.0-3.4x), with one busy process (1.7-2.9x) and with two (0.97-2.0x);
        # 2x the size blew up with two (1763 against 764 ms).
        if not cast:
            return pairs
        return min(pairs, max(2, _THREADED_CAST_BLOCK_ELEMENTS // max(1, rows * length)))
    return min(pairs, max(2, _ROW_BLOCK_ELEMENTS // max(1, rows * length)))


def released_pooled_scores(window_q: torch.Tensor, keys: torch.Tensor, window: torch.Tensor, *,
                           kernel_size: int = 5, pooling: str = "max") -> torch.Tensor:
    """Steps 1-4 and the second window mask: the (B, Hkv, L) scores the release's top-k reads."""
    return released_pooled_scores_checked(window_q, keys, window, kernel_size=kernel_size, pooling=pooling)[0]


def released_pooled_scores_checked(window_q: torch.Tensor, keys: torch.Tensor, window: torch.Tensor, *,
                                   kernel_size: int = 5, pooling: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """``released_pooled_scores`` and ``released_window_scores``' proof that the keys are finite.

    Max pooling of bf16/fp16 scores runs on their float32 copy (exact: the conversion and the
    maximum are, so every pooled value is the release's; 8 -> 1 ms at B=16, L=6425, one thread) and
    the scores stay float32: ``torch.topk`` compares half-precision values in float32 anyway, so it
    keeps the same tokens, ties included (the plateau tests check it). Average pooling rounds, so
    it stays in the release's dtype.
    """
    scores, keys_finite = released_window_scores(window_q, keys, window)
    if kernel_size > 1:
        if pooling in ("max", "maxpool"):
            if scores.dtype in _HALF:
                scores = scores.float()
            scores = F.max_pool1d(scores, kernel_size, padding=kernel_size // 2, stride=1)
        else:
            scores = F.avg_pool1d(scores, kernel_size, padding=kernel_size // 2, stride=1)
    if window.numel():
        scores.index_fill_(-1, window.to(keys.device), float("-inf"))
    return scores, keys_finite


def released_topk(scores: torch.Tensor, window: torch.Tensor, capacity: int) -> torch.Tensor:
    """Step 5: ``topk(capacity − |window|)`` on the scores as given, the window appended, indices
    sorted ascending -> (B, H, capacity).

    The release asks for a sorted top-k. On CPU, torch picks the set first (a partial sort or an
    nth_element, chosen by k and L alone) and only then orders it, so ``sorted=False`` keeps the very
    same set, ties included (checked against the sorted call on tie plateaus in the tests), and
    skips a sort that took 59 of 60 ms for a drafter (k = 6369 of 6425, B = 2, H = 16, one thread).
    Other devices keep the released sorted call: their top-k algorithms were not checked here.
    """
    indices, redo_if, redo = released_topk_deferred(scores, window, capacity)
    return redo() if bool(redo_if) else indices


def released_topk_deferred(scores: torch.Tensor, window: torch.Tensor, capacity: int):
    """``released_topk`` without reading the device: (indices, ``redo_if``, ``redo``), where
    ``redo_if`` is a 0-d bool tensor, True when ``indices`` must be replaced by ``redo()`` (the
    top-k reached into −∞/NaN scores, or a top-k position is also a window position) — what
    ``Selection.redo_if``/``redo`` hand to ``compress``'s one device->host read."""
    batch, heads, length = scores.shape
    keep = min(capacity - window.numel(), length - window.numel())
    top = scores.topk(keep, dim=-1, sorted=scores.device.type != "cpu")
    window = window.to(scores.device)
    if keep:
        not_finite = (torch.isneginf(top.values).any() | torch.isnan(top.values).any()).reshape(())
    else:
        not_finite = torch.zeros((), dtype=torch.bool, device=scores.device)

    def fallback():
        if bool(not_finite):
            # Fewer finite candidates than slots (average pooling spreads the window's −∞ to its
            # neighbours on small maps): the release would keep a window token twice; keep unique tokens.
            return topk_with_forced(scores, window, capacity)
        return _appended_and_sorted(top.indices, window)

    if scores.device.type == "cpu" and keep * _MASK_KEEP_FRACTION >= length:
        union, overlap = _ascending_union(top.indices, window, length)
        return union, not_finite | overlap, fallback
    return _appended_and_sorted(top.indices, window), not_finite, fallback


def _appended_and_sorted(top: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    batch, heads, _ = top.shape
    chosen = torch.cat([top, window.view(1, 1, -1).expand(batch, heads, -1)], dim=-1)
    return chosen.sort(dim=-1).values


# Where the top-k keeps at least 1/8 of the cache, marking the kept positions and reading them back
# in order beats sorting them (B=16, H=16, 6385 of 6425: 54 -> 6 ms, one thread).
_MASK_KEEP_FRACTION = 8


def _ascending_union(top: torch.Tensor, window: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, k) unique positions plus the window -> ((B, H, k + |window|) ascending, a 0-d bool
    that is True where they overlap), by marking them in a (B·H·L) bool mask and reading its set
    positions in order into a tensor of the size they have without overlap (``nonzero_static``: no
    device read). Where they overlap (scores whose window was not at −∞) the positions are wrong
    and the caller appends and sorts instead (keeping the duplicates, as the release would)."""
    batch, heads, _ = top.shape
    mask = torch.zeros(batch, heads, length, dtype=torch.bool, device=top.device)
    mask.scatter_(2, top, True)
    if window.numel():
        mask.index_fill_(-1, window, True)
    expected = batch * heads * (top.shape[2] + window.numel())
    flat = torch.nonzero_static(mask.view(-1), size=expected, fill_value=-1)
    # Fewer marked positions than expected (an overlap) leave the fill value at the end.
    overlap = (flat[-1, 0] < 0) if expected else torch.zeros((), dtype=torch.bool, device=top.device)
    flat = flat.view(batch, heads, -1)
    union = flat.sub_(torch.arange(0, batch * heads * length, length, device=top.device).view(batch, heads, 1))
    return union, overlap
