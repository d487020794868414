"""The procedural scenes, their depiction checks and a few steps of each training stage (issue 17).

No real training here: each stage runs a handful of steps on tiny batches and the loss must fall.
"""

import json

import numpy as np
import pytest
import torch

from adapters.tiny import scenes
from adapters.tiny import train as T


def test_scenes_are_deterministic_and_independent_per_index():
    a = scenes.sample_scene(3, 17)
    assert a == scenes.sample_scene(3, 17)
    assert a != scenes.sample_scene(3, 18) and a != scenes.sample_scene(4, 17)
    images, scene_list = scenes.batch(3, 16, 4)
    again, _ = scenes.batch(3, 17, 1)
    assert np.array_equal(images[1], again[0]) and scene_list[1] == scenes.sample_scene(3, 17)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8


def test_captions_say_what_is_drawn_and_labels_name_colour_and_kind():
    scene = scenes.sample_scene(0, 5)
    a, b = scene.shapes
    assert scene.caption == (f"a {a.size} {a.colour} {a.kind} {scene.relation} a {b.size} {b.colour} {b.kind} "
                             f"on a {scene.background} background")
    assert a.colour != b.colour
    single = scenes.sample_scene(0, 5, "single")
    assert scenes.class_name(single.label) == f"{single.shapes[0].colour} {single.shapes[0].kind}"
    # the relation decides the halves: the first shape's centre lies in the half the caption names
    for i in range(200):
        s = scenes.sample_scene(1, i)
        first, second = s.shapes
        axis = "cy" if s.relation in ("above", "below") else "cx"
        low = s.relation in ("left of", "above")
        assert (getattr(first, axis) < 0.5) == low and (getattr(second, axis) < 0.5) != low
    with pytest.raises(ValueError, match="0..17"):
        scenes.class_name(18)
    with pytest.raises(ValueError, match="'pair' or 'single'"):
        scenes.sample_scene(0, 0, "triple")


def test_checks_pass_rendered_scenes_and_fail_swapped_or_noisy_ones():
    images, scene_list = scenes.batch(11, 0, 120, "pair", side=32)
    rendered = np.array([scenes.check_pair(im, s) for im, s in zip(images, scene_list)])
    assert rendered.mean() > 0.9
    # the same images judged against captions with the two shapes swapped: mostly wrong
    swapped = [scenes.Scene(s.shapes[::-1], s.background, s.relation, s.caption, None) for s in scene_list]
    assert np.mean([scenes.check_pair(im, s) for im, s in zip(images, swapped)]) < 0.2
    noise = np.random.default_rng(0).integers(0, 256, size=(120, 32, 32, 3)).astype(np.uint8)
    assert np.mean([scenes.check_pair(im, s) for im, s in zip(noise, scene_list)]) < 0.35
    singles, single_scenes = scenes.batch(11, 0, 90, "single", side=32)
    checks = np.array([scenes.check_single(im, s.label) for im, s in zip(singles, single_scenes)])
    assert checks[:, 0].mean() > 0.95 and checks[:, 1].mean() > 0.8
    grey = np.full((32, 32, 3), 128, np.uint8)
    assert scenes.check_single(grey, 0) == (False, False)


def test_the_background_check_reads_every_kind_off_rendered_scenes_at_both_sizes():
    for side in (32, 64):
        images, scene_list = scenes.batch(12, 0, 80, "pair", side=side)
        assert {s.background for s in scene_list} == set(scenes.BACKGROUNDS)
        assert all(scenes.background_kind(im) == s.background for im, s in zip(images, scene_list))
        # judged against another background, the same images fail
        wrong = [scenes.Scene(s.shapes, scenes.BACKGROUNDS[(scenes.BACKGROUNDS.index(s.background) + 1) % 4],
                              s.relation, s.caption, None) for s in scene_list]
        assert not any(scenes.check_background(im, s) for im, s in zip(images, wrong))
    assert scenes.background_kind(np.full((32, 32, 3), 128, np.uint8)) == "plain"
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 220
    assert scenes.background_kind(red) is None  # no grey pixels: no background to read
    noise = np.random.default_rng(1).integers(0, 256, size=(40, 32, 32, 3)).astype(np.uint8)
    assert sum(scenes.background_kind(im) is not None for im in noise) < 10  # noise is mostly coloured


