"""The one self-attention-with-cache code path shared by every adapter (Infinity and VAR).

Per layer and scale: append the current map's K/V to the layer cache, attend (softmax scale 1:
adapters fold their own scale into the queries, so ``queries @ keys^T`` are the model's logits),
optionally hand the attention inputs to a calibration statistics collector, then let the cache
policy compress the layer. The policy receives exactly what it declares it needs. A layer whose
heads hold different numbers of tokens (head-wise budgets) is a ``kvpolicy.Ragged`` and attended
with ``kvpolicy.ragged_attention`` (exact; the method per device chosen by measurement).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from kvpolicy import KVCache, Ragged, ragged_attention

RawQueries = Union[torch.Tensor, Callable[[], torch.Tensor], None]


def cached_self_attention(cache: KVCache, layer: int, scale: int, queries: torch.Tensor, keys: torch.Tensor,
                          values: torch.Tensor, *, raw_queries: RawQueries = None, stats=None,
                          stats_rows: Optional[int] = None) -> torch.Tensor:
    """Attention of the current map's queries over the layer's cache (history + current map).

    queries/keys/values: (rows, H, n_current, D). ``raw_queries`` is a tensor or a zero-argument
    callable returning the bare projection x @ W_q^T as (rows, H, n_current, D); it is computed only
    when the policy asks for it. ``stats`` (e.g. ``kvpolicy.AttentionStatsCollector``)
    gets ``observe(layer, scale, queries, keys, current_start=...)`` for the first ``stats_rows``
    rows (the conditional rows under CFG). Returns (rows, H, n_current, Dv).
    """
    all_keys, all_values = cache.append(layer, scale, keys, values)
    if isinstance(all_keys, Ragged):  # heads of different lengths (head-wise budgets): exact, no padding held
        if stats is not None:
            raise ValueError("attention statistics are collected on a full cache (calibrate with policy=None), "
                             f"but layer {layer} holds head-wise compressed tokens")
        out = ragged_attention(queries, all_keys, all_values, scale=1.0)
    elif all_keys.dtype != queries.dtype:
        out = F.scaled_dot_product_attention(queries, all_keys.to(queries.dtype), all_values.to(queries.dtype), scale=1.0)
    else:
        out = F.scaled_dot_product_attention(queries, all_keys, all_values, scale=1.0)
    if stats is not None and not isinstance(all_keys, Ragged):
        rows = queries.shape[0] if stats_rows is None else stats_rows
        stats.observe(layer, scale, queries[:rows], all_keys[:rows], current_start=all_keys.shape[2] - keys.shape[2])
    if cache.policy is not None:
        raw = None
        if cache.needs_raw_queries:
            raw = raw_queries() if callable(raw_queries) else raw_queries
            if raw is None:
                raise ValueError(f"policy {cache.policy.name!r} needs raw queries but this adapter passed none")
        cache.compress(layer, scale, queries=queries if cache.needs_queries else None, raw_queries=raw)
    return out
