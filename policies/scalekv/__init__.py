"""ScaleKV (Li et al., "Memory-Efficient Visual Autoregressive Modeling with Scale-Aware KV Cache
Compression", arXiv 2505.19602; code StargazerX0/ScaleKV @ eb0615a). Facts: reference/scalekv.md.

Budgets: layers are *drafters* (attention spread over the history: large budget) or *refiners*
(attention on the current map: small budget) per scale; the layer mean equals the budget at every
compressed scale. The roles come from exactly one of

- ``budget_file=PATH``: a released budget JSON (rows "Scale N"; row N caps the cache after scale
  N − 2, the last scale reuses the last row, §3.4). The budget defaults to the file's layer mean
  (650 for the released 10 % files) and is the threshold that starts compression (§3.5);
- ``calibration=``: a ``policies.scalekv.calibration.CalibrationResult`` (or its JSON path) ranking
  (layer, scale) pairs by the Attention Selectivity Index, with ``allocation=`` "released" or "paper";
- ``drafters=``: ``{decision scale: [layers]}`` or one ``[layers]`` list for every decision scale.

There is no default source: ``get_policy("scalekv", budget="10%")`` alone raises and names the
three (roles are model-specific; guessing layers would silently give another policy). The
``kvpolicy generate``/``compare`` commands calibrate on the model first when none is given.
A relative ``budget_file`` is stored as an absolute path (configs reload from anywhere).

Decision scale d is the scale whose attention defines the roles; it sets the capacities after plan
scale d − 1 (conventions in ``policies.scalekv.allocation``). With ``calibration``/``drafters`` the budget
is split by ``allocation="released"`` (default; ``refiner_floor`` defaults to max(window_size,
⌈200·B/650⌉), at most B) or ``"paper"`` (``refiner_initial`` B_r(0), ``refiner_decay`` δ; defaults
600 and 70 scaled by B/650); ``num_drafters`` overrides the calibration's drafter fraction.

Selection, after a scale's attention, per batch row and head (vectorised): the observation window
(centres of a 4 × 4 patch grid on the current map, ``policies.common.observation_window_positions``) is
always kept; every other token is scored by the window queries, pooled along the flattened cache
(kernel 5), and the top (capacity − window) are kept; indices ascending. Two modes:

- ``mode="attention"`` (default, the paper §4.1): the model's real queries (``queries=``, logits
  = queries·keysᵀ already scaled), softmax probabilities over the whole cache summed over the
  window queries, average pooling by default; window tokens are masked only *after* pooling (so
  their own high scores lift their neighbours; masking first, as the released code does, would
  spread −∞ to 4 neighbours under average pooling).
- ``mode="reference"``: the released rule (§4.2), reproduced operation for operation
  (``policies.common.released_scores``): ``raw_queries=`` (x·W_qᵀ: no bias, norm, scale or RoPE),
  the 16 window queries times every key in one batched product in the operands' dtype (bf16 for
  float32 keys with bf16 queries, as the release under bf16 autocast), divided by √D, window
  columns −∞, summed over the window rows, max pooling (or "avg" as released), window −∞ again, a
  sorted ``torch.topk`` on the (B, H, L) scores. The same operations on the same dtypes and layout
  keep the same tokens as the release, ties on pooling plateaus included, in float32, bfloat16
  and the mixed flow (tests/test_scalekv_reference_exact.py; ``python scripts/bench_scalekv.py
  --release DIR`` checks it against the released code itself). Only the work around that
  arithmetic is vectorised differently (window positions once for all rows and heads, the window
  columns masked in the summed scores, the keys proved finite by those scores).

Deviations from the released code, all outside its 1:1 '1M' path: the window uses the real map
shape (h, w) instead of a hard-coded 1:1 token count; window positions in the history (small-map
fallback) keep their tokens but contribute no query; a capacity below the window size is an error
at planning time (the released code keeps the whole window, over capacity); where the top-k would
reach into −∞ scores (the released code then keeps a window token twice) unique tokens are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import attrs

from kvpolicy import Policy, compose, register_policy
from kvpolicy.validators import check_choice, check_positive_int
from policies.common import PatchWindowSelector, RecentWindowSelector

from .allocation import ALLOCATIONS, allocate, window_refiner_floor
from .budget_file import BudgetFile, plan_to_budget_file
from .calibration import CalibrationResult


def _path(value):
    # Absolute, so that a saved config reloads from any working directory.
    return None if value is None else str(Path(value).expanduser().absolute())


def _drafters(value):
    """{scale: [layers]} (JSON keys may be strings) or one [layers] list; stored as tuples."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        out = {}
        for key, layers in value.items():
            try:
                scale = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"drafters keys are scale indices, got {key!r}") from None
            if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
                raise ValueError(f"drafters[{key!r}] must be a list of layer indices, got {layers!r}")
            out[scale] = tuple(layers)
        return out
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"drafters must be {{scale: [layers]}} or a list of layers, got {value!r}")
    return tuple(value)


