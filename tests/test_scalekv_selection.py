"""ScaleKV token selection: observation window, both modes against per-row/per-head loops, properties."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from kvpolicy import ScaleSchedule, compress, get_policy
from policies.common import patch_window

# Small 1:1 schedule: cumulative 1, 5, 21, 57, 121, 265.
SCHEDULE = ScaleSchedule([1, 2, 4, 6, 8, 12])
DRAFTERS = {s: [0] for s in range(1, 6)}


def _policy(mode, budget=40, **kw):
    return get_policy("scalekv", mode=mode, budget=budget, drafters=[0], **kw)


def _inputs(seed, batch=2, heads=3, length=265, n=144, dim=8, q_heads=None):
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(batch, heads, length, dim, generator=g), dim=-1)
    values = torch.randn(batch, heads, length, dim, generator=g)
    queries = 3 * torch.randn(batch, q_heads or heads, n, dim, generator=g)
    return keys, values, queries


@pytest.mark.parametrize("side, centres", [(16, [1, 5, 9, 13]), (20, [2, 7, 12, 17]), (24, [2, 8, 14, 20]),
                                           (32, [3, 11, 19, 27]), (40, [4, 14, 24, 34]), (48, [5, 17, 29, 41]),
                                           (64, [7, 23, 39, 55])])
def test_window_centres_match_released_table(side, centres):
    window = patch_window.observation_window_positions(side, side, 16, start=100)
    expected = [100 + r * side + c for r in centres for c in centres]
    assert window.tolist() == expected


def test_window_generalises_to_non_square_and_small_maps():
    # 8 x 12 map: patches 2 x 3, centre rows 0, 2, 4, 6 and columns 1, 4, 7, 10.
    window = patch_window.observation_window_positions(8, 12, 16, start=7)
    assert window.tolist() == [7 + r * 12 + c for r in (0, 2, 4, 6) for c in (1, 4, 7, 10)]
    # 3 x 5 is smaller than the 4 x 4 grid: the last 16 cache tokens (reaching into history).
    assert patch_window.observation_window_positions(3, 5, 16, start=10).tolist() == list(range(9, 25))
    assert patch_window.observation_window_positions(2, 2, 16, start=1).tolist() == [0, 1, 2, 3, 4]
    assert patch_window.observation_window_positions(6, 6, 9, start=0).tolist() == [0, 2, 4, 12, 14, 16, 24, 26, 28]
    with pytest.raises(ValueError, match="perfect square"):
        patch_window.observation_window_positions(8, 8, 10)


def _loop_reference(keys, raw_queries, window, capacity, pooling="max"):
    """The released rule, one (row, head) at a time."""
    batch, heads, length, dim = keys.shape
    start = length - raw_queries.shape[2]
    out = torch.empty(batch, heads, capacity, dtype=torch.long)
    for b in range(batch):
        for h in range(heads):
            q = raw_queries[b, h, window - start]
            logits = (q @ keys[b, h].T) / math.sqrt(dim)
            logits[:, window] = float("-inf")
            scores = logits.sum(0)[None, None]
            pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
            pooled = pool(scores, 5, stride=1, padding=2)[0, 0]
            pooled[window] = float("-inf")
            top = pooled.topk(capacity - len(window)).indices
            out[b, h] = torch.cat([top, window]).sort().values
    return out


def _loop_attention(keys, queries, window, capacity):
    """The paper rule, one (row, head) at a time (query heads averaged per key head)."""
    batch, heads, length, dim = keys.shape
    group = queries.shape[1] // heads
    start = length - queries.shape[2]
    out = torch.empty(batch, heads, capacity, dtype=torch.long)
    for b in range(batch):
        for h in range(heads):
            scores = torch.zeros(length)
            for g in range(group):
                q = queries[b, h * group + g, window - start]
                scores += torch.softmax(q @ keys[b, h].T, dim=-1).sum(0) / group
            pooled = F.avg_pool1d(scores[None, None], 5, stride=1, padding=2)[0, 0]
            pooled[window] = float("-inf")
            top = pooled.topk(capacity - len(window)).indices
            out[b, h] = torch.cat([top, window]).sort().values
    return out


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_reference_mode_equals_per_row_head_loop(pooling):
    keys, values, raw = _inputs(0)
    policy = _policy("reference", pooling=pooling)
    result = compress(policy, keys, values, schedule=SCHEDULE, scale=5, layer=1, num_layers=3, raw_queries=raw)
    window = patch_window.observation_window_positions(12, 12, 16, 121)
    assert torch.equal(result.indices, _loop_reference(keys, raw, window, result.capacity, pooling))


@pytest.mark.parametrize("q_heads", [3, 6])
def test_attention_mode_equals_per_row_head_loop(q_heads):
    keys, values, queries = _inputs(1, q_heads=q_heads)
    policy = _policy("attention")
    assert policy.needs_queries and not policy.needs_raw_queries
    result = compress(policy, keys, values, schedule=SCHEDULE, scale=5, layer=1, num_layers=3, queries=queries)
    window = patch_window.observation_window_positions(12, 12, 16, 121)
    assert torch.equal(result.indices, _loop_attention(keys, queries, window, result.capacity))


def test_attention_mode_keeps_what_the_window_attends_to():
    # History tokens 10..14 are aligned with every window query: they must be kept over the rest.
    keys, values, queries = _inputs(2, batch=1, heads=1)
    direction = F.normalize(torch.ones(8), dim=0)
    keys[0, 0, 10:15] = direction
    queries[0, 0] = 0.1 * queries[0, 0] + 20 * direction
    result = compress(_policy("attention", budget=24), keys, values, schedule=SCHEDULE, scale=5, layer=0,
                      num_layers=3, queries=queries)
    assert set(range(10, 15)) <= set(result.indices[0, 0].tolist())


def test_modes_need_their_queries():
    keys, values, queries = _inputs(3)
    with pytest.raises(ValueError, match="needs queries"):
        compress(_policy("attention"), keys, values, schedule=SCHEDULE, scale=5, layer=1, num_layers=3,
                 raw_queries=queries)
    with pytest.raises(ValueError, match="needs raw_queries"):
        compress(_policy("reference"), keys, values, schedule=SCHEDULE, scale=5, layer=1, num_layers=3,
                 queries=queries)


@settings(max_examples=40, deadline=None)
@given(mode=st.sampled_from(["attention", "reference"]), scale=st.integers(2, 5), seed=st.integers(0, 10_000),
       budget=st.integers(16, 120), layer=st.integers(0, 2), pooling=st.sampled_from([None, "max", "avg"]),
       history_fraction=st.floats(0.2, 1.0))
def test_selection_properties(mode, scale, seed, budget, layer, pooling, history_fraction):
    """Kept <= capacity, window always kept, indices unique and ascending, for any cache length."""
    policy = get_policy("scalekv", mode=mode, budget=budget, drafters=[0], pooling=pooling)
    n = SCHEDULE.tokens(scale)
    history = int(round((SCHEDULE.cumulative[scale] - n) * history_fraction))
    length = n + history
    keys, values, queries = _inputs(seed, length=length, n=n)
    result = compress(policy, keys, values, schedule=SCHEDULE, scale=scale, layer=layer, num_layers=3,
                      **({"queries": queries} if mode == "attention" else {"raw_queries": queries}))
    cap = policy.plan(SCHEDULE, 3).capacity(scale, layer)
    kept = result.indices
    assert kept.shape[2] == (length if cap is None or length <= cap else cap)
    assert bool((kept[..., 1:] > kept[..., :-1]).all())
    h, w = SCHEDULE.shape(scale)
    window = patch_window.observation_window_positions(h, w, 16, length - n, length=length)
    if cap is not None and length > cap:
        for b in range(kept.shape[0]):
            for hh in range(kept.shape[1]):
                assert set(window.tolist()) <= set(kept[b, hh].tolist())


def test_summed_window_logits_sum_queries_first(monkeypatch):
    """(Σ q_j)·k/√D: exact on small-integer inputs (as the golden ones), float-close on general ones,
    and the blocked CPU product (here 6 blocks of 128 positions, the last partial) equals one matmul."""
    monkeypatch.setattr(patch_window, "_DOT_BLOCK_ELEMENTS", 1)
    g = torch.Generator().manual_seed(5)
    keys = torch.randint(-8, 9, (2, 3, 300, 16), generator=g).float() / 8
    q = torch.randint(-8, 9, (2, 3, 16, 16), generator=g).float() / 16
    window = torch.tensor([3, 40, 299])
    released = (q @ keys.transpose(2, 3) / 4).sum(dim=2).index_fill(-1, window, float("-inf"))
    assert torch.equal(patch_window.summed_window_logits(q, keys, window), released)

    keys, _, raw = _inputs(6, length=700, n=144, dim=32)
    q = raw[:, :, :16]
    released = (q @ keys.transpose(2, 3) / math.sqrt(32)).sum(dim=2).index_fill(-1, window, float("-inf"))
    mine = patch_window.summed_window_logits(q, keys, window)
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine, released, rtol=1e-5, atol=1e-5)
    vectors = q.sum(dim=2)
    torch.testing.assert_close(patch_window._rows_dot(keys, vectors, blocked=True),
                               patch_window._rows_dot(keys, vectors, blocked=False), rtol=1e-5, atol=1e-5)
    # bfloat16 keys are read as they are and accumulated in float32.
    half = patch_window.summed_window_logits(q, keys.bfloat16(), window)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, released, rtol=0.05, atol=0.05)
