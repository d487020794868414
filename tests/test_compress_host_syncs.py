"""A compress call reads the device at most once (issue 12: "no per-call host syncs beyond one").

On a GPU every read of a device value into Python (``bool(t)``, ``t.item()``, ``int(t)``,
``t.tolist()``, ``t.numpy()``, a copy to the CPU) waits for all queued work, and so does every
operation whose output size depends on the data (``nonzero``, boolean-mask indexing, ``unique``).
These tests run on CPU, so they count those operations instead of timing anything: every aten op
of the call passes through a ``TorchDispatchMode`` (``_local_scalar_dense`` is what ``bool``,
``int``, ``float`` and ``item`` call; the data-dependent ops are listed), and the Python-level
reads that bypass the dispatcher (``tolist``, ``numpy``, ``__array__``) are patched with counters.
A sync added anywhere in the call (core, selector, scoring helpers) is counted.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvpolicy import ScaleSchedule, compress, get_policy
from kvpolicy.ragged import Ragged

SCHEDULE = ScaleSchedule([1, 2, 4, 6, 8, 12])  # cumulative 1, 5, 21, 57, 121, 265

# Ops that make the host wait for the device: a scalar read, or an output whose size is data-dependent.
_SYNCING_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique",
                "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::unique_dim_consecutive",
                "aten::equal", "aten::is_nonzero", "aten::repeat_interleave"}


class _CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in _SYNCING_OPS and not (name == "aten::repeat_interleave" and kwargs.get("output_size") is not None):
            self.syncs.append(str(func))
        elif name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self.syncs.append(f"{func} with a bool mask")
        elif name in ("aten::_to_copy", "aten::copy_") and _leaves_device(func, args, kwargs):
            self.syncs.append(f"{func} to the host")
        return func(*args, **kwargs)


def _leaves_device(func, args, kwargs) -> bool:
    source = args[1] if func._schema.name == "aten::copy_" else args[0]
    target = args[0].device if func._schema.name == "aten::copy_" else kwargs.get("device", source.device)
    return source.device.type != "cpu" and torch.device(target).type == "cpu"


@pytest.fixture
def count_syncs(monkeypatch):
    """Call ``count_syncs(fn)``: fn's result and the list of its host syncs."""
    def run(fn):
        mode = _CountSyncs()
        for name in ("tolist", "numpy", "__array__"):
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, _name=name, **kwargs):
                mode.syncs.append(f"Tensor.{_name}")
                return _original(self, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)
        try:
            with mode:
                result = fn()
        finally:
            monkeypatch.undo()
        return result, mode.syncs
    return run


def test_the_counter_sees_every_kind_of_sync(count_syncs):
    """Each way of reading the device counts once (else the tests below could not fail)."""
    t = torch.arange(6.0)
    for read in (lambda: bool(t[0] > 1), lambda: t[1].item(), lambda: int(t[2]), lambda: float(t[3]),
                 lambda: t.tolist(), lambda: t.numpy(), lambda: t.nonzero(), lambda: t[t > 2],
                 lambda: t.unique(), lambda: torch.equal(t, t)):
        assert len(count_syncs(read)[1]) == 1
    assert count_syncs(lambda: torch.nonzero_static(t, size=6))[1] == []
    assert count_syncs(lambda: (t > 2).all() & (t < 9).all())[1] == []


