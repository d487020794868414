"""simulate: report fields and byte counts, probe mode, argument checks; the issue's 650/6425 ratio."""

import pytest
import torch

import kvpolicy
from kvpolicy import ScaleSchedule, simulate

VAR_256 = ScaleSchedule([1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
INFINITY_1024 = ScaleSchedule([1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64])


def test_report_fields_full_cache():
    report = simulate(None, schedule=VAR_256, num_layers=2, num_heads=3, head_dim=4, batch=2)
    rows = 4  # batch 2 with CFG
    per_token = 2 * 2 * rows * 3 * 4 * 2  # K+V, layers, rows, heads, dim, bf16 bytes
    assert report.full_kv_bytes == [per_token * c for c in VAR_256.cumulative]
    assert report.kv_bytes == report.full_kv_bytes and report.peak_kv_bytes == per_token * 680
    assert report.capacities == [[None, None]] * 10
    assert report.kept_lengths == [[c, c] for c in VAR_256.cumulative]
    assert report.extra == {"materialized": True, "rows": 4, "num_heads": 3, "head_dim": 4, "dtype": "bfloat16",
                            "key_dtype": "bfloat16"}
    assert set(report.to_dict()) >= {"kv_bytes", "full_kv_bytes", "peak_kv_bytes", "kept_lengths", "capacities"}
    no_cfg = simulate(None, schedule=VAR_256, num_layers=2, num_heads=3, head_dim=4, batch=2, cfg=False,
                      dtype=torch.float32)
    assert no_cfg.full_kv_bytes[-1] == 2 * 2 * 2 * 3 * 4 * 4 * 680


def test_policy_report_and_probe_mode_agree():
    policy = kvpolicy.get_policy("snapkv", budget="10%", window_size=8)
    kwargs = dict(schedule=VAR_256, num_layers=3, num_heads=2, head_dim=8, batch=1)
    real = simulate(policy, materialize=True, **kwargs)
    probe = simulate(policy, materialize=False, **kwargs)
    assert real.kv_bytes == probe.kv_bytes and real.peak_kv_bytes == probe.peak_kv_bytes
    assert real.kept_lengths == probe.kept_lengths and probe.extra["materialized"] is False
    assert real.capacities == [[42] * 3] * 10
    assert [row[0] for row in real.kept_lengths] == [1, 5, 14, 30, 42, 42, 42, 42, 42, 42]
    per_token = 2 * 3 * 2 * 2 * 8 * 2
    assert real.kv_bytes == [per_token * min(c, 42) for c in VAR_256.cumulative]
    # Per-layer bytes (issue 2: accounting per layer and per scale) add up to kv_bytes.
    pyramid = simulate(kvpolicy.get_policy("pyramidkv", budget="10%", window_size=8, beta=4), **kwargs)
    per_layer_token = 2 * 2 * 2 * 8 * 2  # K+V, rows, heads, dim, bf16 bytes
    assert pyramid.layer_kv_bytes == [[per_layer_token * k for k in row] for row in pyramid.kept_lengths]
    assert [sum(row) for row in pyramid.layer_kv_bytes] == pyramid.kv_bytes
    assert len(set(pyramid.layer_kv_bytes[-1])) == 3  # the pyramid: every layer holds a different amount
    assert pyramid.to_dict()["layer_kv_bytes"] == pyramid.layer_kv_bytes
    # Same seed, same report.
    again = simulate(policy, materialize=True, **kwargs)
    assert again.kept_lengths == real.kept_lengths and again.kv_bytes == real.kv_bytes


def test_issue_ratio_for_infinity_2b_at_650_tokens():
    # kvpolicy plan --model infinity-2b --policy snapkv --budget 650 --batch 8: the cache the last
    # scale reads holds 650 of 6425 tokens per layer.
    report = simulate(kvpolicy.get_policy("snapkv", budget=650), schedule=INFINITY_1024, num_layers=32,
                      num_heads=16, head_dim=128, batch=8)
    assert report.extra["materialized"] is False
    assert report.read_by_last_scale_ratio == 650 / 6425
    per_token = 2 * 32 * 16 * 16 * 128 * 2  # K+V, 32 layers, 16 rows, 16 heads, 128 dims, bf16
    assert report.full_kv_bytes[11] == per_token * 6425 and report.kv_bytes[11] == per_token * 650
    # Peak: all layers at 650 except one holding 650 + 4096 (the 64x64 map) before compression.
    assert report.peak_kv_bytes == per_token // 32 * (31 * 650 + 650 + 4096)


@pytest.mark.parametrize("name,value", [("num_layers", 0), ("num_heads", -1), ("head_dim", 2.0), ("batch", True)])
def test_bad_arguments(name, value):
    kwargs = dict(schedule=VAR_256, num_layers=2, num_heads=2, head_dim=4, batch=1)
    with pytest.raises(ValueError, match=f"{name} must be a positive int, got {value!r}"):
        simulate(None, **{**kwargs, name: value})


@pytest.mark.parametrize("materialize", [True, False])
def test_float32_keys_with_bfloat16_values_count_six_bytes_per_channel(materialize):
    # Infinity's official cache layout: K float32 (normalised in float32), V bf16
    common = dict(schedule=VAR_256, num_layers=2, num_heads=3, head_dim=4, batch=2, materialize=materialize)
    mixed = simulate(None, key_dtype=torch.float32, dtype=torch.bfloat16, **common)
    plain = simulate(None, dtype=torch.bfloat16, **common)
    assert [m * 2 for m in mixed.full_kv_bytes] == [p * 3 for p in plain.full_kv_bytes]
    assert mixed.extra["key_dtype"] == "float32" and mixed.extra["dtype"] == "bfloat16"
