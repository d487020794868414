"""Infinity checkpoint formats, loaded through ``adapters.load_model`` exactly as a user would.

Small checkpoints are written in the official layouts: the 2B single ``.pth`` state dict with
``block_chunks.{c}.module.{j}`` keys, the 8B sharded folder (index JSON + .safetensors or .bin
shards), the BSQ-VAE file under ``'vae'`` in both key spellings, and a T5 encoder saved with
``save_pretrained``. Strictness (missing key, wrong shape, unknown key) and the offline message too.
"""

from __future__ import annotations

import json

import pytest
import torch

from adapters import load_model
from adapters.infinity.hub import MissingFilesError
from adapters.infinity.text import ByteTokenizer, load_text_encoder

PROMPTS = ["a red cube on a table"]


@pytest.fixture(scope="module")
def source():
    return load_model("infinity-tiny-random", seed=7)


@pytest.fixture(scope="module")
def files(source, tmp_path_factory):
    """The tiny model's weights written in the official layouts."""
    root = tmp_path_factory.mktemp("infinity_ckpt")
    state = {k: v.clone() for k, v in source.transformer.state_dict().items()}
    # As released files may: no zero_k_bias buffers, plus training buffers the official loader drops.
    # Parameters pickle through _rebuild_parameter / _rebuild_from_type_v2, like the released files.
    buffers = {name for name, _ in source.transformer.named_buffers()}
    single = {k: (v if k in buffers else torch.nn.Parameter(v, requires_grad=False))
              for k, v in state.items() if not k.endswith("zero_k_bias")}
    single["lvl_1L"] = torch.zeros(1, 521)
    single["attn_bias_for_masking"] = torch.zeros(1, 1, 521, 521)
    torch.save(single, root / "infinity_tiny.pth")

    keys = sorted(state)
    halves = {"model-00001-of-00002": keys[: len(keys) // 2], "model-00002-of-00002": keys[len(keys) // 2:]}
    from safetensors.torch import save_file

    for kind, suffix, index in (("safetensors", ".safetensors", "model.safetensors.index.json"),
                                ("bin", ".bin", "pytorch_model.bin.index.json")):
        folder = root / f"sharded_{kind}"
        folder.mkdir()
        weight_map = {}
        for stem, names in halves.items():
            shard = {k: state[k].contiguous() for k in names}
            name = stem + suffix
            (save_file(shard, str(folder / name)) if kind == "safetensors" else torch.save(shard, folder / name))
            weight_map.update({k: name for k in names})
        total = sum(v.numel() * v.element_size() for v in state.values())
        (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))

    torch.save({"vae": source.vae.official_state_dict("wrapped")}, root / "vae_wrapped.pth")
    torch.save({"vae": source.vae.official_state_dict("unwrapped")}, root / "vae_unwrapped.pth")
    t5 = root / "t5"
    source.text_encoder.encoder.save_pretrained(t5)
    ByteTokenizer(source.text_encoder.max_length).save_pretrained(t5)
    return {"root": root, "state": state, "t5": t5}


def _same_generation(a, b):
    out_a = a.generate(PROMPTS, seed=3, progress=False)
    out_b = b.generate(PROMPTS, seed=3, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(out_a.tokens, out_b.tokens))
    assert torch.equal(out_a.images, out_b.images)


@pytest.mark.parametrize("layout", ["single_pth", "sharded_safetensors", "sharded_bin"])
def test_official_layouts_load_and_generate_identically(source, files, layout):
    root = files["root"]
    weights = root / ("infinity_tiny.pth" if layout == "single_pth" else layout)
    loaded = load_model("infinity-tiny-random", weights=str(weights), vae_weights=str(root / "vae_wrapped.pth"),
                        text_encoder=str(files["t5"]), seed=99)
    for key, value in files["state"].items():
        assert torch.equal(loaded.transformer.state_dict()[key], value), key
    _same_generation(source, loaded)


def test_vae_both_key_spellings_and_t5_save_pretrained(source, files):
    root = files["root"]
    for spelling in ("wrapped", "unwrapped"):
        loaded = load_model("infinity-tiny-random", weights=str(root / "infinity_tiny.pth"),
                            vae_weights=str(root / f"vae_{spelling}.pth"), text_encoder=str(files["t5"]), seed=99)
        for key, value in source.vae.state_dict().items():
            assert torch.equal(loaded.vae.state_dict()[key], value), (spelling, key)
    encoder = load_text_encoder(files["t5"])
    assert isinstance(encoder.tokenizer, ByteTokenizer)
    for mine, ref in zip(encoder(PROMPTS + ["ü"]), source.text_encoder(PROMPTS + ["ü"])):
        assert mine.shape == ref.shape and torch.equal(mine, ref)
    assert encoder(["ü"])[0].shape[0] == len("ü".encode()) + 1  # UTF-8 bytes plus end of sequence


def _write(tmp_path, state):
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    return str(path)


def test_missing_key_is_an_error(files, tmp_path):
    state = dict(files["state"])
    del state["block_chunks.1.module.0.sa.mat_qkv.weight"]
    with pytest.raises(ValueError, match=r"missing keys: block_chunks\.1\.module\.0\.sa\.mat_qkv\.weight"):
        load_model("infinity-tiny-random", weights=_write(tmp_path, state))


def test_wrong_shape_is_an_error(files, tmp_path):
    state = dict(files["state"])
    state["head.weight"] = torch.zeros(10, 64)
    with pytest.raises(ValueError, match=r"wrong shapes: head\.weight \(10, 64\) \(model: \(64, 64\)\)"):
        load_model("infinity-tiny-random", weights=_write(tmp_path, state))


def test_unknown_key_is_an_error_but_known_extras_are_ignored(files, tmp_path):
    state = dict(files["state"], **{"blocks.0.sa.mat_qkv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys: blocks\.0\.sa\.mat_qkv\.weight"):
        load_model("infinity-tiny-random", weights=_write(tmp_path, state))
    state = dict(files["state"], Infinity_visible_kvlen=torch.zeros(1), Infinity_invisible_qlen=torch.zeros(1))
    load_model("infinity-tiny-random", weights=_write(tmp_path, state))


def test_sharded_folder_without_index_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="without a shard index"):
        load_model("infinity-tiny-random", weights=str(tmp_path))


@pytest.mark.parametrize("name, needed", [
    ("infinity-2b", ["infinity_2b_reg.pth", "infinity_vae_d32reg.pth", "google/flan-t5-xl"]),
    ("infinity-8b", ["infinity_8b_weights", "infinity_vae_d56_f8_14_patchify.pth", "google/flan-t5-xl"]),
])
def test_offline_without_local_files_says_what_is_needed(monkeypatch, name, needed):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingFilesError) as info:
        load_model(name)
    message = str(info.value)
    for item in needed + ["weights=", "vae_weights=", "text_encoder=", "hf download"]:
        assert item in message, (item, message)


def test_nonexistent_local_path_is_an_error(tmp_path):
    with pytest.raises(MissingFilesError, match="does not exist"):
        load_model("infinity-2b", weights=str(tmp_path / "nope.pth"))