def _inputs(batch=2, heads=4, dim=8, scale=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    length, n = SCHEDULE.cumulative_length(scale), SCHEDULE.tokens(scale)
    keys = torch.randn(batch, heads, length, dim, generator=g).to(dtype)
    values = torch.randn(batch, heads, length, dim, generator=g).to(dtype)
    queries = torch.randn(batch, heads, n, dim, generator=g).to(dtype)
    return keys, values, queries


@pytest.mark.parametrize("mode", ["reference", "attention"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("layer", [0, 1])  # keeps 253 of 265 (indices ordered by a mask), 47 (by a sort)
def test_scalekv_dense_compress_reads_the_device_once(count_syncs, mode, dtype, in_place, layer):
    policy = get_policy("scalekv", mode=mode, budget=150, drafters=[0])
    keys, values, queries = _inputs(dtype=dtype)
    expected = compress(policy, keys.clone(), values.clone(), schedule=SCHEDULE, scale=5, layer=layer, num_layers=2,
                        **{"raw_queries" if mode == "reference" else "queries": queries})
    assert expected.indices.shape[2] < keys.shape[2]  # it does evict
    result, syncs = count_syncs(lambda: compress(
        policy, keys, values, schedule=SCHEDULE, scale=5, layer=layer, num_layers=2, in_place=in_place,
        **{"raw_queries" if mode == "reference" else "queries": queries}))
    assert len(syncs) <= 1, syncs
    assert torch.equal(result.indices, expected.indices) and torch.equal(result.keys, expected.keys)


def test_a_failing_check_still_names_its_cause():
    """The one read is the common path's: a NaN key still raises the finiteness error (reading
    more to say so), and the top-k fallback still applies (no window token kept twice)."""
    policy = get_policy("scalekv", mode="reference", budget=40, drafters=[0])
    keys, values, queries = _inputs()
    keys[0, 1, 7, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values"):
        compress(policy, keys, values, schedule=SCHEDULE, scale=5, layer=0, num_layers=2, raw_queries=queries)


def test_ragged_compress_path_reads_lengths_and_checks_once(count_syncs):
    """A selection with per-(row, head) lengths: the lengths and all checks come back in one read."""
    from kvpolicy import Policy, Selection, register_policy  # noqa: F401 (a local policy below)

    class Ragged2(Policy):
        name = "ragged-sync-test"

        def plan(self, schedule, num_layers):
            return get_policy("scalekv", budget=40, drafters=[0]).plan(schedule, num_layers)

        def select(self, keys, values, ctx):
            batch, heads, length, _ = keys.shape
            indices = torch.arange(length - 30, length).expand(batch, heads, 30).clone()
            lengths = torch.full((batch, heads), 30, dtype=torch.long)
            lengths[0, 0] = 20
            indices[0, 0, 20:] = 0
            indices[0, 0, :20] = torch.arange(length - 20, length)
            return Selection(indices, ctx.state, lengths)

    keys, values, _ = _inputs()
    result, syncs = count_syncs(lambda: compress(Ragged2(), keys, values, schedule=SCHEDULE, scale=5, layer=0,
                                                 num_layers=2))
    assert isinstance(result.keys, Ragged)
    assert len(syncs) <= 1, syncs


@pytest.mark.parametrize("mode", ["reference", "attention"])
def test_the_policys_deferred_fallback_still_applies(mode):
    """Where the top-k reaches into −∞/NaN scores, ``redo`` (read in compress's one check) gives
    ``topk_with_forced``'s unique tokens, as the selector did when it read the flag itself: reference
    mode masks the window before average pooling, which spreads its −∞ until fewer finite candidates
    remain than slots; in attention mode finite keys whose logits overflow give NaN probabilities."""
    from kvpolicy.policy import CompressionContext
    from kvpolicy.scoring import topk_with_forced
    from policies.common.patch_window import observation_window_scores

    policy = get_policy("scalekv", mode=mode, budget=150, drafters=[0], pooling="avg")
    keys, values, queries = _inputs()
    if mode == "attention":  # probabilities are finite unless the logits overflow: finite keys, NaN scores
        keys = keys.clamp(-1, 1) * 3e38
    kwargs = {"raw_queries" if mode == "reference" else "queries": queries}
    capacity = policy.plan(SCHEDULE, 2).capacity(5, 0)
    ctx = CompressionContext(schedule=SCHEDULE, scale=5, layer=0, num_layers=2, capacity=capacity,
                             length=keys.shape[2], state=None, **kwargs)
    pooled, window = observation_window_scores(keys, ctx, raw=mode == "reference", pooling="avg")
    result = compress(policy, keys, values, schedule=SCHEDULE, scale=5, layer=0, num_layers=2, **kwargs)
    assert torch.equal(result.indices, topk_with_forced(pooled, window, capacity))


# -- head-wise paths: per-head capacities, head-adaptive (AdaKV) budgets, ragged caches ------------

def _head_wise_policies():
    """name -> a policy whose selections have per-(row, head) lengths (built lazily: compose registers)."""
    from policies.adakv import AdaptiveHeads
    from policies.common import RecentWindowSelector, UniformAllocation
    from policies.common.allocations import HeadWeightsAllocation
    from policies.common.patch_window import PatchWindowSelector
    from policies.common.selectors import HeavyHitterSelector, SinksRecentSelector, SlidingWindowSelector

    def weighted(selector, **options):
        name = f"syncs_{selector.__name__.lower()}"
        if name not in kvpolicy.list_policies():
            kvpolicy.compose(name, HeadWeightsAllocation, UniformAllocation, selector)
        return get_policy(name, budget=40, head_weights=[1, 2, 3, 2], **options)

    def adakv_patch():
        if "syncs_adakv_patch" not in kvpolicy.list_policies():
            kvpolicy.compose("syncs_adakv_patch", AdaptiveHeads, UniformAllocation, PatchWindowSelector)
        return get_policy("syncs_adakv_patch", budget=40, mode="reference", window_size=4)

    # Built (and composed: registered) only when a test runs, never at collection (the policy matrix
    # parametrises over every registered name).
    return {
        "adakv": lambda: get_policy("adakv", budget=40, window_size=4),
        "adakv over scalekv's reference selector": adakv_patch,
        "snapkv's selector, head weights": lambda: weighted(RecentWindowSelector, window_size=4),
        "sliding window, head weights": lambda: weighted(SlidingWindowSelector),
        "sinks + recent, head weights": lambda: weighted(SinksRecentSelector),
        "h2o, head weights": lambda: weighted(HeavyHitterSelector),
        "scalekv reference, head weights": lambda: weighted(PatchWindowSelector, mode="reference", window_size=4),
        "scalekv attention, head weights": lambda: weighted(PatchWindowSelector, mode="attention", window_size=4),
        "head_aware": lambda: get_policy("head_aware", budget=40, window_size=4,
                                         kinds=[["structural", "contextual", "contextual", "structural"]] * 2),
        "heatkv": lambda: get_policy("heatkv", budget=40, stand_in_heads=4),
    }


import kvpolicy  # noqa: E402  (used by the helpers above)


def _cache_until(policy, last_scale, seed=0):
    """A KVCache driven through scales 0..last_scale-1 and appended at ``last_scale``; the inputs of
    each scale's compress call."""
    g = torch.Generator().manual_seed(seed)
    cache = kvpolicy.KVCache(2, SCHEDULE, policy)
    for scale in range(last_scale + 1):
        n = SCHEDULE.tokens(scale)
        for layer in range(2):
            keys, values, queries = (torch.randn(2, 4, n, 8, generator=g) for _ in range(3))
            cache.append(layer, scale, keys, values)
            if scale < last_scale:
                cache.compress(layer, scale, queries=queries, raw_queries=queries)
    return cache, queries


@pytest.mark.parametrize("name", list(_head_wise_policies()))
def test_head_wise_compress_reads_the_device_once(count_syncs, name):
    """Per-(row, head) selections (head-wise plans, AdaKV's data-dependent budgets), from a dense and
    from a ragged cache: one read per call (the lengths, the checks and the forced-count checks
    together; the kept indices' width is learnt in it). Before: 3 (head-wise plans: the forced
    check and the longest length in topk_per_head, then compress), 4 for adakv (+ its most forced
    positions), heatkv on a ragged cache 2 (its lengths check), head_aware 1 more (any contextual)."""
    policy = _head_wise_policies()[name]()
    for scale in (4, 5):  # the first compress that evicts reads a dense cache, the next one a ragged one
        cache, queries = _cache_until(policy, scale)
        layer = cache.layers[1]
        keys, values, state = layer.keys, layer.values, layer.state
        expected = compress(policy, keys, values, schedule=SCHEDULE, scale=scale, layer=1, num_layers=2,
                            queries=queries, raw_queries=queries, state=state)
        result, syncs = count_syncs(lambda: compress(policy, keys, values, schedule=SCHEDULE, scale=scale, layer=1,
                                                     num_layers=2, queries=queries, raw_queries=queries,
                                                     state=state))
        assert len(syncs) <= 1, (scale, syncs)
        assert torch.equal(result.indices, expected.indices) and torch.equal(result.lengths, expected.lengths)
    assert isinstance(keys, Ragged) or name == "heatkv" and scale == 5  # the second call did read a ragged cache


def _reading_adakv(policy, keys, ctx):
    """AdaKV's choice the way it was made before compress read once: the budgets and the per-head
    top-k each read the device (adakv_head_budgets, scoring.topk_per_head)."""
    from kvpolicy.scoring import topk_per_head
    from policies.adakv import adakv_head_budgets

    forced = policy.forced_positions(ctx)
    scores = policy.score(keys, ctx)
    budgets = adakv_head_budgets(scores, forced, ctx.capacity, policy.floor_alpha, ctx.valid_mask())
    return topk_per_head(scores, budgets, forced=forced, valid=ctx.valid_mask())


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("floor_alpha", [0.0, 0.2, 1.0])
def test_adakv_one_read_keeps_the_reading_choice(pooling, floor_alpha):
    """AdaKV's one-read path (the most forced positions taken as len(forced), checked on the device)
    keeps exactly what the reading budgets and top-k keep, ties included (rounded keys and queries
    make max-pooling plateaus), from a dense and from a ragged cache."""
    from kvpolicy.policy import CompressionContext

    policy = get_policy("adakv", budget=40, window_size=4, pooling=pooling, floor_alpha=floor_alpha)
    for scale in (4, 5):
        cache, queries = _cache_until(policy, scale, seed=3)
        layer = cache.layers[0]
        keys, values = layer.keys, layer.values
        queries = queries.round()
        result = compress(policy, keys, values, schedule=SCHEDULE, scale=scale, layer=0, num_layers=2, queries=queries)
        ragged = isinstance(keys, Ragged)
        view = keys.padded(keys.max_length) if ragged else keys
        ctx = CompressionContext(schedule=SCHEDULE, scale=scale, layer=0, num_layers=2,
                                 capacity=policy.plan(SCHEDULE, 2).capacity(scale, 0), length=view.shape[2],
                                 queries=queries, lengths=keys.lengths if ragged else None)
        indices, lengths = _reading_adakv(policy, view, ctx)
        assert torch.equal(result.indices, indices) and torch.equal(result.lengths, lengths)


def test_adakv_with_repeated_forced_positions_redoes_the_reading_way():
    """A selector whose forced positions repeat one (off the contract that positions are unique):
    the assumption len(forced) fails on the device, and the reading budgets give the choice."""
    from kvpolicy.policy import CompressionContext
    from policies.adakv import AdaptiveHeads
    from policies.common import RecentWindowSelector, UniformAllocation

    class Repeating(RecentWindowSelector):
        def forced_positions(self, ctx):
            recent = super().forced_positions(ctx)
            return torch.cat([recent, recent[:1]])

    if "syncs_adakv_repeating" not in kvpolicy.list_policies():
        kvpolicy.compose("syncs_adakv_repeating", AdaptiveHeads, UniformAllocation,
                         attrs_define(Repeating))
    policy = get_policy("syncs_adakv_repeating", budget=40, window_size=4)
    keys, values, queries = _inputs()
    result = compress(policy, keys, values, schedule=SCHEDULE, scale=5, layer=0, num_layers=2, queries=queries)
    ctx = CompressionContext(schedule=SCHEDULE, scale=5, layer=0, num_layers=2,
                             capacity=policy.plan(SCHEDULE, 2).capacity(5, 0), length=keys.shape[2], queries=queries)
    indices, lengths = _reading_adakv(policy, keys, ctx)
    assert torch.equal(result.indices, indices) and torch.equal(result.lengths, lengths)
    # 4 unique forced positions: 36 scored slots per head, H x capacity in all (len(forced) = 5 gives 4 x 39)
    assert lengths.sum(dim=1).tolist() == [4 * 40, 4 * 40]


def attrs_define(cls):
    import attrs
    return attrs.define(kw_only=True, slots=False)(cls)


def test_more_forced_positions_than_a_heads_budget_is_still_refused():
    """topk_per_head's error comes out of compress's one read with its message."""
    from kvpolicy import Policy, Selection
    from kvpolicy.scoring import per_head_topk

    class Overfull(Policy):
        name = "overfull-sync-test"

        def select(self, keys, values, ctx):
            budgets = torch.full(keys.shape[:2], 3, dtype=torch.long)
            budgets[1, 2] = 1
            return Selection(per_head_topk(keys[..., 0], budgets, forced=torch.tensor([0, 1])))

    keys, values, _ = _inputs()
    with pytest.raises(ValueError, match=r"2 positions are forced to stay in \(row 1, head 2\) but its capacity is 1"):
        compress(Overfull(budget=40), keys, values, schedule=SCHEDULE, scale=5, layer=0, num_layers=2)
    # the same check where the tensors are asked for outside compress
    with pytest.raises(ValueError, match=r"2 positions are forced to stay in \(row 1, head 2\) but its capacity is 1"):
        Overfull(budget=40).select(keys, values, None).resolved()


def test_code_that_treats_a_deferred_per_head_topk_as_a_tensor_is_told_how_to_get_one():
    from kvpolicy import Selection
    from kvpolicy.scoring import per_head_topk, topk_per_head

    scores = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(0))
    budgets = torch.tensor([[2, 5, 3], [4, 1, 6]])
    deferred = per_head_topk(scores, budgets)
    with pytest.raises(AttributeError, match=r"'shape'.*selection.resolved\(\) or PerHeadTopk.resolve\(\)"):
        deferred.shape
    indices, lengths = Selection(deferred).resolved().indices, Selection(deferred).resolved().lengths
    expected = topk_per_head(scores, budgets)
    assert torch.equal(indices, expected[0]) and torch.equal(lengths, expected[1])
    import copy

    assert copy.copy(deferred).lengths is deferred.lengths  # dunder lookups stay plain AttributeErrors
