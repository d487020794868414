"""The per-model KV cache adapters use: per-layer storage, a policy, and one byte ledger.

``KVCache`` is a thin container of ``LayerCache`` objects, one per self-attention layer, and a
``ByteLedger``. Per layer and scale an adapter calls ``append`` (the current map's K/V), attends
over what it returns, then ``compress``, which calls ``kvpolicy.compress`` and replaces the
layer's storage with the kept tokens, so eviction really frees memory.

A layer holds keys and values as compact (rows, heads, length, dim) tensors while every (row,
head) keeps the same number of tokens, and as ``Ragged`` (packed, no padding) once head-wise
budgets make them differ; K and V may have different dtypes (Infinity's official bf16 run caches
K in float32 and V in bfloat16). The ledger counts the bytes of the tensors held (``numel x
element_size``; for a Ragged exactly the kept tokens):

- ``kv_bytes[scale]``: all layers, after that scale's compression (``layer_kv_bytes[scale][layer]``
  per layer);
- ``full_kv_bytes[scale]``: the bytes the same layers would hold with no eviction (every appended
  token kept);
- ``peak_kv_bytes``: the largest total held at any moment, measured right after each append, i.e.
  including one layer's transient (kept history + full current map) before it is compressed.
  Temporary copies made by ``torch.cat`` itself, and the transient padded view a policy scores on a
  ragged cache, are not counted (on a GPU, read the allocator).

``KVCache(..., compaction="in_place")`` moves a layer's kept tokens to the front of its own memory
instead of copying them into a new allocation, where that keeps little dead memory: only when the
layer's capacity evicts at most 1/8 of its tokens (drafter layers) and the layer's memory is the
cache's own (made by its ``torch.cat``). On CPU a new allocation is mostly page faults, so this
writes the kept tokens several times faster (``scripts/bench_scalekv.py``); the old allocation
stays alive until the layer's next append, and the ledger counts it whole (a layer's bytes are
then its storage's, the evicted tail included). A GPU's caching allocator reuses freed memory
anyway: keep the default ``"copy"`` there.

Timing is not the cache's business: adapters time their scales (``adapters.base.ScaleTimer``) and
put the seconds into the report.
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch

from .compress import CompressionResult, compress
from .policy import Policy
from .ragged import Ragged
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
    # [scale][layer] -> per-head kept lengths (max over rows), and the mean over rows and heads. Set
    # for every report; written by to_dict only when some layer held heads of different lengths.
    head_kept_lengths: list[list[tuple]] = attrs.field(factory=list)
    mean_kept_lengths: list[list[float]] = attrs.field(factory=list)
    head_capacities: Optional[list] = None  # the plan's [scale][layer] per-head capacities, if head-wise

    @property
    def read_by_last_scale_ratio(self) -> float:
        """kv_bytes / full_kv_bytes for the cache the last scale reads (after the second-to-last)."""
        s = max(0, self.schedule.num_scales - 2)
        return self.kv_bytes[s] / self.full_kv_bytes[s]

    @property
    def head_wise(self) -> bool:
        """Some layer held heads of different lengths, or the plan was head-wise."""
        return self.head_capacities is not None or any(
            len(set(heads)) > 1 for row in self.head_kept_lengths for heads in row)

    def to_dict(self) -> dict:
        data = {
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
        if self.head_wise:
            data["head_kept_lengths"] = [[list(h) for h in row] for row in self.head_kept_lengths]
            data["mean_kept_lengths"] = [list(r) for r in self.mean_kept_lengths]
            data["head_capacities"] = self.head_capacities
        return data

    def _mean_kept(self, s: int) -> float:
        if self.mean_kept_lengths:
            return sum(self.mean_kept_lengths[s]) / len(self.mean_kept_lengths[s])
        kept = self.kept_lengths[s]
        return sum(kept) / len(kept)

    def table(self, per_head: bool = False) -> str:
        """A plain-text per-scale table (MiB); ``kept/layer`` is tokens per (row, head) on average.
        ``per_head=True`` adds each head's kept length (max over rows, mean over layers)."""
        mib = 2 ** 20
        lines = [f"{'scale':>5} {'map':>9} {'cum':>7} {'kept/layer':>11} {'full MiB':>11} "
                 f"{'policy MiB':>11} {'ratio':>7}" + ("  kept per head (mean over layers)" if per_head else "")]
        for s, (h, w) in enumerate(self.schedule.shapes):
            full, mine = self.full_kv_bytes[s], self.kv_bytes[s]
            line = (f"{s:>5} {f'{h}x{w}':>9} {self.schedule.cumulative[s]:>7} "
                    f"{self._mean_kept(s):>11.1f} {full / mib:>11.2f} {mine / mib:>11.2f} {mine / full:>7.4f}")
            if per_head and self.head_kept_lengths:
                heads = list(zip(*self.head_kept_lengths[s]))
                line += "  " + " ".join(f"{sum(v) / len(v):.0f}" for v in heads)
            lines.append(line)
        lines.append(f"peak (incl. one layer's current map before compression): full "
                     f"{self.full_peak_kv_bytes / mib:.2f} MiB, {self.policy} {self.peak_kv_bytes / mib:.2f} MiB, "
                     f"ratio {self.peak_kv_bytes / self.full_peak_kv_bytes:.4f}")
        return "\n".join(lines)


