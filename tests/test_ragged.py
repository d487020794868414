"""Physically ragged storage: exact attention against a dense masked reference, bytes equal to the
kept tokens (and to the tensors' storage on CPU), and head-wise policies generating with the tiny
Infinity and VAR models."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import kvpolicy
from kvpolicy import Ragged, ragged_attention
from kvpolicy.ragged import METHODS, gather_ragged
from policies.common import HeadWeightsAllocation, RecentWindowSelector, UniformAllocation

_COUNTER = itertools.count()


def _ragged(batch, heads, dim, lengths, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.long)
    longest = int(lengths.max())
    dense = torch.randn(batch, heads, longest, dim, generator=g, dtype=dtype)
    return Ragged.from_padded(dense, lengths, side="left"), dense, lengths


def _masked_reference(queries, dense_k, dense_v, lengths):
    """softmax(q kᵀ) v with the padding (first L - lengths positions) masked out, float64."""
    length = dense_k.shape[2]
    valid = torch.arange(length) >= (length - lengths).unsqueeze(-1)  # (B, H, L)
    logits = queries @ dense_k.transpose(-1, -2)
    logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
    return torch.softmax(logits, -1) @ dense_v


@pytest.mark.parametrize("method", METHODS)
def test_ragged_attention_equals_the_dense_masked_reference(method):
    lengths = [[5, 9, 7], [5, 9, 7]]  # static head-wise: equal per head across rows (one view per head)
    keys, dense_k, lens = _ragged(2, 3, 8, lengths, seed=1)
    values, dense_v, _ = _ragged(2, 3, 8, lengths, seed=2)
    queries = torch.randn(2, 3, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = _masked_reference(queries, dense_k, dense_v, lens)
    torch.testing.assert_close(ragged_attention(queries, keys, values, method=method), expected, rtol=1e-12, atol=1e-12)
    # Rows of a head with different lengths (data-dependent allocations) go one (row, head) at a time.
    uneven = [[5, 9, 7], [8, 4, 7]]
    keys, dense_k, lens = _ragged(2, 3, 8, uneven, seed=4)
    values, dense_v, _ = _ragged(2, 3, 8, uneven, seed=5)
    expected = _masked_reference(queries, dense_k, dense_v, lens)
    torch.testing.assert_close(ragged_attention(queries, keys, values, method=method), expected, rtol=1e-12, atol=1e-12)


def test_ragged_attention_with_grouped_query_heads():
    lengths = [[6, 3]]
    keys, dense_k, lens = _ragged(1, 2, 4, lengths, seed=6)
    values, dense_v, _ = _ragged(1, 2, 4, lengths, seed=7)
    queries = torch.randn(1, 6, 2, 4, dtype=torch.float64)
    expected = _masked_reference(queries, dense_k.repeat_interleave(3, 1), dense_v.repeat_interleave(3, 1),
                                 lens.repeat_interleave(3, 1))
    for method in METHODS:
        torch.testing.assert_close(ragged_attention(queries, keys, values, method=method), expected)


def test_ragged_bytes_are_the_kept_tokens_and_the_storage():
    lengths = [[5, 0, 7], [2, 9, 1]]
    keys, dense, lens = _ragged(2, 3, 16, lengths, dtype=torch.bfloat16)
    kept = sum(map(sum, lengths))
    assert keys.nbytes == kept * 16 * 2 == keys.data.untyped_storage().nbytes()
    for b, h in itertools.product(range(2), range(3)):
        n = lengths[b][h]
        assert torch.equal(keys.segment(b, h), dense[b, h, dense.shape[2] - n:])
    # append keeps the layout compact; padded() restores the left-padded view
    new = torch.randn(2, 3, 4, 16).to(torch.bfloat16)
    grown = keys.append(new)
    assert grown.nbytes == (kept + 24) * 16 * 2 == grown.data.untyped_storage().nbytes()
    view = grown.padded()
    for b, h in itertools.product(range(2), range(3)):
        n = lengths[b][h]
        assert torch.equal(view[b, h, view.shape[2] - n - 4:], torch.cat([dense[b, h, dense.shape[2] - n:], new[b, h]]))
        assert not view[b, h, : view.shape[2] - n - 4].any()
    # gathering from a dense cache
    source = torch.randn(2, 3, 10, 4)
    idx = torch.tensor([[[1, 4, 0], [0, 2, 9]], [[3, 0, 0], [5, 6, 7]]]).view(2, 2, 3)
    out = gather_ragged(source[:, :2], idx, torch.tensor([[2, 3], [1, 3]]))
    assert torch.equal(out.segment(0, 1), source[0, 1, [0, 2, 9]]) and torch.equal(out.segment(1, 0), source[1, 0, [3]])


def test_layer_storage_keeps_k_and_v_dtypes_apart():
    """Infinity's official bf16 run caches K in float32 and V in bfloat16: the storage and ledger allow it."""
    schedule = kvpolicy.ScaleSchedule([1, 2, 3])
    name = f"test_ragged_policy_{next(_COUNTER)}"
    kvpolicy.compose(name, HeadWeightsAllocation, UniformAllocation, RecentWindowSelector)
    policy = kvpolicy.get_policy(name, budget=4, head_weights=[1, 3], window_size=1, kernel_size=1)
    cache = kvpolicy.KVCache(1, schedule, policy)
    g = torch.Generator().manual_seed(0)
    for scale in range(3):
        n = schedule.tokens(scale)
        k = F.normalize(torch.randn(1, 2, n, 8, generator=g), dim=-1)
        v = torch.randn(1, 2, n, 8, generator=g).bfloat16()
        all_k, all_v = cache.append(0, scale, k, v)
        cache.compress(0, scale, queries=torch.randn(1, 2, n, 8, generator=g))
    layer = cache.layers[0]
    assert layer.ragged and layer.keys.dtype == torch.float32 and layer.values.dtype == torch.bfloat16
    assert layer.head_lengths() == [[2, 6]]
    assert cache.report().kv_bytes[-1] == 8 * 8 * 4 + 8 * 8 * 2 == layer.nbytes
    assert layer.keys.data.untyped_storage().nbytes() + layer.values.data.untyped_storage().nbytes() == layer.nbytes


