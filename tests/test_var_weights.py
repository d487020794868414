"""VAR checkpoint loading: official key layout, strictness, local files, the hub and the offline error."""

from __future__ import annotations

import json
import re

import pytest
import torch

import adapters.var.weights as var_weights
from adapters import load_model
from adapters.var import PRESETS, VAE_FILE, VARTransformer, VQVAE, WeightsUnavailableError, build_model
from conftest import require_golden


@pytest.fixture(scope="module")
def reference_keys(golden_dir):
    path = require_golden(golden_dir.parent / "reference" / "keys" / "var_keys.json", "released key dump")
    return json.loads(path.read_text())


@pytest.mark.parametrize("depth", [16, 20, 24, 30, 36])
def test_modules_have_the_official_keys_and_shapes(reference_keys, depth):
    preset = PRESETS[f"var-d{depth}"]
    with torch.device("meta"):
        model = VARTransformer(preset.var)
    mine = {k: list(v.shape) for k, v in model.state_dict().items()}
    ref = reference_keys[f"d{depth}"]["keys"]
    derived = {"lvl_1L", "attn_bias_for_masking"} | {f"blocks.{i}.attn.zero_k_bias" for i in range(depth)}
    assert set(ref) == set(mine) | derived
    assert {k: ref[k] for k in mine} == mine
    assert sum(p.numel() for p in model.parameters()) == reference_keys[f"d{depth}"]["params"]


def test_vqvae_decoder_side_has_the_official_keys(reference_keys):
    with torch.device("meta"):
        vae = VQVAE(PRESETS["var-d30"].vqvae)
    mine = {k: list(v.shape) for k, v in vae.state_dict().items()}
    ref = reference_keys["vae"]
    assert {k: ref[k] for k in mine} == mine
    ignored = set(ref) - set(mine)
    assert all(re.match(r"^(encoder\.|quant_conv\.|quantize\.ema_vocab_hit_SV$)", k) for k in ignored)
    assert sum(v.numel() for k, v in vae.named_parameters() if k.startswith("decoder.")) == 64_653_923  # var.md §7


# -- small checkpoints in the official format --------------------------------------------------------
def official_var_state(model) -> dict:
    """What the official VAR.state_dict() holds, buffers included."""
    t = model.transformer
    state = {k: v.clone() for k, v in t.state_dict().items()}
    L = t.config.total_tokens
    state["lvl_1L"] = t.level_index()
    level = state["lvl_1L"].view(1, L, 1)
    state["attn_bias_for_masking"] = torch.where(level >= level.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, L, L)
    for i in range(t.config.depth):
        state[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(t.config.embed_dim)
    return state


def official_vae_state(model) -> dict:
    state = {k: v.clone() for k, v in model.vqvae.state_dict().items()}
    z = model.vqvae.config.z_channels
    state["encoder.conv_in.weight"] = torch.randn(32, 3, 3, 3)  # encoder side: present in the file, unused
    state["quant_conv.weight"] = torch.randn(z, z, 3, 3)
    state["quant_conv.bias"] = torch.zeros(z)
    state["quantize.ema_vocab_hit_SV"] = torch.zeros(len(model.config.patch_nums), model.config.vocab_size)
    return state


@pytest.fixture(scope="module")
def source():
    return load_model("var-tiny-random", seed=5)


@pytest.fixture()
def files(tmp_path, source):
    var_path, vae_path = tmp_path / "var_tiny.pth", tmp_path / VAE_FILE
    torch.save(official_var_state(source), var_path)
    torch.save(official_vae_state(source), vae_path)
    return var_path, vae_path


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_local_official_files_load_exactly(files, source):
    var_path, vae_path = files
    loaded = load_model("var-tiny-random", weights=str(var_path), vae_weights=vae_path)
    assert _same_weights(loaded, source)
    assert loaded.sources == {"var": str(var_path), "vae": str(vae_path)}


def test_random_weights_depend_on_the_seed(source):
    assert _same_weights(load_model("var-tiny-random", seed=5), source)
    assert not _same_weights(load_model("var-tiny-random", seed=6), source)


def _expect_error(state_var, state_vae, tmp_path, match):
    torch.save(state_var, tmp_path / "v.pth")
    torch.save(state_vae, tmp_path / "q.pth")
    with pytest.raises(ValueError, match=match):
        load_model("var-tiny-random", weights=tmp_path / "v.pth", vae_weights=tmp_path / "q.pth")


def test_missing_key_is_an_error(tmp_path, source):
    state = official_var_state(source)
    del state["blocks.1.ffn.fc1.bias"]
    _expect_error(state, official_vae_state(source), tmp_path, r"missing keys: blocks\.1\.ffn\.fc1\.bias")


def test_misshaped_key_is_an_error(tmp_path, source):
    state = official_var_state(source)
    state["head.bias"] = torch.zeros(7)
    _expect_error(state, official_vae_state(source), tmp_path, r"wrong shapes: head\.bias \(7,\) \(model: \(")


def test_unknown_extra_key_is_an_error(tmp_path, source):
    state = official_var_state(source)
    state["blocks.0.attn.mystery"] = torch.zeros(3)
    _expect_error(state, official_vae_state(source), tmp_path, r"unexpected keys: blocks\.0\.attn\.mystery")


def test_derived_buffers_are_checked(tmp_path, source):
    state = official_var_state(source)
    state["lvl_1L"] = torch.zeros_like(state["lvl_1L"])
    _expect_error(state, official_vae_state(source), tmp_path, "lvl_1L does not match patch_nums")
    state = official_var_state(source)
    state["blocks.2.attn.zero_k_bias"] = torch.ones(source.config.embed_dim)
    _expect_error(state, official_vae_state(source), tmp_path, r"zero_k_bias must be a zero vector")


def test_vae_missing_decoder_key_is_an_error(tmp_path, source):
    state = official_vae_state(source)
    del state["decoder.up.0.block.2.conv2.weight"]
    _expect_error(official_var_state(source), state, tmp_path, r"missing keys: decoder\.up\.0\.block\.2\.conv2\.weight")


def test_missing_local_file_names_the_path(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_model("var-tiny-random", weights=tmp_path / "nope.pth")


def test_hub_download_uses_the_official_repo_and_file_names(files, source, monkeypatch):
    var_path, vae_path = files
    requested = []

    def fake_download(repo_id, filename, **kwargs):
        requested.append((repo_id, filename))
        return str(vae_path if filename == VAE_FILE else var_path)

    monkeypatch.setattr(var_weights, "hf_hub_download", fake_download)
    loaded = build_model(source.config, source.vqvae.config, var_weights=None, vae_weights=None, name="var-tiny-random",
                         hub_file="var_d16.pth", official_vae=True)
    assert requested == [("FoundationVision/var", "var_d16.pth"), ("FoundationVision/var", VAE_FILE)]
    assert _same_weights(loaded, source)


def test_offline_without_files_says_which_files_and_how_to_pass_them(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("var-d30")
    message = str(info.value)
    for needed in ("var_d30.pth", VAE_FILE, "FoundationVision/var", "weights='/path/var_d30.pth'", "vae_weights="):
        assert needed in message
