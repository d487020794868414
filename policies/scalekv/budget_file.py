"""The released ScaleKV budget-file format (``budgets/2b_10%_budget.json``): reading it into a
``CapacityPlan`` and exporting a drafter/refiner plan to it (shared/reference/scalekv.md §3.3–§3.4)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import attrs

from kvpolicy import CapacityPlan, ScaleSchedule
from kvpolicy.json_file import read_json  # also importable from here (kvpolicy.calibration's migration note)

from .allocation import DRAFTER, REFINER, compression_start


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
