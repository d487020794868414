"""The shared policy matrix: every registered policy x budgets x small schedules.

A new policy needs nothing here if it runs with ``get_policy(name, budget=...)``; otherwise add ONE
line to ``POLICY_OPTIONS`` (options for tiny schedules) and, if it promises to keep some positions
(sinks, windows), one line to ``PROMISES``. ``check_generation`` is the reusable check: it drives a
policy through a whole schedule with a ``KVCache`` and asserts every per-call invariant.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Callable, Optional

import attrs
import pytest
import torch
import torch.nn.functional as F

import kvpolicy
from policies.common import observation_window_positions
from kvpolicy import KVCache, ScaleSchedule, Tokens

# Tiny geometries: VAR 256^2 patch nums (680 tokens, N_ref 424) and Infinity's 7-scale 256^2 prefix.
VAR_256 = ScaleSchedule([1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
INFINITY_7 = ScaleSchedule([1, 2, 4, 6, 8, 12, 16])
SCHEDULES = {"var256": VAR_256, "infinity7": INFINITY_7}

# Options a policy needs on tiny schedules (one line per policy). Windows shrink to fit tiny budgets.
POLICY_OPTIONS: dict[str, dict] = {
    "snapkv": {"window_size": 4, "kernel_size": 3},
    "pyramidkv": {"window_size": 4, "kernel_size": 3, "beta": 4},
    "scalekv": {"drafters": [0], "window_size": 4, "kernel_size": 3},
    "uniform": {"window_size": 4, "kernel_size": 3},
}


def _recent(length, count):
    return list(range(length - count, length))


# Positions (in the cache before compression) a policy promises to keep whenever it evicts.
# Signature: (policy, length, capacity, n_current, (h, w) of the current map) -> list of positions.
PROMISES: dict[str, Callable] = {
    "sliding_window": lambda p, length, cap, n, hw: _recent(length, cap),
    "streamingllm": lambda p, length, cap, n, hw: list(range(min(p.num_sinks, cap))) + _recent(length, cap - min(p.num_sinks, cap)),
    "h2o": lambda p, length, cap, n, hw: _recent(length, p.split(cap)[1]),
    "snapkv": lambda p, length, cap, n, hw: _recent(length, min(p.window_size, n)),
    "pyramidkv": lambda p, length, cap, n, hw: _recent(length, min(p.window_size, n)),
    # ScaleKV's observation window (patch centres, or the last tokens on small maps) is always kept.
    "scalekv": lambda p, length, cap, n, hw: _patch_window(p, length, n, hw),
    "uniform": lambda p, length, cap, n, hw: _patch_window(p, length, n, hw),
    # AMS-KV: the condensed coarsest scales (first tokens) and the most recent tokens.
    "amskv": lambda p, length, cap, n, hw: list(range(min(5, cap))) + _recent(length, cap - min(5, cap)),
}


def _patch_window(policy, length, n, hw):
    return observation_window_positions(*hw, policy.window_size, length - n, length=length).tolist()


def registered_policies() -> list[str]:
    with warnings.catch_warnings():  # plug-ins listed in the entry points but not written yet
        warnings.simplefilter("ignore")
        return sorted(kvpolicy.list_policies())


def make_policy(name: str, budget, **extra) -> kvpolicy.Policy:
    """The policy at a budget; policies that take no budget (``full``) are built without it."""
    options = {**POLICY_OPTIONS.get(name, {}), **extra}
    if not kvpolicy.policy_class(name).requires_budget:
        return kvpolicy.get_policy(name, **options)
    return kvpolicy.get_policy(name, budget=budget, **options)


@attrs.frozen
class Inputs:
    """Synthetic per-(scale, layer) tensors: unit keys (cosine attention), values, queries."""

    schedule: ScaleSchedule
    num_layers: int
    tensors: dict  # (scale, layer) -> (keys, values, queries, raw_queries), each (R, H, n, D)

    @property
    def rows(self) -> int:
        return self.tensors[(0, 0)][0].shape[0]

    def row(self, r: int) -> "Inputs":
        return Inputs(self.schedule, self.num_layers,
                      {key: tuple(t[r:r + 1] for t in value) for key, value in self.tensors.items()})


def make_inputs(schedule: ScaleSchedule, *, num_layers: int = 3, rows: int = 4, heads: int = 2, head_dim: int = 8,
                seed: int = 0, dtype=torch.float32, query_scale: float = 6.0, query_group: int = 1) -> Inputs:
    """``query_group`` > 1 repeats each key/value head's queries that many times (grouped-query
    attention with identical query heads per group, which must select as plain multi-head)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    tensors = {}
    for scale in range(schedule.num_scales):
        n = schedule.tokens(scale)
        for layer in range(num_layers):
            keys = F.normalize(randn(rows, heads, n, head_dim), dim=-1).to(dtype)
            values = randn(rows, heads, n, head_dim).to(dtype)
            queries = (query_scale * F.normalize(randn(rows, heads, n, head_dim), dim=-1)).to(dtype)
            raw = randn(rows, heads, n, head_dim).to(dtype)
            if query_group > 1:
                queries, raw = (t.repeat_interleave(query_group, dim=1) for t in (queries, raw))
            tensors[(scale, layer)] = (keys, values, queries, raw)
    return Inputs(schedule, num_layers, tensors)