class LayerCache:
    """One layer's storage: keys and values (dense (B, H, L, D) tensors, or ``Ragged`` when its
    (row, head)s hold different numbers of tokens), the policy state, and the last scale appended."""

    __slots__ = ("keys", "values", "state", "scale", "owned", "compacted")

    def __init__(self):
        self.keys: Any = None
        self.values: Any = None
        self.state: Any = None
        self.scale = -1
        self.owned = False  # keys and values are memory this cache allocated (may be compacted in place)
        self.compacted = False  # they are views at the front of a larger allocation (in-place compaction)

    @property
    def ragged(self) -> bool:
        return isinstance(self.keys, Ragged)

    @property
    def length(self) -> int:
        """Tokens of the longest (row, head) (every one's for a dense layer)."""
        if self.keys is None:
            return 0
        return self.keys.max_length if self.ragged else self.keys.shape[2]

    def head_lengths(self) -> list[list[int]]:
        """[row][head] tokens held."""
        if self.keys is None:
            return []
        if self.ragged:
            return self.keys.host_lengths()
        batch, heads, length = self.keys.shape[:3]
        return [[length] * heads for _ in range(batch)]

    @property
    def nbytes(self) -> int:
        if self.compacted:  # the whole allocation stays alive, evicted tail included
            return sum(t.untyped_storage().nbytes() for t in (self.keys, self.values))
        return sum(0 if t is None else (t.nbytes if isinstance(t, Ragged) else t.numel() * t.element_size())
                   for t in (self.keys, self.values))

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        self.compacted = False
        if self.keys is None:
            self.keys, self.values = keys.contiguous(), values.contiguous()
            self.owned = self.keys is not keys and self.values is not values  # copies, not the caller's tensors
            return self.keys, self.values
        held_shape = (self.keys.batch, self.keys.heads) if self.ragged else tuple(self.keys.shape[:2])
        for name, new, held in (("keys", keys, self.keys), ("values", values, self.values)):
            dim = held.dim if isinstance(held, Ragged) else held.shape[3]
            if tuple(new.shape[:2]) != held_shape or new.shape[3] != dim:
                shape = (*held_shape, "L", dim) if isinstance(held, Ragged) else tuple(held.shape)
                raise ValueError(f"{name} {tuple(new.shape)} do not continue layer {layer}'s cache "
                                 f"{shape}: (B, H, D) must stay the same")
            if new.dtype != held.dtype or new.device != held.device:
                # torch.cat would promote the whole cache silently (and change its byte count).
                raise ValueError(f"{name} are {new.dtype} on {new.device} but layer {layer}'s cache holds "
                                 f"{held.dtype} on {held.device}")
        if self.ragged:
            self.keys, self.values = self.keys.append(keys), self.values.append(values)
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        self.owned = not self.ragged
        return self.keys, self.values


