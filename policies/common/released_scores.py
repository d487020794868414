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
and heads (the release loops over every (row, head) with ``torch.unique``), the −∞ masks touch only
the 16 window columns in place (the release builds a (B, H, 1, L) mask and rewrites the whole
product with ``masked_fill``), and the pooled scores are masked in place (the release clones them).
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
    batch, kv_heads, length, dim = keys.shape
    q_heads, rows = window_q.shape[1], window_q.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    compute = released_compute_dtype(window_q.dtype, keys.dtype)
    q = window_q.reshape(batch, kv_heads, (q_heads // kv_heads) * rows, dim).to(compute)
    if keys.dtype == compute:
        logits = torch.matmul(q, keys.transpose(2, 3))
    else:
        logits = _cast_blocked_matmul(q, keys, compute)
    logits.div_(math.sqrt(dim))
    if window.numel():
        logits.index_fill_(-1, window.to(keys.device), float("-inf"))
    return logits.sum(dim=2)


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


def released_pooled_scores(window_q: torch.Tensor, keys: torch.Tensor, window: torch.Tensor, *,
                           kernel_size: int = 5, pooling: str = "max") -> torch.Tensor:
    """Steps 1-4 and the second window mask: the (B, Hkv, L) scores the release's top-k reads."""
    scores = released_window_logits(window_q, keys, window)
    if kernel_size > 1:
        pool = F.max_pool1d if pooling in ("max", "maxpool") else F.avg_pool1d
        scores = pool(scores, kernel_size, padding=kernel_size // 2, stride=1)
    if window.numel():
        scores.index_fill_(-1, window.to(keys.device), float("-inf"))
    return scores


def released_topk(scores: torch.Tensor, window: torch.Tensor, capacity: int) -> torch.Tensor:
    """Step 5: ``topk(capacity − |window|)`` on the scores as given, the window appended, indices
    sorted ascending -> (B, H, capacity).

    The release asks for a sorted top-k. On CPU, torch picks the set first (a partial sort or an
    nth_element, chosen by k and L alone) and only then orders it, so ``sorted=False`` keeps the very
    same set, ties included (checked against the sorted call on tie plateaus in the tests), and
    skips a sort that took 59 of 60 ms for a drafter (k = 6369 of 6425, B = 2, H = 16, one thread).
    Other devices keep the released sorted call: their top-k algorithms were not checked here.
    """
    batch, heads, length = scores.shape
    keep = min(capacity - window.numel(), length - window.numel())
    top = scores.topk(keep, dim=-1, sorted=scores.device.type != "cpu")
    if keep and bool(torch.isneginf(top.values).any() | torch.isnan(top.values).any()):
        # Fewer finite candidates than slots (average pooling spreads the window's −∞ to its
        # neighbours on small maps): the release would keep a window token twice; keep unique tokens.
        return topk_with_forced(scores, window.to(scores.device), capacity)
    chosen = torch.cat([top.indices, window.to(scores.device).view(1, 1, -1).expand(batch, heads, -1)], dim=-1)
    return chosen.sort(dim=-1).values
