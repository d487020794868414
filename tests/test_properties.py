"""Hypothesis properties of every policy, run by the public test kit (``kvpolicy.testing``), plus
what is specific to one policy: its option errors, its defaults, and float64 per-row references for
SnapKV, PyramidKV and H2O.

``check_policy`` draws schedules (square and non-square, prefixes), budgets (edges included),
geometries (CFG rows, heads, grouped query heads, dtypes, tied scores) and the options each policy
declares in ``check_option_values``, and checks every invariant of ``kvpolicy.testing.INVARIANTS``;
a failure names the invariant and hypothesis' minimal case.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kvpolicy
from kvpolicy import KVCache, ScaleSchedule
from kvpolicy.testing import check_policy, drive, make_inputs

from test_policy_matrix import INFINITY_7, POLICIES, VAR_256


@pytest.mark.parametrize("name", POLICIES)
def test_policy_passes_the_kit(name):
    report = check_policy(name, examples=20)
    # The properties were exercised, not vacuously true: every policy but the full cache evicts.
    if kvpolicy.policy_class(name).requires_budget:
        for invariant in ("capacity", "budget", "rows_alone", "full_budget"):
            assert report.results[invariant].cases, f"{name}: {invariant} never exercised"


# -- policy-specific options and promises ---------------------------------------------------------
@pytest.mark.parametrize("name,options,pattern", [
    ("h2o", {"heavy_ratio": 1.5}, r"heavy_ratio must be a number in \[0, 1\].*1\.5"),
    ("h2o", {"heavy_ratio": float("nan")}, r"heavy_ratio"),
    ("h2o", {"heavy_ratio": "half"}, r"heavy_ratio.*'half'"),
    ("snapkv", {"window_size": 0}, r"window_size must be an int >= 1, got 0"),
    ("snapkv", {"kernel_size": 4}, r"kernel_size must be an odd int >= 1.*got 4"),
    ("snapkv", {"kernel_size": 0}, r"kernel_size must be an odd int"),
    ("snapkv", {"pooling": "median"}, r"pooling must be 'max' or 'avg', got 'median'"),
    ("pyramidkv", {"beta": 0}, r"beta must be an int >= 1, got 0"),
    ("pyramidkv", {"pooling": "maxpool"}, r"pooling must be 'max' or 'avg'"),
    ("streamingllm", {"num_sinks": -1}, r"streamingllm num_sinks must be an int >= 0, got -1"),
    ("streamingllm", {"num_sinks": True}, r"num_sinks must be an int >= 0, got True"),
    ("streamingllm", {"num_sinks": 2.0}, r"num_sinks must be an int >= 0, got 2.0"),
])
def test_bad_options_raise(name, options, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        kvpolicy.get_policy(name, budget="10%", **options)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])
def test_budget_below_window_raises_at_plan_time(name):
    policy = kvpolicy.get_policy(name, budget=20, window_size=32)
    with pytest.raises(ValueError, match=r"20.*window"):
        policy.plan(VAR_256, 4)
    with pytest.raises(ValueError, match="window"):
        KVCache(4, VAR_256, policy)


def test_defaults_follow_the_issue():
    assert kvpolicy.get_policy("snapkv", budget=650).to_config() == {
        "name": "snapkv", "budget": 650, "window_size": 32, "kernel_size": 7, "pooling": "max"}
    assert kvpolicy.get_policy("pyramidkv", budget=650).beta == 20
    h2o = kvpolicy.get_policy("h2o", budget=650)
    assert h2o.heavy_ratio == 0.5 and h2o.split(650) == (325, 325) and h2o.split(643) == (321, 322)
    assert h2o.stateful and h2o.needs_queries and not h2o.needs_raw_queries


def test_h2o_recent_zero_keeps_no_forced_window():
    # heavy_ratio=1: recent window 0 (the "-0:" pitfall would force every column) -> pure heavy hitters.
    inputs = make_inputs(VAR_256, num_layers=1, rows=2, seed=5)
    policy = kvpolicy.get_policy("h2o", budget=30, heavy_ratio=1.0)
    trace = drive(policy, inputs)
    last = trace.indices[(VAR_256.num_scales - 1, 0)]
    assert last.shape[2] == 30
    # Not simply the most recent tokens: heavy hitters from early scales survive.
    assert int(last.min()) < trace.lengths[(VAR_256.num_scales - 1, 0)] - 30


# -- float64 references ---------------------------------------------------------------------------
def assert_topk_tie_aware(kept: torch.Tensor, forced: list[int], scores: torch.Tensor, where: str) -> None:
    """kept (k,) ascending = forced + the top (k - |forced|) of the other positions by ``scores``."""
    kept_set = set(kept.tolist())
    assert set(forced) <= kept_set, f"{where}: forced {forced} not kept"
    candidates = [i for i in range(scores.numel()) if i not in set(forced)]
    chosen = [i for i in candidates if i in kept_set]
    need = len(chosen)
    values = scores[candidates]
    boundary = float(values.topk(need).values[-1]) if need else math.inf
    tol = 1e-5 * float(values.abs().max()) + 1e-12  # float32 scoring vs the float64 reference
    for i in candidates:
        if float(scores[i]) > boundary + tol:
            assert i in kept_set, f"{where}: position {i} (score {float(scores[i])}) above the cut {boundary} was evicted"
    for i in chosen:
        assert float(scores[i]) >= boundary - tol, f"{where}: position {i} below the cut was kept"


def naive_votes(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(n, D) x (L, D) -> (L,) float64: sum over queries of softmax(q k^T)."""
    return torch.softmax(queries.double() @ keys.double().T, dim=-1).sum(dim=0)


