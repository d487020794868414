"""AMS-KV (Xu, Wang, Wang, Li, "AMS-KV: Adaptive KV Caching in Multi-Scale Visual Autoregressive
Transformers", AAAI 2026, arXiv 2511.16047): keep the *condensed* coarsest scales and the most
recent (*local*) scales, evict the scales in between; give more cache to *cache-demanding* layers,
recognised by a weak similarity of their keys across scales.

What the paper states (abstract and §3): attention density is highest on the coarsest scales
("condensed", e.g. the first two) and on the most recent ("local") scales, so those are kept and
the intermediate scales are evicted; KV similarity between successive scales is strong in
*cache-efficient* layers and weak in *cache-demanding* ones, which get a larger cache.

Mapping onto this framework (a per-(scale, layer) capacity plan and a selector):

- Selection, per layer, after each scale's step: every token of the first ``condensed_scales``
  scales is kept, and the rest of the capacity is filled with the most recent tokens in generation
  order: whole local scales (the current map, the scale before, ...) and, where the capacity ends
  inside an older scale, that scale's last rows. With a capacity of condensed + tokens(s) +
  tokens(s − 1) exactly the scales {0, …, condensed − 1, s − 1, s} stay. The condensed tokens are
  always at the front of a compressed cache (they are never evicted), so their cache positions are
  0 … condensed_tokens − 1 at every scale. Nothing is evicted while the cache fits.
- Allocation: the paper fixes how many local scales each layer keeps; here a *budget* (tokens per
  layer on average, ``Ratio``/``Tokens`` as for every policy) is split per scale between the two
  layer kinds: ``demanding_fraction`` of the layers (those with the lowest inter-scale key
  similarity in the calibration) get ``demanding_ratio`` times the capacity of the others, the
  layer mean at most the budget (exactly the budget, up to integer rounding, while no layer is
  saturated); a demanding layer never gets more than its uncompressed length, the excess goes to
  the efficient layers.
- Inter-scale similarity (ours where the paper is not specific): per layer, the mean cosine
  similarity between the keys of scale s and the keys of scale s − 1 upsampled to s's map
  (nearest neighbour), over heads, rows, positions and scales s >= 1; measured by ``kvpolicy
  calibrate`` (statistic ``amskv/key_similarity``).

Deviations, all ours where the paper is not specific: a token budget instead of a fixed number of
local scales per layer kind (so the policy runs at any budget, also below one full local scale,
where it keeps the newest rows of the current map); the binary demanding/efficient split with a
capacity ratio (defaults: a quarter of the layers, twice the capacity); keys only (the calibration
hook sees keys, not values). A capacity below the condensed tokens keeps only the first
``capacity`` of them (as StreamingLLM keeps only the first B sinks).

Calibration and harnesses: the layer split is the paper's signal, so the policy declares
``needs_calibration``: ``kvpolicy compare`` and ``bench-gpu`` calibrate the model first (as for
ScaleKV) and ``kvpolicy calibrate`` records its statistic by default, unless the layer split is
given: ``calibration=`` (a calibration or a plain per-layer similarity list) or
``uniform_layers=True``, which asks for the uncalibrated split (every layer cache-efficient: one
capacity for all layers, condensed scales + recent tokens). ``kvpolicy plan`` without a
calibration plans with ``uniform_layers=True`` as a placeholder and says so. The Python API is
unchanged: ``get_policy("amskv", budget=...)`` without either option is that uniform split too
(``needs_calibration`` only tells harnesses to calibrate).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import attrs
import torch

from kvpolicy import CapacityPlan, Policy, ScaleSchedule, Selection, register_policy, scoring
from kvpolicy.validators import check_int_at_least
from policies.common.calibrated import SharedCalibration

SIMILARITY = "amskv/key_similarity"


def condensed_tokens(schedule: ScaleSchedule, condensed_scales: int) -> int:
    """Tokens of the first ``condensed_scales`` scales (all of them if the schedule is shorter)."""
    count = min(condensed_scales, schedule.num_scales)
    return schedule.cumulative[count - 1] if count else 0


def kept_positions(length: int, capacity: int, condensed: int) -> list[int]:
    """Cache positions AMS-KV keeps: the condensed prefix plus the most recent tokens."""
    if length <= capacity:
        return list(range(length))
    condensed = min(condensed, capacity)
    return list(range(condensed)) + list(range(length - (capacity - condensed), length))


def demanding_layers(similarity: Sequence[float], fraction: float) -> list[int]:
    """The round(fraction · L) layers with the lowest inter-scale key similarity (ties: lower layer)."""
    count = math.floor(fraction * len(similarity) + 0.5)
    ranked = sorted(range(len(similarity)), key=lambda l: (similarity[l], l))
    return sorted(ranked[:count])


def split_capacities(num_layers: int, budget: int, demanding: Sequence[int], ratio: float, length: int,
                     floor: int) -> list[int]:
    """Per-layer capacities for one scale whose uncompressed length is ``length``.

    Demanding layers get ``ratio`` times the efficient layers' capacity; the sum is L · B (integer
    remainder to the lowest layers of the efficient kind first), no capacity exceeds ``length``
    (excess goes back to the other kind) and none is below ``floor``.
    """
    total = num_layers * budget
    if length <= budget or not demanding or len(demanding) == num_layers or ratio == 1:
        return [min(budget, length)] * num_layers
    demanding = set(demanding)
    n_d, n_e = len(demanding), num_layers - len(demanding)
    natural = math.floor(total / (n_d * ratio + n_e))
    if natural < floor:  # the efficient layers could not hold the floor: no split at this budget
        return [budget] * num_layers
    high = min(length, math.floor(natural * ratio))
    efficient = min(length, (total - n_d * high) // n_e)
    caps = [high if l in demanding else efficient for l in range(num_layers)]
    spare = total - sum(caps)
    for kind in (False, True):  # hand out the integer remainder, efficient layers first
        for l in range(num_layers):
            if spare <= 0:
                break
            if (l in demanding) == kind and caps[l] < length:
                caps[l] += 1
                spare -= 1
    return caps


def _similarity_table(value):
    """(per-layer similarities, what they were measured on) from a calibration (statistics, their
    dict or a JSON path) or a plain list of numbers."""
    if value is None:
        return None, ""
    if isinstance(value, (list, tuple)):
        return tuple(float(v) for v in value), ""
    from kvpolicy.attention_stats import load_statistics  # lazily: plain policies never need it

    stats = load_statistics(value)
    return tuple(stats.layer_mean(SIMILARITY)), stats.source


def _check_fraction(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"amskv {attribute.name} must be a number in [0, 1], got {value!r}")


def _check_ratio(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
        raise ValueError(f"amskv {attribute.name} must be a number >= 1 (how many times the efficient layers' "
                         f"capacity a cache-demanding layer gets), got {value!r}")


@register_policy("amskv")
@attrs.define(kw_only=True)
class AMSKV(SharedCalibration, Policy):
    """Condensed coarsest scales + most recent tokens; more cache for cache-demanding layers."""

    condensed_scales: int = attrs.field(default=2, validator=check_int_at_least(1))
    demanding_fraction: float = attrs.field(default=0.25, validator=_check_fraction)
    demanding_ratio: float = attrs.field(default=2.0, validator=_check_ratio)
    calibration: Any = attrs.field(default=None, converter=lambda v: None if v is None else
                                   (str(Path(v).expanduser().absolute()) if isinstance(v, (str, Path)) else v))
    # the uncalibrated split asked for explicitly (every layer cache-efficient): harnesses then do not calibrate
    uniform_layers: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    _similarity: Optional[tuple] = attrs.field(default=None, init=False, repr=False, eq=False)
    _made_for: str = attrs.field(default="", init=False, repr=False, eq=False)

    # harnesses calibrate it unless the split is given; the Python API without one stays the uniform split
    needs_calibration = True
    calibration_option = "calibration"
    plan_sources = ("uniform_layers",)
    check_option_values = {"condensed_scales": (1, 2, 3)}  # drawn by kvpolicy check

    def __attrs_post_init__(self):
        if self.uniform_layers and self.calibration is not None:
            raise ValueError("amskv takes one source of its layer split: calibration= (kvpolicy calibrate, or a "
                             "per-layer similarity list) or uniform_layers=True (every layer cache-efficient), "
                             "got both")
        self._similarity, self._made_for = _similarity_table(self.calibration)

    @classmethod
    def planning_stand_in(cls, schedule, num_layers, budget):
        note = ("no --calibration: the layer split is a placeholder (every layer cache-efficient, one capacity "
                "for all layers) until the model is calibrated; use --calibration (kvpolicy calibrate) for its "
                "cache-demanding layers.")
        return {"uniform_layers": True}, note

    @classmethod
    def calibration_measures(cls, schedule):
        return [similarity_key_measure(schedule)]

    def similarity(self, num_layers: int) -> Optional[tuple]:
        if self._similarity is None:
            return None
        if len(self._similarity) != num_layers:
            made_for = f" (made for {self._made_for})" if self._made_for else ""
            raise ValueError(f"amskv calibration has {len(self._similarity)} layers{made_for}, the model {num_layers}: "
                             "calibrate this model (kvpolicy calibrate)")
        if any(math.isnan(v) for v in self._similarity):
            raise ValueError("amskv calibration has no inter-scale key similarity for some layer (was the "
                             "calibration run on a single-scale schedule?)")
        return self._similarity

    def make_plan(self, schedule, num_layers, budget_tokens):
        condensed = condensed_tokens(schedule, self.condensed_scales)
        similarity = self.similarity(num_layers)
        demanding = [] if similarity is None else demanding_layers(similarity, self.demanding_fraction)
        rows = [split_capacities(num_layers, budget_tokens, demanding, self.demanding_ratio, length,
                                 min(condensed + 1, budget_tokens))
                for length in schedule.cumulative]
        roles = [["demanding" if l in demanding else "efficient" for l in range(num_layers)]] * schedule.num_scales
        return CapacityPlan(capacities=rows, budget_tokens=budget_tokens, policy=self.name,
                            cumulative=schedule.cumulative, roles=roles if demanding else None)

    def promised_positions(self, ctx):
        """The condensed coarsest scales (the first tokens) and the most recent tokens."""
        condensed = condensed_tokens(ctx.schedule, self.condensed_scales)
        return torch.tensor(kept_positions(ctx.length, ctx.capacity, condensed), dtype=torch.long)

    def select(self, keys, values, ctx):
        if ctx.capacity is None or ctx.length <= ctx.capacity:
            return Selection(None, ctx.state)
        condensed = min(condensed_tokens(ctx.schedule, self.condensed_scales), ctx.capacity)
        kept = torch.cat([scoring.first_positions(ctx.length, condensed, device=keys.device),
                          scoring.recent_positions(ctx.length, ctx.capacity - condensed, device=keys.device)])
        batch, heads = keys.shape[:2]
        return Selection(kept.expand(batch, heads, -1).clone(), ctx.state)


def inter_scale_similarity(keys: torch.Tensor, schedule: ScaleSchedule, scale: int) -> torch.Tensor:
    """(B, H) mean cosine similarity between scale ``scale``'s keys and scale − 1's keys upsampled
    (nearest) to its map; ``keys`` (B, H, L, D) is the uncompressed cache through ``scale``."""
    if scale < 1:
        raise ValueError("inter-scale similarity needs a previous scale")
    (h0, w0), (h1, w1) = schedule.shape(scale - 1), schedule.shape(scale)
    start0, start1 = schedule.offset(scale - 1), schedule.offset(scale)
    batch, heads, _, dim = keys.shape
    previous = keys[:, :, start0:start0 + h0 * w0].float().reshape(batch * heads, h0, w0, dim).permute(0, 3, 1, 2)
    upsampled = torch.nn.functional.interpolate(previous, size=(h1, w1), mode="nearest")
    upsampled = upsampled.permute(0, 2, 3, 1).reshape(batch, heads, h1 * w1, dim)
    current = keys[:, :, start1:start1 + h1 * w1].float()
    return torch.nn.functional.cosine_similarity(current, upsampled, dim=-1).mean(dim=-1)


def similarity_key_measure(schedule: ScaleSchedule):
    """A calibration key measure: per (row, head), the inter-scale key similarity at each scale >= 1."""
    offsets = schedule.offsets

    def measure(keys: torch.Tensor, current_start: int, *, scale: int, **context) -> dict:
        if scale < 1:
            return {}
        if offsets[scale] != current_start:
            raise ValueError(f"amskv similarity needs an uncompressed calibration cache (scale {scale} starts at "
                             f"{offsets[scale]}, the cache's current map at {current_start})")
        return {SIMILARITY: inter_scale_similarity(keys, schedule, scale)}

    measure.on_keys = True
    measure.__name__ = "amskv.similarity_key_measure"
    return measure