class ByteLedger:
    """Every byte count of one generation: per (scale, layer) held and appended, and the peaks.
    ``replicas`` accounts one held tensor as that many identical copies (``simulate``'s probes)."""

    def __init__(self, num_layers: int, num_scales: int, replicas: int = 1):
        self.replicas = replicas
        self.held = [0] * num_layers
        self.appended = [0] * num_layers
        self.held_at = [[0] * num_layers for _ in range(num_scales)]
        self.appended_at = [[0] * num_layers for _ in range(num_scales)]
        self.peak = 0
        self.full_peak = 0

    def on_append(self, layer: int, scale: int, added: int, held: int) -> None:
        self.appended[layer] += added * self.replicas
        self.appended_at[scale][layer] = self.appended[layer]
        self.held[layer] = held * self.replicas
        self.held_at[scale][layer] = self.held[layer]
        self.peak = max(self.peak, sum(self.held))
        self.full_peak = max(self.full_peak, sum(self.appended))

    def on_compress(self, layer: int, scale: int, held: int) -> None:
        self.held[layer] = held * self.replicas
        self.held_at[scale][layer] = self.held[layer]


class KVCache:
    """Self-attention KV cache of a whole model for one generation, driven by a policy.

    Usage per layer and scale: ``k_all, v_all = cache.append(layer, scale, k, v)``; attention
    (``adapters.attention`` handles ragged layers); ``cache.compress(layer, scale, queries=...,
    raw_queries=...)``. Call ``reset()`` (or build a new cache) before each generation: policy
    state never leaks between generations.

    ``replicas`` lets a caller account one held tensor as that many identical copies (used by
    ``simulate`` to plan large geometries on a small probe). ``compaction``: ``"copy"`` (default)
    writes each layer's kept tokens into a new allocation; ``"in_place"`` moves them to the front of
    the layer's own memory where the capacity evicts at most 1/8 of its tokens (module docstring).
    """

    COMPACTIONS = ("copy", "in_place")

    def __init__(self, num_layers: int, schedule: ScaleSchedule, policy: Policy | None = None, *,
                 replicas: int = 1, compaction: str = "copy"):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        if not isinstance(schedule, ScaleSchedule):
            raise TypeError(f"schedule must be a ScaleSchedule, got {type(schedule).__name__}")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a Policy (see kvpolicy.get_policy) or None, got {type(policy).__name__}")
        if compaction not in self.COMPACTIONS:
            raise ValueError(f"compaction must be one of {', '.join(map(repr, self.COMPACTIONS))}, got {compaction!r}")
        self.num_layers = num_layers
        self.schedule = schedule
        self.policy = policy
        self.replicas = replicas
        self.compaction = compaction
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
        self.layers = [LayerCache() for _ in range(n)]
        self.ledger = ByteLedger(n, s, self.replicas)
        self._kept_at: list[list[list[list[int]]]] = [[[] for _ in range(n)] for _ in range(s)]

    # Read-only views by layer (what the cache held before the per-layer split).
    @property
    def keys(self) -> list:
        return [layer.keys for layer in self.layers]

    @property
    def values(self) -> list:
        return [layer.values for layer in self.layers]

    @property
    def states(self) -> list:
        return [layer.state for layer in self.layers]

    @property
    def peak_kv_bytes(self) -> int:
        return self.ledger.peak

    @property
    def full_peak_kv_bytes(self) -> int:
        return self.ledger.full_peak

    def length(self, layer: int) -> int:
        return self.layers[layer].length

    def append(self, layer: int, scale: int, keys: torch.Tensor, values: torch.Tensor):
        """Add the current map's tokens to a layer; returns the layer's whole (kept + new) K, V
        (dense tensors, or ``Ragged`` for a layer whose heads hold different lengths)."""
        self._check_layer(layer)
        for name, t in (("keys", keys), ("values", values)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a (B, H, n, D) tensor, got {getattr(t, 'shape', type(t).__name__)}")
        expected = self.schedule.tokens(scale)
        if keys.shape[2] != expected or values.shape[2] != expected:
            raise ValueError(f"scale {scale} has {expected} tokens; got keys {tuple(keys.shape)}, values {tuple(values.shape)}")
        store = self.layers[layer]
        if scale != store.scale + 1:
            raise RuntimeError(f"layer {layer} received scale {scale} after scale {store.scale}; "
                               "scales must arrive in order (call reset() between generations)")
        out = store.append(layer, keys, values)
        store.scale = scale
        self.ledger.on_append(layer, scale, keys.numel() * keys.element_size() + values.numel() * values.element_size(),
                              store.nbytes)
        self._kept_at[scale][layer] = store.head_lengths()
        return out

    def compress(self, layer: int, scale: int, *, queries=None, raw_queries=None) -> Optional[CompressionResult]:
        """Apply the policy to a layer after its attention at ``scale`` (no-op without a policy)."""
        self._check_layer(layer)
        store = self.layers[layer]
        if scale != store.scale:
            raise RuntimeError(f"compress(layer={layer}, scale={scale}) before append at that scale")
        if self.policy is None:
            return None
        in_place = self.compaction == "in_place" and store.owned and self._evicts_little(layer, scale, store.length)
        result = compress(self.policy, store.keys, store.values, schedule=self.schedule, scale=scale, layer=layer,
                          num_layers=self.num_layers, queries=queries, raw_queries=raw_queries, state=store.state,
                          in_place=in_place)
        store.compacted = in_place and not result.ragged
        store.owned = store.owned if result.keys is store.keys else not result.ragged  # a copy is ours too
        store.keys, store.values, store.state = result.keys, result.values, result.state
        self.ledger.on_compress(layer, scale, store.nbytes)
        self._kept_at[scale][layer] = store.head_lengths()
        return result

    # In-place compaction keeps the evicted tail allocated until the next append: only where the
    # capacity evicts at most this fraction of the layer's tokens.
    IN_PLACE_MAX_EVICTED = 1 / 8

    def _evicts_little(self, layer: int, scale: int, length: int) -> bool:
        plan = self.policy.plan(self.schedule, self.num_layers)
        capacity = plan.capacity(scale, layer)
        if capacity is None or plan.head_capacity(scale, layer) is not None:
            return False
        return length - min(capacity, length) <= self.IN_PLACE_MAX_EVICTED * length

    def _check_layer(self, layer) -> None:
        # Python's negative indexing would silently address the last layers.
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer!r} out of range 0..{self.num_layers - 1}")

    def report(self) -> CacheReport:
        plan = self.policy.plan(self.schedule, self.num_layers) if self.policy is not None else None
        n_scales = self.schedule.num_scales
        capacities = [list(plan.capacities[s]) if plan else [None] * self.num_layers for s in range(n_scales)]
        head_kept = [[tuple(max(col) for col in zip(*rows)) if rows else () for rows in row] for row in self._kept_at]
        mean_kept = [[sum(map(sum, rows)) / sum(map(len, rows)) if rows else 0.0 for rows in row] for row in self._kept_at]
        heads = None
        if plan is not None and plan.head_capacities is not None:
            heads = [[None if h is None else list(h) for h in row] for row in plan.head_capacities]
        return CacheReport(
            schedule=self.schedule, num_layers=self.num_layers,
            kv_bytes=[sum(row) for row in self.ledger.held_at],
            full_kv_bytes=[sum(row) for row in self.ledger.appended_at],
            peak_kv_bytes=self.ledger.peak, full_peak_kv_bytes=self.ledger.full_peak,
            kept_lengths=[[max(h) if h else 0 for h in row] for row in head_kept], capacities=capacities,
            policy=self.policy.name if self.policy is not None else "full",
            layer_kv_bytes=[list(r) for r in self.ledger.held_at], head_kept_lengths=head_kept,
            mean_kept_lengths=mean_kept, head_capacities=heads)
