"""HeatKV's static schedule: S-CAS scores -> per-source-scale removal orders -> which (layer, head)
drops which whole source scale after every scale, for a budget.

Facts (paper arXiv 2605.14877 and its released code arm-research/heatkv @ 96dc288, read, not
copied):

- The unit of eviction is an *atom* (source scale j, layer l, head h): head h of layer l either
  keeps every token of scale j or none. The first ``protected_scales`` scales are never evicted
  (released default 3: the 1×1, 2×2 and 4×4 maps of Infinity, 21 tokens).
- S-CAS(l, h, j), the scale-dependent cumulative attention score, is the attention mass that the
  queries of every later scale t > j put on the tokens of scale j, averaged over queries, prompts
  and the later scales t = j + 1 … S − 1. Scales j = protected … S − 2 are ranked.
- For each source scale j the (layer, head) pairs are ordered by ascending S-CAS (ties: head, then
  layer, as released); the first x of that order drop scale j.
- x is the same for every source scale and depends only on the cache read next: after scale t the
  next scale reads cum(t) tokens per head uncompressed; with budget B tokens per head (average over
  all layers and heads), x_t = ceil(L·H·(cum(t) − B) / (cum(t) − P)) (0 if cum(t) <= B, at most
  L·H), P = the protected tokens, so L·H·cum(t) − x_t·(cum(t) − P) <= L·H·B: the *total* cache
  read by scale t + 1 fits the budget; single layers and heads may hold much more or less. x_t
  never decreases, so an atom once dropped stays dropped (a physically evicting cache can follow).

Mapping and deviations (ours): the budget is a token count (``Ratio`` rounds r·N_ref to tokens; the
released code compares against the float r·N_ref); the released code also activates some
removals early *inside* a scale (layer by layer) to bound the peak while a scale is being written;
here a layer's cache is cut after that layer's attention at the scale, as for every policy, and the
peak is what ``KVCache`` counts. The cache after the last scale is never read and the released
code does not compress it; here it is compressed like every scale (so that every plan keeps its
mean within the budget, an invariant of this framework), the last scale's own tokens ranked by the
order of the scale before it (no later queries exist to rank them). Selections up to the last
scale, and so the images, are the same either way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import attrs

from kvpolicy import CapacityPlan, ScaleSchedule
from kvpolicy.json_file import read_json

KIND = "heatkv-schedule"


def source_mass_name(source: int) -> str:
    """Calibration statistic: attention mass the current map's queries put on scale ``source``."""
    return f"heatkv/source_mass/{source}"


def scas_from_means(means: Mapping[int, Sequence], num_scales: int, protected_scales: int) -> list:
    """S-CAS [layer][head][source] from per-source tables ``means[j][layer][target][head]`` (mean
    attention mass on source j from target scale t's queries; NaN/None where not observed).

    S-CAS(l, h, j) = mean over t = j + 1 … S − 1 of means[j][l][t][h]; None for unranked sources
    (j < protected_scales or j = S − 1).
    """
    layers = len(next(iter(means.values())))
    heads = len(means[next(iter(means))][0][0])
    out = [[[None] * num_scales for _ in range(heads)] for _ in range(layers)]
    for j in range(protected_scales, num_scales - 1):
        if j not in means:
            raise ValueError(f"no attention mass recorded on source scale {j} (calibrate with every scale)")
        for l in range(layers):
            for h in range(heads):
                values = [means[j][l][t][h] for t in range(j + 1, num_scales)]
                if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
                    raise ValueError(f"S-CAS of layer {l}, head {h}, source scale {j} needs the attention of every "
                                     f"later scale {j + 1}..{num_scales - 1}; some were not observed")
                out[l][h][j] = sum(values) / len(values)
    return out


def orders_from_scas(scas: Sequence, protected_scales: int, num_scales: int) -> dict[int, list[tuple[int, int]]]:
    """{source scale: [(layer, head), ...]} by ascending S-CAS, ties by head then layer (released)."""
    layers, heads = len(scas), len(scas[0])
    orders = {}
    for j in range(protected_scales, num_scales - 1):
        entries = sorted((scas[l][h][j], h, l) for l in range(layers) for h in range(heads))
        orders[j] = [(l, h) for _, h, l in entries]
    return orders