def _headwise_policy(heads, budget):
    name = f"test_ragged_model_{next(_COUNTER)}"
    kvpolicy.compose(name, HeadWeightsAllocation, UniformAllocation, RecentWindowSelector)
    weights = [1 + h for h in range(heads)]
    return kvpolicy.get_policy(name, budget=budget, head_weights=weights, window_size=4, kernel_size=3)


def _check_report(report, plan, rows, heads, head_dim, depth, itemsize=4):
    """Counted bytes after each scale = the plan's per-head kept lengths x rows x D x itemsize x (K, V)."""
    kept = plan.head_kept_lengths(num_heads=heads)
    for s, row in enumerate(kept):
        expected = sum(sum(per_head) for per_head in row) * rows * head_dim * itemsize * 2
        assert report.kv_bytes[s] == expected, f"scale {s}"
        assert [tuple(h) for h in report.head_kept_lengths[s]] == [tuple(h) for h in row]
    assert report.head_wise and "head_kept_lengths" in report.to_dict()


def test_infinity_tiny_generates_with_a_headwise_policy():
    from adapters import load_model

    model = load_model("infinity-tiny-random")
    c = model.config
    policy = _headwise_policy(c.num_heads, budget=40)
    out = model.generate(["a red cube"], seed=3, policy=policy, progress=False)
    schedule = model.geometry(256).schedule
    plan = policy.plan(schedule, c.depth)
    assert plan.head_wise and len(set(plan.head_capacity(schedule.num_scales - 1, 0))) > 1
    _check_report(out.cache_report, plan, rows=2, heads=c.num_heads, head_dim=c.head_dim, depth=c.depth)
    assert out.images.shape == (1, 256, 256, 3) and len(out.cache_report.scale_seconds) == schedule.num_scales


def test_var_tiny_generates_with_a_headwise_policy():
    from adapters import load_model

    model = load_model("var-tiny-random")
    c = model.config
    policy = _headwise_policy(c.num_heads, budget=40)
    out = model.generate([7], seed=2, policy=policy)
    plan = policy.plan(model.schedule, c.depth)
    _check_report(out.cache_report, plan, rows=2, heads=c.num_heads, head_dim=c.head_dim, depth=c.depth)
    assert out.images.shape == (1, 256, 256, 3)