@attrs.define
class Trace:
    """What a generation did: kept indices per (scale, layer) and the cache report."""

    indices: dict  # (scale, layer) -> (R, H, k) int64
    lengths: dict  # (scale, layer) -> cache length before compression
    report: kvpolicy.CacheReport

    def same_selection(self, other: "Trace") -> bool:
        return self.indices.keys() == other.indices.keys() and all(
            torch.equal(self.indices[key], other.indices[key]) for key in self.indices)


def check_generation(policy: kvpolicy.Policy, inputs: Inputs, cache: Optional[KVCache] = None,
                     promise: Optional[Callable] = None) -> Trace:
    """Run one generation and assert every per-call invariant; returns the trace.

    Per (scale, layer): indices (R, H, k) int64, strictly ascending, in range; k <= capacity; no
    eviction while length <= capacity, otherwise exactly ``capacity`` tokens kept; promised positions
    kept; the cache holds exactly the generated K/V of the kept tokens (bit for bit, tracked by
    global token id); the report's kept lengths and capacities agree with what happened.
    """
    schedule, num_layers = inputs.schedule, inputs.num_layers
    promise = promise if promise is not None else PROMISES.get(policy.name)
    cache = cache if cache is not None else KVCache(num_layers, schedule, policy)
    plan = policy.plan(schedule, num_layers)
    token_ids = [None] * num_layers  # (R, H, L) global ids of the cached tokens, per layer
    originals = [([], []) for _ in range(num_layers)]  # generated keys/values per layer, all scales
    trace = Trace({}, {}, None)
    for scale in range(schedule.num_scales):
        n, offset = schedule.tokens(scale), schedule.offset(scale)
        for layer in range(num_layers):
            keys, values, queries, raw = inputs.tensors[(scale, layer)]
            rows, heads = keys.shape[:2]
            originals[layer][0].append(keys)
            originals[layer][1].append(values)
            all_keys, _ = cache.append(layer, scale, keys, values)
            new_ids = torch.arange(offset, offset + n).expand(rows, heads, n)
            ids = new_ids if token_ids[layer] is None else torch.cat([token_ids[layer], new_ids], dim=2)
            length = all_keys.shape[2]
            assert ids.shape[2] == length
            result = cache.compress(layer, scale, queries=queries if policy.needs_queries else None,
                                    raw_queries=raw if policy.needs_raw_queries else None)
            where = f"{policy} scale {scale} layer {layer} (length {length})"
            idx = result.indices
            capacity = plan.capacity(scale, layer)
            assert result.capacity == capacity, where
            assert idx.dtype == torch.long and idx.shape[:2] == (rows, heads), where
            kept = idx.shape[2]
            if capacity is None or length <= capacity:
                assert torch.equal(idx, torch.arange(length).expand(rows, heads, length)), f"evicted below capacity: {where}"
            else:
                assert kept == capacity, f"kept {kept} != capacity {capacity}: {where}"
                assert int(idx.min()) >= 0 and int(idx.max()) < length, where
                assert bool((idx[..., 1:] > idx[..., :-1]).all()), f"indices not strictly ascending: {where}"
                if promise is not None:
                    promised = torch.tensor(promise(policy, length, capacity, n, schedule.shape(scale)), dtype=torch.long)
                    assert promised.numel() <= kept, where
                    present = (idx.unsqueeze(-1) == promised).any(dim=2)  # (R, H, n_promised)
                    assert bool(present.all()), f"promised positions {promised.tolist()} not all kept: {where}"
            token_ids[layer] = torch.gather(ids, 2, idx)
            # The cache holds exactly the generated tensors of the kept tokens, bit for bit.
            all_orig_k = torch.cat(originals[layer][0], dim=2)
            all_orig_v = torch.cat(originals[layer][1], dim=2)
            expected_k = kvpolicy.gather_tokens(all_orig_k, token_ids[layer])
            expected_v = kvpolicy.gather_tokens(all_orig_v, token_ids[layer])
            assert torch.equal(cache.keys[layer], expected_k) and torch.equal(cache.values[layer], expected_v), where
            assert cache.keys[layer].shape[2] == kept and cache.keys[layer].is_contiguous(), where
            trace.indices[(scale, layer)] = idx.clone()
            trace.lengths[(scale, layer)] = length
    report = cache.report()
    trace.report = report
    for scale in range(schedule.num_scales):
        assert report.capacities[scale] == list(plan.capacities[scale])
        assert report.kept_lengths[scale] == [trace.indices[(scale, l)].shape[2] for l in range(num_layers)]
    return trace


