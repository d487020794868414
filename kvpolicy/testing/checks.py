"""Case-level checks: one generation case, one plan, a config round-trip, bad options.

These need no hypothesis: ``check_case(policy, case)`` reruns one case (for instance the minimal
case ``check_policy`` printed) and raises the violation again.
"""

from __future__ import annotations

import json
import math
from typing import Optional

import attrs

from ..budget import Tokens
from ..policy import Policy
from ..registry import policy_class
from ..schedule import ScaleSchedule
from .driver import Blocked, Checker, budget_tokens, drive, label
from .inputs import Case
from .invariants import InvariantViolation, violation


class Refused(Exception):
    """The policy refused a case's budget or options with a ValueError/TypeError (allowed, early)."""


@attrs.frozen
class PolicySpec:
    """What is checked: a policy class and the options it is built with (the budget comes per case)."""

    cls: type
    options: dict = attrs.field(factory=dict, converter=dict)

    @classmethod
    def of(cls, name_or_policy, options: Optional[dict] = None) -> "PolicySpec":
        """From a registered name (with the class's ``check_options``) or a policy object (its config)."""
        options = dict(options or {})
        if isinstance(name_or_policy, Policy):
            config = name_or_policy.to_config()
            config.pop("name", None)
            config.pop("budget", None)
            return cls(type(name_or_policy), {**config, **options})
        if isinstance(name_or_policy, type) and issubclass(name_or_policy, Policy):
            return cls(name_or_policy, {**getattr(name_or_policy, "check_options", {}), **options})
        if not isinstance(name_or_policy, str):
            raise TypeError(f"check a policy name, a Policy class or a Policy object, got {name_or_policy!r}")
        policy_cls = policy_class(name_or_policy)
        return cls(policy_cls, {**getattr(policy_cls, "check_options", {}), **options})

    @property
    def name(self) -> str:
        return self.cls.name or self.cls.__name__

    @property
    def takes_budget(self) -> bool:
        return bool(self.cls.requires_budget)

    def build(self, budget=None, options: Optional[dict] = None) -> Policy:
        merged = {**self.options, **(options or {})}
        if self.takes_budget:
            merged["budget"] = budget
        return self.cls(**merged)


def _spec_and_checker(policy, case, enabled=None, ignored=()) -> tuple[PolicySpec, Checker]:
    """What is checked (a name, a Policy object or a ``PolicySpec``) and a checker labelled with its name."""
    spec = policy if isinstance(policy, PolicySpec) else PolicySpec.of(policy)
    checker = Checker(None, case, enabled, ignored)
    checker.policy_label = spec.name
    return spec, checker


