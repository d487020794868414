"""``var-tiny-random`` end to end: generation with and without a KV policy, determinism, accounting,
batching, dtypes, the calibration hook, label validation and the geometry."""

from __future__ import annotations

import pytest
import torch

from adapters import load_model
from adapters.geometry import get_geometry
from kvpolicy import get_policy


@pytest.fixture(scope="module")
def model():
    return load_model("var-tiny-random")


@pytest.fixture(scope="module")
def full_run(model):
    return model.generate([3, 980], seed=11)


def _bytes_per_token(model, rows, itemsize=4):
    c = model.config
    return rows * c.num_heads * c.head_dim * 2 * itemsize  # K and V


def test_full_cache_generation_shapes_and_accounting(model, full_run):
    out = full_run
    assert out.images.dtype == torch.uint8 and out.images.shape == (2, 256, 256, 3)
    assert [tuple(t.shape) for t in out.tokens] == [(2, p * p) for p in model.config.patch_nums]
    assert all(t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) < 4096 for t in out.tokens)
    report = out.cache_report
    per_token = _bytes_per_token(model, rows=4) * model.config.depth
    assert report.full_kv_bytes == [n * per_token for n in model.schedule.cumulative]
    assert report.kv_bytes == report.full_kv_bytes and report.policy == "full"
    assert len(report.scale_seconds) == 10 and all(s > 0 for s in report.scale_seconds)
    assert out.config["labels"] == [3, 980] and out.config["seed"] == 11 and out.config["policy"] is None
    assert out.images.float().std() > 0  # not a constant image


def test_policy_physically_reduces_the_cache_and_is_deterministic(model, full_run):
    policy = get_policy("sliding_window", budget="30%")
    first = model.generate([3, 980], seed=11, policy=policy)
    second = model.generate([3, 980], seed=11, policy="sliding_window", budget="30%")
    capacity = round(0.3 * 424)  # Ratio of the prefix read by the last scale (424 tokens at 256^2)
    report = first.cache_report
    assert report.kept_lengths[-1] == [capacity] * model.config.depth
    assert report.kv_bytes[-1] == capacity * _bytes_per_token(model, rows=4) * model.config.depth
    assert report.kv_bytes[-1] < report.full_kv_bytes[-1] and report.peak_kv_bytes < report.full_peak_kv_bytes
    for a, b in zip(first.tokens, second.tokens):
        assert torch.equal(a, b)
    assert torch.equal(first.images, second.images)
    # nothing is evicted before the cache outgrows the budget (155 tokens after scale 6), so the
    # first seven scales equal the full-cache run; later ones see a different cache
    for s in range(7):
        assert torch.equal(first.tokens[s], full_run.tokens[s])
    assert not all(torch.equal(a, b) for a, b in zip(first.tokens[7:], full_run.tokens[7:]))
    assert first.config["policy"]["name"] == "sliding_window"


def test_batches_run_in_sequence_with_one_report(model):
    out = model.generate([1, 2, 3], seed=0, batch_size=2)
    assert out.images.shape[0] == 3 and out.tokens[-1].shape == (3, 256)
    report = out.cache_report
    assert report.extra["num_batches"] == 2 and report.extra["rows_per_batch"] == 4
    assert report.full_kv_bytes[-1] == 680 * _bytes_per_token(model, rows=4) * model.config.depth


def test_bf16_weights_and_autocast(model):
    bf16 = load_model("var-tiny-random", dtype=torch.bfloat16)
    out = bf16.generate([7], seed=0)
    assert out.images.shape == (1, 256, 256, 3) and out.config["dtype"] == "bfloat16"
    assert out.cache_report.full_kv_bytes[-1] == 680 * _bytes_per_token(bf16, rows=2, itemsize=2) * bf16.config.depth
    auto = model.generate([7], seed=0, dtype="bfloat16")
    assert auto.config["dtype"] == "bfloat16" and auto.config["weights_dtype"] == "float32"
    assert torch.equal(out.tokens[0], auto.tokens[0])  # the first scale's draw is robust to rounding
    with pytest.raises(ValueError, match="float32 weights to autocast from"):
        bf16.generate([7], dtype=torch.float32)


