"""ScaleKV's drafter/refiner machinery, model-agnostic: calibration statistics, the Attention
Selectivity Index, budget allocation and the released budget-file format.

Paper: Li et al., "Memory-Efficient Visual Autoregressive Modeling with Scale-Aware KV Cache
Compression", arXiv 2505.19602 (facts: shared/reference/scalekv.md §2–§3).

Scale conventions (one place, used everywhere below):

- A *plan scale* s is where ``CapacityPlan.capacities[s]`` applies: after scale s's attention the
  layer's cache is cut to that capacity, and scale s+1 reads it.
- A *decision scale* d is the scale whose attention defines a layer's role (what the paper
  calibrates: ASI(l, k) at scale k). Plan scale s uses the roles of d = min(s + 1, S − 1): the
  cache cut after s is read by s + 1; the last plan scale reuses the last decision scale (released
  code: its cache is discarded anyway).
- The released budget files' row "Scale N" (1-based) is decision scale N − 1, i.e. it caps the
  cache after plan scale N − 2 (``cache_sizes[min(si, 11) + 2]``, §3.4).
- Compression starts at the first plan scale whose cumulative length exceeds the budget (§3.5);
  earlier plan scales have no limit and need no role decision.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

import attrs
import torch

from .plan import CapacityPlan
from .schedule import ScaleSchedule
from .validators import check_choice, check_int_at_least

DRAFTER = "drafter"
REFINER = "refiner"
ALLOCATIONS = ("released", "paper")

# Released 10 % files: refiners never below 200 tokens at a 650-token budget (§3.3 property 4).
_RELEASED_FLOOR, _RELEASED_BUDGET = 200, 650
# Paper ablation (Fig. 6c): B_r(0) = 600 and δ = 70 at a 650-token budget.
_PAPER_INITIAL, _PAPER_DECAY = 600, 70


# -- scales ------------------------------------------------------------------------------------

def compression_start(schedule: ScaleSchedule, budget_tokens: int) -> Optional[int]:
    """First plan scale whose cumulative length exceeds the budget (None: nothing is compressed)."""
    for s, total in enumerate(schedule.cumulative):
        if total > budget_tokens:
            return s
    return None


def decision_scale(plan_scale: int, num_scales: int) -> int:
    return min(plan_scale + 1, num_scales - 1)


def decision_scales(schedule: ScaleSchedule, budget_tokens: int) -> list[int]:
    """Scales whose drafter/refiner roles matter for a budget (the scales calibration ranks)."""
    start = compression_start(schedule, budget_tokens)
    if start is None:
        return []
    return sorted({decision_scale(s, schedule.num_scales) for s in range(start, schedule.num_scales)})


def default_refiner_floor(budget_tokens: int) -> int:
    """The released files' refiner floor, 200 tokens at 650, scaled with the budget: ⌈200·B/650⌉."""
    return -(-budget_tokens * _RELEASED_FLOOR // _RELEASED_BUDGET)


def window_refiner_floor(budget_tokens: int, window_size: int) -> int:
    """The floor a ScaleKV plan uses: ``default_refiner_floor`` but never below the observation
    window (a refiner must hold its window tokens), and never above the budget."""
    return min(budget_tokens, max(window_size, default_refiner_floor(budget_tokens)))


def default_refiner_schedule(budget_tokens: int) -> tuple[int, int]:
    """Paper allocation defaults scaled from its ablation (B_r(0) = 600, δ = 70 at 650 tokens)."""
    return (round(budget_tokens * _PAPER_INITIAL / _RELEASED_BUDGET),
            round(budget_tokens * _PAPER_DECAY / _RELEASED_BUDGET))


# -- allocation --------------------------------------------------------------------------------

def _check_int(name, value, low=0):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _released_split(num_layers: int, n_drafters: int, budget: int, limit: int, floor: int) -> tuple[int, int]:
    """(Max, Min): Max is the largest integer <= limit such that Min = (L·B − N_d·Max)/(L − N_d) is
    an integer >= floor. Max = B (Min = B) always qualifies, so a solution exists when limit >= B
    and floor <= B. Reproduces all ten rows of the released 10 % files (§3.3 property 4)."""
    if n_drafters in (0, num_layers):
        return budget, budget
    total, n_refiners = num_layers * budget, num_layers - n_drafters
    high = min(limit, (total - floor * n_refiners) // n_drafters)
    for candidate in range(high, budget - 1, -1):  # at most L − N_d steps: the residues cycle
        if (total - n_drafters * candidate) % n_refiners == 0:
            return candidate, (total - n_drafters * candidate) // n_refiners
    return budget, budget  # unreachable: candidate = budget always divides


def _paper_split(num_layers: int, n_drafters: int, budget: int, limit: int, refiner_target: int,
                 floor: int) -> tuple[int, int]:
    """(B_d, B_r) with N_d·B_d + N_r·B_r = L·B exactly. B_r is the linear target clamped to
    [floor, B], moved to the nearest value (at most N_d − 1 tokens down, or up) that makes B_d an
    integer; if B_d would exceed ``limit`` (more than a drafter can hold), drafters get the largest
    feasible value <= limit and the rest goes back to the refiners."""
    if n_drafters in (0, num_layers):
        return budget, budget
    total, n_refiners = num_layers * budget, num_layers - n_drafters
    target = min(budget, max(floor, refiner_target))
    refiner = next((r for r in range(target, target - n_drafters, -1)
                    if r >= floor and (total - n_refiners * r) % n_drafters == 0), None)
    if refiner is None:
        refiner = next(r for r in range(target, budget + 1) if (total - n_refiners * r) % n_drafters == 0)
    drafter = (total - n_refiners * refiner) // n_drafters
    if drafter > limit:
        drafter, refiner = _released_split(num_layers, n_drafters, budget, limit, 0)
    return drafter, refiner


def allocate(schedule: ScaleSchedule, num_layers: int, budget_tokens: int,
             drafters: Mapping[int, Sequence[int]], *, allocation: str = "released",
             refiner_floor: Optional[int] = None, refiner_initial: Optional[int] = None,
             refiner_decay: Optional[int] = None, policy: str = "scalekv") -> CapacityPlan:
    """A drafter/refiner ``CapacityPlan`` with layer mean exactly ``budget_tokens`` at every compressed scale.

    ``drafters`` maps every decision scale (``decision_scales``) to its drafter layers.

    - ``allocation="released"`` (default): what the released budget files do (§3.3): drafters keep
      nearly everything (Max <= Limit, the longest a drafter can be: the first compressed length,
      then previous Max + new tokens), refiners share the rest (Min an integer >= refiner_floor,
      default ``default_refiner_floor``).
    - ``allocation="paper"``: Eq. 4, refiner budget B_r(k) = B_r(0) − δ·k over the compressed
      scales k = 0, 1, … (defaults ``default_refiner_schedule``: 600/70 at 650), freed memory to
      the drafters. Deviations: B_r is clamped to [refiner_floor, B] and nudged by < N_d tokens so
      that B_d is an integer; a drafter never gets more than it can hold (its Limit), the excess
      returns to the refiners, so the layer mean stays exactly B.

    The last plan scale reuses the previous row (the released code's last compression).
    """
    _check_int("num_layers", num_layers, 1)
    _check_int("budget_tokens", budget_tokens, 1)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if allocation == "released" and (refiner_initial is not None or refiner_decay is not None):
        raise ValueError("refiner_initial/refiner_decay belong to allocation='paper'")
    floor = default_refiner_floor(budget_tokens) if refiner_floor is None else refiner_floor
    _check_int("refiner_floor", floor, 1)
    if floor > budget_tokens:
        raise ValueError(f"refiner_floor {floor} exceeds the budget {budget_tokens}: refiners could not "
                         "stay at or below the layer mean")
    if allocation == "paper":
        initial, decay = default_refiner_schedule(budget_tokens)
        initial = initial if refiner_initial is None else refiner_initial
        decay = decay if refiner_decay is None else refiner_decay
        _check_int("refiner_initial", initial, 1)
        _check_int("refiner_decay", decay, 0)
        if initial > budget_tokens:
            raise ValueError(f"refiner_initial {initial} exceeds the budget {budget_tokens}: refiners "
                             "would keep more than drafters")
        if refiner_initial is not None and refiner_initial < floor:
            raise ValueError(f"refiner_initial {refiner_initial} is below refiner_floor {floor}: the refiner budget "
                             "would be clamped to the floor at every scale (lower refiner_floor or raise refiner_initial)")
    sets = check_drafters(schedule, num_layers, budget_tokens, drafters)
    S = schedule.num_scales
    start = compression_start(schedule, budget_tokens)
    capacities = [[None] * num_layers for _ in range(S)]
    roles = [[None] * num_layers for _ in range(S)]
    if start is not None:
        previous_max = None
        for s in range(start, S):
            if s == S - 1 and s > start:  # last scale: reuse the previous row (released mapping)
                capacities[s], roles[s] = list(capacities[s - 1]), list(roles[s - 1])
                break
            layers = sets[decision_scale(s, S)]
            limit = schedule.cumulative[s] if previous_max is None else previous_max + schedule.tokens(s)
            if allocation == "released":
                high, low = _released_split(num_layers, len(layers), budget_tokens, limit, floor)
            else:
                high, low = _paper_split(num_layers, len(layers), budget_tokens, limit,
                                         initial - decay * (s - start), floor)
            previous_max = high
            capacities[s] = [high if l in layers else low for l in range(num_layers)]
            roles[s] = [DRAFTER if l in layers else REFINER for l in range(num_layers)]
    return CapacityPlan(capacities=capacities, budget_tokens=budget_tokens, policy=policy, roles=roles,
                        cumulative=schedule.cumulative)


def check_drafters(schedule: ScaleSchedule, num_layers: int, budget_tokens: int,
                   drafters: Mapping[int, Sequence[int]] | Sequence[int]) -> dict[int, frozenset[int]]:
    """Validate a drafter assignment; a plain list of layers means "these layers at every decision scale"."""
    needed = decision_scales(schedule, budget_tokens)
    if not isinstance(drafters, Mapping):
        drafters = {d: drafters for d in needed}
    out = {}
    for scale, layers in drafters.items():
        if isinstance(scale, bool) or not isinstance(scale, int):
            raise ValueError(f"drafter scales are ints (decision scales), got {scale!r}")
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (Sequence, set, frozenset)):
            raise ValueError(f"drafters[{scale}] must be a list of layer indices, got {layers!r}")
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
                raise ValueError(f"drafters[{scale}] lists layer {layer!r}; layers are 0..{num_layers - 1}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"drafters[{scale}] lists a layer twice: {list(layers)}")
        out[scale] = frozenset(layers)
    if set(out) != set(needed):
        raise ValueError(f"drafters must give a layer list for exactly the decision scales {needed} of this "
                         f"schedule and budget {budget_tokens} (plan scale s uses the roles of scale "
                         f"min(s + 1, S − 1)); got scales {sorted(out)}")
    return out


def read_json(path: str | Path, what: str):
    """A JSON file's content; a missing file or invalid JSON fails naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {exc}") from None


# -- the released budget-file format -----------------------------------------------------------

_ROW = re.compile(r"^Scale (\d+)$")
_BLOCK = re.compile(r"^Block (\d+)$")


@attrs.frozen
class BudgetFile:
    """A released ScaleKV budget JSON (``budgets/2b_10%_budget.json``): rows "Scale N" with
    per-layer flags "Block i" (1 = drafter), ``Max`` (drafter capacity), ``Min`` (refiner
    capacity), and the unused ``High``/``Limit``. Row N caps the cache after plan scale N − 2
    (the last plan scale reuses the last row), exactly as ``cache_sizes[min(si, 11) + 2]``."""

    rows: dict = attrs.field(eq=False)  # N -> {"flags": tuple[int], "max": int, "min": int, "high": int|None, "limit": int|None}
    source: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "BudgetFile":
        return cls.from_dict(read_json(path, "ScaleKV budget file"), source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> "BudgetFile":
        where = f"budget file {source!r}" if source else "budget file"
        if not isinstance(data, dict) or not data:
            raise ValueError(f"{where}: expected a JSON object with 'Scale N' rows")
        rows, widths = {}, set()
        for key, row in data.items():
            match = _ROW.match(str(key))
            if not match:
                raise ValueError(f"{where}: unexpected top-level key {key!r}; rows are named 'Scale N'")
            if not isinstance(row, dict):
                raise ValueError(f"{where}: row {key!r} must be an object")
            flags, extra = {}, {}
            for name, value in row.items():
                block = _BLOCK.match(name)
                if block:
                    if value not in (0, 1) or isinstance(value, bool):
                        raise ValueError(f"{where}: {key} {name} is {value!r}; flags are 0 (refiner) or 1 (drafter)")
                    flags[int(block.group(1))] = int(value)
                elif name in ("Max", "Min", "High", "Limit"):
                    if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name in ("Max", "Min") else 0):
                        raise ValueError(f"{where}: {key} {name} is {value!r}; it must be a non-negative int"
                                         + (" >= 1" if name in ("Max", "Min") else ""))
                    extra[name] = value
                else:
                    raise ValueError(f"{where}: row {key!r} has unknown entry {name!r} (allowed: 'Block i', Max, Min, High, Limit)")
            for name in ("Max", "Min"):
                if name not in extra:
                    raise ValueError(f"{where}: row {key!r} has no {name!r}")
            if not flags or sorted(flags) != list(range(len(flags))):
                missing = sorted(set(range(max(flags, default=-1) + 1)) - set(flags))
                raise ValueError(f"{where}: row {key!r} must flag 'Block 0' … 'Block L−1'; missing {['Block %d' % i for i in missing] or ['Block 0']}")
            if extra["Max"] < extra["Min"]:
                raise ValueError(f"{where}: row {key!r} gives drafters (Max {extra['Max']}) less than refiners (Min {extra['Min']})")
            widths.add(len(flags))
            rows[int(match.group(1))] = {"flags": tuple(flags[i] for i in range(len(flags))), "max": extra["Max"],
                                         "min": extra["Min"], "high": extra.get("High"), "limit": extra.get("Limit")}
        if len(widths) != 1:
            raise ValueError(f"{where}: rows flag different numbers of layers {sorted(widths)}")
        return cls(rows=rows, source=source)

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.rows.values()))["flags"])

    def capacities(self, n: int) -> list[int]:
        row = self.rows[n]
        return [row["max"] if f else row["min"] for f in row["flags"]]

    def implied_budget(self) -> Optional[int]:
        """The common per-layer mean of every row (650 for the released 10 % files), or None."""
        means = {sum(self.capacities(n)) / self.num_layers for n in self.rows}
        if len(means) == 1:
            mean = means.pop()
            if mean == int(mean):
                return int(mean)
        return None

    def to_plan(self, schedule: ScaleSchedule, num_layers: int, budget_tokens: int, policy: str = "scalekv") -> CapacityPlan:
        """Capacities per (plan scale, layer) for a schedule; fails on any mismatch."""
        where = f"budget file {self.source!r}" if self.source else "budget file"
        if num_layers != self.num_layers:
            raise ValueError(f"{where} flags {self.num_layers} layers but the model has num_layers={num_layers}")
        S = schedule.num_scales
        if S < 2:
            raise ValueError(f"{where}: a budget file needs a schedule of at least 2 scales")
        start = compression_start(schedule, budget_tokens)
        used = {} if start is None else {s: min(s, S - 2) + 2 for s in range(start, S)}
        needed = sorted(set(used.values()))
        missing = [n for n in needed if n not in self.rows]
        unused = sorted(set(self.rows) - set(needed))
        if missing or unused:
            first = "no scale" if start is None else f"plan scale {start} (cumulative {schedule.cumulative[start]} > {budget_tokens})"
            raise ValueError(f"{where} does not match this schedule and budget: compression starts after {first}, "
                             f"so rows {['Scale %d' % n for n in needed]} are needed; "
                             f"missing {['Scale %d' % n for n in missing]}, unused {['Scale %d' % n for n in unused]}")
        for n in needed:  # the layer mean may never exceed the budget (it can stay below it)
            mean = sum(self.capacities(n)) / num_layers
            if mean > budget_tokens:
                raise ValueError(f"{where}: row 'Scale {n}' averages {mean:.2f} tokens per layer, above the "
                                 f"budget {budget_tokens}; pass the budget the file was made for")
        capacities = [[None] * num_layers for _ in range(S)]
        roles = [[None] * num_layers for _ in range(S)]
        for s, n in used.items():
            capacities[s] = self.capacities(n)
            roles[s] = [DRAFTER if f else REFINER for f in self.rows[n]["flags"]]
        return CapacityPlan(capacities=capacities, budget_tokens=budget_tokens, policy=policy, roles=roles,
                            cumulative=schedule.cumulative)

    def to_dict(self) -> dict:
        out = {}
        for n in sorted(self.rows):
            row = self.rows[n]
            entry = {f"Block {i}": f for i, f in enumerate(row["flags"])}
            if row["high"] is not None:
                entry["High"] = row["high"]
            entry["Max"], entry["Min"] = row["max"], row["min"]
            if row["limit"] is not None:
                entry["Limit"] = row["limit"]
            out[f"Scale {n}"] = entry
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def plan_to_budget_file(plan: CapacityPlan, schedule: ScaleSchedule) -> BudgetFile:
    """Export a drafter/refiner plan to the released budget-file format.

    Needs roles and one capacity per role at each compressed scale, and the last plan scale equal
    to the one before (both map to the last row). Limit is written as the released files do: the
    first compressed length, then previous Max + the scale's new tokens.
    """
    if plan.roles is None:
        raise ValueError("only plans with drafter/refiner roles can be exported to a budget file")
    if plan.num_scales != schedule.num_scales or (plan.cumulative is not None and plan.cumulative != schedule.cumulative):
        raise ValueError("the plan was made for a different schedule")
    S = schedule.num_scales
    compressed = [s for s in range(S) if any(c is not None for c in plan.capacities[s])]
    if not compressed:
        raise ValueError("the plan compresses nothing; a budget file would have no rows")
    if compressed != list(range(compressed[0], S)):
        raise ValueError(f"the plan compresses at scales {compressed}; a budget file needs every scale from the first compressed one on")
    if len(compressed) > 1 and (plan.capacities[S - 1] != plan.capacities[S - 2] or plan.roles[S - 1] != plan.roles[S - 2]):
        raise ValueError("the last two plan scales differ, but a budget file maps both to its last row")
    rows, previous_max = {}, None
    for s in compressed:
        n = min(s, S - 2) + 2
        if n in rows:
            continue
        caps, roles = plan.capacities[s], plan.roles[s]
        by_role = {}
        for cap, role in zip(caps, roles):
            if role not in (DRAFTER, REFINER) or cap is None:
                raise ValueError(f"plan scale {s} has role {role!r} / capacity {cap!r}; need 'drafter'/'refiner' with a capacity")
            by_role.setdefault(role, set()).add(cap)
        if any(len(v) > 1 for v in by_role.values()):
            raise ValueError(f"plan scale {s} gives one role several capacities {by_role}; a budget file holds one Max and one Min")
        low = next(iter(by_role.get(REFINER, by_role.get(DRAFTER))))
        high = next(iter(by_role.get(DRAFTER, {low})))
        limit = schedule.cumulative[s] if previous_max is None else previous_max + schedule.tokens(s)
        previous_max = high
        flags = tuple(1 if r == DRAFTER else 0 for r in roles)
        rows[n] = {"flags": flags, "max": high, "min": low, "high": sum(flags), "limit": limit}
    return BudgetFile(rows=rows)


# -- calibration: attention statistics -> Attention Selectivity Index -----------------------------

OPERATORS = ("multiplicative", "additive")
# Attention entries materialised at once while observing (per block of sampled queries).
_BLOCK_ELEMENTS = 1 << 23


class AttentionStatsCollector:
    """Accumulates ScaleKV's two attention statistics per (layer, scale) during calibration runs.

    Adapters call ``observe`` after a layer's attention at a scale with the conditional rows'
    queries (B, Hq, n, D), such that q·kᵀ are the model's logits (scale, norm and RoPE applied),
    and the layer's whole cache keys (B, Hkv, L, D) whose positions >= ``current_start`` are the
    current map. For at most ``max_queries`` sampled query positions (seeded, the same for every
    call at a (layer, scale)) the attention probabilities over all L keys are computed block by
    block (never a full n × L matrix), and two numbers are averaged over heads, rows, sampled
    queries and calls:

    - current attention ratio: probability mass on the current map (paper: Σ_{j∈C_k} α_ij);
    - history top-K′ ratio: the sum of the K′ = ``top_k`` largest history probabilities (paper:
      TopKSum′; K′ is not given in the paper, default 16, the window size), and the same sum as a
      share of the query's whole history mass (its concentration, for ``history="share"``).

    Scale 0 has no history and records only the first.
    """

    def __init__(self, num_layers: int, num_scales: int, *, top_k: int = 16, max_queries: int = 256, seed: int = 0):
        _check_int("num_layers", num_layers, 1)
        _check_int("num_scales", num_scales, 1)
        _check_int("top_k", top_k, 1)
        _check_int("max_queries", max_queries, 1)
        _check_int("seed", seed, 0)
        self.num_layers, self.num_scales = num_layers, num_scales
        self.top_k, self.max_queries, self.seed = top_k, max_queries, seed
        shape = (num_layers, num_scales)
        self._current_sum = torch.zeros(shape, dtype=torch.float64)
        self._history_sum = torch.zeros(shape, dtype=torch.float64)
        self._share_sum = torch.zeros(shape, dtype=torch.float64)
        self._count = torch.zeros(shape, dtype=torch.long)
        self._history_count = torch.zeros(shape, dtype=torch.long)
        self.calls = 0

    def _sample(self, layer: int, scale: int, n: int) -> torch.Tensor:
        if n <= self.max_queries:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer * 1009 + scale)
        return torch.randperm(n, generator=generator)[: self.max_queries].sort().values

    @torch.no_grad()
    def observe(self, layer: int, scale: int, queries: torch.Tensor, keys: torch.Tensor, *, current_start: int) -> None:
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
        positions = self._sample(layer, scale, n).to(queries.device)
        group = q_heads // kv_heads
        grouped = queries.index_select(2, positions).reshape(batch, kv_heads, group, positions.numel(), dim)
        keys32 = keys.float()
        k_hist = min(self.top_k, current_start)
        current_sum = history_sum = share_sum = 0.0
        block = max(1, _BLOCK_ELEMENTS // max(1, batch * q_heads * length))
        for lo in range(0, positions.numel(), block):
            logits = torch.einsum("bhgqd,bhld->bhgql", grouped[:, :, :, lo:lo + block].float(), keys32)
            probs = torch.softmax(logits, dim=-1)
            current_sum += float(probs[..., current_start:].sum(dtype=torch.float64))
            if k_hist:
                history = probs[..., :current_start]
                top = history.topk(k_hist, dim=-1).values.sum(dim=-1, dtype=torch.float64)
                history_sum += float(top.sum())
                mass = history.sum(dim=-1, dtype=torch.float64)
                share_sum += float((top / mass.clamp_min(torch.finfo(torch.float64).tiny)).sum())
        if not all(math.isfinite(v) for v in (current_sum, history_sum, share_sum)):
            raise ValueError(f"attention at layer {layer}, scale {scale} is not finite (NaN or inf in the queries or "
                             "keys); nothing was recorded")
        count = batch * q_heads * positions.numel()
        self._current_sum[layer, scale] += current_sum
        self._count[layer, scale] += count
        if k_hist:
            self._history_sum[layer, scale] += history_sum
            self._share_sum[layer, scale] += share_sum
            self._history_count[layer, scale] += count
        self.calls += 1

    def result(self, *, operator: str = "multiplicative", history: str = "mass", drafter_fraction: float = 0.075,
               epsilon: float = 1e-6, source: str = "") -> "CalibrationResult":
        def table(total, count):
            return [[float(total[l, s] / count[l, s]) if count[l, s] else None for s in range(self.num_scales)]
                    for l in range(self.num_layers)]

        return CalibrationResult(
            num_layers=self.num_layers, num_scales=self.num_scales,
            current_ratio=table(self._current_sum, self._count),
            history_topk=table(self._history_sum, self._history_count),
            history_share=table(self._share_sum, self._history_count),
            top_k=self.top_k, operator=operator, history=history, drafter_fraction=drafter_fraction, epsilon=epsilon,
            samples=self._count.tolist(), calls=self.calls, source=source)


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
            raise ValueError("history='share' needs the history_share table (recorded by AttentionStatsCollector)")
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
        from .budget import parse_budget

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
    def from_dict(cls, data: dict) -> "CalibrationResult":
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
