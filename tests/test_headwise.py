"""Head-wise budgets and composition: plans with per-head capacities, selections with per-(row,
head) lengths, physically ragged results, the head-adaptive wrapper, and every selector applied
per head exactly as if that head were alone."""

from __future__ import annotations

import itertools

import attrs
import pytest
import torch
import torch.nn.functional as F

import kvpolicy
from kvpolicy import (CapacityPlan, KVCache, Policy, Ragged, ScaleSchedule, ScoredPolicy, Selection, Tokens, compose,
                      compress, scoring)
from policies.common import (HeadWeightsAllocation, HeavyHitterSelector, PatchWindowSelector, RecentWindowSelector,
                             SinksRecentSelector, SlidingWindowSelector, UniformAllocation)

SCHEDULE = ScaleSchedule([1, 2, 3, 4, 6, 8])  # cumulative 1, 5, 14, 30, 66, 130
_COUNTER = itertools.count()


def _compose(*parts, **options):
    """A freshly registered composed policy (unique test name) built with ``options``."""
    name = f"test_headwise_{next(_COUNTER)}"
    compose(name, *parts)
    return kvpolicy.get_policy(name, **options)


def _inputs(schedule, *, rows=2, heads=3, dim=8, layers=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for scale in range(schedule.num_scales):
        n = schedule.tokens(scale)
        for layer in range(layers):
            keys = F.normalize(torch.randn(rows, heads, n, dim, generator=g), dim=-1).to(dtype)
            values = torch.randn(rows, heads, n, dim, generator=g).to(dtype)
            queries = (5 * F.normalize(torch.randn(rows, heads, n, dim, generator=g), dim=-1)).to(dtype)
            raw = torch.randn(rows, heads, n, dim, generator=g).to(dtype)
            out[(scale, layer)] = (keys, values, queries, raw)
    return out


def _run(policy, inputs, schedule, layers=2, head=None):
    """Drive a cache through the schedule; returns the cache. ``head`` restricts the inputs to one head."""
    cache = KVCache(layers, schedule, policy)
    for scale in range(schedule.num_scales):
        for layer in range(layers):
            k, v, q, raw = (t if head is None else t[:, head:head + 1] for t in inputs[(scale, layer)])
            cache.append(layer, scale, k, v)
            cache.compress(layer, scale, queries=q if policy.needs_queries else None,
                           raw_queries=raw if policy.needs_raw_queries else None)
    return cache


# -- plans ---------------------------------------------------------------------------------------

def test_plan_head_capacities_validate_print_and_round_trip():
    caps = [[None, None], [5, 4], [5, 4]]
    heads = [[None, None], [(2, 8, 5), None], [(0, 10, 5), (4, 4, 4)]]
    plan = CapacityPlan(capacities=caps, head_capacities=heads, budget_tokens=5, cumulative=(1, 5, 14))
    assert plan.head_wise and plan.num_heads == 3
    assert plan.head_capacity(1, 0) == (2, 8, 5) and plan.head_capacity(1, 1) is None
    assert CapacityPlan.from_json(plan.to_json()) == plan
    assert plan.head_kept_lengths() == [[(1, 1, 1), (1, 1, 1)], [(2, 5, 5), (4, 4, 4)], [(0, 10, 5), (4, 4, 4)]]
    assert plan.kept_lengths() == [[1, 1], [5, 4], [10, 4]]
    assert plan.compressed_scales() == [1, 2]
    assert "head-wise in 1 layer" in str(plan)
    table = plan.head_table()
    assert "    1     0      5.0  2 8 5  (2 5 5)" in table and "    2     1      4.0  4 4 4" in table
    assert "head_capacities" not in CapacityPlan(capacities=caps).to_dict()  # layer-wise JSON unchanged
    with pytest.raises(ValueError, match=r"sum to 16, more than 3 heads x the layer's average budget 5 = 15"):
        CapacityPlan(capacities=caps, head_capacities=[[None, None], [(2, 9, 5), None], [None, None]])
    with pytest.raises(ValueError, match="needs the layer's per-head average budget"):
        CapacityPlan(capacities=caps, head_capacities=[[(1, 1, 1), None], [None, None], [None, None]])
    with pytest.raises(ValueError, match=r"whole number >= 0"):
        CapacityPlan(capacities=caps, head_capacities=[[None, None], [(-1, 8, 5), None], [None, None]])
    with pytest.raises(ValueError, match=r"different numbers of heads \[2, 3\]"):
        CapacityPlan(capacities=caps, head_capacities=[[None, None], [(2, 8, 5), (4, 4)], [None, None]])


def test_head_weights_allocation_splits_every_capacity_exactly():
    policy = _compose(HeadWeightsAllocation, UniformAllocation, RecentWindowSelector, budget=10,
                      head_weights=[1, 2, 3], window_size=2, kernel_size=1)
    plan = policy.plan(SCHEDULE, 2)
    assert plan.capacities[-1] == (10, 10)
    assert plan.head_capacity(5, 1) == (5, 10, 15)
    with pytest.raises(ValueError, match=r"capacity 1 at scale 1, layer 0, head 0 is smaller than that scale's observation window"):
        _compose(HeadWeightsAllocation, UniformAllocation, RecentWindowSelector, budget=4, head_weights=[1, 10, 1],
                 window_size=2).plan(SCHEDULE, 2)
    with pytest.raises(ValueError, match=r"needs head_weights"):
        _compose(HeadWeightsAllocation, UniformAllocation, RecentWindowSelector, budget=4)


# -- compress: lengths, checks, ragged results --------------------------------------------------

@attrs.define(kw_only=True)
class _Fixed(Policy):
    """Returns whatever the test sets (a policy written against the head-wise API)."""

    indices: object = None
    lengths: object = None

    def select(self, keys, values, ctx):
        return Selection(self.indices, ctx.state, self.lengths)


def _fixed_policy(adaptive=False, **kw):
    cls = type("FixedAdaptive" if adaptive else "FixedPerHead", (_Fixed,), {"head_adaptive": adaptive})
    cls = attrs.define(kw_only=True)(cls)
    cls.name = cls.__name__
    return cls(budget=4, **kw)


def test_compress_keeps_per_head_lengths_physically():
    keys, values = torch.randn(2, 3, 14, 4, dtype=torch.float64), torch.randn(2, 3, 14, 4, dtype=torch.float32)  # V may differ in dtype only
    indices = torch.tensor([[[0, 5, 13, 0], [1, 2, 3, 4], [7, 0, 0, 0]], [[9, 10, 0, 0], [0, 0, 0, 0], [2, 4, 6, 8]]])
    lengths = torch.tensor([[3, 4, 1], [2, 0, 4]])
    out = compress(_fixed_policy(indices=indices, lengths=lengths), keys, values, schedule=ScaleSchedule([1, 2, 3]),
                   scale=2, layer=0, num_layers=1)
    assert isinstance(out.keys, Ragged) and out.ragged and torch.equal(out.lengths, lengths)
    for b, h in itertools.product(range(2), range(3)):
        kept = indices[b, h, :lengths[b, h]]
        assert torch.equal(out.keys.segment(b, h), keys[b, h, kept]) and torch.equal(out.values.segment(b, h), values[b, h, kept])
    # Counted bytes are the kept tokens only, and on CPU the storage holds exactly that.
    assert out.keys.nbytes == int(lengths.sum()) * 4 * 8 == out.keys.data.untyped_storage().nbytes()
    assert out.values.nbytes == int(lengths.sum()) * 4 * 4 == out.values.data.untyped_storage().nbytes()


def test_compress_checks_per_head_lengths_and_adaptive_totals():
    keys = torch.randn(1, 2, 14, 4)
    kw = dict(schedule=ScaleSchedule([1, 2, 3]), scale=2, layer=0, num_layers=1)
    idx = torch.arange(6).expand(1, 2, 6).clone()
    with pytest.raises(RuntimeError, match=r"kept 6 tokens in \(row 0, head 0\) over its capacity 4"):
        compress(_fixed_policy(indices=idx, lengths=torch.tensor([[6, 2]])), keys, keys, **kw)
    # A head-adaptive policy may give one head 6 when the row's total stays within H x capacity = 8.
    out = compress(_fixed_policy(adaptive=True, indices=idx, lengths=torch.tensor([[6, 2]])), keys, keys, **kw)
    assert out.lengths.tolist() == [[6, 2]]
    with pytest.raises(RuntimeError, match=r"kept 9 tokens in row 0 over H x capacity = 2 x 4"):
        compress(_fixed_policy(adaptive=True, indices=idx, lengths=torch.tensor([[6, 3]])), keys, keys, **kw)
    bad = idx.clone()
    bad[0, 0, 1] = 0
    with pytest.raises(RuntimeError, match="not unique, ascending and in range"):
        compress(_fixed_policy(adaptive=True, indices=bad, lengths=torch.tensor([[3, 2]])), keys, keys, **kw)
    # Padding beyond lengths is ignored (here: descending garbage).
    pad = torch.tensor([[[0, 1, 9, 3, 2, 1], [4, 5, 0, 0, 0, 0]]])
    out = compress(_fixed_policy(indices=pad, lengths=torch.tensor([[3, 2]])), keys, keys, **kw)
    assert out.keys.host_lengths() == [[3, 2]]
    with pytest.raises(RuntimeError, match=r"need a \(B=1, H=2\) int64 tensor"):
        compress(_fixed_policy(indices=pad, lengths=torch.tensor([3, 2])), keys, keys, **kw)


def test_equal_lengths_stay_dense():
    keys = torch.randn(1, 2, 14, 4)
    idx = torch.tensor([[[0, 3, 5, 0], [1, 2, 13, 0]]])
    out = compress(_fixed_policy(indices=idx, lengths=torch.tensor([[3, 3]])), keys, keys,
                   schedule=ScaleSchedule([1, 2, 3]), scale=2, layer=0, num_layers=1)
    assert not out.ragged and torch.equal(out.keys, kvpolicy.gather_tokens(keys, idx[..., :3]))


# -- every selector per head, exactly as if the head were alone ---------------------------------

SELECTORS = [
    (RecentWindowSelector, "snapkv", {"window_size": 3, "kernel_size": 3, "pooling": "avg"}),
    (PatchWindowSelector, "uniform", {"window_size": 4, "kernel_size": 3}),
    (PatchWindowSelector, "uniform", {"window_size": 4, "kernel_size": 3, "mode": "reference", "pooling": "avg"}),
    (HeavyHitterSelector, "h2o", {"heavy_ratio": 0.5}),
    (SinksRecentSelector, "streamingllm", {"num_sinks": 2}),
    (SlidingWindowSelector, "sliding_window", {}),
]


@pytest.mark.parametrize("selector, alone_name, options", SELECTORS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_each_head_selects_as_if_alone(selector, alone_name, options):
    """Head h of a head-wise run keeps exactly the tokens the layer-wise policy keeps on head h
    alone with budget = h's capacity (ragged history, padding, state and pooling included)."""
    weights = [1, 2, 3]
    policy = _compose(HeadWeightsAllocation, UniformAllocation, selector, budget=12, head_weights=weights, **options)
    caps = policy.plan(SCHEDULE, 2).head_capacity(5, 0)
    assert caps == (6, 12, 18)
    inputs = _inputs(SCHEDULE, dtype=torch.float64)
    together = _run(policy, inputs, SCHEDULE)
    assert any(isinstance(k, Ragged) for k in together.keys)
    for h, cap in enumerate(caps):
        alone = _run(kvpolicy.get_policy(alone_name, budget=cap, **options), inputs, SCHEDULE, head=h)
        for layer in range(2):
            held = together.keys[layer]
            for b in range(2):
                mine = held.segment(b, h) if isinstance(held, Ragged) else held[b, h]
                assert torch.equal(mine, alone.keys[layer][b, 0]), f"head {h}, row {b}, layer {layer}"


# -- the head-adaptive wrapper (AdaKV-style) over any scored selector ----------------------------

@attrs.define(kw_only=True, slots=False)
class ScoreMassHeads(ScoredPolicy):
    """Redistributes a layer's H x capacity across heads: every head keeps its forced positions,
    the rest of the row's budget goes to the best scores over all heads jointly (AdaKV's idea)."""

    head_adaptive = True

    def head_budgets(self, scores, forced, ctx):
        batch, heads, length = scores.shape
        valid = ctx.valid_mask()
        forced_mask = torch.zeros(length, dtype=torch.bool, device=scores.device)
        forced_mask[forced] = True
        forced_mask = forced_mask.expand(batch, heads, length) & (valid if valid is not None else True)
        free = scores.float().masked_fill(forced_mask, float("-inf"))
        if valid is not None:
            free = free.masked_fill(~valid, float("-inf"))
        n_forced = forced_mask.sum(-1)
        extra = heads * ctx.capacity - int(n_forced.sum(-1).max())
        top = free.reshape(batch, heads * length).topk(extra, dim=-1).indices // length  # the head of each pick
        return n_forced + F.one_hot(top, heads).sum(1)


@pytest.mark.parametrize("selector, options", [(RecentWindowSelector, {"window_size": 3, "kernel_size": 3}),
                                               (PatchWindowSelector, {"window_size": 4, "kernel_size": 3})])
def test_head_adaptive_wrapper_over_a_scored_selector(selector, options):
    policy = _compose(ScoreMassHeads, UniformAllocation, selector, budget=10, **options)
    assert policy.head_adaptive and not policy.plan(SCHEDULE, 2).head_wise
    inputs = _inputs(SCHEDULE, seed=4)
    cache = KVCache(2, SCHEDULE, policy)
    seen_ragged = False
    for scale in range(SCHEDULE.num_scales):
        for layer in range(2):
            k, v, q, raw = inputs[(scale, layer)]
            cache.append(layer, scale, k, v)
            out = cache.compress(layer, scale, queries=q, raw_queries=raw)
            lengths = out.lengths
            if SCHEDULE.cumulative[scale] > 10:
                assert (lengths.sum(-1) == 3 * 10).all()  # the row's whole budget, redistributed
                seen_ragged |= out.ragged and len(set(lengths.flatten().tolist())) > 1
    assert seen_ragged
    report = cache.report()
    assert report.kv_bytes[-1] == 2 * 2 * (2 * 3 * 10) * 8 * 4  # layers x (K, V) x tokens x D x float32


def test_scalekv_allocation_with_snapkv_selection_is_one_line():
    policy = kvpolicy.get_policy("scalekv_snapkv", budget=20, drafters=[0], window_size=3, kernel_size=3)
    assert type(policy).__name__ == "ScaleKVSnapKV" and policy.needs_queries
    plan = policy.plan(SCHEDULE, 2)
    scalekv = kvpolicy.get_policy("scalekv", budget=20, drafters=[0], window_size=4, kernel_size=3)
    assert plan.capacities == scalekv.plan(SCHEDULE, 2).capacities and plan.roles is not None
    snap = kvpolicy.get_policy("snapkv", budget=20, window_size=3, kernel_size=3)
    inputs = _inputs(SCHEDULE, heads=2, seed=2)
    # Selection is SnapKV's: with the same capacity (scale 4's refiner and a layer-wise snapkv run on
    # refiner-capacity inputs) both keep the same tokens; checked per call on the raw selector.
    keys, values, queries, _ = inputs[(4, 1)]
    full = torch.cat([inputs[(s, 1)][0] for s in range(5)], dim=2)
    vals = torch.cat([inputs[(s, 1)][1] for s in range(5)], dim=2)
    cap = plan.capacity(4, 1)
    ours = compress(policy, full, vals, schedule=SCHEDULE, scale=4, layer=1, num_layers=2, queries=queries)
    theirs = compress(kvpolicy.get_policy("snapkv", budget=cap, window_size=3, kernel_size=3), full, vals,
                      schedule=SCHEDULE, scale=4, layer=1, num_layers=2, queries=queries)
    assert ours.capacity == cap and torch.equal(ours.indices, theirs.indices)
    assert snap.to_config()["window_size"] == policy.to_config()["window_size"]
    assert kvpolicy.Policy.from_config(policy.to_config()) == policy


# -- planning: simulate and `kvpolicy plan --per-head` ----------------------------------------------

def test_simulate_probes_head_wise_policies_exactly():
    policy = _compose(HeadWeightsAllocation, UniformAllocation, RecentWindowSelector, budget=20,
                      head_weights=[1, 1, 2, 4], window_size=3, kernel_size=3)
    kw = dict(schedule=SCHEDULE, num_layers=2, num_heads=4, head_dim=8, batch=3, dtype=torch.float32)
    probe = kvpolicy.simulate(policy, materialize=False, **kw)
    full = kvpolicy.simulate(policy, materialize=True, **kw)
    assert probe.extra["probe"] == "1 row(s) x 4 head(s)" and full.extra["materialized"] and "probe" not in full.extra
    assert probe.kv_bytes == full.kv_bytes and probe.peak_kv_bytes == full.peak_kv_bytes
    assert probe.head_kept_lengths == full.head_kept_lengths
    plan = policy.plan(SCHEDULE, 2)
    assert [list(r) for r in probe.head_kept_lengths] == [list(r) for r in plan.head_kept_lengths()]
    assert "kept per head" in probe.table(per_head=True)
    with pytest.raises(ValueError, match=r"plans 4 heads per layer but the model has num_heads=2"):
        kvpolicy.simulate(policy, **{**kw, "num_heads": 2})


PLUGIN = '''
from kvpolicy import compose
from policies.common import HeadWeightsAllocation, RecentWindowSelector, UniformAllocation

compose("plugin_headwise_snapkv", HeadWeightsAllocation, UniformAllocation, RecentWindowSelector,
        description="SnapKV with fixed per-head weights")
'''


def test_plan_command_prints_per_head_lengths(tmp_path, capsys):
    from benchmarks.cli import main

    plugin = tmp_path / "headwise_plugin.py"
    plugin.write_text(PLUGIN)
    weights = ",".join(["1", "3"] * 8)  # var-d16: 16 heads
    assert main(["plan", "--plugin", str(plugin), "--model", "var-d16", "--policy", "plugin_headwise_snapkv",
                 "--budget", "64", "--option", f"plugin_headwise_snapkv.head_weights=[{weights}]",
                 "--option", "plugin_headwise_snapkv.window_size=8", "--per-head"]) == 0
    out = capsys.readouterr().out
    assert "kept tokens per head after each scale (mean over layers; 16 heads):" in out
    assert "    9    32.0   96.0" in out  # the last scales: heads keep 32 and 96 (mean 64)
    assert "per-head capacities of the plan:" in out


def test_keep_all_on_a_ragged_cache_names_the_real_positions():
    lengths = torch.tensor([[4, 5]])
    keys = Ragged.from_padded(torch.randn(1, 2, 5, 4), lengths)
    policy = attrs.evolve(_fixed_policy(), budget=10)  # every head fits: nothing is evicted
    out = compress(policy, keys, keys, schedule=ScaleSchedule([1, 1, 2]), scale=2, layer=0, num_layers=1)
    assert out.keys is keys and out.lengths.tolist() == [[4, 5]]
    assert out.indices[0, 0, :4].tolist() == [1, 2, 3, 4] and out.indices[0, 1].tolist() == [0, 1, 2, 3, 4]