def test_calibration_statistics_hook(model):
    from policies.scalekv.calibration import ScaleKVStatsCollector

    depth, scales = model.config.depth, len(model.config.patch_nums)
    stats = ScaleKVStatsCollector(depth, scales, max_queries=16)
    model.generate([5], seed=0, stats=stats)
    assert stats.calls == depth * scales
    result = stats.result()
    assert all(0 < v <= 1 for row in result.current_ratio for v in row)
    assert all(row[0] is None and all(0 < v <= 1 for v in row[1:]) for row in result.history_topk)


def test_stats_receive_only_the_conditional_rows(model):
    calls = []

    class Recorder:
        def observe(self, layer, scale, queries, keys, *, current_start):
            calls.append((layer, scale, queries.shape[0], keys.shape[0], keys.shape[2], current_start))

    model.generate([5, 6], seed=0, stats=Recorder(), policy="sliding_window", budget=40)
    cumulative, lengths = model.schedule.cumulative, model.schedule.lengths
    assert len(calls) == model.config.depth * 10
    for layer, scale, q_rows, k_rows, length, start in calls:
        assert q_rows == k_rows == 2  # B conditional rows of the 2B CFG rows
        assert start == length - lengths[scale] and length <= cumulative[scale]


def test_more_smooth_changes_the_image_not_the_first_draw(model):
    plain = model.generate([9], seed=2)
    smooth = model.generate([9], seed=2, more_smooth=True)
    assert torch.equal(plain.tokens[0], smooth.tokens[0])
    assert not torch.equal(plain.images, smooth.images)


def test_teacher_forcing_reproduces_a_generation(model, full_run):
    forced = model.teacher_forced([3, 980], full_run.tokens, cfg=4.0)
    assert [tuple(l.shape) for l in forced.logits] == [(2, p * p, 4096) for p in model.config.patch_nums]
    again = forced.images.mul(255).round().permute(0, 2, 3, 1).to(torch.uint8)
    assert torch.equal(again, full_run.images)


@pytest.mark.parametrize("labels, error, match", [
    ([1000], ValueError, r"class label 1000 is out of range 0\.\.999"),
    ([-1], ValueError, r"class label -1 is out of range"),
    ([2.5], TypeError, r"class label 2\.5 is not an int"),
    ([True], TypeError, "is not an int"),
    ("cat", TypeError, "labels must be class indices"),
    ([], ValueError, "labels is empty"),
    (torch.tensor([[1, 2]]), ValueError, "1-D integer"),
])
def test_bad_labels_are_rejected(model, labels, error, match):
    with pytest.raises(error, match=match):
        model.generate(labels)


@pytest.mark.parametrize("kwargs, match", [
    ({"top_k": 5000}, r"top_k must be an int in 0\.\.4096"),
    ({"top_p": 1.5}, r"top_p must be in \[0, 1\]"),
    ({"cfg": -1.0}, "cfg must be a real number >= 0"),
    ({"batch_size": 0}, "batch_size must be a positive int"),
    ({"dtype": "int8"}, "dtype 'int8' is not one of"),
    ({"budget": "10%"}, "budget= was given without policy="),
    ({"resolution": 512}, r"256x256 images only, got resolution=512"),
    ({"aspect_ratio": 2.0}, "square images only"),
])
def test_bad_settings_are_rejected(model, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        model.generate([1], **kwargs)


def test_labels_accept_ints_sequences_and_arrays():
    import numpy as np

    from adapters.var import check_labels

    assert check_labels(7, 1000) == [7]
    assert check_labels((1, 2), 1000) == [1, 2]
    assert check_labels(np.array([3, 999]), 1000) == [3, 999]
    assert check_labels(torch.tensor([0, 5]), 1000) == [0, 5]


def test_geometry_matches_the_registry(model):
    assert model.geometry() == get_geometry("var-tiny-random")
    d30 = get_geometry("var-d30")
    assert (d30.num_layers, d30.num_heads, d30.head_dim, d30.schedule.total) == (30, 30, 64, 680)


def test_progress_bar_over_scales(model, capsys):
    model.generate([1], seed=0, progress=True)
    assert "var-tiny-random scales" in capsys.readouterr().err
