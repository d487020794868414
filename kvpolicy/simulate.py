"""``simulate``: drive a policy through a whole schedule with synthetic tensors, no model needed.

It uses the same ``KVCache`` the adapters use, in the same order (per scale, per layer: append the
current map, then compress), so its byte counts are what a real generation of that geometry holds.

Large geometries (Infinity-8B at 1024^2 with batch 8 would need ~100 GB of synthetic tensors) are
simulated on a probe with the real head dimension and dtype: one row and one head for layer-wise
policies (every row and head of a compact cache keeps the same number of tokens, so the counted
bytes of the probe times rows x heads are exactly the bytes of the full geometry); one row and all
heads for head-wise plans (every row keeps the same per-head lengths: exact too); one row and all
heads for head-adaptive policies, whose lengths depend on the data (each row is counted as the
probe row: exact whenever every row fills its budget, which a row does once it evicts).
``report.extra["materialized"]`` (and ``["probe"]`` for a probe) say which way was used.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .cache import CacheReport, KVCache
from .policy import Policy
from .schedule import ScaleSchedule

# Simulations whose full cache would exceed this are run on a one-row, one-head probe.
MATERIALIZE_LIMIT_BYTES = 1 << 30


def estimate_full_bytes(schedule: ScaleSchedule, *, num_layers: int, num_heads: int, head_dim: int,
                        rows: int, dtype: torch.dtype, key_dtype: Optional[torch.dtype] = None) -> int:
    key_size = torch.empty(0, dtype=dtype if key_dtype is None else key_dtype).element_size()
    value_size = torch.empty(0, dtype=dtype).element_size()
    return num_layers * rows * num_heads * schedule.total * head_dim * (key_size + value_size)


def simulate(policy: Policy | None, *, schedule: ScaleSchedule, num_layers: int, num_heads: int,
             head_dim: int, batch: int = 1, cfg: bool = True, seed: int = 0,
             dtype: torch.dtype = torch.bfloat16, materialize: Optional[bool] = None,
             device: str | torch.device = "cpu", key_dtype: Optional[torch.dtype] = None,
             progress: Optional[Callable[[int], object]] = None) -> CacheReport:
    """Run ``policy`` (None = full cache) over every scale and layer; return the cache report.

    Rows = batch x 2 with CFG (conditional and unconditional rows). Keys are unit vectors (like
    the cosine-attention caches of Infinity and VAR), queries random with norm 4, values normal.
    ``dtype`` is the values' (and queries') dtype; ``key_dtype`` (default: the same) the cached
    keys', e.g. float32 keys with bfloat16 values, the official Infinity layout. ``progress``, if
    given, is called with 1 after every (scale, layer) step (e.g. a progress bar's ``update``): large
    geometries take seconds.
    """
    key_dtype = dtype if key_dtype is None else key_dtype
    for name, value in (("num_layers", num_layers), ("num_heads", num_heads), ("head_dim", head_dim), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    rows = batch * (2 if cfg else 1)
    if materialize is None:
        materialize = estimate_full_bytes(schedule, num_layers=num_layers, num_heads=num_heads, head_dim=head_dim,
                                          rows=rows, dtype=dtype, key_dtype=key_dtype) <= MATERIALIZE_LIMIT_BYTES
    plan = policy.plan(schedule, num_layers) if policy is not None else None
    if plan is not None and plan.head_wise and plan.num_heads != num_heads:
        raise ValueError(f"policy {policy.name!r} plans {plan.num_heads} heads per layer but the model has "
                         f"num_heads={num_heads}")
    per_head = policy is not None and (policy.head_adaptive or plan.head_wise)
    if materialize:
        sim_rows, sim_heads = rows, num_heads
    else:
        sim_rows, sim_heads = (1, num_heads) if per_head else (1, 1)
    cache = KVCache(num_layers, schedule, policy, replicas=(rows * num_heads) // (sim_rows * sim_heads))
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    for scale in range(schedule.num_scales):
        n = schedule.tokens(scale)
        for layer in range(num_layers):
            keys = F.normalize(randn(sim_rows, sim_heads, n, head_dim), dim=-1).to(key_dtype)
            values = randn(sim_rows, sim_heads, n, head_dim).to(dtype)
            cache.append(layer, scale, keys, values)
            queries = raw = None
            if cache.needs_queries:
                queries = 4 * F.normalize(randn(sim_rows, sim_heads, n, head_dim), dim=-1).to(dtype)
            if cache.needs_raw_queries:
                raw = randn(sim_rows, sim_heads, n, head_dim).to(dtype)
            cache.compress(layer, scale, queries=queries, raw_queries=raw)
            if progress is not None:
                progress(1)
    report = cache.report()
    if not materialize:
        report.extra["probe"] = f"{sim_rows} row(s) x {sim_heads} head(s)"
    report.extra.update({"materialized": materialize, "rows": rows, "num_heads": num_heads,
                         "head_dim": head_dim, "dtype": str(dtype).replace("torch.", ""),
                         "key_dtype": str(key_dtype).replace("torch.", "")})
    return report