def _calibration(value):
    if value is None:
        return None
    if isinstance(value, CalibrationResult):
        return value
    if hasattr(value, "head_means"):  # the shared calibration statistics (kvpolicy calibrate)
        return CalibrationResult.from_statistics(value)
    if isinstance(value, dict):
        return CalibrationResult.from_dict(value)
    if isinstance(value, (str, Path)):
        return CalibrationResult.load(value)
    raise TypeError(f"calibration must be a CalibrationResult, its dict or a JSON path, got {type(value).__name__}")


# ScaleKV's released budget files, shipped unchanged with their source (budgets/SOURCE.md)
RELEASED_DIR = Path(__file__).resolve().parent / "budgets"


def _released_index() -> dict:
    import json

    return json.loads((RELEASED_DIR / "index.json").read_text())["files"]


def released_budget_file(name: str) -> Path:
    """The shipped copy of a released budget file by short name (``<model>-10%``, also ``-10pct``,
    the stored file name and the released file name, with or without ``budgets/``)."""
    for short, entry in _released_index().items():
        if name in (short, short.replace("%", "pct"), entry["file"], entry["released"], f"budgets/{entry['released']}"):
            return RELEASED_DIR / entry["file"]
    raise ValueError(f"budget file {name!r} is neither an existing file nor a released budget: "
                     f"the shipped ones are {', '.join(_released_index())}")


def resolve_budget_file(value) -> str:
    """An existing path as given; otherwise a released file by short name; otherwise a one-line error."""
    text = str(value)
    if Path(text).expanduser().is_file():
        return str(Path(text).expanduser())
    try:
        return str(released_budget_file(text))
    except ValueError:
        raise ValueError(f"budget file {text!r} does not exist and is not a released budget name "
                         f"(shipped: {', '.join(_released_index())})") from None


def _optional_positive(instance, attribute, value):
    if value is not None:
        check_positive_int(instance, attribute, value)