def check_plan(policy: kvpolicy.Policy, schedule: ScaleSchedule, num_layers: int) -> None:
    """Mean capacity over layers <= budget tokens (+1 for rounding) at every compressed scale."""
    plan = policy.plan(schedule, num_layers)
    budget = policy.budget_tokens(schedule) if policy.budget is not None or policy.requires_budget else None
    assert plan.num_scales == schedule.num_scales and plan.num_layers == num_layers
    for scale in plan.compressed_scales():
        mean = plan.mean_capacity(scale)
        assert mean is not None, f"{policy}: scale {scale} evicts but some layer is unlimited"
        assert budget is not None and mean <= budget + 1, f"{policy}: scale {scale} mean capacity {mean} > {budget} + 1"


def budget_cases(schedule: ScaleSchedule) -> list:
    return ["10%", "25%", Tokens(12), Tokens(schedule.total)]


POLICIES = registered_policies()
CASES = [(name, sched, budget) for name in POLICIES for sched in SCHEDULES
         for budget in budget_cases(SCHEDULES[sched])]


def matrix_case(name: str, schedule: ScaleSchedule, budget, seed: int = 0) -> None:
    """One matrix cell: plan invariants, a checked generation, determinism and no stale state."""
    policy = make_policy(name, budget)
    check_plan(policy, schedule, 3)
    inputs = make_inputs(schedule, num_layers=3, rows=4, seed=seed)
    cache = KVCache(3, schedule, policy)
    first = check_generation(policy, inputs, cache)
    # Determinism and no stale state: the same cache after reset() and a brand-new cache (and a
    # freshly built policy) select exactly the same tokens for the same inputs.
    cache.reset()
    again = check_generation(policy, inputs, cache)
    fresh = check_generation(make_policy(name, budget), inputs)
    assert first.same_selection(again) and first.same_selection(fresh)
    assert first.report.kv_bytes == again.report.kv_bytes == fresh.report.kv_bytes


def full_budget_case(name: str, schedule: ScaleSchedule = INFINITY_7) -> None:
    """A budget covering every token behaves exactly like the full cache."""
    inputs = make_inputs(schedule, num_layers=2, rows=2, seed=3)
    full = check_generation(kvpolicy.get_policy("full"), inputs)
    for budget in (Tokens(schedule.total), Tokens(schedule.total + 17), Tokens(10**6)):
        trace = check_generation(make_policy(name, budget), inputs)
        assert trace.same_selection(full), f"{name} at {budget} differs from full"
        assert trace.report.kv_bytes == full.report.kv_bytes
        assert trace.report.peak_kv_bytes == full.report.peak_kv_bytes


def rows_alone_case(name: str, schedule: ScaleSchedule = VAR_256) -> None:
    """Each batch row is compressed exactly as if it were alone."""
    inputs = make_inputs(schedule, num_layers=2, rows=3, seed=11)
    together = check_generation(make_policy(name, "10%"), inputs)
    for r in range(inputs.rows):
        alone = check_generation(make_policy(name, "10%"), inputs.row(r))
        for key, idx in together.indices.items():
            assert torch.equal(idx[r:r + 1], alone.indices[key]), f"{name}: row {r} differs at (scale, layer) {key}"


def config_case(name: str) -> None:
    """to_config / from_config round-trip to an equal policy."""
    policy = make_policy(name, "10%")
    config = policy.to_config()
    assert config["name"] == name
    rebuilt = kvpolicy.Policy.from_config(config)
    assert type(rebuilt) is type(policy) and rebuilt == policy
    assert rebuilt.to_config() == config
    if kvpolicy.policy_class(name).requires_budget:
        assert kvpolicy.Policy.from_config(make_policy(name, Tokens(77)).to_config()).budget == Tokens(77)


@pytest.mark.parametrize("name,schedule_name,budget", CASES, ids=lambda v: str(v))
def test_matrix(name, schedule_name, budget):
    matrix_case(name, SCHEDULES[schedule_name], budget, seed=zlib.crc32(f"{name}/{schedule_name}".encode()) % 1000)


@pytest.mark.parametrize("name", POLICIES)
def test_budget_at_least_full_length_is_full(name):
    full_budget_case(name)


@pytest.mark.parametrize("name", POLICIES)
def test_each_row_compressed_as_if_alone(name):
    rows_alone_case(name)


@pytest.mark.parametrize("name", POLICIES)
def test_config_round_trip(name):
    config_case(name)


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
    plain = check_generation(policy, make_inputs(INFINITY_7, rows=2, seed=5))
    grouped = check_generation(policy, make_inputs(INFINITY_7, rows=2, seed=5, query_group=3))
    assert grouped.same_selection(plain)
    assert any(idx.shape[2] < plain.lengths[key] for key, idx in plain.indices.items())  # it evicted


def test_matrix_covers_the_issue_baselines():
    # The issue-2 baselines must be registered and therefore in the matrix (scalekv/uniform join
    # automatically once registered).
    assert {"full", "sliding_window", "streamingllm", "h2o", "snapkv", "pyramidkv"} <= set(POLICIES)
    assert len(CASES) == len(POLICIES) * len(SCHEDULES) * 4
