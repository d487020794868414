"""ScaleKV's calibration: attention statistics -> Attention Selectivity Index -> drafter layers.

Paper: Li et al., "Memory-Efficient Visual Autoregressive Modeling with Scale-Aware KV Cache
Compression", arXiv 2505.19602 (facts: shared/reference/scalekv.md §2). The statistics are
recorded by the core's generic ``kvpolicy.AttentionStatsCollector`` with ScaleKV's measure
(``scalekv_measure``); ``ScaleKVStatsCollector`` bundles the two and turns the statistics into a
``CalibrationResult``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import attrs
import torch

from kvpolicy import CapacityPlan, ScaleSchedule
from kvpolicy.attention_stats import AttentionStatsCollector
from kvpolicy.json_file import read_json
from kvpolicy.validators import check_choice, check_int_at_least

from .allocation import _check_int, allocate, decision_scales, window_refiner_floor
from .budget_file import BudgetFile, plan_to_budget_file

OPERATORS = ("multiplicative", "additive")


def scalekv_measure(top_k: int = 16):
    """ScaleKV's two attention statistics per sampled query (a measure for ``AttentionStatsCollector``):

    - ``current_ratio``: probability mass on the current map (paper: Σ_{j∈C_k} α_ij);
    - ``history_topk``: the sum of the K′ = ``top_k`` largest history probabilities (paper:
      TopKSum′; K′ is not given in the paper, default 16, the window size), and ``history_share``
      the same sum as a share of the query's whole history mass (its concentration, for
      ``history="share"``). Not defined at the first scale (no history).
    """
    _check_int("top_k", top_k, 1)
    tiny = torch.finfo(torch.float64).tiny

    def measure(probs: torch.Tensor, current_start: int) -> dict:
        out = {"current_ratio": probs[..., current_start:].sum(dim=-1, dtype=torch.float64)}
        k_hist = min(top_k, current_start)
        if k_hist:
            history = probs[..., :current_start]
            top = history.topk(k_hist, dim=-1).values.sum(dim=-1, dtype=torch.float64)
            mass = history.sum(dim=-1, dtype=torch.float64)
            out["history_topk"] = top
            out["history_share"] = top / mass.clamp_min(tiny)
        return out

    measure.__name__ = f"scalekv_measure(top_k={top_k})"
    return measure


class ScaleKVStatsCollector(AttentionStatsCollector):
    """The core collector with ScaleKV's measure; ``result()`` gives the ``CalibrationResult``.

    Averages are over heads, rows, sampled queries (at most ``max_queries`` per call, seeded) and
    calls, per (layer, scale); scale 0 has no history and records only the current ratio.
    """

    def __init__(self, num_layers: int, num_scales: int, *, top_k: int = 16, max_queries: int = 256, seed: int = 0):
        _check_int("top_k", top_k, 1)
        super().__init__(num_layers, num_scales, [scalekv_measure(top_k)], max_queries=max_queries, seed=seed)
        self.top_k = top_k

    def result(self, *, operator: str = "multiplicative", history: str = "mass", drafter_fraction: float = 0.075,
               epsilon: float = 1e-6, source: str = "") -> "CalibrationResult":
        return CalibrationResult(
            num_layers=self.num_layers, num_scales=self.num_scales,
            current_ratio=self.layer_means("current_ratio"), history_topk=self.layer_means("history_topk"),
            history_share=self.layer_means("history_share"), top_k=self.top_k, operator=operator, history=history,
            drafter_fraction=drafter_fraction, epsilon=epsilon, samples=self.layer_counts("current_ratio"),
            calls=self.calls, source=source)


def _grid(value):
    """Rows of numbers (NaN/None = not observed) as tuples; entries are checked by the result."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return value  # CalibrationResult names the field in its error
    rows = []
    for row in value:
        if isinstance(row, (str, bytes)) or not hasattr(row, "__iter__"):
            return value
        rows.append(tuple(None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in row))
    return tuple(rows)


def _check_fraction(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"drafter_fraction must be in [0, 1], got {value!r}")


def _check_epsilon(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"epsilon must be a finite number > 0 (it keeps Z finite when a scale's ASI has no "
                         f"spread), got {value!r}")


# Averages of probabilities lie in [0, 1]; float32 softmax sums may overshoot 1 slightly.
_PROBABILITY_SLACK = 1e-4