def build_for(spec: PolicySpec, case: Case, checker: Optional[Checker] = None) -> Policy:
    """The policy of a case, planned for its geometry; ``Refused`` if it rightly refuses them."""
    try:
        policy = spec.build(case.budget, case.options)
        policy.plan(case.schedule, case.num_layers)
    except (ValueError, TypeError) as exc:
        raise Refused(f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:
        checker = checker or Checker(None, case)
        checker.policy_label = spec.name
        checker.fail("completes", f"building or planning raised {type(exc).__name__}: {exc}")
    return policy


def check_case(policy, case: Case, *, enabled=None, ignored=()) -> set[str]:
    """Every generation invariant on one case; returns the invariants it exercised.

    ``policy`` is a registered name, a Policy object or a ``PolicySpec``. Raises
    ``InvariantViolation`` at the first broken invariant of ``enabled`` (default all; ``Refused``
    if the policy refuses the case's budget or options; ``Blocked`` if an invariant neither enabled
    nor ``ignored`` fails). Generations only some invariants need run when those are enabled.
    """
    spec, checker = _spec_and_checker(policy, case, enabled, ignored)
    full_length = case.budget is not None and spec.takes_budget and case.budget_tokens >= case.schedule.total
    try:
        first_policy = build_for(spec, case, checker)
    except Refused as exc:
        if full_length:
            checker.fail("full_budget", f"the policy refused budget {case.budget} (>= all {case.schedule.total} "
                                        f"tokens): {exc}")
        raise

    # A head-wise plan fixes the number of heads (say, by per-head weights): the case uses it.
    planned_heads = getattr(first_policy.plan(case.schedule, case.num_layers), "num_heads", None)
    if planned_heads is not None and planned_heads != case.heads:
        case = attrs.evolve(case, heads=planned_heads)
        checker.case = case

    def run(policy, inputs, reuse=None):
        try:
            return drive(policy, inputs, reuse=reuse, checker=checker)
        except (InvariantViolation, Blocked):
            raise
        except Exception as exc:
            checker.fail("completes", f"raised {type(exc).__name__}: {exc}")
            raise Blocked("completes") from exc

    inputs = case.inputs()
    first = run(first_policy, inputs)
    checker.where = ""
    checker.exercised.add("completes")

    if checker.wants("determinism"):
        _determinism(spec, case, checker, run, inputs, first)
    if checker.wants("no_stale_state"):
        _no_stale_state(spec, case, checker, run, inputs, first, first_policy)
    if checker.wants("rows_alone") and case.rows > 1:
        _rows_alone(spec, case, checker, run, inputs, first)
    if checker.wants("full_budget") and full_length:
        _full_budget(case, checker, run, inputs, first)
    return set(checker.exercised) | first.exercised


def _determinism(spec, case, checker, run, inputs, first):
    """A fresh policy and a fresh cache select the same tokens for the same inputs."""
    again = run(build_for(spec, case, checker), inputs)
    checker.where = ""
    checker.exercised.add("determinism")
    diff = first.difference(again)
    checker.check(diff is None, "determinism", lambda: f"a second run on the same inputs differs: {diff}")


def _no_stale_state(spec, case, checker, run, inputs, first, first_policy):
    """The first cache, reset, runs another generation like a fresh cache and policy, and then
    the first inputs again like the first time."""
    other = case.inputs(seed=case.seed + 1)
    reused = run(first_policy, other, reuse=first)
    fresh = run(build_for(spec, case, checker), other)
    checker.where = ""
    checker.exercised.add("no_stale_state")
    diff = reused.difference(fresh)
    checker.check(diff is None, "no_stale_state",
                  lambda: f"after reset(), another generation on the same cache differs from a fresh cache: {diff}")
    diff = run(first_policy, inputs, reuse=reused).difference(first)
    checker.where = ""
    checker.check(diff is None, "no_stale_state",
                  lambda: f"after reset() and another generation, the first inputs select differently: {diff}")


def _rows_alone(spec, case, checker, run, inputs, first):
    """Each row as if alone (a CFG pair or a batch never couples rows)."""
    row = case.seed % case.rows
    alone = run(build_for(spec, case, checker), inputs.row(row))
    checker.where = ""
    checker.exercised.add("rows_alone")
    diff = first.difference(alone, rows=slice(row, row + 1))
    checker.check(diff is None, "rows_alone", lambda: f"row {row} alone differs from row {row} in the batch: {diff}")


def _full_budget(case, checker, run, inputs, first):
    """A budget covering every token is the full cache: same selection, same counted bytes."""
    reference = run(None, inputs)
    checker.where = ""
    checker.exercised.add("full_budget")
    diff = first.difference(reference)
    checker.check(diff is None, "full_budget", lambda: f"budget {case.budget} >= {case.schedule.total} tokens "
                                                        f"evicted: {diff}")
    for what in ("kv_bytes", "peak_kv_bytes", "layer_kv_bytes"):
        mine, full = getattr(first.report, what), getattr(reference.report, what)
        checker.check(mine == full, "full_budget", lambda: f"{what} {mine} differ from the full cache's {full}")


@attrs.frozen
class PlanCase:
    """A plan on a real model geometry (no tensors): schedule, layers, budget, options."""

    schedule: ScaleSchedule
    num_layers: int
    budget: object
    options: dict = attrs.field(factory=dict, converter=dict)

    def __repr__(self) -> str:
        return (f"PlanCase(schedule={[tuple(s) for s in self.schedule.shapes]}, num_layers={self.num_layers}, "
                f"budget={self.budget!r}, options={self.options!r})")


def check_plan(policy, case: PlanCase, *, enabled=None, ignored=()) -> set[str]:
    """Plan-level capacity and budget: mean kept (layers, heads) <= budget at every scale."""
    spec, checker = _spec_and_checker(policy, case, enabled, ignored)
    try:
        built = spec.build(case.budget, case.options)
        plan = built.plan(case.schedule, case.num_layers)
    except (ValueError, TypeError) as exc:
        raise Refused(f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:
        checker.fail("completes", f"planning raised {type(exc).__name__}: {exc}")
    checker.exercised.add("completes")
    budget = budget_tokens(built, case.schedule)
    kept = plan_kept_lengths(plan, case.schedule)  # [scale][layer] -> tuple of per-head kept
    head_caps = getattr(plan, "head_capacities", None)
    for s, row in enumerate(plan.capacities):
        for l, cap in enumerate(row):
            heads = head_caps[s][l] if head_caps is not None else None
            if cap is not None and heads is not None:
                checker.exercised.add("capacity")
                checker.check(sum(heads) <= len(heads) * cap, "capacity",
                              lambda: f"scale {s}, layer {l}: head capacities {list(heads)} sum to {sum(heads)} > "
                                      f"{len(heads)} heads x capacity {cap}")
    if budget is None:
        return set(checker.exercised)
    checker.exercised.add("budget")
    for s, row in enumerate(kept):
        total = sum(sum(heads) / len(heads) for heads in row)
        mean = total / case.num_layers
        checker.check(mean <= budget + 1e-9, "budget",
                      lambda: f"scale {s}: the plan keeps {mean:.2f} tokens per layer on average "
                              f"(capacities {_short_row(plan.capacities[s])}) > budget {budget}")
    return set(checker.exercised)


def _short_row(row) -> list:
    row = list(row)
    return row if len(row) <= 16 else row[:8] + ["..."] + row[-4:]


def plan_kept_lengths(plan, schedule: ScaleSchedule) -> list[list[tuple[int, ...]]]:
    """Tokens each layer (and head, where the plan has head capacities) holds after each scale."""
    head_caps = getattr(plan, "head_capacities", None)
    out, kept, previous = [], None, 0
    for s, total in enumerate(schedule.cumulative):
        new, previous = total - previous, total
        row = []
        for l, cap in enumerate(plan.capacities[s]):
            heads = head_caps[s][l] if head_caps is not None and head_caps[s][l] is not None else None
            width = len(heads) if heads is not None else (len(kept[l]) if kept is not None else 1)
            prev = kept[l] if kept is not None else (0,) * width
            if len(prev) != width:
                prev = (sum(prev) / len(prev),) * width
            caps = heads if heads is not None else (cap,) * width
            row.append(tuple(p + new if c is None else min(p + new, c) for p, c in zip(prev, caps)))
        out.append(row)
        kept = row
    return out


def check_config(policy, case: Case, *, enabled=None, ignored=()) -> set[str]:
    """to_config() is JSON-friendly and from_config() rebuilds an equal policy with the same config."""
    spec, checker = _spec_and_checker(policy, case, enabled, ignored)
    try:
        built = spec.build(case.budget, case.options)
    except (ValueError, TypeError) as exc:
        raise Refused(f"{type(exc).__name__}: {exc}") from None
    checker.exercised.add("config")
    try:
        config = built.to_config()
        text = json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        checker.fail("config", f"to_config() is not JSON: {exc}")
    checker.check(config.get("name") == spec.cls.name, "config",
                  lambda: f"to_config() names {config.get('name')!r}, the policy is registered as {spec.cls.name!r}")
    try:
        rebuilt = Policy.from_config(json.loads(text))
    except Exception as exc:
        checker.fail("config", f"Policy.from_config({text}) raised {type(exc).__name__}: {exc}")
    checker.check(type(rebuilt) is type(built), "config",
                  lambda: f"from_config built a {type(rebuilt).__name__}, not a {type(built).__name__}")
    checker.check(rebuilt == built, "config", lambda: f"from_config({text}) built {rebuilt!r}, not an equal policy {built!r}")
    again = rebuilt.to_config()
    checker.check(json.loads(json.dumps(again)) == json.loads(text), "config",
                  lambda: f"the rebuilt policy's config {again} differs from {config}")
    return set(checker.exercised)


BAD_BUDGETS = ("0%", 0, -3, "lots", 1.5, math.nan, True)
_WRONG = object()


def bad_option_probes(spec: PolicySpec) -> list[tuple[str, dict]]:
    """(description, constructor keywords) that must raise a clear error naming the bad value."""
    budget = {"budget": Tokens(8)} if spec.takes_budget else {}
    probes = [("unknown option no_such_option=1", {**spec.options, **budget, "no_such_option": 1})]
    if spec.takes_budget:
        probes += [(f"budget={value!r}", {**spec.options, "budget": value}) for value in BAD_BUDGETS]
    if attrs.has(spec.cls):
        for field in attrs.fields(spec.cls):
            name = field.alias or field.name
            if not field.init or name == "budget" or isinstance(field.default, attrs.Factory):
                continue
            default = field.default
            if isinstance(default, bool) or not isinstance(default, (int, float, str)):
                continue
            bad = 12345 if isinstance(default, str) else "not-a-number"
            probes.append((f"option {name}={bad!r} (wrong type; default {default!r})",
                           {**spec.options, **budget, name: bad}))
    return probes


def check_bad_options(policy, *, enabled=None) -> set[str]:
    """Bad options and budgets raise ValueError/TypeError at construction, naming the option or value."""
    spec, checker = _spec_and_checker(policy, None, enabled)
    checker.exercised.add("bad_options")
    for description, kwargs in bad_option_probes(spec):
        checker.case = f"{spec.cls.__name__}(**{kwargs!r})"
        try:
            spec.cls(**kwargs)
        except (ValueError, TypeError) as exc:
            message = str(exc)
            needles = _names(description, kwargs)
            checker.check(any(n in message for n in needles), "bad_options",
                          lambda: f"{description} raised {type(exc).__name__}({message!r}), which names none of {needles}")
            continue
        except Exception as exc:
            checker.fail("bad_options", f"{description} raised {type(exc).__name__}: {exc} (not a ValueError/TypeError)")
        checker.fail("bad_options", f"{description} was accepted silently")
    return set(checker.exercised)


def _names(description: str, kwargs: dict) -> list[str]:
    """What a clear message names: the bad value (repr or str) or the option."""
    if description.startswith("unknown option"):
        return ["no_such_option"]
    if description.startswith("budget="):
        value = kwargs["budget"]
        return [repr(value), str(value)]
    name = description.split()[1].split("=")[0]
    return [name]
