"""The per-model KV cache that adapters use: compact storage, a policy, and byte accounting.

Each layer holds its keys and values as compact (rows, heads, length, dim) tensors. ``append``
concatenates the current map's tokens; ``compress`` calls ``kvpolicy.compress`` and replaces the
stored tensors with the kept ones, so eviction really frees memory.

Accounting counts the bytes of the tensors held (``numel * element_size``):

- ``kv_bytes[scale]``: all layers, after that scale's compression (``layer_kv_bytes[scale][layer]``
  per layer);
- ``full_kv_bytes[scale]``: the bytes the same layers would hold with no eviction (every appended
  token kept);
- ``peak_kv_bytes``: the largest total held at any moment, measured right after each append, i.e.
  including one layer's transient (kept history + full current map) before it is compressed.
  Temporary copies made by ``torch.cat`` itself are not counted (on a GPU, read the allocator).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import attrs
import torch

from .compress import CompressionResult, compress
from .policy import Policy
from .schedule import ScaleSchedule


@attrs.define
class CacheReport:
    """Per-scale memory of a generation (or a simulation), in counted bytes."""

    schedule: ScaleSchedule
    num_layers: int
    kv_bytes: list[int]
    full_kv_bytes: list[int]
    peak_kv_bytes: int
    full_peak_kv_bytes: int
    kept_lengths: list[list[int]]  # [scale][layer], max over rows and heads
    capacities: list[list[Optional[int]]]  # [scale][layer]
    policy: str = "full"
    scale_seconds: list[float] = attrs.field(factory=list)
    extra: dict = attrs.field(factory=dict)
    layer_kv_bytes: list[list[int]] = attrs.field(factory=list)  # [scale][layer]; kv_bytes is their sum

    @property
    def read_by_last_scale_ratio(self) -> float:
        """kv_bytes / full_kv_bytes for the cache the last scale reads (after the second-to-last)."""
        s = max(0, self.schedule.num_scales - 2)
        return self.kv_bytes[s] / self.full_kv_bytes[s]

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "schedule": [list(s) for s in self.schedule.shapes],
            "num_layers": self.num_layers,
            "kv_bytes": list(self.kv_bytes),
            "full_kv_bytes": list(self.full_kv_bytes),
            "peak_kv_bytes": self.peak_kv_bytes,
            "full_peak_kv_bytes": self.full_peak_kv_bytes,
            "kept_lengths": [list(r) for r in self.kept_lengths],
            "capacities": [list(r) for r in self.capacities],
            "scale_seconds": list(self.scale_seconds),
            "layer_kv_bytes": [list(r) for r in self.layer_kv_bytes],
            **self.extra,
        }

    def table(self) -> str:
        """A plain-text per-scale table (MiB)."""
        mib = 2 ** 20
        lines = [f"{'scale':>5} {'map':>9} {'cum':>7} {'kept/layer':>11} {'full MiB':>11} "
                 f"{'policy MiB':>11} {'ratio':>7}"]
        for s, (h, w) in enumerate(self.schedule.shapes):
            kept = self.kept_lengths[s]
            full, mine = self.full_kv_bytes[s], self.kv_bytes[s]
            lines.append(f"{s:>5} {f'{h}x{w}':>9} {self.schedule.cumulative[s]:>7} "
                         f"{sum(kept) / len(kept):>11.1f} {full / mib:>11.2f} {mine / mib:>11.2f} "
                         f"{mine / full:>7.4f}")
        lines.append(f"peak (incl. one layer's current map before compression): full "
                     f"{self.full_peak_kv_bytes / mib:.2f} MiB, {self.policy} {self.peak_kv_bytes / mib:.2f} MiB, "
                     f"ratio {self.peak_kv_bytes / self.full_peak_kv_bytes:.4f}")
        return "\n".join(lines)


class KVCache:
    """Self-attention KV cache of a whole model for one generation, driven by a policy.

    Usage per layer and scale: ``k_all, v_all = cache.append(layer, scale, k, v)``; attention;
    ``cache.compress(layer, scale, queries=..., raw_queries=...)``. Call ``reset()`` (or build a new
    cache) before each generation: policy state never leaks between generations.

    ``replicas`` lets a caller account one held tensor as that many identical copies (used by
    ``simulate`` to plan large geometries on a one-row, one-head probe).
    """

    def __init__(self, num_layers: int, schedule: ScaleSchedule, policy: Policy | None = None, *,
                 replicas: int = 1):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        if not isinstance(schedule, ScaleSchedule):
            raise TypeError(f"schedule must be a ScaleSchedule, got {type(schedule).__name__}")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a Policy (see kvpolicy.get_policy) or None, got {type(policy).__name__}")
        self.num_layers = num_layers
        self.schedule = schedule
        self.policy = policy
        self.replicas = replicas
        if policy is not None:
            policy.plan(schedule, num_layers)  # fail early on a bad budget
        self.reset()

    @property
    def needs_queries(self) -> bool:
        return self.policy is not None and self.policy.needs_queries

    @property
    def needs_raw_queries(self) -> bool:
        return self.policy is not None and self.policy.needs_raw_queries

    def reset(self) -> None:
        n, s = self.num_layers, self.schedule.num_scales
        self.keys: list[Optional[torch.Tensor]] = [None] * n
        self.values: list[Optional[torch.Tensor]] = [None] * n
        self.states: list[Any] = [None] * n
        self._held = [0] * n
        self._appended = [0] * n
        self._appended_at = [[0] * n for _ in range(s)]
        self._held_at = [[0] * n for _ in range(s)]
        self._kept_at = [[0] * n for _ in range(s)]
        self._scale_of_layer = [-1] * n
        self.peak_kv_bytes = 0
        self._full_held = [0] * n
        self.full_peak_kv_bytes = 0
        self.scale_seconds = [0.0] * s
        self._scale_started: Optional[float] = None

    def _bytes(self, *tensors: torch.Tensor) -> int:
        return self.replicas * sum(t.numel() * t.element_size() for t in tensors)

    def length(self, layer: int) -> int:
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    def append(self, layer: int, scale: int, keys: torch.Tensor, values: torch.Tensor):
        """Add the current map's tokens to a layer; returns the layer's whole (kept + new) K, V."""
        self._check_layer(layer)
        for name, t in (("keys", keys), ("values", values)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a (B, H, n, D) tensor, got {getattr(t, 'shape', type(t).__name__)}")
        expected = self.schedule.tokens(scale)
        if keys.shape[2] != expected or values.shape[2] != expected:
            raise ValueError(f"scale {scale} has {expected} tokens; got keys {tuple(keys.shape)}, values {tuple(values.shape)}")
        if scale != self._scale_of_layer[layer] + 1:
            raise RuntimeError(f"layer {layer} received scale {scale} after scale {self._scale_of_layer[layer]}; "
                               "scales must arrive in order (call reset() between generations)")
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = keys.contiguous(), values.contiguous()
        else:
            for name, new, held in (("keys", keys, self.keys[layer]), ("values", values, self.values[layer])):
                if new.shape[:2] != held.shape[:2] or new.shape[3] != held.shape[3]:
                    raise ValueError(f"{name} {tuple(new.shape)} do not continue layer {layer}'s cache "
                                     f"{tuple(held.shape)}: (B, H, D) must stay the same")
                if new.dtype != held.dtype or new.device != held.device:
                    # torch.cat would promote the whole cache silently (and change its byte count).
                    raise ValueError(f"{name} are {new.dtype} on {new.device} but layer {layer}'s cache holds "
                                     f"{held.dtype} on {held.device}")
            self.keys[layer] = torch.cat([self.keys[layer], keys], dim=2)
            self.values[layer] = torch.cat([self.values[layer], values], dim=2)
        self._scale_of_layer[layer] = scale
        added = self._bytes(keys, values)
        self._appended[layer] += added
        self._appended_at[scale][layer] = self._appended[layer]
        self._held[layer] = self._bytes(self.keys[layer], self.values[layer])
        self.peak_kv_bytes = max(self.peak_kv_bytes, sum(self._held))
        self._full_held[layer] = self._appended[layer]
        self.full_peak_kv_bytes = max(self.full_peak_kv_bytes, sum(self._full_held))
        self._record(layer, scale)
        return self.keys[layer], self.values[layer]

    def compress(self, layer: int, scale: int, *, queries=None, raw_queries=None) -> Optional[CompressionResult]:
        """Apply the policy to a layer after its attention at ``scale`` (no-op without a policy)."""
        self._check_layer(layer)
        if scale != self._scale_of_layer[layer]:
            raise RuntimeError(f"compress(layer={layer}, scale={scale}) before append at that scale")
        if self.policy is None:
            return None
        result = compress(self.policy, self.keys[layer], self.values[layer], schedule=self.schedule,
                          scale=scale, layer=layer, num_layers=self.num_layers, queries=queries,
                          raw_queries=raw_queries, state=self.states[layer])
        self.keys[layer], self.values[layer], self.states[layer] = result.keys, result.values, result.state
        self._held[layer] = self._bytes(result.keys, result.values)
        self._record(layer, scale)
        return result

    def _check_layer(self, layer) -> None:
        # Python's negative indexing would silently address the last layers.
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer!r} out of range 0..{self.num_layers - 1}")

    def _record(self, layer: int, scale: int) -> None:
        self._held_at[scale][layer] = self._held[layer]
        self._kept_at[scale][layer] = self.length(layer)

    # -- timing helpers for adapters ----------------------------------------------------------
    def start_scale(self, scale: int, synchronize=None) -> None:
        if synchronize is not None:
            synchronize()
        self._scale_started = time.perf_counter()

    def end_scale(self, scale: int, synchronize=None) -> None:
        if synchronize is not None:
            synchronize()
        if self._scale_started is not None:
            self.scale_seconds[scale] += time.perf_counter() - self._scale_started
            self._scale_started = None

    def report(self) -> CacheReport:
        plan = self.policy.plan(self.schedule, self.num_layers) if self.policy is not None else None
        n_scales = self.schedule.num_scales
        capacities = [list(plan.capacities[s]) if plan else [None] * self.num_layers for s in range(n_scales)]
        return CacheReport(
            schedule=self.schedule, num_layers=self.num_layers,
            kv_bytes=[sum(row) for row in self._held_at],
            full_kv_bytes=[sum(row) for row in self._appended_at],
            peak_kv_bytes=self.peak_kv_bytes, full_peak_kv_bytes=self.full_peak_kv_bytes,
            kept_lengths=[list(r) for r in self._kept_at], capacities=capacities,
            policy=self.policy.name if self.policy is not None else "full",
            scale_seconds=list(self.scale_seconds), layer_kv_bytes=[list(r) for r in self._held_at])
