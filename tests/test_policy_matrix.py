"""The shared policy matrix: every registered policy x budgets x small schedules, checked by the
public test kit (``kvpolicy.testing``), the same checks ``kvpolicy check`` runs.

A new policy needs nothing here if it runs with ``get_policy(name, budget=...)`` on small
schedules; otherwise it declares ``check_options`` (options for small geometries, e.g. a smaller
observation window) on its class, and what it always keeps with ``promised_positions(ctx)``.
``POLICY_OPTIONS`` below only overrides those for this matrix.
"""

from __future__ import annotations

import warnings
import zlib

import attrs
import pytest
import torch

import kvpolicy
from kvpolicy import ScaleSchedule, Tokens
from kvpolicy.testing import Case, PlanCase, check_case, check_config, check_plan, drive, make_inputs

# Tiny geometries: VAR 256^2 patch nums (680 tokens, N_ref 424) and Infinity's 7-scale 256^2 prefix.
VAR_256 = ScaleSchedule([1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
INFINITY_7 = ScaleSchedule([1, 2, 4, 6, 8, 12, 16])
SCHEDULES = {"var256": VAR_256, "infinity7": INFINITY_7}

# Matrix-only overrides of a policy's declared ``check_options`` (normally empty).
POLICY_OPTIONS: dict[str, dict] = {}


def registered_policies() -> list[str]:
    with warnings.catch_warnings():  # plug-ins listed in the entry points but not written yet
        warnings.simplefilter("ignore")
        return sorted(kvpolicy.list_policies())


def policy_options(name: str, **extra) -> dict:
    return {**kvpolicy.policy_class(name).check_options, **POLICY_OPTIONS.get(name, {}), **extra}


def make_policy(name: str, budget, **extra) -> kvpolicy.Policy:
    """The policy at a budget with its check options; policies that take no budget (``full``) are built without it."""
    options = policy_options(name, **extra)
    if not kvpolicy.policy_class(name).requires_budget:
        return kvpolicy.get_policy(name, **options)
    return kvpolicy.get_policy(name, budget=budget, **options)


def budget_cases(schedule: ScaleSchedule) -> list:
    return ["10%", "25%", Tokens(12), Tokens(schedule.total)]


def matrix_case(name: str, schedule: ScaleSchedule, budget, seed: int = 0, **geometry) -> None:
    """One matrix cell: every generation invariant of the kit (capacity, budget, indices, bit-exact
    tensors, promises, bytes, determinism, no stale state, rows alone, full budget), the plan, and
    (for the built-ins, which all fill their capacity) exactly ``capacity`` tokens kept when evicting."""
    policy = make_policy(name, budget)
    options = policy_options(name)
    budget = None if policy.budget is None else kvpolicy.parse_budget(budget)
    case = Case(schedule=schedule, budget=budget, options=options, num_layers=3, batch=2, cfg=True, seed=seed,
                **geometry)
    check_case(name, case)
    check_plan(name, PlanCase(schedule=schedule, num_layers=3, budget=budget, options=options))
    trace = drive(policy, case.inputs())
    plan = policy.plan(schedule, 3)
    for (scale, layer), kept in trace.kept.items():
        capacity, before = plan.capacity(scale, layer), trace.before[(scale, layer)]
        if capacity is None:
            continue
        head_caps = plan.head_capacity(scale, layer)
        if policy.head_adaptive:  # a row's heads share H x capacity (all of it once the row exceeds it)
            over = before.sum(dim=1) > before.shape[1] * capacity
            assert bool((kept.sum(dim=1)[over] == before.shape[1] * capacity).all()), \
                f"{name} kept {kept.tolist()}, rows of {before.shape[1]} x {capacity} at {scale, layer}"
        elif head_caps is not None:  # each head fills its own capacity
            limit = torch.minimum(before, torch.tensor(head_caps).view(1, -1))
            assert bool((kept == limit).all()), f"{name} kept {kept.tolist()}, head capacities {head_caps} at {scale, layer}"
        elif trace.lengths[(scale, layer)] > capacity:
            assert bool((kept == capacity).all()), f"{name} kept {kept.tolist()} < capacity {capacity} at {scale, layer}"


POLICIES = registered_policies()
CASES = [(name, sched, budget) for name in POLICIES for sched in SCHEDULES
         for budget in budget_cases(SCHEDULES[sched])]


@pytest.mark.parametrize("name,schedule_name,budget", CASES, ids=lambda v: str(v))
def test_matrix(name, schedule_name, budget):
    matrix_case(name, SCHEDULES[schedule_name], budget, seed=zlib.crc32(f"{name}/{schedule_name}".encode()) % 1000)


@pytest.mark.parametrize("name", POLICIES)
def test_tied_scores_grouped_queries_and_half_precision(name):
    # Every score tied, grouped query heads, bf16: still exactly `capacity` unique tokens, the same
    # way for every row and run.
    matrix_case(name, VAR_256, "10%", seed=1, tied=True, query_group=2, dtype="bfloat16")


@pytest.mark.parametrize("name", POLICIES)
def test_config_round_trip(name):
    for budget in ("10%", Tokens(77)):
        check_config(name, Case(schedule=INFINITY_7, budget=budget if kvpolicy.policy_class(name).requires_budget
                                else None, options=policy_options(name)))


@pytest.mark.parametrize("name", POLICIES)
def test_bad_inputs_raise(name):
    schedule = INFINITY_7
    policy = make_policy(name, Tokens(40))
    scale = 4  # 8x8 map; cumulative 121 tokens
    length = schedule.cumulative_length(scale)
    keys = torch.randn(2, 2, length, 8)
    values = torch.randn(2, 2, length, 8)
    queries = torch.randn(2, 2, schedule.tokens(scale), 8)
    state = torch.zeros(2, 2, length - schedule.tokens(scale)) if policy.stateful else None
    kw = dict(schedule=schedule, scale=scale, layer=0, num_layers=2, queries=queries, raw_queries=queries, state=state)
    kvpolicy.compress(policy, keys, values, **kw)  # the valid call works
    with pytest.raises(ValueError, match=r"keys .* and values .* must agree"):
        kvpolicy.compress(policy, keys, values[:, :, :-1], **kw)
    with pytest.raises(ValueError, match=r"cache length 200 at scale 4 must lie in 64\.\.121"):
        kvpolicy.compress(policy, torch.randn(2, 2, 200, 8), torch.randn(2, 2, 200, 8), **kw)
    with pytest.raises(TypeError, match="floating point"):
        kvpolicy.compress(policy, keys.long(), values, **kw)
    with pytest.raises(ValueError, match=r"must be a \(B, H, L, D\) tensor"):
        kvpolicy.compress(policy, keys[0], values[0], **kw)
    with pytest.raises(IndexError, match="layer 2 out of range 0..1"):
        kvpolicy.compress(policy, keys, values, **{**kw, "layer": 2})
    with pytest.raises(IndexError, match="scale 7 out of range 0..6"):
        kvpolicy.compress(policy, keys, values, **{**kw, "scale": 7})
    with pytest.raises(ValueError, match="queries shape"):
        kvpolicy.compress(policy, keys, values, **{**kw, "queries": queries[:, :, :-1], "raw_queries": queries[:, :, :-1]})
    if policy.needs_queries:
        with pytest.raises(ValueError, match=f"policy '{name}' needs queries="):
            kvpolicy.compress(policy, keys, values, **{**kw, "queries": None})
    if policy.needs_raw_queries:
        with pytest.raises(ValueError, match=f"policy '{name}' needs raw_queries="):
            kvpolicy.compress(policy, keys, values, **{**kw, "raw_queries": None})
    with pytest.raises(ValueError, match=r"(?i)budget"):
        kvpolicy.get_policy(name, budget="0%")
    with pytest.raises(TypeError, match="has no option"):
        kvpolicy.get_policy(name, budget="10%", no_such_option=1)


def _uses_queries(cls) -> bool:
    # A declared need is a class attribute or, when it depends on options (mode), a property.
    return any(getattr(cls, need) is True or isinstance(getattr(cls, need), property)
               for need in ("needs_queries", "needs_raw_queries"))


QUERY_POLICIES = [(name, extra) for name in POLICIES if _uses_queries(kvpolicy.policy_class(name))
                  for extra in ({}, {"mode": "reference"})
                  if not extra or "mode" in attrs.fields_dict(kvpolicy.policy_class(name))]


@pytest.mark.parametrize("name,extra", QUERY_POLICIES, ids=lambda v: str(v))
def test_grouped_query_heads(name, extra):
    """GQA (query heads a multiple of the key/value heads) works for every query-using policy; with
    identical queries within each group it keeps exactly what plain multi-head attention keeps."""
    policy = make_policy(name, "25%", **extra)
    plain = drive(policy, make_inputs(INFINITY_7, rows=2, seed=5))
    grouped = drive(policy, make_inputs(INFINITY_7, rows=2, seed=5, query_group=3))
    assert grouped.same_selection(plain)
    assert plain.evicted()


def test_matrix_covers_the_issue_baselines():
    # The issue-2 baselines must be registered and therefore in the matrix (scalekv/uniform join
    # automatically once registered).
    assert {"full", "sliding_window", "streamingllm", "h2o", "snapkv", "pyramidkv"} <= set(POLICIES)
    assert len(CASES) == len(POLICIES) * len(SCHEDULES) * 4
