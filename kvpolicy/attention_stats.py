"""Attention statistics per (layer, scale, head) for calibrated policies.

A calibrated policy (ScaleKV's drafter/refiner roles, head-wise budgets from cumulative attention,
...) needs to know how a model's layers and heads attend. ``AttentionStatsCollector`` is what the
adapters feed during calibration runs (``stats=`` of ``generate``): after a layer's attention at a
scale it receives the conditional rows' queries (B, Hq, n, D), such that q·kᵀ are the model's
logits (scale, norm and RoPE applied), and the layer's whole cache keys (B, Hkv, L, D) whose
positions >= ``current_start`` are the current map.

For at most ``max_queries`` sampled query positions (seeded, the same for every call at a (layer,
scale)) it computes the attention probabilities over all L keys block by block (never a full
n × L matrix) and hands each block to the *measures*: functions of ``(probs, current_start)``,
probs (B, Hkv, G, q, L) float32 with G grouped query heads per KV head, that return named
per-query values (B, Hkv, G, q); a name mapped to None is not defined at this call (history
statistics at the first scale, say). Sums (float64) and counts accumulate per (layer, scale, KV
head) over rows, grouped query heads, sampled queries and calls. What a policy makes of them
(ranking, budgets) is the policy's business: the core knows no policy.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import torch

Measure = Callable[[torch.Tensor, int], Mapping[str, Optional[torch.Tensor]]]

# Attention entries materialised at once while observing (per block of sampled queries).
_BLOCK_ELEMENTS = 1 << 23


def _check_int(name, value, low=0):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class AttentionStatsCollector:
    """Accumulates named attention statistics per (layer, scale, KV head) (see the module doc)."""

    def __init__(self, num_layers: int, num_scales: int, measures: Sequence[Measure] | None = None, *,
                 max_queries: int = 256, seed: int = 0, top_k=None):
        if measures is None or top_k is not None:
            raise TypeError("kvpolicy's AttentionStatsCollector is generic: pass measures=[f(probs, current_start) -> "
                            "{name: per-query values}]; ScaleKV's statistics (top_k=, result()) are "
                            "policies.scalekv.calibration.ScaleKVStatsCollector")
        _check_int("num_layers", num_layers, 1)
        _check_int("num_scales", num_scales, 1)
        _check_int("max_queries", max_queries, 1)
        _check_int("seed", seed, 0)
        measures = tuple(measures)
        if not measures or not all(callable(m) for m in measures):
            raise ValueError(f"measures must be a non-empty list of callables, got {measures!r}")
        self.num_layers, self.num_scales = num_layers, num_scales
        self.measures, self.max_queries, self.seed = measures, max_queries, seed
        self.num_heads: Optional[int] = None  # KV heads, fixed by the first observation
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self.calls = 0

    def _sample(self, layer: int, scale: int, n: int) -> torch.Tensor:
        if n <= self.max_queries:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer * 1009 + scale)
        return torch.randperm(n, generator=generator)[: self.max_queries].sort().values

    def _check(self, layer, scale, queries, keys, current_start) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer!r} out of range 0..{self.num_layers - 1}")
        if isinstance(scale, bool) or not isinstance(scale, int) or not 0 <= scale < self.num_scales:
            raise IndexError(f"scale {scale!r} out of range 0..{self.num_scales - 1}")
        if not isinstance(queries, torch.Tensor) or queries.dim() != 4 or not isinstance(keys, torch.Tensor) or keys.dim() != 4:
            raise ValueError("queries must be (B, Hq, n, D) and keys (B, Hkv, L, D) tensors")
        if not (queries.is_floating_point() and keys.is_floating_point()):
            raise TypeError(f"queries and keys must be floating point, got {queries.dtype} and {keys.dtype}")
        batch, q_heads, n, dim = queries.shape
        kv_batch, kv_heads, length, kv_dim = keys.shape
        if kv_batch != batch or kv_dim != dim or q_heads % kv_heads:
            raise ValueError(f"queries {tuple(queries.shape)} do not fit keys {tuple(keys.shape)}: need the same B "
                             "and D and a multiple of the key heads")
        if isinstance(current_start, bool) or not isinstance(current_start, int) or current_start < 0 or current_start + n != length:
            raise ValueError(f"current_start={current_start!r}: the {n} queries must be the last positions of the "
                             f"{length}-token cache (current_start = {length - n})")
        if self.num_heads is not None and kv_heads != self.num_heads:
            raise ValueError(f"keys have {kv_heads} heads but earlier observations had {self.num_heads}")

    @torch.no_grad()
    def observe(self, layer: int, scale: int, queries: torch.Tensor, keys: torch.Tensor, *, current_start: int) -> None:
        self._check(layer, scale, queries, keys, current_start)
        batch, q_heads, n, dim = queries.shape
        kv_heads, length = keys.shape[1], keys.shape[2]
        positions = self._sample(layer, scale, n).to(queries.device)
        group = q_heads // kv_heads
        grouped = queries.index_select(2, positions).reshape(batch, kv_heads, group, positions.numel(), dim)
        keys32 = keys.float()
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        block = max(1, _BLOCK_ELEMENTS // max(1, batch * q_heads * length))
        for lo in range(0, positions.numel(), block):
            logits = torch.einsum("bhgqd,bhld->bhgql", grouped[:, :, :, lo:lo + block].float(), keys32)
            probs = torch.softmax(logits, dim=-1)
            for measure in self.measures:
                for name, values in measure(probs, current_start).items():
                    if values is None:
                        continue
                    if tuple(values.shape) != tuple(probs.shape[:4]):
                        raise RuntimeError(f"measure {getattr(measure, '__name__', measure)!r} returned {name!r} of shape "
                                           f"{tuple(values.shape)}; need one value per query {tuple(probs.shape[:4])}")
                    per_head = values.to(torch.float64).sum(dim=(0, 2, 3)).cpu()
                    sums[name] = sums[name] + per_head if name in sums else per_head
                    counts[name] = counts.get(name, 0) + batch * group * probs.shape[3]
        if not all(math.isfinite(v) for t in sums.values() for v in t.tolist()):
            raise ValueError(f"attention at layer {layer}, scale {scale} is not finite (NaN or inf in the queries or "
                             "keys); nothing was recorded")
        if self.num_heads is None:
            self.num_heads = kv_heads
        for name, total in sums.items():
            if name not in self._sums:
                shape = (self.num_layers, self.num_scales, kv_heads)
                self._sums[name] = torch.zeros(shape, dtype=torch.float64)
                self._counts[name] = torch.zeros(shape, dtype=torch.long)
            self._sums[name][layer, scale] += total
            self._counts[name][layer, scale] += counts[name]
        self.calls += 1

    # -- results -------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The statistics recorded so far (sorted)."""
        return sorted(self._sums)

    def _get(self, name: str, table: dict) -> torch.Tensor:
        if name in table:
            return table[name].clone()
        dtype = torch.float64 if table is self._sums else torch.long
        return torch.zeros(self.num_layers, self.num_scales, self.num_heads or 1, dtype=dtype)  # never observed

    def sums(self, name: str) -> torch.Tensor:
        """(layers, scales, heads) float64 sums of ``name`` (zeros where never observed)."""
        return self._get(name, self._sums)

    def counts(self, name: str) -> torch.Tensor:
        """(layers, scales, heads) number of values summed."""
        return self._get(name, self._counts)

    def head_means(self, name: str) -> torch.Tensor:
        """(layers, scales, heads) float64 means, NaN where nothing was observed."""
        counts = self.counts(name)
        return torch.where(counts > 0, self.sums(name) / counts.clamp_min(1), torch.full_like(self.sums(name), math.nan))

    def layer_means(self, name: str) -> list[list[Optional[float]]]:
        """[layer][scale] mean over heads, rows, queries and calls (None where nothing was observed)."""
        sums, counts = self.sums(name).sum(dim=2), self.counts(name).sum(dim=2)
        return [[float(sums[l, s] / counts[l, s]) if counts[l, s] else None for s in range(self.num_scales)]
                for l in range(self.num_layers)]

    def layer_counts(self, name: str) -> list[list[int]]:
        return self.counts(name).sum(dim=2).tolist()