def prune_count(incoming: int, budget_tokens: int, protected_tokens: int, slots: int) -> int:
    """Atoms per source scale to drop so that ``slots`` heads reading ``incoming`` tokens fit the budget."""
    if incoming <= budget_tokens:
        return 0
    if incoming <= protected_tokens:
        raise ValueError(f"budget {budget_tokens} is below the {protected_tokens} protected tokens")
    return min(slots, -(-slots * (incoming - budget_tokens) // (incoming - protected_tokens)))


def _orders(value) -> dict:
    out = {}
    for key, entries in dict(value).items():
        out[int(key)] = tuple((int(l), int(h)) for l, h in entries)
    return out


@attrs.frozen
class HeatSchedule:
    """Removal orders per source scale (what a calibration yields); budgets turn it into plans.

    ``orders[j]`` lists every (layer, head) once, lowest S-CAS first. ``scores`` (S-CAS
    [layer][head][source], optional) is kept for inspection. Save with ``save``/``to_dict``; a
    reloaded schedule gives the same plan for every budget.
    """

    num_layers: int
    num_heads: int
    num_scales: int
    protected_scales: int
    orders: dict = attrs.field(converter=_orders)
    scores: Optional[tuple] = attrs.field(default=None, eq=False)
    source: str = ""

    def __attrs_post_init__(self):
        for name in ("num_layers", "num_heads", "num_scales", "protected_scales"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "protected_scales" else 1):
                raise ValueError(f"heatkv schedule {name} must be a positive int, got {value!r}")
        if self.protected_scales < 1:
            raise ValueError(f"heatkv protected_scales must be >= 1 (the first scales are never evicted), got "
                             f"{self.protected_scales}")
        expected = list(range(self.protected_scales, self.num_scales - 1))
        if sorted(self.orders) != expected:
            raise ValueError(f"heatkv schedule needs one order per source scale {expected}, got {sorted(self.orders)}")
        everyone = {(l, h) for l in range(self.num_layers) for h in range(self.num_heads)}
        for j, order in self.orders.items():
            if len(order) != len(everyone) or set(order) != everyone:
                raise ValueError(f"heatkv order of source scale {j} must list every (layer, head) of a "
                                 f"{self.num_layers}x{self.num_heads} model exactly once")

    @classmethod
    def from_scas(cls, scas, *, num_scales: int, protected_scales: int, source: str = "") -> "HeatSchedule":
        orders = orders_from_scas(scas, protected_scales, num_scales)
        return cls(num_layers=len(scas), num_heads=len(scas[0]), num_scales=num_scales,
                   protected_scales=protected_scales, orders=orders,
                   scores=tuple(tuple(tuple(row) for row in layer) for layer in scas), source=source)

    @classmethod
    def from_released_orders(cls, orders, *, num_layers: int, num_heads: int, num_scales: int,
                             protected_scales: int = 3, source: str = "") -> "HeatSchedule":
        """The released format: a list of orders for source scales protected … S − 2, each a list
        of ``[head, layer]`` pairs, lowest S-CAS first (arm-research/heatkv ``orders/*.json``)."""
        expected = num_scales - 1 - protected_scales
        if not isinstance(orders, list) or len(orders) != expected:
            raise ValueError(f"released HeatKV orders must list {expected} orders (source scales {protected_scales}.."
                             f"{num_scales - 2}), got {len(orders) if isinstance(orders, list) else type(orders).__name__}")
        table = {protected_scales + i: [(int(layer), int(head)) for head, layer in order] for i, order in enumerate(orders)}
        return cls(num_layers=num_layers, num_heads=num_heads, num_scales=num_scales,
                   protected_scales=protected_scales, orders=table, source=source)

    # -- the schedule for a budget ------------------------------------------------------------
    def check_schedule(self, schedule: ScaleSchedule, num_layers: int, num_heads: Optional[int] = None) -> None:
        made_for = f" (made for {self.source})" if self.source else ""
        if schedule.num_scales != self.num_scales or num_layers != self.num_layers or (
                num_heads is not None and num_heads != self.num_heads):
            raise ValueError(f"heatkv schedule covers {self.num_scales} scales x {self.num_layers} layers x "
                             f"{self.num_heads} heads{made_for}, the model has {schedule.num_scales} scales x "
                             f"{num_layers} layers{'' if num_heads is None else f' x {num_heads} heads'}: "
                             "calibrate this model and resolution (kvpolicy calibrate)")

    def removal_counts(self, schedule: ScaleSchedule, budget_tokens: int) -> list[int]:
        """x_t per plan scale t: the (layer, head) pairs that drop each source scale after scale t."""
        protected = schedule.cumulative[min(self.protected_scales, schedule.num_scales) - 1]
        if budget_tokens < protected:
            raise ValueError(f"heatkv: budget {budget_tokens} tokens is below the {protected} tokens of the "
                             f"{self.protected_scales} protected scales; use a budget >= {protected} or fewer "
                             "protected_scales")
        slots = self.num_layers * self.num_heads
        return [prune_count(schedule.cumulative[t], budget_tokens, protected, slots) for t in range(schedule.num_scales)]

    def order(self, source: int) -> tuple:
        """The removal order of a source scale; the last scale (no later queries rank it) uses the
        order of the scale before it."""
        ranked = min(source, self.num_scales - 2)
        if ranked in self.orders:
            return self.orders[ranked]
        # no ranked source scale at all (a schedule of protected scales and one more): head, then layer
        return tuple((l, h) for h in range(self.num_heads) for l in range(self.num_layers))

    def dropped(self, schedule: ScaleSchedule, budget_tokens: int, scale: int) -> list[list[frozenset]]:
        """[layer][head] -> the source scales that head holds no longer after ``scale``'s step."""
        counts = self.removal_counts(schedule, budget_tokens)
        out = [[set() for _ in range(self.num_heads)] for _ in range(self.num_layers)]
        for j in range(self.protected_scales, scale + 1):
            for l, h in self.order(j)[: counts[scale]]:
                out[l][h].add(j)
        return [[frozenset(s) for s in row] for row in out]

    def head_capacities(self, schedule: ScaleSchedule, budget_tokens: int) -> list[list[Optional[tuple]]]:
        """[scale][layer] -> per-head token counts after that scale (None: no eviction there)."""
        counts = self.removal_counts(schedule, budget_tokens)
        out = []
        for t in range(schedule.num_scales):
            if counts[t] == 0:
                out.append([None] * self.num_layers)
                continue
            dropped = self.dropped(schedule, budget_tokens, t)
            out.append([tuple(schedule.cumulative[t] - sum(schedule.tokens(j) for j in dropped[l][h])
                              for h in range(self.num_heads)) for l in range(self.num_layers)])
        return out

    def kept_positions(self, schedule: ScaleSchedule, budget_tokens: int, scale: int, layer: int) -> Optional[list[list[int]]]:
        """Per head: the cache positions kept after ``scale`` in that head's own cache before
        compression (the scales it still held, then the current map); None when no head of the
        layer drops anything at this scale."""
        now = self.dropped(schedule, budget_tokens, scale)[layer]
        before = (self.dropped(schedule, budget_tokens, scale - 1)[layer] if scale else
                  [frozenset()] * self.num_heads)
        if now == before:
            return None
        out = []
        for h in range(self.num_heads):
            kept, position = [], 0
            for j in range(scale + 1):
                if j in before[h]:
                    continue  # already gone from this head's cache
                n = schedule.tokens(j)
                if j not in now[h]:
                    kept.extend(range(position, position + n))
                position += n
            out.append(kept)
        return out

    def held_lengths(self, schedule: ScaleSchedule, budget_tokens: int, scale: int, layer: int) -> list[int]:
        """Per head: tokens in that head's cache at ``scale`` before compression (its scales so far)."""
        before = (self.dropped(schedule, budget_tokens, scale - 1)[layer] if scale else
                  [frozenset()] * self.num_heads)
        return [schedule.cumulative[scale] - sum(schedule.tokens(j) for j in before[h]) for h in range(self.num_heads)]

    def plan(self, schedule: ScaleSchedule, budget_tokens: int, policy: str = "heatkv") -> CapacityPlan:
        """A head-wise ``CapacityPlan``: per (scale, layer) the per-head counts, the layer entry
        their ceiling mean (so that sum over heads <= H · capacity)."""
        heads = self.head_capacities(schedule, budget_tokens)
        layer_caps = [[None if row is None else -(-sum(row) // self.num_heads) for row in scale] for scale in heads]
        return CapacityPlan(capacities=layer_caps, budget_tokens=budget_tokens, policy=policy,
                            cumulative=schedule.cumulative, head_capacities=heads)

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": KIND, "num_layers": self.num_layers, "num_heads": self.num_heads,
                "num_scales": self.num_scales, "protected_scales": self.protected_scales,
                "orders": {str(j): [list(p) for p in order] for j, order in sorted(self.orders.items())},
                "scores": None if self.scores is None else [[list(r) for r in layer] for layer in self.scores],
                "source": self.source}

    @classmethod
    def from_dict(cls, data: dict) -> "HeatSchedule":
        if not isinstance(data, dict) or data.get("kind") != KIND:
            raise ValueError(f"not a HeatKV schedule (expected 'kind': {KIND!r})")
        unknown = set(data) - {"kind", "num_layers", "num_heads", "num_scales", "protected_scales", "orders",
                               "scores", "source"}
        if unknown:
            raise ValueError(f"unknown HeatKV schedule fields {sorted(unknown)}")
        scores = data.get("scores")
        return cls(num_layers=data["num_layers"], num_heads=data["num_heads"], num_scales=data["num_scales"],
                   protected_scales=data["protected_scales"], orders=data["orders"],
                   scores=None if scores is None else tuple(tuple(tuple(r) for r in layer) for layer in scores),
                   source=data.get("source", ""))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "HeatSchedule":
        return cls.from_dict(read_json(path, "HeatKV schedule"))


def source_mass_measure(schedule: ScaleSchedule):
    """A calibration measure: per sampled query of scale t, its attention mass on every earlier
    scale j < t (statistics ``heatkv/source_mass/{j}``). Needs the uncompressed calibration cache."""
    offsets, ends = schedule.offsets, schedule.cumulative

    def measure(probs, current_start: int, *, scale: int, **context) -> dict:
        if offsets[scale] != current_start:
            raise ValueError(f"heatkv S-CAS needs an uncompressed calibration cache (scale {scale} starts at "
                             f"{offsets[scale]}, the cache's current map at {current_start})")
        return {source_mass_name(j): probs[..., offsets[j]:ends[j]].sum(dim=-1, dtype=probs.dtype)
                for j in range(scale)}

    measure.takes_context = True
    measure.__name__ = "heatkv.source_mass_measure"
    return measure