@attrs.define(kw_only=True, slots=False)
class ScaleKVAllocation(Policy):
    """ScaleKV's drafter/refiner budgets per scale (an allocation part, ``kvpolicy.compose``)."""

    # kvpolicy check: layer 0 drafts at every scale, a window that fits small budgets; the values it
    # draws for the allocation's option (the selectors add theirs).
    check_options = {"drafters": [0], "window_size": 4, "kernel_size": 3}
    check_option_values = {"allocation": ("released", "paper")}

    budget_file: Optional[str] = attrs.field(default=None, converter=_path)
    calibration: Any = attrs.field(default=None, converter=_calibration)
    drafters: Any = attrs.field(default=None, converter=_drafters)
    allocation: str = attrs.field(default="released", validator=check_choice(ALLOCATIONS))
    refiner_floor: Optional[int] = attrs.field(default=None, validator=_optional_positive)
    refiner_initial: Optional[int] = attrs.field(default=None, validator=_optional_positive)
    refiner_decay: Optional[int] = attrs.field(default=None)
    num_drafters: Optional[int] = attrs.field(default=None)
    _file: Optional[BudgetFile] = attrs.field(default=None, init=False, repr=False, eq=False)

    @classmethod
    def calibration_measures(cls, schedule):
        """ScaleKV's statistics (current ratio, history top-K′ mass and share; K′ = 16) for the
        shared calibration run; ``CalibrationResult.from_statistics`` reads them back."""
        from .calibration import scalekv_measure

        return [scalekv_measure(16)]

    # roles come from a calibration, unless a released budget file or an explicit drafter table is given
    needs_calibration = True
    calibration_option = "calibration"
    plan_file_option = "budget_file"
    plan_sources = ("drafters",)

    @classmethod
    def calibration_collector(cls, num_layers, num_scales, *, seed=0, schedule=None, top_k=None, **options):
        """The shared calibration collector (every registered policy's statistics, ScaleKV's with
        K′ = 16) when the schedule is known; ScaleKV's own collector for another ``top_k``."""
        from .calibration import ScaleKVStatsCollector

        if schedule is not None and top_k in (None, 16) and not options:
            from kvpolicy.attention_stats import shared_collector

            return shared_collector(num_layers, num_scales, schedule, seed=seed)
        return ScaleKVStatsCollector(num_layers, num_scales, seed=seed, **({} if top_k is None else {"top_k": top_k}),
                                     **options)

    @classmethod
    def _drafter_fraction(cls, schedule, num_layers, budget_tokens, num_drafters):
        """The calibration's drafter fraction that ranks exactly ``num_drafters`` (layer, scale)
        pairs over the scales ``budget_tokens`` compresses."""
        from .allocation import decision_scales

        if budget_tokens is None:
            raise ValueError("--num-drafters needs --budget: the number of drafters is counted over the scales "
                             "that budget compresses")
        scales = len(decision_scales(schedule, budget_tokens))
        total = num_layers * scales
        if isinstance(num_drafters, bool) or not isinstance(num_drafters, int) or not 0 <= num_drafters <= total:
            raise ValueError(f"--num-drafters must be in 0..{total} ({num_layers} layers x {scales} compressed "
                             f"scales), got {num_drafters}")
        return num_drafters / total

    @classmethod
    def check_calibration_options(cls, schedule, num_layers, budget_tokens=None, num_drafters=None, **options):
        super().check_calibration_options(schedule, num_layers, budget_tokens, **options)
        if num_drafters is not None:
            cls._drafter_fraction(schedule, num_layers, budget_tokens, num_drafters)

    @classmethod
    def calibration_result(cls, collector, *, source, schedule, budget_tokens=None, num_drafters=None, **options):
        """``num_drafters``: rank exactly that many drafter pairs at ``budget_tokens``."""
        cls.check_calibration_options(schedule, collector.num_layers, budget_tokens, num_drafters, **options)
        fraction = {} if num_drafters is None else {"drafter_fraction": cls._drafter_fraction(
            schedule, collector.num_layers, budget_tokens, num_drafters)}
        if not hasattr(collector, "result"):  # the shared collector: its statistics serve every policy
            if not fraction:
                return collector.statistics(source=source)
            from .calibration import CalibrationResult

            return CalibrationResult.from_statistics(collector.statistics(source=source), **fraction)
        return collector.result(source=source, **fraction)

    @classmethod
    def released_plan_file(cls, model, budget_tokens):
        """The shipped released budget file made for ``model`` whose layer mean is ``budget_tokens``."""
        for entry in _released_index().values():
            path = RELEASED_DIR / entry["file"]
            if entry["model"] == model and BudgetFile.load(path).implied_budget() == budget_tokens:
                return path
        return None

    @classmethod
    def resolve_plan_file(cls, value) -> str:
        """An existing path as given; otherwise a shipped released file by short name."""
        return resolve_budget_file(value)

    def export_plan_file(self, schedule, num_layers, path):
        """The released budget-file format (reads back with ``budget_file=``)."""
        self.budget_file_export(schedule, num_layers).save(path)

    @classmethod
    def planning_stand_in(cls, schedule, num_layers, budget):
        """Counted bytes depend on how many layers are drafters at each scale, not on which: the
        calibration's default count (round(0.075 x layers x compressed scales), spread evenly over
        the scales, as the released files roughly do) at placeholder layers 0, 1, ..."""
        import math

        from .allocation import decision_scales

        if budget is None:
            raise ValueError(f"{cls.name} needs --budget (e.g. 10%) to plan without a budget file")
        scales = decision_scales(schedule, budget.tokens(schedule))
        fraction = next(f.default for f in attrs.fields(CalibrationResult) if f.name == "drafter_fraction")
        total = math.floor(fraction * num_layers * len(scales) + 0.5)
        per_scale = {s: total // len(scales) + (1 if i < total % len(scales) else 0) for i, s in enumerate(scales)}
        note = (f"no --calibration or --budget-file: {total} drafters ({fraction:g} of {num_layers} layers x "
                f"{len(scales)} compressed scales) at placeholder layers; the bytes depend only on the drafter count "
                "per scale. Use --calibration (kvpolicy calibrate) or --budget-file for the real roles.")
        return {"drafters": {s: list(range(n)) for s, n in per_scale.items()}}, note

    @classmethod
    def describe_calibration(cls, calibration, schedule, budget_tokens):
        calibration = _calibration(calibration)  # the shared statistics read as ScaleKV's result
        drafters = calibration.drafters(schedule, budget_tokens)
        lines = [f"drafters at {budget_tokens} tokens per layer, {sum(len(v) for v in drafters.values())} in all, "
                 "by decision scale:"]
        lines += [f"  scale {scale:2d}: {', '.join(map(str, layers)) or '-'}" for scale, layers in drafters.items()]
        return lines

    def __attrs_post_init__(self):
        sources = [n for n in ("budget_file", "calibration", "drafters") if getattr(self, n) is not None]
        if len(sources) != 1:
            raise ValueError(f"{self.name} needs exactly one source of drafter/refiner roles: budget_file=PATH "
                             "(a released budget JSON), calibration=RESULT_OR_PATH, or drafters={scale: [layers]} "
                             f"(or drafters=[layers] for every scale); got {sources or 'none'}")
        if self.budget_file is not None:
            extra = [n for n in ("refiner_floor", "refiner_initial", "refiner_decay") if getattr(self, n) is not None]
            if self.allocation != "released" or extra:
                raise ValueError(f"allocation options {extra or ['allocation']} do not apply to budget_file "
                                 "(the file fixes every capacity)")
            self._file = BudgetFile.load(self.budget_file)
        if self.allocation == "released" and (self.refiner_initial is not None or self.refiner_decay is not None):
            raise ValueError("refiner_initial/refiner_decay belong to allocation='paper'")
        if self.refiner_decay is not None and (isinstance(self.refiner_decay, bool) or not isinstance(self.refiner_decay, int)
                                               or self.refiner_decay < 0):
            raise ValueError(f"refiner_decay must be an int >= 0, got {self.refiner_decay!r}")
        if self.num_drafters is not None:
            if self.calibration is None:
                raise ValueError("num_drafters applies to calibration= only (the other sources name their drafters)")
            if isinstance(self.num_drafters, bool) or not isinstance(self.num_drafters, int) or self.num_drafters < 0:
                raise ValueError(f"num_drafters must be an int >= 0, got {self.num_drafters!r}")

    def budget_tokens(self, schedule, budget=None):
        if self._file is not None:
            implied = self._file.implied_budget()
            chosen = self.budget if budget is None else budget
            if chosen is None:
                if implied is None:
                    raise ValueError(f"budget file {self.budget_file!r} has no common integer layer mean; "
                                     "pass budget= (the token count that starts compression)")
                return implied
            tokens = super().budget_tokens(schedule, chosen)
            if implied is not None and tokens != implied:
                raise ValueError(f"budget {chosen} is {tokens} tokens per layer but budget file {self.budget_file!r} "
                                 f"averages {implied}; pass budget={implied} or leave budget out")
            return tokens
        return super().budget_tokens(schedule, budget)

    def make_plan(self, schedule, num_layers, budget_tokens):
        if self._file is not None:
            plan = self._file.to_plan(schedule, num_layers, budget_tokens, policy=self.name)
        else:
            drafters = self.drafters
            if self.calibration is not None:
                drafters = self.calibration.drafters(schedule, budget_tokens, num_drafters=self.num_drafters)
                if self.calibration.num_layers != num_layers:
                    made_for = f" (made for {self.calibration.source})" if self.calibration.source else ""
                    raise ValueError(f"calibration has {self.calibration.num_layers} layers{made_for}, the model "
                                     f"{num_layers}: calibrate this model (kvpolicy calibrate)")
            floor = self.refiner_floor
            if floor is None:  # a refiner must hold the selector's observation window
                floor = window_refiner_floor(budget_tokens, getattr(self, "window_size", 1))
            plan = allocate(schedule, num_layers, budget_tokens, drafters, allocation=self.allocation,
                            refiner_floor=floor, refiner_initial=self.refiner_initial,
                            refiner_decay=self.refiner_decay, policy=self.name)
        return self.check_plan(plan, schedule)

    def budget_file_export(self, schedule, num_layers, budget=None) -> BudgetFile:
        """This policy's plan in the released budget-file format."""
        return plan_to_budget_file(self.plan(schedule, num_layers, budget), schedule)


@register_policy("scalekv")
@attrs.define(kw_only=True)
class ScaleKV(ScaleKVAllocation, PatchWindowSelector):
    """ScaleKV: drafter/refiner budgets per scale and observation-window token selection."""

    # kvpolicy check draws both selection modes and both allocations.
    check_option_values = {"mode": ("attention", "reference"), "allocation": ("released", "paper"),
                           "pooling": (None, "max", "avg")}


# A new combination is one line: ScaleKV's budgets with SnapKV's recent-window selection.
ScaleKVSnapKV = compose("scalekv_snapkv", ScaleKVAllocation, RecentWindowSelector, class_name="ScaleKVSnapKV",
                        description="ScaleKV's drafter/refiner budgets with SnapKV's recent-window token selection",
                        check_option_values={"allocation": ("released", "paper"), "pooling": ("max", "avg")})
