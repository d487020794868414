"""Parity of the Infinity adapter with the official code (golden vectors in ../shared/golden).

The model is built from the golden ``model_config`` and ``state_dict`` through the public path a user
takes (``InfinityConfig.from_official``, ``InfinityTransformer``, ``load_transformer_weights``,
``InfinityModel.generate_from_features``). Tolerances are the golden README's: teacher-forced logits
per scale max|Δ| <= 1e-4 * max|golden_s|; bits and cache lengths exact; codes and cached K 1e-5.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from adapters.geometry import INFINITY_TEMPLATES
from adapters.infinity import InfinityConfig, InfinityModel, InfinityTransformer, load_transformer_weights
from kvpolicy import KVCache, ScaleSchedule, get_policy

from conftest import released_budget_file, require_golden


def _load_golden(golden_dir, case):
    path = require_golden(golden_dir / case / "golden.pt")
    return torch.load(path, weights_only=True)


def _build(golden) -> InfinityModel:
    config = InfinityConfig.from_official(golden["model_config"], token_bits=golden["vae_config"]["codebook_dim"])
    transformer = InfinityTransformer(config)
    load_transformer_weights(transformer, {k: v.float() for k, v in golden["state_dict"].items()})
    return InfinityModel(transformer.eval(), name="golden")


def _features(golden):
    text = golden["text"]
    bounds = text["cu_seqlens_k"].tolist()
    return [text["kv_compact"][a:b] for a, b in zip(bounds, bounds[1:])]


def _run(model, golden, run, *, forced, policy=None, cache_class=None):
    args = golden["args"]
    schedule = ScaleSchedule(golden["scale_schedule"])
    cache = None if cache_class is None else cache_class(model.config.depth, schedule, policy)
    return model.generate_from_features(
        _features(golden), schedule=schedule, template=INFINITY_TEMPLATES[args["h_div_w"]],
        policy=None if cache is not None else policy, cache=cache,
        seed=args["g_seed"], cfg=args["cfg"], tau=args["tau"], top_k=args["top_k"], top_p=args["top_p"],
        forced_bits=run["bits"] if forced else None, keep_logits=True)


def _assert_logits(result, run):
    """Per scale: max|mine - golden| <= 1e-4 * max|golden| (README tolerance). Returns relative errors."""
    errors = []
    for s, (mine, gold) in enumerate(zip(result.logits, run["logits"])):
        assert mine.shape == gold.shape, f"scale {s}: logits {tuple(mine.shape)} vs golden {tuple(gold.shape)}"
        torch.testing.assert_close(mine, gold, rtol=1e-4, atol=1e-4 * gold.abs().max().item(), msg=lambda m: f"scale {s}: {m}")
        errors.append(((mine - gold).abs().max() / gold.abs().max()).item())
    return errors


@pytest.fixture(scope="module")
def infinity_golden(golden_dir):
    return _load_golden(golden_dir, "infinity")


def test_teacher_forced_logits_and_sampler(infinity_golden):
    golden = infinity_golden
    result = _run(_build(golden), golden, golden, forced=True)
    errors = _assert_logits(result, golden)
    print("infinity max relative logit error per scale:", ["%.2e" % e for e in errors])
    # The sampler, fed our logits with the golden seed, draws the golden bits at every scale.
    for s, (mine, gold) in enumerate(zip(result.sampled_bits, golden["bits"])):
        assert torch.equal(mine, gold), f"scale {s}: sampled bits differ"


def test_free_running_bits_codes_and_cache(infinity_golden):
    golden = infinity_golden
    result = _run(_build(golden), golden, golden, forced=False)
    for s, (mine, gold) in enumerate(zip(result.bits, golden["bits"])):
        assert mine.dtype == torch.uint8 and torch.equal(mine, gold), f"scale {s}: bits differ"
    torch.testing.assert_close(result.summed_codes, golden["summed_codes"], rtol=0, atol=1e-5)

    cache, reference = result.cache, golden["cache"]
    assert list(cache.keys[0].shape) == reference["block0_after_last_scale"]["cached_k_shape"]
    assert list(cache.values[0].shape) == reference["block0_after_last_scale"]["cached_v_shape"]
    report = cache.report()
    for scale, lengths in reference["cached_len_per_layer"].items():
        assert report.kept_lengths[int(scale)] == list(lengths)
    positions = torch.tensor(reference["layer0_cached_k_positions"])
    torch.testing.assert_close(cache.keys[0][:, :, positions], reference["layer0_cached_k"], rtol=0, atol=1e-5)


def test_cache_after_first_scale_has_official_shape(infinity_golden):
    golden = infinity_golden
    model = _build(golden)
    schedule = ScaleSchedule(golden["scale_schedule"]).prefix(1)
    result = model.generate_from_features(_features(golden), schedule=schedule, template=INFINITY_TEMPLATES[1.0],
                                          seed=golden["args"]["g_seed"])
    assert list(result.cache.keys[0].shape) == golden["cache"]["block0_after_scale0"]["cached_k_shape"]
    assert torch.equal(result.bits[0], golden["bits"][0])


class _RecordingCache(KVCache):
    """Records the kept indices of every compressing call, to compare with the official selections."""

    def reset(self):
        super().reset()
        self.selections = []

    def compress(self, layer, scale, **kwargs):
        length = self.length(layer)
        result = super().compress(layer, scale, **kwargs)
        if result is not None and result.capacity is not None and length > result.capacity:
            self.selections.append((layer, scale, length, result.indices))
        return result


def test_scalekv_reference_run_matches_official(golden_dir):
    """ScaleKV in reference mode with the released 2B 10% budget file: per-layer cache lengths after
    every scale, every selection (SHA-256 of the kept indices), teacher-forced logits and the bits."""
    golden = _load_golden(golden_dir, "infinity_scalekv")
    config = golden["scalekv_config"]
    budget_file = released_budget_file(golden_dir, config["budget_file"])
    policy = get_policy("scalekv", mode="reference", budget_file=budget_file, window_size=config["window_size"],
                        kernel_size=config["kernel_size"], pooling=config["pooling"])
    run = golden["runs"]["scalekv"]
    result = _run(_build(golden), golden, run, forced=True, policy=policy, cache_class=_RecordingCache)

    report = result.cache.report()
    for scale, lengths in run["cached_len_per_layer"].items():
        assert report.kept_lengths[int(scale)] == list(lengths), f"cache lengths differ after scale {scale}"
    calls = result.cache.selections
    assert len(calls) == len(run["selections"])
    for (layer, scale, length, indices), official in zip(calls, run["selections"]):
        assert (layer, scale, length) == (official["layer"], official["scale_ind"], official["key_len"])
        digest = hashlib.sha256(indices.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
        assert digest == official["kept_indices_sha256"], f"selection differs at layer {layer}, scale {scale}"
    errors = _assert_logits(result, run)
    print("infinity_scalekv max relative logit error per scale:", ["%.2e" % e for e in errors])
    for s, (mine, gold) in enumerate(zip(result.sampled_bits, run["bits"])):
        assert torch.equal(mine, gold), f"scale {s}: sampled bits differ"


def test_full_cache_run_on_the_1m_schedule_matches_official(golden_dir):
    """The unpatched run of the same 32-layer model (13 scales, 10521 tokens): logits, bits, lengths."""
    golden = _load_golden(golden_dir, "infinity_scalekv")
    run = golden["runs"]["full"]
    result = _run(_build(golden), golden, run, forced=True)
    report = result.cache.report()
    for scale, lengths in run["cached_len_per_layer"].items():
        assert report.kept_lengths[int(scale)] == list(lengths)
    errors = _assert_logits(result, run)
    print("infinity_scalekv full-run max relative logit error per scale:", ["%.2e" % e for e in errors])
    for s, (mine, gold) in enumerate(zip(result.sampled_bits, run["bits"])):
        assert torch.equal(mine, gold), f"scale {s}: sampled bits differ"
