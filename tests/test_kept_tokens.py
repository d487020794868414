"""Observing which tokens a policy kept (issue 16, item 12): ``generate(on_compress=fn)`` hands fn a
``kvpolicy.KeptTokens`` record (global positions per layer, scale, row and head) for Infinity and VAR,
and the positions are those of the keys and values the cache really holds."""

from __future__ import annotations

import pytest
import torch

from adapters import load_model
from kvpolicy import KeptTokens, KeptTokensCache, Ragged, get_policy


@pytest.fixture(scope="module")
def infinity():
    return load_model("infinity-tiny")


@pytest.fixture(scope="module")
def var():
    return load_model("var-tiny")


def _by_key(records):
    return {(r.batch, r.scale, r.layer): r for r in records}


@pytest.mark.parametrize("family", ["infinity", "var"])
def test_sliding_window_records_the_last_tokens_in_generation_order(family, request):
    model = request.getfixturevalue(family)
    records = []
    conditions = ["a red cube", "a blue ball"] if family == "infinity" else [1, 2]
    out = model.generate(conditions, policy="sliding_window", budget=40, seed=0, progress=False,
                         on_compress=records.append)
    schedule = out.cache_report.schedule
    assert len(records) == schedule.num_scales * model.num_layers  # every layer's step at every scale
    for record in records:
        generated = schedule.cumulative_length(record.scale)
        assert record.generated == generated
        kept = min(40, generated)
        # the window's rule, written independently: the last 40 positions of 0..generated-1
        expected = torch.arange(generated - kept, generated).expand(4, model_heads(model), kept)
        assert torch.equal(record.positions, expected), (record.scale, record.layer)
        assert torch.equal(record.lengths, torch.full((4, model_heads(model)), kept))
        assert record.evicted == (generated > 40) and not record.head_wise


def model_heads(model) -> int:
    return model.config.num_heads


def test_observing_does_not_change_the_generation(var):
    plain = var.generate([3, 4], policy="snapkv", budget="30%", seed=5, progress=False)
    observed = var.generate([3, 4], policy="snapkv", budget="30%", seed=5, progress=False, on_compress=lambda r: None)
    assert all(torch.equal(a, b) for a, b in zip(plain.tokens, observed.tokens))
    assert plain.cache_report.kv_bytes == observed.cache_report.kv_bytes


@pytest.mark.parametrize("family", ["infinity", "var"])
def test_head_wise_records_agree_with_the_cache_report(family, request):
    model = request.getfixturevalue(family)
    records = []
    conditions = ["a red cube", "a blue ball"] if family == "infinity" else [1, 2]
    out = model.generate(conditions, policy="adakv", budget="25%", seed=1, progress=False, on_compress=records.append)
    report = out.cache_report
    assert any(r.head_wise for r in records), "adakv kept equal lengths everywhere: the ragged path is not tested"
    for record in records:
        # the report's per-head lengths come from the stored tensors (max over rows)
        assert tuple(record.lengths.max(dim=0).values.tolist()) == report.head_kept_lengths[record.scale][record.layer]
        for b in range(record.positions.shape[0]):
            for h in range(record.positions.shape[1]):
                held = record.of(b, h)
                assert len(held) == record.lengths[b, h]
                assert (held[1:] > held[:-1]).all() and held.min() >= 0 and held.max() < record.generated
                assert (record.positions[b, h, len(held):] == -1).all()
    last = max(r.scale for r in records)
    assert all(r.evicted for r in records if r.scale == last)


class _HeldVersusAppended(KeptTokensCache):
    """Keeps every appended key, and after each compression checks the cache's real keys and values
    against the appended ones at the reported positions."""

    def reset(self):
        super().reset()
        self.appended_keys = [[] for _ in range(self.num_layers)]
        self.appended_values = [[] for _ in range(self.num_layers)]
        self.checked = 0
        self.ragged_checked = 0

    def append(self, layer, scale, keys, values):
        self.appended_keys[layer].append(keys.clone())
        self.appended_values[layer].append(values.clone())
        return super().append(layer, scale, keys, values)


