"""Head-aware compression after HACK (Qin, Lv, Lin, Guo, Zhang, Zou, Lin, "Head-Aware KV Cache
Compression for Efficient Visual Autoregressive Modeling", AAAI 2026, arXiv 2504.09261) and
HACK++ (Qin, Jiang, Lin, Lv, Guo, Wen, Lin, arXiv 2606.08302): heads are classified offline into
*structural* heads (spatial coherence: every query attends to its spatial counterpart in the
current map and in earlier maps, a multi-diagonal pattern) and *contextual* heads (semantic
consistency: all queries attend to the same few tokens, a vertical pattern); each kind gets its own
budget (asymmetric) and its own selection pattern.

What the papers state: the two head kinds exist and are stable across prompts, so one offline
calibration classifies them; budgets are asymmetric and each kind has a pattern-specific
compression; the average cache length stays within the budget B (HACK); HACK++ adds that the kinds
differ in how much they rely on earlier scales and derives head-specific priors from the same
calibration.

Mapping onto this framework, and what is ours where the papers are not specific:

- Classification statistic (ours): the *locality* of a head, the attention mass a query puts on
  the keys at (or next to, ``radius`` cells) its own spatial position, mapped onto every scale's
  grid; averaged over sampled queries, rows, prompts and the scales whose map has at least
  ``min_map_tokens`` tokens (tiny maps have no spatial structure). Structural heads score high,
  contextual heads low. ``kvpolicy calibrate`` records it (``head_aware/locality``).
- Split (ours): the (layer, head) pairs are divided in two by Otsu's threshold on the locality
  values (the split that maximises the between-group variance), or, with ``contextual_fraction``,
  the given share of lowest-locality heads is contextual.
- Budgets, ``allocation="asymmetric"`` (HACK, default): in every layer with C contextual and S
  structural heads, a contextual head gets ``contextual_ratio`` times a structural head's capacity
  and the layer's mean over heads is the budget B (C·c + S·s <= H·B; the ratio, default 0.5, is
  ours); nothing is evicted while a head's cache fits. ``allocation="prior"`` (after HACK++'s
  head-specific priors; the rule is ours): per (scale, layer) every head gets the window and the
  rest of H·B in proportion to its calibrated attention mass on earlier scales at the scale that
  reads the cache (statistic ``head_aware/history_mass``), so the split follows layers and scales.
- Selection per kind: structural heads keep the most recent tokens (the current map and the maps
  just before it, the spatial neighbourhood their diagonals read next); contextual heads keep the
  tokens the last ``window_size`` raster queries vote for (softmax probabilities, pooled with
  ``kernel_size``), plus that window.

Options: ``calibration`` or ``kinds`` (the head kinds' source), ``allocation`` ("asymmetric" or
"prior"), ``contextual_ratio`` (0.5),
``contextual_fraction`` (None: Otsu), ``min_map_tokens`` (16), ``radius`` (1), and the contextual
heads' ``window_size`` (16), ``kernel_size`` (5), ``pooling`` ("max").

Without a calibration the policy cannot know the head kinds and refuses to plan (``kvpolicy
calibrate`` makes one; ``kvpolicy compare``/``generate`` calibrate first).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import attrs
import torch

from kvpolicy import CapacityPlan, ScoredPolicy, load_statistics, register_policy, scoring
from policies.common.calibrated import SharedCalibration
from kvpolicy.validators import check_choice, check_int_at_least, check_positive_int
from policies.common.options import check_odd_kernel, check_pooling_name, check_window_fits

LOCALITY = "head_aware/locality"
HISTORY = "head_aware/history_mass"
ALLOCATIONS = ("asymmetric", "prior")
STRUCTURAL, CONTEXTUAL = "structural", "contextual"


def locality_mask(schedule, scale: int, query_positions: torch.Tensor, length: int, radius: int = 1) -> torch.Tensor:
    """(q, L) bool: key j is local to query i of scale ``scale`` when, on key j's own map, it lies
    within ``radius`` cells (Chebyshev) of the cell under query i's centre. Keys are the first
    ``length`` tokens of the uncompressed sequence (calibration caches are never compressed)."""
    h, w = schedule.shape(scale)
    q_row, q_col = query_positions // w, query_positions % w
    y = (q_row.double() + 0.5) / h
    x = (q_col.double() + 0.5) / w
    key_scale, key_row, key_col = schedule.locate_tensor(torch.arange(length, device=query_positions.device))
    heights = torch.tensor([s[0] for s in schedule.shapes], dtype=torch.double, device=query_positions.device)[key_scale]
    widths = torch.tensor([s[1] for s in schedule.shapes], dtype=torch.double, device=query_positions.device)[key_scale]
    target_row = torch.floor(y[:, None] * heights[None, :]).long()
    target_col = torch.floor(x[:, None] * widths[None, :]).long()
    return ((key_row[None, :] - target_row).abs() <= radius) & ((key_col[None, :] - target_col).abs() <= radius)


def locality_measure(schedule, *, radius: int = 1):
    """A calibration measure: per sampled query, its attention mass on keys local to it."""
    offsets = schedule.offsets

    def measure(probs: torch.Tensor, current_start: int, *, positions: torch.Tensor, scale: int, **context) -> dict:
        if offsets[scale] != current_start:
            raise ValueError(f"head_aware locality needs an uncompressed calibration cache (scale {scale} starts at "
                             f"{offsets[scale]}, the cache's current map at {current_start})")
        mask = locality_mask(schedule, scale, positions, probs.shape[-1], radius).to(probs.dtype)
        # HACK++'s prior: how much each head relies on earlier scales (its attention outside the map)
        return {LOCALITY: torch.einsum("bhgql,ql->bhgq", probs, mask),
                HISTORY: probs[..., :current_start].sum(dim=-1) if current_start else None}

    measure.takes_context = True
    measure.__name__ = f"head_aware.locality_measure(radius={radius})"
    return measure


def otsu_split(values: Sequence[float]) -> float:
    """The threshold t maximising the between-group variance of {v < t} and {v >= t} (Otsu);
    between two adjacent sorted values."""
    ordered = sorted(values)
    if len(ordered) < 2 or ordered[0] == ordered[-1]:
        raise ValueError("cannot split heads into two kinds: every head has the same locality")
    total, n = sum(ordered), len(ordered)
    best, threshold, prefix = -1.0, None, 0.0
    for k in range(1, n):
        prefix += ordered[k - 1]
        if ordered[k] == ordered[k - 1]:
            continue
        low_mean, high_mean = prefix / k, (total - prefix) / (n - k)
        between = k * (n - k) * (low_mean - high_mean) ** 2
        if between > best:
            best, threshold = between, (ordered[k - 1] + ordered[k]) / 2
    return threshold


def classify_heads(locality: Sequence[Sequence[float]], contextual_fraction: float | None = None) -> list[list[str]]:
    """[layer][head] -> "structural" or "contextual" from per-head locality (high = structural)."""
    flat = [(v, l, h) for l, row in enumerate(locality) for h, v in enumerate(row)]
    if any(v is None or math.isnan(v) for v, _, _ in flat):
        raise ValueError("head locality is missing for some head (calibrate on maps of at least a few tokens)")
    kinds = [[STRUCTURAL] * len(row) for row in locality]
    if contextual_fraction is None:
        threshold = otsu_split([v for v, _, _ in flat])
        contextual = [(l, h) for v, l, h in flat if v < threshold]
    else:
        count = math.floor(contextual_fraction * len(flat) + 0.5)
        contextual = [(l, h) for _, l, h in sorted(flat)[:count]]
    for l, h in contextual:
        kinds[l][h] = CONTEXTUAL
    return kinds


def prior_head_capacities(reliance: Sequence[float], budget: int, length: int, floor: int) -> tuple[int, ...]:
    """Per-head capacities in one layer proportional to each head's reliance on earlier scales
    (HACK++'s head-specific prior; the proportional rule is ours): every head gets ``floor``, the
    rest of H·budget is shared in proportion to ``reliance`` (largest remainders, ties to the lower
    head), none above ``length`` (the excess goes to the others)."""
    heads = len(reliance)
    if length <= budget:
        return tuple([length] * heads)
    caps = [min(floor, length)] * heads
    spare = heads * budget - sum(caps)
    weights = [max(0.0, float(r)) for r in reliance]
    while spare > 0:
        open_heads = [h for h in range(heads) if caps[h] < length]
        if not open_heads:
            break
        total = sum(weights[h] for h in open_heads)
        shares = {h: (weights[h] / total if total > 0 else 1 / len(open_heads)) * spare for h in open_heads}
        given = {h: min(length - caps[h], math.floor(shares[h])) for h in open_heads}
        left = spare - sum(given.values())
        for h in sorted(open_heads, key=lambda h: (-(shares[h] - math.floor(shares[h])), h)):
            if left <= 0:
                break
            if caps[h] + given[h] < length:
                given[h] += 1
                left -= 1
        if not any(given.values()):
            break
        for h, g in given.items():
            caps[h] += g
        spare = heads * budget - sum(caps)
    return tuple(caps)


def split_head_capacities(kinds: Sequence[str], budget: int, ratio: float, length: int, floor: int) -> tuple[int, ...]:
    """Per-head capacities in one layer: contextual heads ``ratio`` × structural, sum <= H·budget,
    none above ``length`` (the excess goes to the other kind) or below ``floor``."""
    heads = len(kinds)
    total = heads * budget
    n_c = sum(k == CONTEXTUAL for k in kinds)
    n_s = heads - n_c
    if length <= budget:
        return tuple([length] * heads)
    if n_c in (0, heads) or ratio == 1:
        return tuple([budget] * heads)
    structural = min(length, math.floor(total / (n_s + ratio * n_c)))
    contextual = max(floor, min(length, math.floor(structural * ratio)))
    structural = min(length, (total - n_c * contextual) // n_s)
    if structural < floor:
        raise ValueError(f"head_aware: budget {budget} leaves structural heads {structural} tokens, below the "
                         f"observation window {floor}")
    caps = [contextual if k == CONTEXTUAL else structural for k in kinds]
    spare = total - sum(caps)
    for h in range(heads):  # integer remainder: one more token for the first heads that can take it
        if spare <= 0:
            break
        if caps[h] < length:
            caps[h] += 1
            spare -= 1
    return tuple(caps)


def head_locality(stats, schedule, min_map_tokens: int) -> list[list[float]]:
    """[layer][head] locality: the mean over the scales whose map has >= ``min_map_tokens`` tokens,
    weighted by the sampled queries of each scale."""
    means = stats.head_means(LOCALITY)  # (layers, scales, heads)
    counts = torch.tensor(stats.counts[LOCALITY], dtype=torch.float64)  # (layers, scales)
    use = torch.tensor([schedule.tokens(s) >= min_map_tokens for s in range(schedule.num_scales)])
    weights = torch.where(use[None, :] & (counts > 0), counts, torch.zeros_like(counts))
    if not bool((weights.sum(dim=1) > 0).all()):
        raise ValueError(f"head_aware: no calibrated scale has a map of at least min_map_tokens={min_map_tokens} tokens")
    means = torch.nan_to_num(means, nan=0.0)
    return ((means * weights[:, :, None]).sum(dim=1) / weights.sum(dim=1)[:, None]).tolist()


def _kinds(value):
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"head_aware kinds must be a [layer][head] table of 'structural'/'contextual', got {value!r}")
    table = tuple(tuple(str(k) for k in row) for row in value)
    bad = sorted({k for row in table for k in row} - {STRUCTURAL, CONTEXTUAL})
    if bad:
        raise ValueError(f"head_aware kinds are 'structural' or 'contextual', got {bad}")
    return table


def _check_ratio(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"head_aware contextual_ratio must be in (0, 1] (a contextual head's capacity over a "
                         f"structural head's), got {value!r}")


def _check_optional_fraction(instance, attribute, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
        raise ValueError(f"head_aware contextual_fraction must be None (Otsu split) or in [0, 1], got {value!r}")


@register_policy("head_aware")
@attrs.define(kw_only=True)
class HeadAware(SharedCalibration, ScoredPolicy):
    """HACK-style: structural heads keep recent tokens, contextual heads voted tokens, asymmetric budgets."""

    needs_queries = True
    needs_calibration = True
    calibration_option = "calibration"
    plan_sources = ("kinds", "stand_in_heads")

    calibration: Any = attrs.field(default=None, converter=lambda v: str(Path(v).expanduser().absolute())
                                   if isinstance(v, (str, Path)) else v)
    kinds: Optional[tuple] = attrs.field(default=None, converter=_kinds)
    stand_in_heads: Optional[int] = attrs.field(default=None, validator=attrs.validators.optional(check_positive_int))
    allocation: str = attrs.field(default="asymmetric", validator=check_choice(ALLOCATIONS))
    contextual_ratio: float = attrs.field(default=0.5, validator=_check_ratio)
    contextual_fraction: Optional[float] = attrs.field(default=None, validator=_check_optional_fraction)
    min_map_tokens: int = attrs.field(default=16, validator=check_int_at_least(1))
    radius: int = attrs.field(default=1, validator=check_int_at_least(0))
    window_size: int = attrs.field(default=16, validator=check_positive_int)
    kernel_size: int = attrs.field(default=5, validator=check_odd_kernel)
    pooling: str = attrs.field(default="max", validator=check_pooling_name)
    _derived: dict = attrs.field(factory=dict, init=False, repr=False, eq=False)

    # kvpolicy check: placeholder kinds for the checked heads (the option set to the head count)
    check_options = {"stand_in_heads": 2, "window_size": 4, "kernel_size": 3}
    check_option_values = {"window_size": (1, 2, 4, 6), "kernel_size": (1, 3, 5), "pooling": ("max", "avg"),
                           "contextual_ratio": (0.25, 0.5, 1.0)}
    check_heads_option = "stand_in_heads"

    def promised_positions(self, ctx):
        """The observation window (the last tokens of the current map), kept by every head."""
        return scoring.recent_positions(ctx.length, self.window(ctx))

    def __attrs_post_init__(self):
        sources = [n for n in ("calibration", "kinds", "stand_in_heads") if getattr(self, n) is not None]
        if len(sources) > 1:
            raise ValueError("head_aware takes one source of head kinds: calibration= (kvpolicy calibrate), kinds= "
                             f"(an explicit [layer][head] table) or stand_in_heads= (a placeholder), got {sources}")

    @classmethod
    def calibration_measures(cls, schedule):
        return [locality_measure(schedule)]

    @classmethod
    def planning_stand_in(cls, schedule, num_layers, budget, num_heads: Optional[int] = None):
        heads = num_heads or 16
        note = (f"no --calibration: head kinds are a placeholder (every other one of the {heads} heads of a layer "
                "contextual); use --calibration (kvpolicy calibrate) for the model's classified heads.")
        return {"stand_in_heads": heads}, note

    @classmethod
    def describe_calibration(cls, calibration, schedule, budget_tokens):
        kinds = cls(calibration=calibration).head_kinds(schedule, calibration.num_layers)
        per_layer = [sum(k == CONTEXTUAL for k in row) for row in kinds]
        return [f"head_aware: {sum(per_layer)} contextual and {sum(len(r) for r in kinds) - sum(per_layer)} structural "
                f"heads; contextual heads per layer: {' '.join(map(str, per_layer))}"]

    def head_kinds(self, schedule, num_layers: int) -> tuple:
        """[layer][head] kinds from the source (explicit, calibrated or the placeholder)."""
        if self.kinds is not None:
            kinds = self.kinds
        elif self.stand_in_heads is not None:
            kinds = tuple(tuple(CONTEXTUAL if h % 2 == 0 else STRUCTURAL for h in range(self.stand_in_heads))
                          for _ in range(num_layers))
        else:
            key = (schedule, num_layers)
            kinds = self._derived.get(key)
            if kinds is None:
                if self.calibration is None:
                    raise ValueError("head_aware needs the head kinds: calibration=FILE (from `kvpolicy calibrate`), "
                                     "kinds=[[...], ...] ('structural'/'contextual' per layer and head), or "
                                     "stand_in_heads=H (placeholder kinds, for memory planning only)")
                stats = load_statistics(self.calibration)
                stats.check_geometry(num_layers, schedule.num_scales, self.name)
                locality = head_locality(stats, schedule, self.min_map_tokens)
                kinds = tuple(tuple(row) for row in classify_heads(locality, self.contextual_fraction))
                self._derived[key] = kinds
        if len(kinds) != num_layers:
            raise ValueError(f"head_aware kinds cover {len(kinds)} layers, the model has {num_layers}")
        return kinds

    def make_plan(self, schedule, num_layers, budget_tokens):
        kinds = self.head_kinds(schedule, num_layers)
        floor = min(self.window_size, budget_tokens)
        if self.allocation == "prior":
            reliance = self.history_reliance(schedule, num_layers)
            last = schedule.num_scales - 1
            # the cache cut after scale s is read by scale s + 1: that scale's reliance decides
            heads = [[None if length <= budget_tokens else
                      prior_head_capacities(reliance[l][min(s + 1, last)], budget_tokens, length, floor)
                      for l in range(num_layers)] for s, length in enumerate(schedule.cumulative)]
        else:
            heads = [[None if length <= budget_tokens else
                      split_head_capacities(kinds[l], budget_tokens, self.contextual_ratio, length, floor)
                      for l in range(num_layers)] for length in schedule.cumulative]
        layer_caps = [[None if row is None else budget_tokens for row in scale] for scale in heads]
        plan = CapacityPlan(capacities=layer_caps, budget_tokens=budget_tokens, policy=self.name,
                            cumulative=schedule.cumulative, head_capacities=heads)
        # every head keeps the observation window; head capacities are never below it (floor)
        return check_window_fits(plan, schedule, lambda s: min(self.window_size, schedule.tokens(s)), self.name,
                                 self.window_size)

    def history_reliance(self, schedule, num_layers: int) -> list:
        """[layer][scale][head] calibrated attention mass on earlier scales (HACK++'s prior)."""
        if self.calibration is None:
            raise ValueError("head_aware allocation='prior' needs calibration= (the heads' calibrated reliance on "
                             "earlier scales); kinds=/stand_in_heads= give no prior")
        stats = load_statistics(self.calibration)
        stats.check_geometry(num_layers, schedule.num_scales, self.name)
        means = torch.nan_to_num(stats.head_means(HISTORY), nan=1.0)  # scale 0 has no history: equal shares
        return means.tolist()

    def window(self, ctx) -> int:
        return min(self.window_size, ctx.n_current)

    def forced_positions(self, ctx):
        return scoring.recent_positions(ctx.length, self.window(ctx))

    def score(self, keys, ctx):
        """Contextual heads: the window queries' pooled votes; structural heads: recency (the
        position itself), so their top tokens are the most recent ones."""
        kinds = self.head_kinds(ctx.schedule, ctx.num_layers)[ctx.layer]
        if keys.shape[1] != len(kinds):
            raise ValueError(f"head_aware kinds list {len(kinds)} heads for layer {ctx.layer}, the cache has {keys.shape[1]}")
        recency = torch.arange(ctx.length, device=keys.device, dtype=torch.float32).expand(*keys.shape[:2], -1)
        if CONTEXTUAL not in kinds:  # decided on the host: no device read
            return recency
        contextual = torch.tensor([k == CONTEXTUAL for k in kinds], device=keys.device)
        window = self.window(ctx)
        votes = scoring.attention_scores(ctx.queries[:, :, ctx.n_current - window:], keys, softmax=True,
                                         valid=ctx.valid_mask())
        candidates = scoring.pool_scores(votes[..., : ctx.length - window], self.kernel_size, self.pooling)
        votes = torch.cat([candidates, votes[..., ctx.length - window:]], dim=-1)
        return torch.where(contextual.view(1, -1, 1), votes, recency)