def _falls(rows, stage, term):
    losses = [r[term] for r in rows if r["stage"] == stage]
    return np.mean(losses[-2:]) < np.mean(losses[:2]), losses


def test_each_training_stage_runs_on_the_adapters_modules_and_its_loss_falls(tmp_path):
    torch.set_num_threads(1)
    fast = {"bsq": T.StageSettings(8, 4, 3e-3), "vq": T.StageSettings(8, 4, 3e-3),
            "infinity": T.StageSettings(6, 2, 3e-3), "var": T.StageSettings(6, 2, 3e-3),
            "infinity+": T.StageSettings(2, 2, 1e-3), "var+": T.StageSettings(2, 2, 1e-3)}
    summary = T.train_all(tmp_path, seed=1, settings=fast, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # tokenizers: the reconstruction error (their VQ / commitment terms grow while the latents do)
    for stage, term in (("bsq", "mse"), ("vq", "mse"), ("infinity", "loss"), ("var", "loss")):
        falls, losses = _falls(rows, stage, term)
        assert len(losses) == fast[stage].steps
        assert falls, f"{stage} {term} did not fall: {losses}"
    assert set(summary["final_loss"]) == set(T.STAGES) | {"infinity+", "var+"}
    assert [r["step"] for r in rows if r["stage"] == "var+"] == [0, 1]  # the second cycle ran
    assert (tmp_path / "loss.png").stat().st_size > 0
    # the files load into the adapters exactly as the shipped ones do (strict loaders)
    from adapters import load_model

    weights = tmp_path / "weights"
    model = load_model("infinity-tiny", weights=str(weights / "infinity-tiny" / "transformer.safetensors"),
                       vae_weights=str(weights / "infinity-tiny" / "vae.safetensors"))
    assert model.generate(["a small red circle left of a large blue square on a plain background"],
                          progress=False).images.shape == (1, 32, 32, 3)
    var = load_model("var-tiny", weights=str(weights / "var-tiny" / "var.safetensors"),
                     vae_weights=str(weights / "var-tiny" / "vqvae.safetensors"))
    assert var.generate([3], progress=False).images.shape == (1, 32, 32, 3)


def test_teacher_forcing_cache_is_the_inference_cache_for_full_attention():
    """Teacher-forced logits equal the generation loop's logits when it is fed the same bits."""
    from adapters import load_model

    model = load_model("infinity-tiny")
    features = model.encode(["a large green square above a small red triangle on a dotted background"])
    schedule, template, _ = model.schedule()
    run = model.generate_from_features(features, schedule=schedule, template=template, cfg=1.0, seed=0,
                                       keep_logits=True)
    with torch.no_grad():
        loss = T.infinity_teacher_forced_loss(model.transformer, features, run.bits, torch.tensor([False]))
    # the loop's logits at tau 1, cfg 1 -> the same mean bitwise cross-entropy
    logits = torch.cat([l.reshape(-1, 2) for l in run.logits])
    targets = torch.cat([b.reshape(-1).long() for b in run.bits])
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, targets), atol=1e-5)
    # truncated to the first 3 scales (block-causal: the same logits there), and reweighted by scale
    with torch.no_grad():
        first = T.infinity_teacher_forced_loss(model.transformer, features, run.bits, torch.tensor([False]), scales=3)
        weighted = T.infinity_teacher_forced_loss(model.transformer, features, run.bits, torch.tensor([False]),
                                                  reweight=True)
    n = sum(b.numel() for b in run.bits[:3])
    assert torch.allclose(first, torch.nn.functional.cross_entropy(logits[:n], targets[:n]), atol=1e-5)
    # Infinity's rule: every token of a (h, w) scale weighs sqrt(last area / (h w)), then normalised
    areas = [b.shape[1] * b.shape[2] for b in run.bits]
    token_weight = torch.cat([torch.full((b.numel(),), (areas[-1] / a) ** 0.5) for a, b in zip(areas, run.bits)])
    each = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    assert torch.allclose(weighted, (each * token_weight).sum() / token_weight.sum(), atol=1e-5)


