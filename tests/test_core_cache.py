"""KVCache: compact storage and byte accounting (per scale, full, peak) against hand-computed numbers;
in-place compaction."""

import attrs
import pytest
import torch

import kvpolicy
from kvpolicy import CapacityPlan, KVCache, Policy, ScaleSchedule, Selection
from kvpolicy.compress import compact_tokens_, gather_tokens

SCHEDULE = ScaleSchedule([1, 2, 3])  # 1, 4, 9 tokens; cumulative 1, 5, 14
ROWS, HEADS, DIM = 2, 3, 4
TOKEN_BYTES = 2 * ROWS * HEADS * DIM * 4  # K and V, float32: bytes of one token in one layer = 192


def run(cache, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    for scale in range(SCHEDULE.num_scales):
        for layer in range(cache.num_layers):
            n = SCHEDULE.tokens(scale)
            k = torch.randn(ROWS, HEADS, n, DIM, generator=g).to(dtype)
            cache.append(layer, scale, k, torch.randn(ROWS, HEADS, n, DIM, generator=g).to(dtype))
            cache.compress(layer, scale)
    return cache.report()


def test_sliding_window_bytes_by_hand():
    report = run(KVCache(2, SCHEDULE, kvpolicy.get_policy("sliding_window", budget=4)))
    assert TOKEN_BYTES == 192
    # Held tokens after each scale's compression: [1, 1], [4, 4], [4, 4].
    assert report.kv_bytes == [2 * 192, 8 * 192, 8 * 192] == [384, 1536, 1536]
    assert report.full_kv_bytes == [2 * 192, 10 * 192, 28 * 192] == [384, 1920, 5376]
    # Peak: at scale 2, layer 0 holds 4 kept + 9 new = 13 tokens while layer 1 holds 4 -> 17 tokens.
    assert report.peak_kv_bytes == 17 * 192 == 3264
    assert report.full_peak_kv_bytes == 28 * 192
    assert report.kept_lengths == [[1, 1], [4, 4], [4, 4]]
    assert report.capacities == [[4, 4]] * 3
    assert report.read_by_last_scale_ratio == 1536 / 1920  # after the second-to-last scale
    assert report.policy == "sliding_window"
    table = report.table()
    assert "peak (incl. one layer's current map before compression)" in table and "0.8000" in table


def test_full_cache_and_no_policy():
    full = run(KVCache(2, SCHEDULE, kvpolicy.get_policy("full")))
    none = run(KVCache(2, SCHEDULE))
    for report in (full, none):
        assert report.kv_bytes == report.full_kv_bytes == [384, 1920, 5376]
        assert report.peak_kv_bytes == report.full_peak_kv_bytes == 5376
        assert report.kept_lengths == [[1, 1], [5, 5], [14, 14]]
    assert none.capacities == [[None, None]] * 3 and none.policy == "full"


def test_bf16_and_replicas():
    report = run(KVCache(2, SCHEDULE, kvpolicy.get_policy("sliding_window", budget=4), replicas=5), dtype=torch.bfloat16)
    assert report.kv_bytes == [5 * 96 * t for t in (2, 8, 8)]  # bf16: 96 bytes per token and layer
    assert report.peak_kv_bytes == 5 * 96 * 17


def test_storage_is_compact_and_state_resets():
    cache = KVCache(1, SCHEDULE, kvpolicy.get_policy("h2o", budget=3))
    g = torch.Generator().manual_seed(1)
    for scale in range(3):
        n = SCHEDULE.tokens(scale)
        k = torch.randn(1, 1, n, DIM, generator=g)
        cache.append(0, scale, k, k.clone())
        cache.compress(0, scale, queries=torch.randn(1, 1, n, DIM, generator=g))
        assert cache.keys[0].shape[2] == cache.length(0) == min(3, SCHEDULE.cumulative_length(scale))
        assert cache.states[0].shape == (1, 1, cache.length(0))
    cache.reset()
    assert cache.keys == [None] and cache.states == [None] and cache.length(0) == 0 and cache.peak_kv_bytes == 0


def test_misuse_raises():
    cache = KVCache(2, SCHEDULE, kvpolicy.get_policy("sliding_window", budget=4))
    k = torch.zeros(1, 1, 4, DIM)
    with pytest.raises(ValueError, match=r"scale 0 has 1 tokens; got keys \(1, 1, 4, 4\)"):
        cache.append(0, 0, k, k)
    with pytest.raises(RuntimeError, match=r"layer 0 received scale 1 after scale -1; scales must arrive in order"):
        cache.append(0, 1, k, k)
    with pytest.raises(RuntimeError, match=r"compress\(layer=0, scale=0\) before append at that scale"):
        cache.compress(0, 0)
    one = torch.zeros(1, 1, 1, DIM)
    cache.append(0, 0, one, one)
    with pytest.raises(RuntimeError, match="call reset"):
        cache.append(0, 0, one, one)  # a second generation without reset
    with pytest.raises(ValueError, match="num_layers must be an int >= 1, got 0"):
        KVCache(0, SCHEDULE)
    with pytest.raises(ValueError, match="num_layers must be an int >= 1, got '3'"):
        KVCache("3", SCHEDULE)
    with pytest.raises(TypeError, match="schedule must be a ScaleSchedule, got list"):
        KVCache(2, [1, 2])
    with pytest.raises(TypeError, match=r"policy must be a Policy \(see kvpolicy.get_policy\) or None, got str"):
        KVCache(2, SCHEDULE, "snapkv")
    for layer in (-1, 2, True):  # -1 used to append silently to the last layer
        with pytest.raises(IndexError, match=f"layer {layer!r} out of range 0..1"):
            cache.append(layer, 0, one, one)
        with pytest.raises(IndexError, match=f"layer {layer!r} out of range 0..1"):
            cache.compress(layer, 0)
    with pytest.raises(ValueError, match=r"keys \(1, 2, 4, 4\) do not continue layer 0's cache \(1, 1, 1, 4\)"):
        cache.append(0, 1, torch.zeros(1, 2, 4, DIM), torch.zeros(1, 2, 4, DIM))
    with pytest.raises(ValueError, match=r"keys are torch.float64 on cpu but layer 0's cache holds torch.float32 on cpu"):
        cache.append(0, 1, torch.zeros(1, 1, 4, DIM, dtype=torch.float64), torch.zeros(1, 1, 4, DIM))
    with pytest.raises(ValueError, match=r"keys must be a \(B, H, n, D\) tensor"):
        cache.append(1, 0, torch.zeros(1, 1, DIM), one)
    with pytest.raises(ValueError, match="needs a budget"):
        KVCache(2, SCHEDULE, kvpolicy.get_policy("snapkv"))  # fails early, before any tensor


def test_declared_needs():
    assert KVCache(1, SCHEDULE, kvpolicy.get_policy("snapkv", budget=40)).needs_queries
    assert not KVCache(1, SCHEDULE, kvpolicy.get_policy("sliding_window", budget=4)).needs_queries
    assert not KVCache(1, SCHEDULE).needs_raw_queries


LONG = ScaleSchedule([1, 2, 4, 6])  # cumulative 1, 5, 21, 57


@attrs.define(kw_only=True)
class LargestKeys(Policy):
    """Keeps each (row, head)'s tokens with the largest first key element; layer 0 evicts 7 of 57
    tokens at the last scale (at most 1/8: compacted in place), layer 1 keeps 10 (copied)."""

    requires_budget = False

    def make_plan(self, schedule, num_layers, budget_tokens):
        return CapacityPlan(capacities=[[None, None]] * 3 + [[50, 10]], policy="largest_keys")

    def select(self, keys, values, ctx):
        if ctx.capacity is None or ctx.length <= ctx.capacity:
            return Selection(None, ctx.state)
        return Selection(keys[..., 0].topk(ctx.capacity, dim=-1).indices.sort(dim=-1).values, ctx.state)


def _drive(compaction, dtype):
    cache = KVCache(2, LONG, LargestKeys(), compaction=compaction)
    g = torch.Generator().manual_seed(1)
    given, kept, held = [], [], []
    for scale in range(LONG.num_scales):
        for layer in range(2):
            n = LONG.tokens(scale)
            k, v = torch.randn(2, 3, n, 8, generator=g).to(dtype), torch.randn(2, 3, n, 8, generator=g).to(dtype)
            given.append((k, k.clone()))
            cache.append(layer, scale, k, v)
            before = cache.layers[layer].nbytes
            cache.compress(layer, scale)
            kept.append((cache.layers[layer].keys.clone(), cache.layers[layer].values.clone()))
            held.append((before, cache.layers[layer].nbytes))
    return cache, given, kept, held


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_compaction_keeps_the_same_tokens_and_counts_the_whole_allocation(dtype):
    copy, _, kept_copy, held_copy = _drive("copy", dtype)
    in_place, given, kept_in_place, held_in_place = _drive("in_place", dtype)
    for (k1, v1), (k2, v2) in zip(kept_copy, kept_in_place):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    # layer 0 at the last scale: compacted in place, its whole allocation (57 tokens) still counted
    token = 2 * 3 * 8 * (4 if dtype == torch.float32 else 2) * 2  # K and V of one token
    assert held_copy[-2] == (57 * token, 50 * token) and held_in_place[-2] == (57 * token, 57 * token)
    assert cache_layer_shares_memory(in_place.layers[0])
    assert held_in_place[-1] == held_copy[-1] == (57 * token, 10 * token)  # layer 1 evicts 47: copied
    assert in_place.report().kv_bytes[-1] == copy.report().kv_bytes[-1] + 7 * token
    for original, pristine in given:  # the caller's tensors are never overwritten
        assert torch.equal(original, pristine)


def cache_layer_shares_memory(layer):
    return layer.compacted and layer.keys.untyped_storage().nbytes() > layer.keys.numel() * layer.keys.element_size()


@pytest.mark.parametrize("rows_per_step", [1, 5, 7, 64, 8192])
@pytest.mark.parametrize("kept", [0, 1, 13, 37, 40])
def test_compact_tokens_in_place_equals_gather(rows_per_step, kept, monkeypatch):
    """Chunks that overlap their sources (few evicted) go through the buffer, the others straight
    into place; both give gather_tokens' rows, for every chunk size, including k = L and k = 0."""
    import importlib
    monkeypatch.setattr(importlib.import_module("kvpolicy.compress"), "_COMPACT_ROWS", rows_per_step)
    g = torch.Generator().manual_seed(kept)
    tensor = torch.randn(3, 4, 40, 6, generator=g)
    indices = torch.rand(3, 4, 40, generator=g).topk(kept, dim=-1).indices.sort(dim=-1).values
    expected = gather_tokens(tensor, indices)
    work = tensor.clone()
    out = compact_tokens_(work, indices)
    assert torch.equal(out, expected) and out.untyped_storage().data_ptr() == work.untyped_storage().data_ptr()


def test_compaction_option_is_checked():
    with pytest.raises(ValueError, match=r"compaction must be one of 'copy', 'in_place', got 'fast'"):
        KVCache(2, SCHEDULE, compaction="fast")
    keys, values = torch.randn(2, 2, 14, 4), torch.randn(2, 2, 14, 4)
    with pytest.raises(TypeError, match="in_place must be True or False, got 'yes'"):
        kvpolicy.compress(kvpolicy.get_policy("sliding_window", budget=4), keys, values, schedule=SCHEDULE, scale=2,
                          layer=0, num_layers=1, in_place="yes")
