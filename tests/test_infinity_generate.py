"""Infinity adapter: presets against the official key dumps, tiny generation, policies, calibration
hook, counted KV bytes against ``kvpolicy.simulate``, dtypes and input validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters import load_model
from adapters.geometry import get_geometry
from adapters.infinity import InfinityConfig, InfinityModel, InfinityTransformer, random_text_encoder
from adapters.infinity.bsq_vae import BSQVAEConfig, BSQVAEDecoder
from adapters.infinity.config import PRESETS
from adapters.infinity.weights import random_init
from kvpolicy import get_policy, simulate
from conftest import require_golden

KEYS_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "keys"


@pytest.fixture(scope="module")
def tiny():
    return load_model("infinity-tiny-random")


@pytest.mark.parametrize("name, dump", [
    ("infinity-2b", "keys_infinity_2b.json"), ("infinity-8b", "keys_infinity_8b.json"),
    ("infinity-layer12", "keys_infinity_layer12.json"), ("infinity-layer16", "keys_infinity_layer16.json"),
    ("infinity-layer24", "keys_infinity_layer24.json"), ("infinity-layer32", "keys_infinity_layer32.json"),
    ("infinity-layer40", "keys_infinity_layer40.json"), ("infinity-layer48", "keys_infinity_layer48.json"),
])
def test_presets_have_the_official_keys_shapes_and_parameter_counts(name, dump):
    path = require_golden(KEYS_DIR / dump, "released key dump")
    reference = json.loads(path.read_text())
    with torch.device("meta"):
        model = InfinityTransformer(PRESETS[name].model)
    mine = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert mine == {k: list(v) for k, v in reference["keys"].items()}
    assert sum(p.numel() for p in model.parameters()) == reference["params"]
    geometry = get_geometry(name)
    assert (geometry.num_layers, geometry.num_heads, geometry.head_dim) == (
        model.config.depth, model.config.num_heads, model.config.head_dim)


def test_tiny_generates_a_256_image_with_a_full_cache(tiny):
    out = tiny.generate(["a red cube", "a blue sphere"], seed=1, progress=False)
    assert out.images.shape == (2, 256, 256, 3) and out.images.dtype == torch.uint8
    schedule = tiny.geometry(256).schedule
    assert [tuple(b.shape) for b in out.tokens] == [(2, h, w, 32) for h, w in schedule.shapes]
    assert all(b.dtype == torch.uint8 and int(b.max()) <= 1 for b in out.tokens)
    report = out.cache_report
    c = tiny.config
    assert report.kept_lengths == [[n] * c.depth for n in schedule.cumulative]
    per_token = 2 * 2 * c.num_heads * c.head_dim * 4  # K and V, 2 rows (cond + uncond), float32
    assert report.kv_bytes == [c.depth * n * per_token * 2 for n in schedule.cumulative]
    assert report.peak_kv_bytes == report.kv_bytes[-1] and len(report.scale_seconds) == schedule.num_scales
    assert all(s > 0 for s in report.scale_seconds)
    assert out.config["seed"] == 1 and out.config["resolution"] == "0.06M"
    assert out.images.float().std() > 0


def test_same_seed_same_image_other_seed_other_bits(tiny):
    a = tiny.generate(["a cat"], seed=4, progress=False)
    b = tiny.generate(["a cat"], seed=4, progress=False)
    c = tiny.generate(["a cat"], seed=5, progress=False)
    assert torch.equal(a.images, b.images) and all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert not all(torch.equal(x, y) for x, y in zip(a.tokens, c.tokens))


def test_cfg_rows_conditional_first_and_no_guidance_rows_at_cfg_1(tiny):
    features = tiny.encode(["abc", "defgh"])
    ctx = tiny.transformer.prepare_text(features, guidance=True)
    assert ctx.rows == 4 and ctx.mask.sum(1).tolist() == [4, 6, 4, 6]
    uncond = tiny.transformer.cfg_uncond
    expected = tiny.transformer.text_proj_for_ca(tiny.transformer.text_norm(uncond[:4]))
    torch.testing.assert_close(ctx.text[2, :4], expected)  # row B + 0: cfg_uncond truncated to prompt 0's length
    out = tiny.generate(["abc"], cfg=1.0, progress=False)
    assert out.cache_report.extra["rows_per_batch"] == 1
    assert tiny.generate(["abc"], cfg=3.0, progress=False).cache_report.extra["rows_per_batch"] == 2


def test_policy_physically_reduces_the_cache(tiny):
    policy = get_policy("streamingllm", budget=40)
    out = tiny.generate(["a dog"], policy=policy, progress=False)
    report = out.cache_report
    assert all(k <= 40 for k in report.kept_lengths[-1])
    assert report.kv_bytes[-1] < report.full_kv_bytes[-1] and report.peak_kv_bytes < report.full_peak_kv_bytes
    assert out.config["policy"]["name"] == "streamingllm"


def test_scalekv_on_tiny_uses_the_cache_plan(tiny):
    out = tiny.generate(["a red cube"], policy=get_policy("scalekv", drafters=[0], budget="10%"), progress=False)
    report = out.cache_report
    for kept, caps in zip(report.kept_lengths, report.capacities):
        assert all(cap is None or k <= cap for k, cap in zip(kept, caps))
    assert report.kept_lengths[-1][0] > report.kept_lengths[-1][1]  # layer 0 drafts, the others refine


class _Recorder:
    def __init__(self):
        self.calls = {}

    def observe(self, layer, scale, queries, keys, *, current_start):
        self.calls[(layer, scale)] = (tuple(queries.shape), tuple(keys.shape), current_start)


def test_calibration_hook_sees_every_layer_and_scale(tiny):
    recorder = _Recorder()
    tiny.generate(["a", "b"], stats=recorder, progress=False)
    c, schedule = tiny.config, tiny.geometry().schedule
    assert set(recorder.calls) == {(l, s) for l in range(c.depth) for s in range(schedule.num_scales)}
    for (layer, scale), (q, k, start) in recorder.calls.items():
        n, total = schedule.tokens(scale), schedule.cumulative_length(scale)
        assert q == (2, c.num_heads, n, c.head_dim)  # the two conditional rows only
        assert k == (2, c.num_heads, total, c.head_dim) and start == total - n


def test_attention_stats_collector_from_a_real_generation(tiny):
    from policies.scalekv.calibration import ScaleKVStatsCollector

    schedule = tiny.geometry().schedule
    collector = ScaleKVStatsCollector(tiny.config.depth, schedule.num_scales, max_queries=32)
    tiny.generate(["a red cube"], stats=collector, progress=False)
    assert collector.calls == tiny.config.depth * schedule.num_scales
    result = collector.result()
    assert result is not None


def test_peak_kv_bytes_equal_simulate_on_the_1024_schedule():
    """scalekv at 10% on the real 1:1 '1M' schedule (13 scales, 10521 tokens), a 2-layer tiny-width
    model: the counted bytes of the generation equal kvpolicy.simulate for that geometry."""
    config = InfinityConfig(depth=2, embed_dim=32, num_heads=2, block_chunks=1, token_bits=2,
                            mlp_ratio=8.0, text_channels=128, text_maxlen=32)
    transformer = random_init(InfinityTransformer(config), seed=3).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = BSQVAEDecoder(BSQVAEConfig(codebook_dim=2, base_channels=32, channel_multipliers=(1, 1), patch_size=2)).eval()
    model = InfinityModel(transformer, vae, random_text_encoder(128, seed=1), name="infinity-2layer")
    policy = get_policy("scalekv", drafters=[0], budget="10%")
    out = model.generate(["a red cube"], policy=policy, resolution=1024, progress=False)
    assert out.images.shape == (1, 128, 128, 3)
    geometry = model.geometry(1024)
    assert geometry.schedule.total == 10521
    predicted = simulate(policy, schedule=geometry.schedule, num_layers=2, num_heads=2, head_dim=16, batch=1,
                         cfg=True, dtype=torch.float32)
    assert out.cache_report.peak_kv_bytes == predicted.peak_kv_bytes
    assert out.cache_report.kv_bytes == predicted.kv_bytes
    assert out.cache_report.kept_lengths == predicted.kept_lengths
    assert out.cache_report.read_by_last_scale_ratio < 0.15  # about 10% of the 6425-token prefix


def test_bfloat16_blocks_and_cache(tiny):
    model = load_model("infinity-tiny-random", dtype=torch.bfloat16, key_dtype=None)  # a bf16 key cache
    out = model.generate(["a red cube"], progress=False)
    full = tiny.generate(["a red cube"], progress=False)
    assert out.images.dtype == torch.uint8 and out.config["dtype"] == "bfloat16"
    assert out.config["key_dtype"] == "bfloat16"
    assert out.cache_report.kv_bytes[-1] * 2 == full.cache_report.kv_bytes[-1]  # bf16 K/V: half the bytes
    assert model.transformer.blocks()[0].sa.mat_qkv.weight.dtype == torch.bfloat16
    assert model.transformer.head.weight.dtype == torch.float32  # head, embeddings stay float32


def test_official_kv_dtypes_keep_keys_float32_under_bf16():
    model = load_model("infinity-tiny-random", dtype=torch.bfloat16, official_kv_dtypes=True)
    plain = load_model("infinity-tiny-random", dtype=torch.bfloat16, official_kv_dtypes=False)
    official = model.generate(["a red cube"], progress=False).cache_report.kv_bytes[-1]
    assert official * 2 == plain.generate(["a red cube"], progress=False).cache_report.kv_bytes[-1] * 3  # 6 vs 4 bytes


def test_the_official_key_layout_is_the_default():
    default = load_model("infinity-tiny-random", dtype=torch.bfloat16).generate(["a red cube"], progress=False)
    bf16_keys = load_model("infinity-tiny-random", dtype=torch.bfloat16, key_dtype="bf16").generate(["a red cube"], progress=False)
    assert default.config["key_dtype"] == "float32" and bf16_keys.config["key_dtype"] == "bfloat16"
    assert default.cache_report.kv_bytes[-1] * 2 == bf16_keys.cache_report.kv_bytes[-1] * 3  # 4 + 2 vs 2 + 2 bytes


def test_geometry_matches_the_registered_tiny_geometry(tiny):
    assert tiny.geometry() == get_geometry("infinity-tiny-random")
    wide = tiny.geometry(512, aspect_ratio=0.5)
    assert wide.schedule.shapes[-1] == (23, 46) and wide.schedule.num_scales == 10


def test_batches_and_progress(tiny, capsys):
    out = tiny.generate(["a", "b", "c"], batch_size=2, progress=True)
    assert out.images.shape[0] == 3 and out.tokens[-1].shape[0] == 3
    assert out.cache_report.extra["num_batches"] == 2
    assert "scale" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    ({"resolution": 300}, "resolution 300"),
    ({"resolution": "2M"}, "resolution '2M'"),
    ({"aspect_ratio": 0}, "aspect_ratio"),
    ({"cfg": float("nan")}, "cfg"),
    ({"tau": 0}, "tau"),
    ({"top_k": -1}, "top_k"),
    ({"top_p": 1.5}, "top_p"),
    ({"batch_size": 0}, "batch_size"),
    ({"dtype": torch.int8}, "dtype"),
    ({"budget": "10%"}, "without policy"),
])
def test_bad_arguments_fail_clearly(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny.generate(["a"], progress=False, **kwargs)


def test_bad_prompts_fail_clearly(tiny):
    with pytest.raises(ValueError, match="non-empty list of strings"):
        tiny.generate([], progress=False)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        tiny.generate([3], progress=False)


def _patchify_model():
    config = InfinityConfig(depth=2, embed_dim=64, num_heads=2, block_chunks=1, token_bits=8, spatial_patchify=True,
                            text_channels=128, text_maxlen=32)
    transformer = random_init(InfinityTransformer(config), seed=2).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = BSQVAEDecoder(BSQVAEConfig.tiny(codebook_dim=2, spatial_patchify=True)).eval()
    return InfinityModel(transformer, vae, random_text_encoder(128, seed=1), name="infinity-8b-shaped",
                         default_resolution=256)


def test_spatial_patchify_round_trip_and_generation():
    """8B layout: token channel k <-> VAE channel k // 4 at (2y + (k % 4) // 2, 2x + k % 2); the next
    scale's input is the pixel-unshuffled latent, so bits -> codes -> unshuffle gives every token its
    own bits back (as +-c)."""
    import torch.nn.functional as F
    from adapters.infinity.bsq_vae import bits_to_codes

    bits = torch.randint(0, 2, (2, 3, 5, 8), dtype=torch.uint8)
    codes = bits_to_codes(bits, 2, spatial_patchify=True)
    assert codes.shape == (2, 2, 6, 10)
    tokens = F.pixel_unshuffle(codes, 2).permute(0, 2, 3, 1)
    assert torch.equal(tokens > 0, bits.bool())
    one = torch.zeros(1, 3, 5, 8, dtype=torch.uint8)
    one[0, 1, 2, 6] = 1  # token (y=1, x=2), channel 6 -> VAE channel 1 at (2 + 1, 4 + 0)
    positive = (bits_to_codes(one, 2, spatial_patchify=True) > 0).nonzero().tolist()
    assert positive == [[0, 1, 3, 4]]

    model = _patchify_model()
    out = model.generate(["a red cube"], progress=False)
    assert out.images.shape == (1, 256, 256, 3)
    assert [tuple(b.shape) for b in out.tokens] == [(1, h, w, 8) for h, w in model.geometry().schedule.shapes]


def test_dtype_names_are_accepted_like_var():
    """Both adapters take torch dtypes or their names ('bf16', 'bfloat16', …) through one parser."""
    from adapters import load_model

    model = load_model("infinity-tiny-random", dtype="bf16")
    assert model.transformer.block_dtype == torch.bfloat16
    model.generate(["a red cube"], dtype="float32", progress=False)
    assert model.transformer.block_dtype == torch.float32
    with pytest.raises(ValueError, match=r"dtype 'int8' is not one of float32, bfloat16, float16"):
        load_model("infinity-tiny-random", dtype="int8")