def test_truncated_steps_train_the_coarse_scales_and_every_full_every_th_step_all():
    settings = T.StageSettings(8, 2, 1e-3, coarse_scales=5, full_every=4)
    assert [settings.scales_at(i) for i in range(8)] == [5, 5, 5, None, 5, 5, 5, None]
    assert [T.StageSettings(3, 2, 1e-3).scales_at(i) for i in range(3)] == [None] * 3


def test_two_jobs_train_the_same_weights_as_one_after_the_other(tmp_path):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    tiny = {name: T.StageSettings(2, 2, 1e-3, coarse_scales=3 if name in ("infinity", "var") else 0, full_every=2)
            for name in ("bsq", "vq", "infinity", "var")}
    tiny.update({"infinity+": None, "var+": None})
    one = T.train_all(tmp_path / "one", seed=2, settings=tiny, progress=False, jobs=1)
    two = T.train_all(tmp_path / "two", seed=2, settings=tiny, progress=False, jobs=2)
    assert one["final_loss"] == two["final_loss"]
    for file in ("infinity-tiny/transformer.safetensors", "infinity-tiny/text_encoder.safetensors",
                 "var-tiny/var.safetensors", "var-tiny/vqvae.safetensors"):
        a, b = (load_file(str(tmp_path / run / "weights" / file)) for run in ("one", "two"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    rows = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["scales"] for r in rows if r["stage"] == "var"] == [3, 10]
    with pytest.raises(ValueError, match="jobs must be 1 or 2"):
        T.train_all(tmp_path / "three", settings=tiny, jobs=3)


def test_train_tiny_command_refuses_bad_arguments(capsys):
    from benchmarks.cli import main

    assert main(["train-tiny", "--stages", "bsq,gan"]) == 2
    assert "unknown stage(s) ['gan']" in capsys.readouterr().err
    assert main(["train-tiny", "--steps-scale", "0"]) == 2
    assert "--steps-scale must be a positive number" in capsys.readouterr().err


def test_trained_presets_load_offline_from_the_package_and_the_random_ones_keep_their_names():
    from adapters import load_model
    from adapters.geometry import get_geometry
    from adapters.tiny_weights import ROOT
    from benchmarks.prompts import EVAL_PROMPTS, default_prompts

    var = load_model("var-tiny")
    assert var.sources == {"var": str(ROOT / "var-tiny" / "var.safetensors"),
                           "vae": str(ROOT / "var-tiny" / "vqvae.safetensors")}
    assert var.config.num_classes == scenes.NUM_CLASSES and var.geometry() == get_geometry("var-tiny")
    assert load_model("var-tiny-random").sources["var"].startswith("random")
    infinity = load_model("infinity-tiny")
    assert infinity.geometry() == get_geometry("infinity-tiny")
    assert infinity.text_encoder.width == infinity.config.text_channels
    # the trained T5 reads whole caption words (its shipped vocabulary), the random one bytes
    from adapters.infinity.text import ByteTokenizer, WordTokenizer

    assert isinstance(infinity.text_encoder.tokenizer, WordTokenizer)
    assert infinity.text_encoder.tokenizer.words == scenes.VOCABULARY
    trained = infinity.encode(["a small red circle"])[0]
    random_model = load_model("infinity-tiny-random")
    assert type(random_model.text_encoder.tokenizer) is ByteTokenizer
    assert trained.shape == (5, infinity.config.text_channels)
    assert random_model.encode(["a small red circle"])[0].shape == (len("a small red circle") + 1,
                                                                    random_model.config.text_channels)
    # compare/calibrate default to the preset's own held-out captions, other models to the generic list
    own = default_prompts("infinity-tiny", "eval")
    assert own.parent == ROOT / "infinity-tiny" and default_prompts("infinity-2b", "eval") == EVAL_PROMPTS
    held_out = [s.caption for s in (scenes.sample_scene(scenes.held_out_seed(0), i) for i in range(16))]
    assert [l for l in own.read_text().splitlines() if not l.startswith("#")] == held_out


def test_self_correction_targets_correct_the_flipped_prefix():
    """Bitwise self-correction: inputs are the targets with some bits flipped, and every scale's
    target is the sign of the residual left by the flipped prefix (plain BSQ when nothing flips)."""
    import torch.nn.functional as F

    from adapters.infinity.bsq_vae import bits_to_codes, resize_codes

    z = torch.randn(3, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    shapes = T.infinity_shapes()
    _, plain, _ = T.bsq_quantize(z, shapes)
    targets, inputs = T.self_correcting_bits(z, shapes, 0.0, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(plain, targets, inputs))
    targets, inputs = T.self_correcting_bits(z, shapes, 0.3, torch.Generator().manual_seed(1))
    flipped = [float((t != i).float().mean()) for t, i in zip(targets, inputs)]
    assert max(flipped) > 0.05 and max(flipped) <= 0.3 + 0.1
    summed = torch.zeros_like(z)
    for shape, target, given in zip(shapes, targets, inputs):
        residual = F.interpolate(z - summed, size=shape, mode="area") if shape != (16, 16) else z - summed
        assert torch.equal(target, (residual > 0).permute(0, 2, 3, 1).to(torch.uint8))
        summed = summed + resize_codes(bits_to_codes(given, 16), (16, 16))
    # one strength per scale (missing scales: none): only the 2x2 and 4x4 inputs are flipped, and the
    # rates are drawn per image
    z = torch.randn(64, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    targets, inputs = T.self_correcting_bits(z, shapes, (0.0, 0.5, 0.2), torch.Generator().manual_seed(1))
    flipped = [(t != i).float().flatten(1).mean(1) for t, i in zip(targets, inputs)]
    assert float(flipped[0].max()) == 0 and all(float(f.max()) == 0 for f in flipped[3:])
    assert 0.3 < float(flipped[1].max()) <= 0.5 + 0.15 and float(flipped[2].max()) <= 0.2 + 0.1
    assert float(flipped[1].std()) > 0.05  # per-image rates, not one rate for the batch


def test_selectivity_table_reads_both_calibration_file_formats(tmp_path):
    """The README's selectivity tables: the core's attention-statistics files (per-head means) and
    the older ScaleKV calibration files (per-layer tables) give the same kind of rows; the core's
    files also give the structure table (entropy / history locality, and the uniform-attention row)."""
    from pathlib import Path

    from adapters.tiny.evaluate import selectivity_markdown
    from kvpolicy import ScaleSchedule
    from kvpolicy.attention_stats import uniform_history_locality

    folder = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "tiny-models"
    new = folder / "calibration_var-tiny.json"
    data = json.loads(new.read_text())
    old = tmp_path / "legacy.json"  # the fields a ScaleKV calibration file of an earlier version had
    old.write_text(json.dumps({"num_layers": 2, "num_scales": 3, "top_k": 16, "source": "legacy toy",
                               "current_ratio": [[1.0, 0.25, 0.5], [1.0, 0.75, 0.625]],
                               "history_topk": [[None, 0.75, 0.5], [None, 0.25, 0.375]]}))
    text = selectivity_markdown({"trained": new, "random": old})
    trained, legacy = text.split("**random**")[0], text.split("**random**")[1]
    heads = np.array(data["means"]["current_ratio"], dtype=float)  # (layer, scale, head)
    history = np.array(data["means"]["history_topk"], dtype=float)
    row = "| 0 | " + " | ".join(f"{heads[0, k].mean():.2f} / {history[0, k].mean():.2f}" for k in range(1, 10)) + " |"
    assert row in trained
    entropy = np.array(data["means"]["structure/entropy"], dtype=float)
    locality = np.array(data["means"]["structure/history_locality"], dtype=float)
    row = "| 2 | " + " | ".join(f"{entropy[2, k].mean():.2f} / {locality[2, k].mean():.2f}" for k in range(1, 10)) + " |"
    assert row in trained
    schedule = ScaleSchedule([1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
    assert f"1.00 / {uniform_history_locality(schedule, 9):.2f} |" in trained.split("uniform attention")[1]
    assert "| 0 | 0.25 / 0.75 | 0.50 / 0.50 |" in legacy and "entropy" not in legacy


def test_caption_places_mark_each_colour_word_with_where_its_caption_puts_the_shape():
    tokenizer = T.caption_tokenizer()
    scene_list = [scenes.sample_scene(0, i) for i in range(40)]
    places = T.caption_places(tokenizer, scene_list, 20)
    assert {s.relation for s in scene_list} == set(scenes.RELATIONS)
    for scene, row in zip(scene_list, places.tolist()):
        words = scene.caption.split()
        marked = {i: T.PLACES[p] for i, p in enumerate(row) if p != -100}
        first, second = scene.shapes
        assert sorted(marked) == [words.index(first.colour), words.index(second.colour)]
        # independent reading: the shape's centre lies in the named half
        for shape in scene.shapes:
            place = marked[words.index(shape.colour)]
            coordinate = shape.cx if place in ("left", "right") else shape.cy
            assert (coordinate < 0.5) == (place in ("left", "top"))


def test_the_text_encoder_starts_position_aware_and_cross_attention_starts_selective():
    encoder = T.new_text_encoder(3)
    biases = [m.relative_attention_bias.weight for m in encoder.modules()
              if getattr(m, "has_relative_attention_bias", False)]
    assert biases and all(1.5 < float(b.detach().std()) < 2.5 for b in biases)
    from adapters.infinity.model import InfinityTransformer

    model = InfinityTransformer(T.TRAINED_TINY_CONFIG)
    T.init_transformer(model, T.TRAINED_TINY_CONFIG.depth)
    T.init_text_routing(model)
    routed = {n: p for n, p in model.named_parameters() if n.endswith(T.TEXT_ROUTING)}
    assert len(routed) == 2 * T.TRAINED_TINY_CONFIG.depth + 2 + 1  # per block q and kv, the text MLP, the pool's kv
    for name, param in routed.items():
        assert abs(float(param.detach().std()) - param.shape[1] ** -0.5) < 0.25 * param.shape[1] ** -0.5, name
    assert float(model.block_chunks[0].module[0].sa.mat_qkv.weight.detach().std()) < 0.03  # the rest keeps GPT init


def test_the_free_pair_layout_is_the_first_one_so_var_tiny_still_reproduces():
    """Values drawn by scenes.py before the "halves" layout existed (main at 392203d): the VQ
    tokenizer of var-tiny trained on these scenes, so train-tiny must still draw them for it."""
    first = {0: ("a small blue triangle left of a large purple circle on a striped background",
                 [(0.749477, 0.259698, 0.099355), (0.646032, 0.559095, 0.191984)]),
             7: ("a large green triangle above a small yellow square on a dotted background",
                 [(0.207329, 0.427505, 0.204869), (0.624843, 0.661361, 0.114368)])}
    for index, (caption, centres) in first.items():
        scene = scenes.sample_scene(1, index, "pair", "free")
        assert scene.caption == caption
        assert [(round(s.cy, 6), round(s.cx, 6), round(s.radius, 6)) for s in scene.shapes] == centres
        assert scenes.sample_scene(1, index).caption == caption  # the layouts draw the same captions
    image = scenes.render(scenes.sample_scene(1, 7, "pair", "free"), 32, 5)
    assert int(image.sum()) == 255708 and int(image[10, 20].sum()) == 642
    with pytest.raises(ValueError, match="pair layout must be one of"):
        scenes.sample_scene(1, 0, "pair", "tidy")
