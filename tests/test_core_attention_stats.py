"""The core's generic attention-statistics collector (per layer, scale and head) and the migration
messages of code that moved out of the core."""

import importlib

import pytest
import torch

from kvpolicy import AttentionStatsCollector


def current_mass(probs, current_start):
    return {"current": probs[..., current_start:].sum(-1), "history": probs[..., :current_start].sum(-1)
            if current_start else None}


def test_per_head_means_equal_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    batch, q_heads, kv_heads, n, length, dim = 2, 4, 2, 5, 12, 8
    queries = torch.randn(batch, q_heads, n, dim, generator=generator, dtype=torch.float64)
    keys = torch.randn(batch, kv_heads, length, dim, generator=generator, dtype=torch.float64)
    collector = AttentionStatsCollector(2, 3, [current_mass], max_queries=100)
    collector.observe(1, 2, queries, keys, current_start=length - n)
    collector.observe(1, 2, queries, keys, current_start=length - n)  # a second call averages the same
    grouped = queries.reshape(batch, kv_heads, 2, n, dim)
    probs = torch.softmax(torch.einsum("bhgqd,bhld->bhgql", grouped, keys), -1)
    expected = probs[..., length - n:].sum(-1).mean(dim=(0, 2, 3))  # per KV head
    means = collector.head_means("current")
    torch.testing.assert_close(means[1, 2], expected, rtol=1e-5, atol=1e-6)
    assert torch.isnan(means[0]).all() and collector.counts("current")[1, 2].tolist() == [2 * batch * 2 * n] * 2
    assert collector.layer_means("current")[1][2] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert collector.layer_means("current")[0][0] is None and collector.names == ["current", "history"]
    assert collector.calls == 2 and collector.num_heads == kv_heads
    with pytest.raises(ValueError, match="keys have 3 heads but earlier observations had 2"):
        collector.observe(0, 0, queries[:, :3], keys[:, :1].expand(-1, 3, -1, -1), current_start=length - n)


def test_undefined_values_are_not_counted_and_bad_measures_fail():
    collector = AttentionStatsCollector(1, 1, [current_mass])
    collector.observe(0, 0, torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), current_start=0)
    assert collector.counts("history").sum() == 0 and collector.layer_means("history") == [[None]]
    bad = AttentionStatsCollector(1, 1, [lambda probs, start: {"x": probs.sum()}])
    with pytest.raises(RuntimeError, match="one value per query"):
        bad.observe(0, 0, torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), current_start=0)
    with pytest.raises(TypeError, match="ScaleKVStatsCollector"):
        AttentionStatsCollector(2, 3, top_k=4)


@pytest.mark.parametrize("module, name, new", [
    ("kvpolicy.calibration", "CalibrationResult", "policies.scalekv.calibration"),
    ("kvpolicy.calibration", "BudgetFile", "policies.scalekv.budget_file"),
    ("kvpolicy.calibration", "allocate", "policies.scalekv.allocation"),
    ("kvpolicy.scoring", "observation_window_positions", "policies.common.patch_window"),
])
def test_moved_names_fail_with_their_new_place(module, name, new):
    with pytest.raises(ImportError, match=f"{module}.{name} moved to {new}"):
        exec(f"from {module} import {name}")
    assert hasattr(importlib.import_module(new), name)


def test_moved_module_fails_with_its_new_place():
    with pytest.raises(ImportError, match="kvpolicy.windowed moved to policies.common"):
        importlib.import_module("kvpolicy.windowed")