def _check_held(cache, record: KeptTokens):
    store = cache.layers[record.layer]
    all_keys = torch.cat(cache.appended_keys[record.layer], dim=2)  # (B, H, generated, D) in generation order
    all_values = torch.cat(cache.appended_values[record.layer], dim=2)
    assert all_keys.shape[2] == record.generated
    for b in range(all_keys.shape[0]):
        for h in range(all_keys.shape[1]):
            positions = record.of(b, h)
            if isinstance(store.keys, Ragged):
                keys, values = store.keys.segment(b, h), store.values.segment(b, h)
            else:
                keys, values = store.keys[b, h], store.values[b, h]
            assert torch.equal(keys, all_keys[b, h, positions]), (record.scale, record.layer, b, h)
            assert torch.equal(values, all_values[b, h, positions]), (record.scale, record.layer, b, h)
    cache.checked += 1
    cache.ragged_checked += isinstance(store.keys, Ragged)


@pytest.mark.parametrize("policy", ["adakv", "snapkv", "streamingllm", "full"])
def test_reported_positions_are_those_of_the_keys_and_values_the_cache_holds(infinity, policy):
    schedule, template, _ = infinity.schedule()
    holder = {}
    make = get_policy(policy) if policy == "full" else get_policy(policy, budget="20%")
    cache = _HeldVersusAppended(infinity.num_layers, schedule, make,
                                on_compress=lambda record: _check_held(holder["cache"], record))
    holder["cache"] = cache
    infinity.generate_from_features(infinity.encode(["a red cube", "a green cone"]), schedule=schedule,
                                    template=template, cache=cache, seed=4)
    assert cache.checked == schedule.num_scales * infinity.num_layers
    if policy == "adakv":
        assert cache.ragged_checked > 0, "no ragged layer was checked"


def test_batches_are_numbered_and_each_reports_its_own_rows(var):
    records = []
    var.generate([1, 2, 3], policy="sliding_window", budget=30, batch_size=2, progress=False,
                 on_compress=records.append)
    batches = sorted({r.batch for r in records})
    assert batches == [0, 1]
    rows = {r.batch: r.positions.shape[0] for r in records}
    assert rows == {0: 4, 1: 2}  # CFG: conditional and unconditional rows of 2 labels, then of 1


def test_teacher_forced_passes_report_too(infinity, var):
    seen = []
    bits = infinity.generate(["a"], seed=0, progress=False).tokens
    infinity.teacher_forced_logits(["a"], bits, policy="sliding_window", budget=40, on_compress=seen.append)
    assert len(seen) == len(bits) * infinity.num_layers and seen[-1].lengths.max() == 40
    seen.clear()
    indices = var.generate([1], seed=0, progress=False).tokens
    var.teacher_forced([1], indices, policy="sliding_window", budget=30, on_compress=seen.append)
    assert len(seen) == len(indices) * var.num_layers and seen[-1].lengths.max() == 30


def test_a_bad_callback_fails_before_any_work(infinity, var, monkeypatch):
    monkeypatch.setattr(infinity, "encode", lambda *a: pytest.fail("the text encoder ran"))
    with pytest.raises(TypeError, match="on_compress must be a callable taking a kvpolicy.KeptTokens record, got 3"):
        infinity.generate(["a"], on_compress=3, progress=False)
    with pytest.raises(TypeError, match="on_compress must be a callable"):
        var.generate([1], on_compress="print", progress=False)
    schedule, template, _ = infinity.schedule()
    with pytest.raises(ValueError, match="pass on_compress= or your own cache=, not both"):
        infinity.generate_from_features([torch.zeros(2, 8)], schedule=schedule, template=template, on_compress=print,
                                        cache=KeptTokensCache(infinity.num_layers, schedule, on_compress=print))
    with pytest.raises(TypeError, match="on_compress must be a callable"):
        KeptTokensCache(infinity.num_layers, schedule, on_compress=None)
