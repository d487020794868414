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

Two kinds of measures beyond ``f(probs, current_start)``:

- a measure with the attribute ``takes_context = True`` is called as ``f(probs, current_start,
  positions=..., scale=..., layer=...)`` where ``positions`` are the block's query positions in
  the current map (spatial statistics need to know where a query sits);
- a measure with ``takes_logits = True`` also gets ``logits=...``, the float32 logits the block's
  ``probs`` are the softmax of (a share of a subset of keys renormalised from ``probs`` is 0/0 where
  that subset's probabilities underflow to 0; a softmax over the subset's logits is not);
- a measure with ``on_keys = True`` is a *key measure*: called once per observation as
  ``f(keys, current_start, scale=..., layer=...)`` with the whole cache keys (B, Hkv, L, D), it
  returns named per-(row, head) values (B, Hkv) (inter-scale key similarity, say).

``statistics(source=...)`` freezes what was recorded into an ``AttentionStatistics``: per name the
(layer, scale, head) means and counts, saved as one JSON file (``kvpolicy calibrate``) that every
calibrated policy reads (``load_statistics``). ``calibration_measures(schedule)`` gathers the
measures every registered policy declares (``Policy.calibration_measures``), so one calibration
run records what all of them need.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import attrs
import torch

from .json_file import read_json

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
        self.key_measures = tuple(m for m in measures if getattr(m, "on_keys", False))
        measures = tuple(m for m in measures if not getattr(m, "on_keys", False))
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
        for lo in range(0, positions.numel() if self.measures else 0, block):
            logits = torch.einsum("bhgqd,bhld->bhgql", grouped[:, :, :, lo:lo + block].float(), keys32)
            probs = torch.softmax(logits, dim=-1)
            for measure in self.measures:
                context = {}
                if getattr(measure, "takes_context", False):
                    context.update(positions=positions[lo:lo + block], scale=scale, layer=layer)
                if getattr(measure, "takes_logits", False):
                    context["logits"] = logits
                found = measure(probs, current_start, **context)
                for name, values in found.items():
                    if values is None:
                        continue
                    if tuple(values.shape) != tuple(probs.shape[:4]):
                        raise RuntimeError(f"measure {getattr(measure, '__name__', measure)!r} returned {name!r} of shape "
                                           f"{tuple(values.shape)}; need one value per query {tuple(probs.shape[:4])}")
                    per_head = values.to(torch.float64).sum(dim=(0, 2, 3)).cpu()
                    sums[name] = sums[name] + per_head if name in sums else per_head
                    counts[name] = counts.get(name, 0) + batch * group * probs.shape[3]
        for measure in self.key_measures:
            for name, values in measure(keys, current_start, scale=scale, layer=layer).items():
                if values is None:
                    continue
                if tuple(values.shape) != (batch, kv_heads):
                    raise RuntimeError(f"key measure {getattr(measure, '__name__', measure)!r} returned {name!r} of "
                                       f"shape {tuple(values.shape)}; need one value per row and head {(batch, kv_heads)}")
                per_head = values.to(torch.float64).sum(dim=0).cpu()
                sums[name] = sums[name] + per_head if name in sums else per_head
                counts[name] = counts.get(name, 0) + batch
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

    # -- combining collectors (calibration split over processes) --------------------------------
    def state_dict(self) -> dict:
        """The accumulated sums and counts as named tensors (copies) plus ``calls``, e.g. to send
        them to another process: ``sums.NAME`` and ``counts.NAME``, (layers, scales, heads)."""
        state = {f"sums.{name}": total.clone() for name, total in self._sums.items()}
        state.update({f"counts.{name}": count.clone() for name, count in self._counts.items()})
        state["calls"] = self.calls
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Replace the statistics with ``state`` (from ``state_dict`` of a collector with the same
        layers and scales)."""
        if "calls" not in state:
            raise ValueError("collector state lacks 'calls'")
        sums, counts, heads = {}, {}, set()
        for key, value in state.items():
            if key == "calls":
                continue
            kind, _, name = key.partition(".")
            if kind not in ("sums", "counts") or not name:
                raise ValueError(f"collector state has unknown entry {key!r} (entries: sums.NAME, counts.NAME, calls)")
            if (not isinstance(value, torch.Tensor) or value.dim() != 3
                    or tuple(value.shape[:2]) != (self.num_layers, self.num_scales)):
                raise ValueError(f"collector state {key!r} must be a ({self.num_layers} layers, {self.num_scales} scales, "
                                 "heads) tensor")
            heads.add(value.shape[2])
            target = sums if kind == "sums" else counts
            target[name] = value.to(torch.float64 if kind == "sums" else torch.long).clone()
        if set(sums) != set(counts) or len(heads) > 1:
            raise ValueError(f"collector state needs sums and counts of the same names and heads, got {sorted(state)}")
        self._sums, self._counts = sums, counts
        self.num_heads = heads.pop() if heads else None
        self.calls = int(state["calls"])

    def merge(self, other: "AttentionStatsCollector") -> None:
        """Add another collector's statistics to this one. The statistics are sums, so conditions
        observed by several collectors (processes) and merged in a fixed order give one result
        wherever each ran. Both must have the same class, layers, scales, query sampling and measures'
        names (the measures themselves are functions and cannot be compared)."""
        mine = (type(self), self.num_layers, self.num_scales, self.max_queries, self.seed, getattr(self, "top_k", None))
        theirs = (type(other), other.num_layers, other.num_scales, other.max_queries, other.seed, getattr(other, "top_k", None))
        if mine != theirs:
            raise ValueError(f"cannot merge collectors with different (class, layers, scales, max_queries, seed, top_k): "
                             f"{mine[1:]} vs {theirs[1:]}")
        if other.num_heads is not None and self.num_heads is not None and other.num_heads != self.num_heads:
            raise ValueError(f"cannot merge collectors of {self.num_heads} and {other.num_heads} heads")
        for name, total in other._sums.items():
            if name not in self._sums:
                self._sums[name] = torch.zeros_like(total)
                self._counts[name] = torch.zeros_like(other._counts[name])
            self._sums[name] += total
            self._counts[name] += other._counts[name]
        if self.num_heads is None:
            self.num_heads = other.num_heads
        self.calls += other.calls

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

    def statistics(self, *, source: str = "") -> "AttentionStatistics":
        """What was recorded, frozen: per name the (layer, scale, head) means and their counts."""
        means, counts = {}, {}
        for name in self.names:
            means[name] = [[[None if math.isnan(v) else v for v in row] for row in layer]
                           for layer in self.head_means(name).tolist()]
            counts[name] = self.counts(name)[:, :, 0].tolist()
        return AttentionStatistics(num_layers=self.num_layers, num_scales=self.num_scales, num_heads=self.num_heads or 1,
                                   means=means, counts=counts, calls=self.calls, source=source)


STATISTICS_KIND = "kvpolicy-attention-statistics"


def _check_tables(instance, attribute, value):
    shape = (instance.num_layers, instance.num_scales)
    for name, table in value.items():
        if not isinstance(name, str) or len(table) != shape[0] or any(len(row) != shape[1] for row in table):
            raise ValueError(f"statistics {attribute.name}[{name!r}] must be a [{shape[0]} layers][{shape[1]} scales] table")


@attrs.frozen
class AttentionStatistics:
    """Calibration statistics of one model: per name, the mean per (layer, scale, head) (None where
    not observed) and how many values each mean averages (per layer and scale; the same for every
    head). One file serves every calibrated policy; each derives its plan from it."""

    num_layers: int
    num_scales: int
    num_heads: int
    means: dict = attrs.field(validator=_check_tables)
    counts: dict = attrs.field(validator=_check_tables)
    calls: int = 0
    source: str = ""

    def __attrs_post_init__(self):
        if set(self.means) != set(self.counts):
            raise ValueError("statistics means and counts must name the same statistics")

    @property
    def names(self) -> list[str]:
        return sorted(self.means)

    def _check_name(self, name: str) -> None:
        if name not in self.means:
            made_for = f" (made for {self.source})" if self.source else ""
            raise ValueError(f"the calibration{made_for} has no statistic {name!r} (it has {self.names}); "
                             "run kvpolicy calibrate again with this policy registered")

    def head_means(self, name: str) -> torch.Tensor:
        """(layers, scales, heads) float64 means, NaN where not observed."""
        self._check_name(name)
        return torch.tensor([[[math.nan if v is None else v for v in row] for row in layer]
                             for layer in self.means[name]], dtype=torch.float64)

    def layer_means(self, name: str) -> list[list[Optional[float]]]:
        """[layer][scale] mean over heads (None where not observed)."""
        means = self.head_means(name).mean(dim=2)
        return [[None if math.isnan(v) else v for v in row] for row in means.tolist()]

    def layer_mean(self, name: str) -> list[float]:
        """Per layer: the mean over heads and observed scales, weighted by the values each scale saw
        (NaN for a layer with no observation)."""
        means, counts = self.head_means(name).mean(dim=2), torch.tensor(self.counts[name], dtype=torch.float64)
        seen = ~torch.isnan(means)
        weights = torch.where(seen, counts, torch.zeros_like(counts))
        total = torch.where(seen, means, torch.zeros_like(means)).mul(weights).sum(dim=1)
        return (total / weights.sum(dim=1)).tolist()

    def check_geometry(self, num_layers: int, num_scales: int, policy: str) -> None:
        if (num_layers, num_scales) != (self.num_layers, self.num_scales):
            made_for = f" (made for {self.source})" if self.source else ""
            raise ValueError(f"{policy}: the calibration covers {self.num_layers} layers x {self.num_scales} scales"
                             f"{made_for}, the model has {num_layers} x {num_scales}: calibrate this model and "
                             "resolution (kvpolicy calibrate)")

    def to_dict(self) -> dict:
        return {"kind": STATISTICS_KIND, "num_layers": self.num_layers, "num_scales": self.num_scales,
                "num_heads": self.num_heads, "means": self.means, "counts": self.counts, "calls": self.calls,
                "source": self.source}

    @classmethod
    def from_dict(cls, data: dict) -> "AttentionStatistics":
        if not isinstance(data, dict) or data.get("kind") != STATISTICS_KIND:
            raise ValueError(f"not a kvpolicy calibration (expected 'kind': {STATISTICS_KIND!r}; make one with "
                             "kvpolicy calibrate)")
        fields = {f.name for f in attrs.fields(cls)}
        unknown = set(data) - fields - {"kind"}
        if unknown:
            raise ValueError(f"unknown calibration fields {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k != "kind"})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "AttentionStatistics":
        return cls.from_dict(read_json(path, "calibration file", " (make one with kvpolicy calibrate)"))


def load_statistics(value) -> AttentionStatistics:
    """An ``AttentionStatistics`` from itself, a collector, its dict or a JSON path."""
    if isinstance(value, AttentionStatistics):
        return value
    if isinstance(value, AttentionStatsCollector):
        return value.statistics()
    if isinstance(value, dict):
        return AttentionStatistics.from_dict(value)
    if isinstance(value, (str, Path)):
        return AttentionStatistics.load(value)
    raise TypeError(f"a calibration is an AttentionStatistics, its dict or a JSON path, got {type(value).__name__}")


# Descriptive statistics every calibration records, whatever the policies: how structured a
# model's attention is (issue 17: trained tiny models against random weights). No policy reads them.
ENTROPY = "structure/entropy"
HISTORY_LOCALITY = "structure/history_locality"


def entropy_measure():
    """A measure: each query's attention entropy over all L keys divided by log L (1 = uniform
    attention, 0 = all mass on one key); not defined where the cache holds a single key."""

    def measure(probs: torch.Tensor, current_start: int) -> dict:
        length = probs.shape[-1]
        if length < 2:
            return {ENTROPY: None}
        entropy = -torch.special.xlogy(probs, probs).sum(dim=-1, dtype=torch.float64)
        return {ENTROPY: entropy / math.log(length)}

    measure.__name__ = "structure.entropy_measure"
    return measure


def history_neighbourhood(schedule, scale: int, query_positions: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """(q, offsets[scale]) bool: history key j (an earlier map's token) is in query i's neighbourhood
    when, on key j's own map, it lies within ``radius`` cells (Chebyshev) of the cell under query
    i's centre (query i: position ``query_positions[i]`` of scale ``scale``'s map, row-major)."""
    h, w = schedule.shape(scale)
    device = query_positions.device
    centre_y = (torch.div(query_positions, w, rounding_mode="floor").double() + 0.5) / h
    centre_x = ((query_positions % w).double() + 0.5) / w
    key_scale, key_row, key_col = schedule.locate_tensor(torch.arange(schedule.offset(scale), device=device))
    heights = torch.tensor([s[0] for s in schedule.shapes], dtype=torch.double, device=device)[key_scale]
    widths = torch.tensor([s[1] for s in schedule.shapes], dtype=torch.double, device=device)[key_scale]
    row = torch.floor(centre_y[:, None] * heights[None, :]).long()
    col = torch.floor(centre_x[:, None] * widths[None, :]).long()
    return ((key_row[None, :] - row).abs() <= radius) & ((key_col[None, :] - col).abs() <= radius)


def history_locality_measure(schedule, *, radius: int = 1):
    """A measure: the share of each query's history attention (its attention on earlier maps,
    renormalised to 1) that falls on history keys in its spatial neighbourhood
    (``history_neighbourhood``); not defined at the first scale (no history). Attention spread
    evenly over the history scores the neighbourhood's share of the history tokens
    (``uniform_history_locality``)."""
    _check_int("radius", radius, 0)
    offsets = schedule.offsets

    def measure(probs: torch.Tensor, current_start: int, *, positions: torch.Tensor, scale: int,
                logits: torch.Tensor | None = None, **context) -> dict:
        if current_start == 0:
            return {HISTORY_LOCALITY: None}
        if offsets[scale] != current_start:
            raise ValueError(f"history locality needs an uncompressed calibration cache (scale {scale} starts at "
                             f"{offsets[scale]}, the cache's current map at {current_start})")
        # the history attention renormalised, as a softmax over the history logits: a sharp query whose
        # history probabilities all underflow to 0 in probs still has a defined share (called without
        # logits, from probs, where that query gives 0/0)
        if logits is not None:
            history = torch.softmax(logits[..., :current_start], dim=-1)
        else:
            history = probs[..., :current_start] / probs[..., :current_start].sum(dim=-1, keepdim=True)
        near = history_neighbourhood(schedule, scale, positions, radius).to(history.dtype)
        return {HISTORY_LOCALITY: torch.einsum("bhgql,ql->bhgq", history, near).double()}

    measure.takes_context = True
    measure.takes_logits = True
    measure.__name__ = f"structure.history_locality_measure(radius={radius})"
    return measure


def uniform_history_locality(schedule, scale: int, radius: int = 1) -> float:
    """What ``history_locality_measure`` gives for attention spread evenly over the history: the
    mean, over the map's queries, of the share of history tokens in a query's neighbourhood."""
    if scale < 1:
        raise ValueError(f"scale {scale!r} has no history (scales >= 1 do)")
    positions = torch.arange(schedule.tokens(scale))
    return float(history_neighbourhood(schedule, scale, positions, radius).double().mean())


def structure_measures(schedule, *, radius: int = 1) -> list:
    """The descriptive measures every shared calibration records (``ENTROPY``, ``HISTORY_LOCALITY``)."""
    return [entropy_measure(), history_locality_measure(schedule, radius=radius)]


def shared_collector(num_layers: int, num_scales: int, schedule, *, seed: int = 0, max_queries: int = 256,
                     names: Sequence[str] | None = None) -> AttentionStatsCollector:
    """The collector one calibration run feeds for every registered policy (or those named): the
    union of their ``calibration_measures``, plus the descriptive ``structure_measures``; its
    ``statistics()`` is the file they all read."""
    if schedule is None or schedule.num_scales != num_scales:
        raise ValueError(f"the shared calibration collector needs the model's schedule ({num_scales} scales), got "
                         f"{schedule!r}")
    measures = calibration_measures(schedule, names) + structure_measures(schedule)
    return AttentionStatsCollector(num_layers, num_scales, measures, seed=seed, max_queries=max_queries)


def calibration_measures(schedule, names: Sequence[str] | None = None) -> list:
    """The measures every registered policy (or those named) declares for ``schedule``
    (``Policy.calibration_measures``): one calibration run records them all."""
    from .registry import list_policies, policy_class

    measures, seen = [], set()
    for name in (sorted(list_policies()) if names is None else names):
        declare = policy_class(name).calibration_measures
        # Policies composed from the same allocation part (scalekv, scalekv_snapkv) declare the
        # same measures through the same method: record them once.
        key = getattr(declare, "__func__", declare)
        if key in seen:
            continue
        seen.add(key)
        measures.extend(declare(schedule))
    return measures
