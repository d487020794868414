"""VAR parity with the official code: ``shared/golden/var`` (tiny official VAR + VQVAE, CPU, fp32).

Teacher-forced logits per scale (README tolerance: max|Δ| <= 1e-4 · max|golden|), sampled indices
with the same seed (exact), f_hat and the decoded image (max abs 1e-5). The VQVAE decoder weights
are regenerated here from the golden file's recipe and checked against its SHA-256 digests.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from adapters.var import VARConfig, VQVAEConfig, build_model

MASK32 = 0xFFFFFFFF


def _hash32(x: np.ndarray) -> np.ndarray:
    x = (((x >> 16) ^ x) * 0x45D9F3B) & MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & MASK32
    return (x >> 16) ^ x


def _hash_uniform(n: int, seed: int) -> np.ndarray:
    """n values in [-1, 1), multiples of 2**-15 (the golden README's generator)."""
    s = int(_hash32(np.array([seed & MASK32], dtype=np.int64))[0])
    h = _hash32(_hash32(np.arange(n, dtype=np.int64)) ^ s)
    return ((h & 0xFFFF) - 32768).astype(np.float32) / np.float32(32768)


def decoder_weights(recipe: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key, r in recipe.items():
        n = int(np.prod(r["shape"]))
        w = torch.from_numpy(r["offset"] + r["amp"] * _hash_uniform(n, r["key_seed"])).view(r["shape"]).float()
        assert hashlib.sha256(w.numpy().tobytes()).hexdigest() == r["sha256"], key
        out[key] = w
    return out


@pytest.fixture(scope="module")
def golden(golden_dir):
    return torch.load(golden_dir / "var" / "golden.pt", weights_only=True)


@pytest.fixture(scope="module")
def model(golden):
    vc, qc = golden["var_config"], golden["vqvae_config"]
    dd = qc["ddconfig"]
    var_config = VARConfig(depth=vc["depth"], embed_dim=vc["embed_dim"], num_heads=vc["num_heads"],
                           patch_nums=vc["patch_nums"], vocab_size=qc["vocab_size"], cvae=qc["z_channels"],
                           num_classes=vc["num_classes"], shared_aln=vc["shared_aln"], mlp_ratio=vc["mlp_ratio"],
                           norm_eps=vc["norm_eps"])
    vqvae_config = VQVAEConfig(vocab_size=qc["vocab_size"], z_channels=qc["z_channels"], ch=dd["ch"],
                               ch_mult=dd["ch_mult"], num_res_blocks=dd["num_res_blocks"], using_sa=dd["using_sa"],
                               using_mid_sa=dd["using_mid_sa"], quant_resi=qc["quant_resi"],
                               share_quant_resi=qc["share_quant_resi"])
    var_sd = {k: v.float() if v.is_floating_point() else v for k, v in golden["var_state_dict"].items()}
    vae_sd = {k: v.float() for k, v in golden["vqvae_state_dict"].items()}
    vae_sd.update(decoder_weights(golden["vqvae_decoder_recipe"]))
    return build_model(var_config, vqvae_config, var_weights=var_sd, vae_weights=vae_sd, name="var-golden")


def test_recipe_regenerates_the_recorded_decoder_values(golden):
    recipe = golden["vqvae_decoder_recipe"]
    weights = decoder_weights(recipe)  # asserts every SHA-256
    for key in ("decoder.conv_in.weight", "decoder.norm_out.weight"):
        first = weights[key].flatten()[:4].tolist()
        assert first == pytest.approx(recipe[key]["first_values"], abs=0)


def test_teacher_forced_logits_f_hat_and_image(golden, model):
    labels = golden["labels"].tolist()
    indices = [i.long() for i in golden["indices"]]
    out = model.teacher_forced(labels, indices, cfg=golden["args"]["cfg"])
    assert len(out.logits) == len(golden["logits"])
    for s, (mine, ref) in enumerate(zip(out.logits, golden["logits"])):
        assert mine.shape == ref.shape and mine.dtype == torch.float32
        worst = (mine - ref).abs().max().item()
        assert worst <= 1e-4 * ref.abs().max().item(), f"scale {s}: max |Δ| {worst:.3g}"
    assert (out.f_hat - golden["f_hat"]).abs().max().item() <= 1e-5
    assert (out.images - golden["image"]).abs().max().item() <= 1e-5


def test_sampled_indices_match_with_the_same_seed(golden, model):
    args = golden["args"]
    out = model.generate(golden["labels"], seed=args["g_seed"], cfg=args["cfg"], top_k=args["top_k"],
                         top_p=args["top_p"], more_smooth=args["more_smooth"])
    for s, (mine, ref) in enumerate(zip(out.tokens, golden["indices"])):
        assert torch.equal(mine, ref.long()), f"scale {s}"
    # the uint8 image is the golden [0, 1] image rounded to 1/255
    expected = golden["image"].mul(255).round().permute(0, 2, 3, 1)
    assert (out.images.float() - expected).abs().max().item() <= 1
    assert out.images.shape == tuple(expected.shape)


def test_a_different_seed_gives_different_indices(golden, model):
    args = golden["args"]
    out = model.generate(golden["labels"], seed=args["g_seed"] + 1, cfg=args["cfg"])
    assert any(not torch.equal(mine, ref.long()) for mine, ref in zip(out.tokens, golden["indices"]))
