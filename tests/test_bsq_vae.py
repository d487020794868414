"""BSQ-VAE decoder: golden parity, both key spellings, strict loading, presets, uint8 conversion."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.infinity.bsq_vae import (
    BSQVAEConfig,
    BSQVAEDecoder,
    bits_to_codes,
    images_to_uint8,
    load_bsq_vae,
    resize_codes,
)
from conftest import require_golden

# Recommended tolerances of shared/golden/README.md (bsq_vae section).
IMAGE_TOL = 1e-5
SUMMED_CODES_TOL = 1e-6


@pytest.fixture(scope="module")
def golden(golden_dir):
    return torch.load(golden_dir / "bsq_vae" / "golden.pt", weights_only=True)


@pytest.fixture(scope="module")
def golden_state(golden):
    return {k: v.float() for k, v in golden["state_dict"].items()}  # float8 storage -> exact float32


@pytest.fixture(scope="module")
def golden_decoder(golden_state):
    return load_bsq_vae(golden_state)


def _unwrapped(key: str) -> str:
    """The alternative official spelling: drop the Conv/Normalize wrapper level (reference §10.3)."""
    return re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", key)


def _seeded_decoder(config: BSQVAEConfig, seed: int = 0) -> BSQVAEDecoder:
    torch.manual_seed(seed)
    decoder = BSQVAEDecoder(config).eval()
    with torch.no_grad():  # non-trivial norms/biases so that loading mistakes show
        for name, p in decoder.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return decoder


# -- golden parity ------------------------------------------------------------------------------


def test_config_from_golden_fields_matches_inferred(golden, golden_state):
    from_decoder_config = BSQVAEConfig.from_official(golden["decoder_config"])
    from_args = BSQVAEConfig.from_official(golden["autoencoder_args"])
    assert from_decoder_config == from_args
    inferred = BSQVAEConfig.from_state_dict(golden_state)
    assert BSQVAEDecoder(inferred).state_dict().keys() == BSQVAEDecoder(from_args).state_dict().keys()


def test_decode_matches_golden(golden, golden_state):
    decoder = load_bsq_vae(golden_state, BSQVAEConfig.from_official(golden["autoencoder_args"]))
    case = golden["decode_case"]
    image = decoder.decode(case["summed_codes"])
    assert image.shape == case["image"].shape
    assert (image - case["image"]).abs().max().item() <= IMAGE_TOL
    assert image.min() >= -1 and image.max() <= 1
    if (case["image"].abs() == 1).any():  # the clamp is exercised (public set: 19% at +-1)
        assert (image.abs() == 1).any()


def test_bits_path_matches_golden(golden, golden_decoder):
    case = golden["bits_case"]
    c = torch.tensor(0.1767767071723938)  # official code value for d = 32 (golden README)
    for bits, codes in zip(case["bits"], case["codes"]):
        mine = golden_decoder.bits_to_codes(bits)
        assert mine.dtype == torch.float32
        assert torch.equal(mine, codes.squeeze(2))  # exact
        assert torch.equal(mine.abs(), torch.full_like(mine, c.item()))
        assert torch.equal(mine > 0, bits.permute(0, 3, 1, 2).bool())
    summed, image = golden_decoder.decode_bits(case["bits"])
    assert (summed - case["summed_codes"].squeeze(2)).abs().max().item() <= SUMMED_CODES_TOL
    assert (image - case["image"]).abs().max().item() <= IMAGE_TOL


def test_resize_codes_is_the_official_trilinear(golden, golden_decoder):
    case = golden["bits_case"]
    codes = golden_decoder.bits_to_codes(case["bits"][1])  # 3x3
    up = resize_codes(codes, (8, 8))
    official = torch.nn.functional.interpolate(codes.unsqueeze(2), size=(1, 8, 8), mode="trilinear").squeeze(2)
    assert torch.equal(up, official)
    bilinear = torch.nn.functional.interpolate(codes, size=(8, 8), mode="bilinear")
    assert (up - bilinear).abs().max() < 1e-6  # reference §8.2: same up to rounding
    with pytest.raises(ValueError, match=r"\(B, d, h, w\)"):
        resize_codes(codes.unsqueeze(2), (8, 8))


# -- key spellings and strictness ---------------------------------------------------------------


def test_unwrapped_spelling_in_a_full_checkpoint_loads_identically(golden, golden_state, golden_decoder):
    state = {_unwrapped(k): v for k, v in golden_state.items()}
    assert len(set(state) & set(golden_state)) == 0  # every key really renamed
    assert "decoder.up.1.upsample.conv.weight" in state and "decoder.norm_out.weight" in state
    # A released-style file: weights under 'vae', with encoder keys and the quantizer masks present.
    mask = 2 ** torch.arange(31, -1, -1)
    checkpoint = {
        "vae": {**state, "encoder.conv_in.conv.weight": torch.zeros(32, 3, 3, 3),
                "quantizer.lfq.mask": mask, "quantize.lfq.mask": mask},
        "ema": {},
    }
    decoder = load_bsq_vae(checkpoint)
    for key, value in golden_decoder.state_dict().items():
        assert torch.equal(decoder.state_dict()[key], value), key
    image = decoder.decode(golden["decode_case"]["summed_codes"])
    assert (image - golden["decode_case"]["image"]).abs().max().item() <= IMAGE_TOL


def test_bf16_autocast_and_bf16_weights(golden, golden_state):
    """The official run decodes under bf16 autocast (reference §9); both bf16 routes work."""
    case = golden["decode_case"]
    decoder = load_bsq_vae(golden_state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_image = decoder.decode(case["summed_codes"])
    bf16_decoder = load_bsq_vae(golden_state, dtype=torch.bfloat16)
    assert bf16_decoder.conv_in.conv.weight.dtype == torch.bfloat16
    weights_image = bf16_decoder.decode(case["summed_codes"])  # float32 input is cast to the weights
    for image in (autocast_image, weights_image):
        assert image.dtype == torch.bfloat16
        assert 0 < (image.float() - case["image"]).abs().max() < 0.1  # bf16 rounding, nothing worse
        batch, _, height, width = case["image"].shape
        assert images_to_uint8(image).shape == (batch, height, width, 3)


def test_missing_key_is_an_error_naming_it(golden_state):
    state = dict(golden_state)
    del state["decoder.up.0.block.0.nin_shortcut.conv.weight"]
    with pytest.raises(KeyError, match=r"missing keys: decoder\.up\.0\.block\.0\.nin_shortcut\.conv\.weight"):
        load_bsq_vae(state, BSQVAEConfig.from_state_dict(golden_state))
    with pytest.warns(UserWarning, match="nin_shortcut"):
        decoder = load_bsq_vae(state, BSQVAEConfig.from_state_dict(golden_state), strict=False)
    assert torch.equal(decoder.conv_out.conv.weight, golden_state["decoder.conv_out.conv.weight"])


def test_mis_shaped_key_is_an_error_even_when_not_strict(golden_state):
    state = dict(golden_state)
    state["decoder.conv_out.conv.bias"] = torch.zeros(4)
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"decoder\.conv_out\.conv\.bias \(4,\) \(model: \(3,\)\)"):
            load_bsq_vae(state, strict=strict)


def test_unexpected_keys_and_bad_masks_are_errors(golden_state):
    state = {**golden_state, "decoder.mid.attn_1.q.conv.weight": torch.zeros(64, 64, 1, 1)}
    with pytest.raises(KeyError, match=r"unexpected keys: decoder\.mid\.attn_1\.q\.conv\.weight"):
        load_bsq_vae(state)
    with pytest.warns(UserWarning, match="attn_1"):
        load_bsq_vae(state, strict=False)
    with pytest.warns(UserWarning, match=r"ignored 1 keys.*discriminator\.conv\.weight"):
        load_bsq_vae({**golden_state, "discriminator.conv.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="codebook_dim=32"):
        load_bsq_vae({**golden_state, "quantizer.lfq.mask": torch.ones(14)})
    both = {**golden_state, "decoder.conv_in.weight": golden_state["decoder.conv_in.conv.weight"]}
    with pytest.raises(ValueError, match=r"both spellings.*decoder\.conv_in\.conv\.weight"):
        load_bsq_vae(both)
    with pytest.raises(KeyError, match="neither a 'vae' entry"):
        load_bsq_vae({"model": golden_state})
    with pytest.raises(KeyError, match="'ema'"):
        load_bsq_vae({"vae": golden_state}, entry="ema")
    with pytest.raises(FileNotFoundError, match="no_such_vae.pth"):
        load_bsq_vae("no_such_vae.pth")


# -- tiny round trip through files ---------------------------------------------------------------


@pytest.mark.parametrize("spelling,zipfile", [("wrapped", True), ("unwrapped", False)])
def test_tiny_round_trip_through_a_pth_file(tmp_path, spelling, zipfile):
    config = BSQVAEConfig.tiny()
    original = _seeded_decoder(config, seed=3)
    path = tmp_path / "vae.pth"
    torch.save({"vae": original.official_state_dict(spelling)}, path, _use_new_zipfile_serialization=zipfile)
    loaded = load_bsq_vae(path)
    assert loaded.config == config  # shape inferred from the file
    codes = bits_to_codes(torch.randint(0, 2, (2, 2, 3, 32), generator=torch.Generator().manual_seed(1)), 32)
    expected = original.decode(codes)
    assert expected.shape == (2, 3, 32, 48)  # stride 16
    assert torch.equal(loaded.decode(codes), expected)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_tiny_patchify_decoder_shapes():
    config = BSQVAEConfig.tiny(codebook_dim=8, spatial_patchify=True)
    assert (config.token_bits, config.upsample_factor, config.token_to_latent) == (32, 8, 2)
    decoder = _seeded_decoder(config)
    bits = torch.randint(0, 2, (1, 2, 2, 32), dtype=torch.uint8)
    codes = decoder.bits_to_codes(bits)
    assert codes.shape == (1, 8, 4, 4)
    image = decoder.decode(codes)
    assert image.shape == (1, 3, 32, 32) and image.abs().max() <= 1


# -- presets against the released key dumps -----------------------------------------------------


@pytest.mark.parametrize("preset,dump,count", [("infinity_2b", "vaekeys_infinity_2b.json", 154),
                                               ("infinity_8b", "vaekeys_infinity_8b.json", 128)])
def test_presets_match_released_key_dumps(golden_dir, preset, dump, count):
    path = require_golden(golden_dir.parent / "reference" / "keys" / dump, "released key dump")
    released = json.loads(path.read_text())
    config = getattr(BSQVAEConfig, preset)()
    with torch.device("meta"):  # shapes only: no 65 M-parameter allocation
        decoder = BSQVAEDecoder(config)
    mine = {k: list(v.shape) for k, v in decoder.official_state_dict().items()}
    theirs = {k: v for k, v in released.items() if k.startswith("decoder.")}
    assert len(mine) == count and mine == theirs
    assert sum(math.prod(s) for s in mine.values()) == pytest.approx(65.1e6 if count == 154 else 48.5e6, rel=2e-3)
    # The full file (encoder keys, masks) infers the preset, spatial patchify included.
    meta_state = {k: torch.empty(v, device="meta") for k, v in released.items()}
    assert BSQVAEConfig.from_state_dict(meta_state) == config
    assert config.upsample_factor == (16 if preset == "infinity_2b" else 8)
    assert config.token_bits == (32 if preset == "infinity_2b" else 56)


def test_from_official_vae_config_follows_the_official_loader():
    assert BSQVAEConfig.from_official({"codebook_dim": 32, "codebook_size": 2**32, "patch_size": 16,
                                       "quantizer": "MultiScaleBSQ", "z_interplote_up": "trilinear"}) \
        == BSQVAEConfig.infinity_2b()
    assert BSQVAEConfig.from_official({"codebook_dim": 14, "patch_size": 8}) == BSQVAEConfig.infinity_8b()
    with pytest.raises(ValueError, match="codebook_size"):
        BSQVAEConfig.from_official({"codebook_dim": 14, "codebook_size": 2**16, "patch_size": 8})
    with pytest.raises(ValueError, match="use_pxsf=True"):
        BSQVAEConfig.from_official({"ch": 32, "ch_mult": [1, 2], "z_channels": 32, "patch_size": 16, "use_pxsf": True})


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="multiple of 32 or 24"):
        BSQVAEConfig(codebook_dim=4, base_channels=20, channel_multipliers=(1, 2))
    with pytest.raises(ValueError, match="power of two, got 12"):
        BSQVAEConfig(codebook_dim=4, base_channels=32, patch_size=12)
    with pytest.raises(ValueError, match="codebook_dim must be a positive int, got 0"):
        BSQVAEConfig(codebook_dim=0)
    with pytest.raises(ValueError, match="no upsampler"):
        BSQVAEConfig(codebook_dim=4, base_channels=32, channel_multipliers=(1,))


# -- bits -> codes ------------------------------------------------------------------------------


def test_spatial_patchify_bit_layout():
    """Token channel k -> VAE channel k // 4 at (2y + (k % 4) // 2, 2x + k % 2) (reference §8.2)."""
    d = 14
    for k in range(4 * d):
        bits = torch.zeros(1, 2, 3, 4 * d, dtype=torch.uint8)
        bits[0, 1, 2, k] = 1
        codes = bits_to_codes(bits, d, spatial_patchify=True)
        assert codes.shape == (1, d, 4, 6)
        positive = (codes > 0).nonzero().tolist()
        assert positive == [[0, k // 4, 2 * 1 + (k % 4) // 2, 2 * 2 + k % 2]]


def test_bits_to_codes_rejects_bad_bits():
    with pytest.raises(ValueError, match="expects 4 x 14"):
        bits_to_codes(torch.zeros(1, 1, 1, 14, dtype=torch.uint8), 14, spatial_patchify=True)
    with pytest.raises(ValueError, match="0 or 1; found values \\[0, 2\\]"):
        bits_to_codes(torch.tensor([[[[0, 2]]]]), 2)
    with pytest.raises(ValueError, match="integer or bool"):
        bits_to_codes(torch.zeros(1, 1, 1, 2), 2)


@settings(max_examples=25, deadline=None)
@given(d=st.sampled_from([2, 4, 14, 16, 32]), seed=st.integers(0, 2**16))
def test_codes_are_unit_vectors_of_plus_minus_c(d, seed):
    bits = torch.randint(0, 2, (1, 2, 2, d), generator=torch.Generator().manual_seed(seed))
    codes = bits_to_codes(bits, d)
    assert torch.allclose(codes.norm(dim=1), torch.ones(1, 2, 2))
    assert torch.allclose(codes.abs(), torch.full_like(codes, d**-0.5))
    assert torch.equal(codes > 0, bits.permute(0, 3, 1, 2).bool())


# -- uint8 conversion ---------------------------------------------------------------------------


def test_images_to_uint8_truncates_like_the_official_code():
    values = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 0.999, -0.9999, 2 * 200.99 / 255 - 1])
    image = values.view(1, 1, 1, -1).expand(1, 3, 1, -1).clone()
    image[0, 1] = 1.0  # distinguish the channels
    image[0, 2] = -1.0
    rgb = images_to_uint8(image)
    assert rgb.dtype == torch.uint8 and rgb.shape == (1, 1, 8, 3)
    # (x + 1) / 2 * 255 truncated: 0, 63.75, 127.5, 191.25, 255, 254.87…, 0.01…, 200.99
    assert rgb[0, 0, :, 0].tolist() == [0, 63, 127, 191, 255, 254, 0, 200]
    assert rgb[0, 0, :, 1].tolist() == [255] * 8 and rgb[0, 0, :, 2].tolist() == [0] * 8
    bgr = images_to_uint8(image, bgr=True)
    assert torch.equal(bgr, rgb.flip(-1))


def test_images_to_uint8_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[-1, 1\].*1\.5"):
        images_to_uint8(torch.full((1, 3, 2, 2), 1.5))
    with pytest.raises(ValueError, match="nan"):
        images_to_uint8(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        images_to_uint8(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="floating"):
        images_to_uint8(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))


def test_decoder_rejects_wrong_latent_width(golden_decoder):
    with pytest.raises(ValueError, match=r"\(B, 32, H, W\)"):
        golden_decoder.decode(torch.zeros(1, 14, 4, 4))