def naive_pool(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    half, out = kernel // 2, torch.empty_like(scores)
    for i in range(scores.numel()):
        window = scores[max(0, i - half): i + half + 1]
        # avg pooling counts the zero padding (torch's count_include_pad default), max ignores it
        out[i] = window.max() if pooling == "max" else window.sum() / kernel
    return out


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(name=st.sampled_from(["snapkv", "pyramidkv"]), window=st.integers(1, 6), kernel=st.sampled_from([1, 3, 5]),
       pooling=st.sampled_from(["max", "avg"]), tokens=st.integers(6, 80), seed=st.integers(0, 1000))
def test_snapkv_family_matches_float64_reference(name, window, kernel, pooling, tokens, seed):
    schedule = VAR_256.prefix(8)  # last map 10x10
    options = dict(window_size=window, kernel_size=kernel, pooling=pooling)
    policy = kvpolicy.get_policy(name, budget=tokens, **options)
    inputs = make_inputs(schedule, num_layers=2, rows=2, heads=2, seed=seed)
    cache = KVCache(2, schedule, policy)
    for scale in range(schedule.num_scales):
        n = schedule.tokens(scale)
        for layer in range(2):
            keys, values, queries, _ = inputs.tensors[(scale, layer)]
            all_keys, _ = cache.append(layer, scale, keys, values)
            all_keys = all_keys.clone()
            result = cache.compress(layer, scale, queries=queries)
            length, capacity = all_keys.shape[2], result.capacity
            if length <= capacity:
                continue
            w = min(window, n)
            for r in range(2):
                for h in range(2):
                    votes = naive_votes(queries[r, h, n - w:], all_keys[r, h])
                    scores = torch.cat([naive_pool(votes[: length - w], kernel, pooling), votes[length - w:]])
                    assert_topk_tie_aware(result.indices[r, h], list(range(length - w, length)), scores,
                                          f"{name} scale {scale} layer {layer} row {r} head {h}")


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(tokens=st.integers(1, 120), heavy_ratio=st.sampled_from([0.0, 0.3, 0.5, 1.0]), seed=st.integers(0, 1000))
def test_h2o_matches_float64_reference(tokens, heavy_ratio, seed):
    schedule = INFINITY_7.prefix(6)  # last map 12x12, 265 tokens
    policy = kvpolicy.get_policy("h2o", budget=tokens, heavy_ratio=heavy_ratio)
    rows, heads = 2, 2
    inputs = make_inputs(schedule, num_layers=1, rows=rows, heads=heads, seed=seed)
    cache = KVCache(1, schedule, policy)
    totals = torch.zeros(rows, heads, schedule.total, dtype=torch.float64)  # by global token id
    ids = None
    for scale in range(schedule.num_scales):
        n, offset = schedule.tokens(scale), schedule.offset(scale)
        keys, values, queries, _ = inputs.tensors[(scale, 0)]
        all_keys, _ = cache.append(0, scale, keys, values)
        all_keys = all_keys.clone()
        new = torch.arange(offset, offset + n).expand(rows, heads, n)
        ids = new if ids is None else torch.cat([ids, new], dim=2)
        length = ids.shape[2]
        for r in range(rows):
            for h in range(heads):
                totals[r, h, ids[r, h]] += naive_votes(queries[r, h], all_keys[r, h])
        result = cache.compress(0, scale, queries=queries)
        if length > result.capacity:
            recent = result.capacity - math.floor(heavy_ratio * result.capacity + 1e-9)
            for r in range(rows):
                for h in range(heads):
                    assert_topk_tie_aware(result.indices[r, h], list(range(length - recent, length)),
                                          totals[r, h, ids[r, h]], f"h2o scale {scale} row {r} head {h}")
        ids = torch.gather(ids, 2, result.indices)
        # The carried state is the running total of every kept token, accumulated at every scale
        # (also where nothing was evicted); new tokens started from 0.
        assert result.state.shape == ids.shape
        torch.testing.assert_close(result.state.double(), torch.gather(totals, 2, ids), rtol=1e-4, atol=1e-4)


def test_h2o_rejects_stale_or_missing_state():
    policy = kvpolicy.get_policy("h2o", budget=10)
    schedule = INFINITY_7
    keys = torch.randn(1, 2, 21, 8)
    queries = torch.randn(1, 2, 16, 8)
    kw = dict(schedule=schedule, scale=2, layer=0, num_layers=1, queries=queries)
    with pytest.raises(ValueError, match="no accumulated-attention state for a cache of 21 tokens"):
        kvpolicy.compress(policy, keys, keys, **kw)
    with pytest.raises(ValueError, match="stale state"):
        kvpolicy.compress(policy, keys, keys, **kw, state=torch.zeros(1, 2, 9))
    assert kvpolicy.compress(policy, keys, keys, **kw, state=torch.zeros(1, 2, 5)).indices.shape == (1, 2, 10)


# -- PyramidKV capacity rule -------------------------------------------------------------------------
def test_pyramidkv_plan_cases():
    from policies.pyramidkv import pyramid_capacities

    # length < B and length < 2m: uniform B.
    assert pyramid_capacities(650, 16, 600, 4, 20) == [650] * 4
    assert pyramid_capacities(650, 16, 1200, 4, 20) == [650] * 4  # 2m = 1268
    # Pyramid: m = 634, min = 31, max = 1237; exact ramp over 4 layers: 1237, 835, 433, 31 (+16).
    assert pyramid_capacities(650, 16, 6425, 4, 20) == [1253, 851, 449, 47]
    # Clamped (needs w >= m // beta): B 100, w 16, m 84 -> min 4, max 164 >= length - w for length
    # 170 (>= 2m = 168), so max = 154, min = 168 - 154 = 14; the first layer keeps the whole cache.
    assert pyramid_capacities(100, 16, 170, 3, 20) == [170, 100, 30]
    # Remainder rounding: m = 10, beta 4: min 2, max 18 -> 18, 10, 2 (+ window 1).
    assert pyramid_capacities(11, 1, 1000, 3, 4) == [19, 11, 3]
    # m = 10, beta 3: min 3, max 17, ramp 17, 12.33, 7.67, 3 -> floors 17, 12, 7, 3 and the one
    # remaining token goes to the largest fraction (7.67): sum stays 4 * m.
    caps = pyramid_capacities(11, 1, 1000, 4, 3)
    assert caps == [18, 13, 9, 4] and sum(caps) == 4 * 11
    with pytest.raises(ValueError, match="smaller than the observation window"):
        pyramid_capacities(10, 16, 1000, 4, 20)
    assert pyramid_capacities(650, 16, 6425, 1, 20) == [650]


def test_pyramidkv_plan_on_infinity_1024():
    schedule = ScaleSchedule([1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64])
    plan = kvpolicy.get_policy("pyramidkv", budget=650, window_size=16).plan(schedule, 32)
    for s, length in enumerate(schedule.cumulative):
        row = plan.capacities[s]
        assert sum(row) == 650 * 32, f"scale {s}: mean must equal the budget exactly"
        assert all(a >= b for a, b in zip(row, row[1:])), "lower layers keep more"
        if length < 2 * 634:
            assert list(row) == [650] * 32
    assert plan.capacities[-1][0] == 1253 and plan.capacities[-1][-1] == 47
    assert "min 47 max 1253 mean 650.0" in str(plan)


# -- head-wise capacities (issue 9): static per-head plans and a head-adaptive wrapper ------------


from policies.common import (HeadWeightsAllocation, HeavyHitterSelector, PatchWindowSelector,  # noqa: E402
                             RecentWindowSelector, SinksRecentSelector, SlidingWindowSelector, UniformAllocation)
from test_headwise import ScoreMassHeads  # noqa: E402

HEADWISE_SELECTORS = {
    "recent": (RecentWindowSelector, st.fixed_dictionaries({"window_size": st.integers(1, 4),
                                                              "kernel_size": st.sampled_from([1, 3]),
                                                              "pooling": st.sampled_from(["max", "avg"])})),
    "patch": (PatchWindowSelector, st.fixed_dictionaries({"window_size": st.sampled_from([1, 4]),
                                                            "kernel_size": st.sampled_from([1, 3]),
                                                            "mode": st.sampled_from(["attention", "reference"])})),
    "heavy": (HeavyHitterSelector, st.fixed_dictionaries({"heavy_ratio": st.sampled_from([0.0, 0.5, 1.0])})),
    "sinks": (SinksRecentSelector, st.fixed_dictionaries({"num_sinks": st.integers(0, 3)})),
    "sliding": (SlidingWindowSelector, st.just({})),
}
SCORED = ("recent", "patch")
for _key, (_selector, _) in HEADWISE_SELECTORS.items():
    kvpolicy.compose(f"test_prop_headwise_{_key}", HeadWeightsAllocation, UniformAllocation, _selector)
    if _key in SCORED:
        kvpolicy.compose(f"test_prop_adaptive_{_key}", ScoreMassHeads, UniformAllocation, _selector)


HEADWISE_CASES = ([(f"test_prop_headwise_{key}", {"head_weights": weights})
                   for key in HEADWISE_SELECTORS for weights in ([1, 3], [2, 1, 1])]
                  + [(f"test_prop_adaptive_{key}", {}) for key in SCORED])


@pytest.mark.parametrize("name, options", HEADWISE_CASES,
                         ids=[f"{n}-{len(o.get('head_weights', ()))}" for n, o in HEADWISE_CASES])
def test_headwise_compositions_pass_the_kit(name, options):
    """Every selector under head-wise capacities (head weights fix H) and under a head-adaptive
    wrapper passes the kit: kept <= capacity per (scale, layer, row, head) (the row's total <=
    H x capacity when head-adaptive), layer mean over heads <= budget, indices unique and ascending
    per head, held tokens bit-exact, counted bytes = the tensors held, promises per head, ..."""
    invariants = None
    if "head_weights" in options:
        # Head weights split the layer's budget by weight whatever the cache length, so a budget that
        # covers the whole cache still evicts from a low-weight head: 'full_budget' does not hold by
        # design (the kit found it; redistributing what a head cannot hold would change the split).
        from kvpolicy.testing.invariants import INVARIANTS
        invariants = [name for name in INVARIANTS if name != "full_budget"]
    check_policy(name, examples=10, options=options, invariants=invariants)
