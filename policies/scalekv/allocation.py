"""ScaleKV's drafter/refiner allocation: which scales need roles, refiner floors, and the split of a
budget between drafter and refiner layers (released files' rule or the paper's linear decay).

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

from typing import Mapping, Optional, Sequence

from kvpolicy import CapacityPlan, ScaleSchedule

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