@attrs.frozen
class CalibrationResult:
    """Calibrated attention statistics per (layer, scale) and the drafter ranking they imply.

    ASI(l, k) = current_ratio · H (``operator="multiplicative"``, Eq. 2 as printed) or
    current_ratio + H (``"additive"``, an unverified reading of the paper's ⊙, §2.1), where H is
    the mean sum of the K′ largest history probabilities (``history="mass"``, the paper's wording,
    default) or that sum as a share of the history mass (``history="share"``, an option of ours).
    Caveat of the printed form: with H = mass, a layer that looks almost only at the current map
    has H ≈ 0 and so a low product, and a layer that looks only at a few history tokens has a low
    current ratio: both can rank as drafters although the paper calls them refiners; the additive
    form (or H = share under the product) ranks them as refiners.
    Z(l, k) = (ASI − μ_k)/(σ_k + ε) over the layers at scale k (population σ). The N_d pairs with the
    lowest Z among the decision scales of a budget (``decision_scales``: those whose roles the plan
    uses; scales before compression are never ranked) are drafters. N_d = ``num_drafters`` or
    round(drafter_fraction · L · number of ranked scales); the default 0.075 is the 8B file's 15/200
    (the 2B file has 9/160 = 0.056).
    """

    num_layers: int = attrs.field(validator=check_int_at_least(1))
    num_scales: int = attrs.field(validator=check_int_at_least(1))
    current_ratio: tuple = attrs.field(converter=_grid)  # [layer][scale], None = not observed
    history_topk: tuple = attrs.field(converter=_grid)
    history_share: Optional[tuple] = attrs.field(default=None, converter=attrs.converters.optional(_grid))
    top_k: int = attrs.field(default=16, validator=check_int_at_least(1))
    operator: str = attrs.field(default="multiplicative", validator=check_choice(OPERATORS))
    history: str = attrs.field(default="mass", validator=check_choice(("mass", "share")))
    drafter_fraction: float = attrs.field(default=0.075, validator=_check_fraction)
    epsilon: float = attrs.field(default=1e-6, validator=_check_epsilon)
    samples: Optional[tuple] = attrs.field(default=None, converter=attrs.converters.optional(_grid))
    calls: int = attrs.field(default=0, validator=check_int_at_least(0))
    source: str = attrs.field(default="", validator=attrs.validators.instance_of(str))  # e.g. "infinity-2b, 13 scales"

    def __attrs_post_init__(self):
        if self.history == "share" and self.history_share is None:
            raise ValueError("history='share' needs the history_share table (recorded by ScaleKVStatsCollector)")
        shape = f"[{self.num_layers} layers][{self.num_scales} scales]"

        def fits(grid):
            return (isinstance(grid, tuple) and len(grid) == self.num_layers
                    and all(isinstance(row, tuple) and len(row) == self.num_scales for row in grid))

        for name in ("current_ratio", "history_topk", "history_share"):
            grid = getattr(self, name)
            if grid is None:
                continue
            if not fits(grid):
                raise ValueError(f"{name} must be a {shape} table of numbers in [0, 1] (null = not observed)")
            for l, row in enumerate(grid):
                for s, v in enumerate(row):
                    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                          or not -_PROBABILITY_SLACK <= v <= 1 + _PROBABILITY_SLACK):
                        raise ValueError(f"{name}[layer {l}][scale {s}] is {v!r}; entries are numbers in [0, 1] or null")
            # Stored as floats so that a loaded result equals the saved one.
            object.__setattr__(self, name, tuple(tuple(None if v is None else float(v) for v in row) for row in grid))
        if self.samples is not None and not (fits(self.samples) and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for row in self.samples for v in row)):
            raise ValueError(f"samples must be a {shape} table of counts >= 0, got {self.samples!r}"[:300])

    def asi(self) -> list[list[Optional[float]]]:
        out = []
        table = self.history_share if self.history == "share" else self.history_topk
        for cur_row, hist_row in zip(self.current_ratio, table):
            row = []
            for cur, hist in zip(cur_row, hist_row):
                if cur is None or hist is None:
                    row.append(None)
                else:
                    row.append(cur * hist if self.operator == "multiplicative" else cur + hist)
            out.append(row)
        return out

    def zscores(self) -> list[list[Optional[float]]]:
        """Z per (layer, scale), normalised over layers within each scale (None where unobserved)."""
        asi = self.asi()
        z = [[None] * self.num_scales for _ in range(self.num_layers)]
        for s in range(self.num_scales):
            column = [asi[l][s] for l in range(self.num_layers)]
            if any(v is None for v in column):
                continue
            mean = sum(column) / len(column)
            std = math.sqrt(sum((v - mean) ** 2 for v in column) / len(column))
            for l, v in enumerate(column):
                z[l][s] = (v - mean) / (std + self.epsilon)
        return z

    def drafter_pairs(self, scales: Sequence[int], num_drafters: Optional[int] = None) -> list[tuple[int, int]]:
        """The (layer, scale) pairs with the lowest Z among ``scales``, lowest first."""
        z = self.zscores()
        for s in scales:
            if not 0 <= s < self.num_scales:
                raise ValueError(f"scale {s} out of range 0..{self.num_scales - 1}")
            if z[0][s] is None:
                raise ValueError(f"scale {s} was not observed for every layer (and with history) during "
                                 "calibration; its drafters cannot be ranked")
        if num_drafters is None:
            num_drafters = math.floor(self.drafter_fraction * self.num_layers * len(scales) + 0.5)
        total = self.num_layers * len(scales)
        if isinstance(num_drafters, bool) or not isinstance(num_drafters, int) or not 0 <= num_drafters <= total:
            raise ValueError(f"num_drafters must be an int in 0..{total}, got {num_drafters!r}")
        ranked = sorted(((z[l][s], s, l) for s in scales for l in range(self.num_layers)))
        return [(l, s) for _, s, l in ranked[:num_drafters]]

    def drafters(self, schedule: ScaleSchedule, budget_tokens: int, num_drafters: Optional[int] = None) -> dict[int, list[int]]:
        """{decision scale: sorted drafter layers} for a schedule and budget."""
        if schedule.num_scales != self.num_scales:
            made_for = f" (made for {self.source})" if self.source else ""
            raise ValueError(f"calibration covers {self.num_scales} scales{made_for}, the schedule has "
                             f"{schedule.num_scales}: calibrate this model and resolution (kvpolicy calibrate)")
        scales = decision_scales(schedule, budget_tokens)
        out = {s: [] for s in scales}
        for layer, scale in self.drafter_pairs(scales, num_drafters):
            out[scale].append(layer)
        return {s: sorted(v) for s, v in out.items()}

    def plan(self, schedule: ScaleSchedule, budget, *, num_drafters: Optional[int] = None,
             allocation: str = "released", window_size: int = 16, **allocation_options) -> CapacityPlan:
        """A drafter/refiner plan for any budget (``allocate``'s options pass through). The refiner
        floor defaults to ``window_refiner_floor(budget, window_size)``, as the scalekv policy uses, so
        an exported budget file always loads into a policy with that window."""
        from kvpolicy import parse_budget

        tokens = parse_budget(budget).tokens(schedule)
        if allocation_options.get("refiner_floor") is None:
            allocation_options["refiner_floor"] = window_refiner_floor(tokens, window_size)
        return allocate(schedule, self.num_layers, tokens, self.drafters(schedule, tokens, num_drafters),
                        allocation=allocation, **allocation_options)

    def to_budget_file(self, schedule: ScaleSchedule, budget, **plan_options) -> BudgetFile:
        """The released budget-file format for this calibration at a budget."""
        return plan_to_budget_file(self.plan(schedule, budget, **plan_options), schedule)

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": "scalekv-calibration", "num_layers": self.num_layers, "num_scales": self.num_scales,
                "current_ratio": [list(r) for r in self.current_ratio],
                "history_topk": [list(r) for r in self.history_topk],
                "history_share": None if self.history_share is None else [list(r) for r in self.history_share],
                "top_k": self.top_k, "operator": self.operator, "history": self.history, "drafter_fraction": self.drafter_fraction, "epsilon": self.epsilon,
                "samples": None if self.samples is None else [list(r) for r in self.samples], "calls": self.calls,
                "source": self.source}

    @classmethod
    def from_statistics(cls, stats, **options) -> "CalibrationResult":
        """The result from the generic calibration statistics (``kvpolicy calibrate``, which records
        ScaleKV's measure, K′ = 16, with every other calibrated policy's), the same numbers a
        ``ScaleKVStatsCollector`` gives. ``options``: operator, history, drafter_fraction, epsilon."""
        from kvpolicy.attention_stats import load_statistics

        stats = load_statistics(stats)
        return cls(num_layers=stats.num_layers, num_scales=stats.num_scales,
                   current_ratio=stats.layer_means("current_ratio"), history_topk=stats.layer_means("history_topk"),
                   history_share=stats.layer_means("history_share"), top_k=16,
                   samples=stats.counts["current_ratio"], calls=stats.calls, source=stats.source, **options)

    @classmethod
    def from_dict(cls, data: dict) -> "CalibrationResult":
        if isinstance(data, dict) and data.get("kind") == "kvpolicy-attention-statistics":
            return cls.from_statistics(data)
        if not isinstance(data, dict) or data.get("kind") != "scalekv-calibration":
            raise ValueError("not a ScaleKV calibration JSON (expected 'kind': 'scalekv-calibration')")
        fields = {f.name for f in attrs.fields(cls)}
        unknown = set(data) - fields - {"kind"}
        if unknown:
            raise ValueError(f"unknown calibration fields {sorted(unknown)}")
        missing = sorted(f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING and f.name not in data)
        if missing:
            raise ValueError(f"calibration JSON is missing field(s) {missing}")
        return cls(**{k: v for k, v in data.items() if k != "kind"})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationResult":
        return cls.from_dict(read_json(path, "calibration file"))
