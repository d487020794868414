"""Public API gaps met while writing tests against it (issue 16, item 12): models from the official
constructor arguments in one call, Infinity's teacher-forced forward, and per-scale guidance and
temperature lists. Observing the kept tokens: ``test_kept_tokens.py``."""

from __future__ import annotations

import pytest
import torch

from adapters import load_model
from adapters.geometry import INFINITY_TEMPLATES
from adapters.infinity import InfinityConfig, InfinityModel, InfinityTransformer, load_transformer_weights
from adapters.infinity.bsq_vae import BSQVAEConfig, load_bsq_vae
from adapters.infinity.text import random_text_encoder
from adapters.var import VARConfig, VARModel, VQVAEConfig, build_model
from kvpolicy import ScaleSchedule, get_policy

from conftest import require_golden

PROMPT = ["a red cube"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("infinity-tiny")


def _free_run(model, prompts, *, seed=3, cfg=3.0, tau=1.0, policy=None):
    """A free-running generation that keeps its logits (the reference a teacher-forced pass must equal)."""
    schedule, template, _ = model.schedule()
    return model.generate_from_features(model.encode(prompts), schedule=schedule, template=template, seed=seed,
                                        cfg=cfg, tau=tau, policy=policy, keep_logits=True)


# -- teacher forcing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [None, "sliding_window"])
def test_teacher_forced_logits_equal_the_logits_of_the_run_that_drew_the_bits(tiny, policy):
    make = (lambda: None) if policy is None else (lambda: get_policy(policy, budget=40))
    free = _free_run(tiny, PROMPT, policy=make())
    forced = tiny.teacher_forced_logits(PROMPT, free.bits, policy=make())
    assert len(forced) == len(free.logits) == 7
    for s, (mine, reference) in enumerate(zip(forced, free.logits)):
        assert torch.equal(mine, reference), f"scale {s}"


def test_teacher_forced_logits_follow_the_given_bits_not_samples(tiny):
    free = _free_run(tiny, PROMPT)
    flipped = [b.clone() for b in free.bits]
    flipped[3] = 1 - flipped[3]  # feed other bits at scale 3: later logits change, earlier ones do not
    forced = tiny.teacher_forced_logits(PROMPT, flipped)
    for s in range(4):
        assert torch.equal(forced[s], free.logits[s]), f"scale {s}"
    assert not torch.equal(forced[4], free.logits[4])
    # and they equal a generation forced to the same bits through the low-level loop
    schedule, template, _ = tiny.schedule()
    reference = tiny.generate_from_features(tiny.encode(PROMPT), schedule=schedule, template=template,
                                            forced_bits=flipped, keep_logits=True, seed=11)
    assert all(torch.equal(a, b) for a, b in zip(forced, reference.logits))


def test_teacher_forced_template_comes_from_the_bits_or_aspect_ratio(tiny):
    token_bits = tiny.config.token_bits
    features = tiny.encode(PROMPT)
    # a 4:5 template (h/w 1.25) with four scales is unique: (1,1), (2,2), (3,3), (5,4)
    shapes = INFINITY_TEMPLATES[1.25][:4]
    bits = [torch.randint(0, 2, (1, h, w, token_bits), generator=torch.Generator().manual_seed(h * 7 + w),
                          dtype=torch.uint8) for h, w in shapes]
    logits = tiny.teacher_forced_logits(features, bits)
    reference = tiny.generate_from_features(features, schedule=ScaleSchedule(shapes), template=INFINITY_TEMPLATES[1.25],
                                            forced_bits=bits, keep_logits=True)
    assert all(torch.equal(a, b) for a, b in zip(logits, reference.logits))
    # three scales (1,1), (2,2), (3,3) start four templates (1.25, 1.75 and their transposes), whose RoPE
    # positions differ
    with pytest.raises(ValueError, match=r"start the templates of h/w 0\.571, 0\.8, 1\.25, 1\.75; pass aspect_ratio="):
        tiny.teacher_forced_logits(features, bits[:3])
    by_ratio = tiny.teacher_forced_logits(features, bits[:3], aspect_ratio=1.75)
    reference = tiny.generate_from_features(features, schedule=ScaleSchedule(shapes[:3]),
                                            template=INFINITY_TEMPLATES[1.75], forced_bits=bits[:3], keep_logits=True)
    assert all(torch.equal(a, b) for a, b in zip(by_ratio, reference.logits))
    assert not torch.equal(by_ratio[1], tiny.teacher_forced_logits(features, bits[:3], aspect_ratio=1.25)[1])


def test_teacher_forced_logits_refuse_bad_bits_in_one_line(tiny):
    token_bits = tiny.config.token_bits
    with pytest.raises(ValueError, match=r"do not follow the h/w 1 template"):
        tiny.teacher_forced_logits(PROMPT, [torch.zeros(1, 1, 1, token_bits), torch.zeros(1, 3, 3, token_bits)],
                                   aspect_ratio=1.0)
    with pytest.raises(ValueError, match=r"not a prefix of any Infinity template"):
        tiny.teacher_forced_logits(PROMPT, [torch.zeros(1, 3, 5, token_bits)])
    with pytest.raises(ValueError, match=rf"bits of scale 0 must be a \(1, h, w, {token_bits}\) tensor"):
        tiny.teacher_forced_logits(PROMPT, [torch.zeros(2, 1, 1, token_bits)])
    with pytest.raises(ValueError, match="bits of scale 0 hold values other than 0 and 1"):
        tiny.teacher_forced_logits(PROMPT, [torch.full((1, 1, 1, token_bits), 2)])
    with pytest.raises(ValueError, match="bits must be a non-empty list"):
        tiny.teacher_forced_logits(PROMPT, [])
    with pytest.raises(ValueError, match="prompts must be strings or T5 features"):
        tiny.teacher_forced_logits([], [torch.zeros(1, 1, 1, token_bits)])


# -- per-scale guidance and temperature ------------------------------------------------------------


def test_constant_per_scale_lists_equal_the_scalar(tiny):
    scalar = tiny.generate(PROMPT, seed=2, cfg=3.0, tau=0.8, progress=False)
    listed = tiny.generate(PROMPT, seed=2, cfg=[3.0] * 7, tau=(0.8,) * 7, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(scalar.tokens, listed.tokens))
    assert torch.equal(scalar.images, listed.images)
    assert listed.config["cfg"] == [3.0] * 7 and listed.config["tau"] == [0.8] * 7


def test_each_scale_uses_its_own_cfg_and_tau(tiny):
    bits = _free_run(tiny, PROMPT).bits
    cfgs, taus = [3.0, 4.0, 2.0, 3.0, 5.0, 1.5, 3.0], [1.0, 0.5, 1.0, 0.7, 1.0, 1.2, 0.9]
    listed = tiny.teacher_forced_logits(PROMPT, bits, cfg=cfgs, tau=taus)
    # with the bits forced, scale s sees the same inputs in every run: its logits are those of a run
    # with cfg[s] and tau[s] for all scales (an independent reference per scale)
    for s, (c, t) in enumerate(zip(cfgs, taus)):
        assert torch.equal(listed[s], tiny.teacher_forced_logits(PROMPT, bits, cfg=c, tau=t)[s]), f"scale {s}"
    constant = tiny.teacher_forced_logits(PROMPT, bits, cfg=3.0, tau=1.0)
    assert torch.equal(listed[0], constant[0]) and not torch.equal(listed[1], constant[1])
    # and in a free run the samples change
    free = tiny.generate(PROMPT, seed=2, cfg=cfgs, tau=taus, progress=False)
    scalar = tiny.generate(PROMPT, seed=2, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(free.tokens, scalar.tokens))


def test_cfg_of_one_at_some_scales_takes_the_conditional_logits(tiny):
    bits = _free_run(tiny, PROMPT).bits
    mixed = tiny.teacher_forced_logits(PROMPT, bits, cfg=[3.0, 1.0, 3.0, 1.0, 3.0, 3.0, 1.0])
    unguided = tiny.teacher_forced_logits(PROMPT, bits, cfg=1.0)  # conditional rows only
    for s in (1, 3, 6):  # same maths; the batch holds the unconditional rows too, so allow rounding
        torch.testing.assert_close(mixed[s], unguided[s], rtol=1e-5, atol=1e-5)
    assert torch.equal(mixed[2], tiny.teacher_forced_logits(PROMPT, bits, cfg=3.0)[2])


def test_per_scale_lists_of_the_wrong_length_or_value_fail_before_any_work(tiny, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the text encoder ran before the check")

    monkeypatch.setattr(tiny, "encode", no_work)
    with pytest.raises(ValueError, match=r"^cfg has 2 values but the schedule has 7 scales; give one number or one "
                                         r"per scale$"):
        tiny.generate(PROMPT, cfg=[3.0, 3.0], progress=False)
    with pytest.raises(ValueError, match=r"^tau has 8 values but the schedule has 7 scales"):
        tiny.generate(PROMPT, tau=[1.0] * 8, progress=False)
    with pytest.raises(ValueError, match=r"^tau\[6\] must be a real number > 0 \(a temperature\), got 0\.0$"):
        tiny.generate(PROMPT, tau=[1.0] * 6 + [0.0], progress=False)
    with pytest.raises(ValueError, match=r"^cfg\[0\] must be a finite number \(1 = no guidance\), got nan$"):
        tiny.generate(PROMPT, cfg=[float("nan")] + [3.0] * 6, progress=False)


# -- from the official constructor arguments --------------------------------------------------------


@pytest.fixture(scope="module")
def infinity_golden(golden_dir):
    return torch.load(require_golden(golden_dir / "infinity" / "golden.pt"), weights_only=True)


def _golden_features(golden):
    bounds = golden["text"]["cu_seqlens_k"].tolist()
    return [golden["text"]["kv_compact"][a:b] for a, b in zip(bounds, bounds[1:])]


def test_infinity_from_official_equals_the_four_call_path_and_the_official_logits(infinity_golden):
    golden = infinity_golden
    state = {k: v.float() for k, v in golden["state_dict"].items()}
    model = InfinityModel.from_official(golden["model_config"], state, vae_config=golden["vae_config"])
    # the four calls it replaces (tests/test_infinity_golden.py)
    transformer = InfinityTransformer(InfinityConfig.from_official(golden["model_config"],
                                                                   token_bits=golden["vae_config"]["codebook_dim"]))
    load_transformer_weights(transformer, state)
    four_calls = InfinityModel(transformer.eval(), name="golden")
    args = golden["args"]
    features = _golden_features(golden)
    logits = model.teacher_forced_logits(features, golden["bits"], cfg=args["cfg_list"], tau=args["tau_list"])
    reference = four_calls.generate_from_features(
        features, schedule=ScaleSchedule(golden["scale_schedule"]), template=INFINITY_TEMPLATES[args["h_div_w"]],
        seed=args["g_seed"], cfg=args["cfg"], tau=args["tau"], forced_bits=golden["bits"], keep_logits=True)
    assert len(logits) == len(golden["logits"]) == 7
    for s, (mine, four, gold) in enumerate(zip(logits, reference.logits, golden["logits"])):
        assert torch.equal(mine, four), f"scale {s}"
        torch.testing.assert_close(mine, gold, rtol=1e-4, atol=1e-4 * gold.abs().max().item())  # golden README
    assert model.vae is None and model.text_encoder is None


def test_infinity_from_official_with_a_vae_and_text_encoder_generates(infinity_golden, golden_dir):
    bsq = torch.load(require_golden(golden_dir / "bsq_vae" / "golden.pt"), weights_only=True)
    vae_state = {k: v.float() for k, v in bsq["state_dict"].items()}
    golden = infinity_golden
    encoder = random_text_encoder(golden["model_config"]["text_channels"], seed=1, max_length=16)
    model = InfinityModel.from_official(golden["model_config"], {k: v.float() for k, v in golden["state_dict"].items()},
                                        vae_config=bsq["decoder_config"], vae_state_dict=vae_state,
                                        text_encoder=encoder, default_resolution=256)
    reference = load_bsq_vae(vae_state, BSQVAEConfig.from_official(bsq["decoder_config"]))
    case = bsq["decode_case"]
    assert torch.equal(model.vae.decode(case["summed_codes"]), reference.decode(case["summed_codes"]))
    out = model.generate(["a"], seed=0, progress=False)
    assert out.images.shape[0] == 1 and len(out.tokens) == 7


def test_infinity_from_official_refuses_incomplete_arguments(infinity_golden):
    config = infinity_golden["model_config"]
    with pytest.raises(ValueError, match="token_bits is needed without vae_config"):
        InfinityModel.from_official(config, {})
    with pytest.raises(TypeError, match="text_encoder must be a TextEncoder, a hub name or folder, or None"):
        InfinityModel.from_official(config, {}, token_bits=32, text_encoder=3)
    with pytest.raises(ValueError, match=r"Infinity option cos_attn=False is not implemented"):
        InfinityModel.from_official({**config, "cos_attn": False}, {}, token_bits=32)


@pytest.fixture(scope="module")
def var_golden(golden_dir):
    return torch.load(require_golden(golden_dir / "var" / "golden.pt"), weights_only=True)


def test_var_configs_from_the_official_arguments_equal_the_hand_built_ones(var_golden):
    vc, qc = var_golden["var_config"], var_golden["vqvae_config"]
    dd = qc["ddconfig"]
    # the configs tests/test_var_golden.py builds field by field
    assert VARConfig.from_official(vc, qc) == VARConfig(
        depth=vc["depth"], embed_dim=vc["embed_dim"], num_heads=vc["num_heads"], patch_nums=vc["patch_nums"],
        vocab_size=qc["vocab_size"], cvae=qc["z_channels"], num_classes=vc["num_classes"],
        shared_aln=vc["shared_aln"], mlp_ratio=vc["mlp_ratio"], norm_eps=vc["norm_eps"])
    assert VQVAEConfig.from_official(qc) == VQVAEConfig(
        vocab_size=qc["vocab_size"], z_channels=qc["z_channels"], ch=dd["ch"], ch_mult=dd["ch_mult"],
        num_res_blocks=dd["num_res_blocks"], using_sa=dd["using_sa"], using_mid_sa=dd["using_mid_sa"],
        quant_resi=qc["quant_resi"], share_quant_resi=qc["share_quant_resi"])
    # build_vae_var's released d16: the official defaults plus its arguments
    released = {"depth": 16, "embed_dim": 1024, "num_heads": 16, "attn_l2_norm": True, "drop_path_rate": 0.1 * 16 / 24}
    assert VARConfig.from_official(released, {"ch": 160}) == VARConfig.official(16)
    assert VQVAEConfig.from_official({"ch": 160, "test_mode": True}) == VQVAEConfig()


def test_var_configs_refuse_unknown_or_unimplemented_arguments(var_golden):
    vc, qc = var_golden["var_config"], var_golden["vqvae_config"]
    with pytest.raises(ValueError, match=r"VAR argument attn_l2_norm=False is not implemented"):
        VARConfig.from_official({**vc, "attn_l2_norm": False}, qc)
    with pytest.raises(ValueError, match=r"VAR argument attn_l2_norm=False"):  # the official default
        VARConfig.from_official({k: v for k, v in vc.items() if k != "attn_l2_norm"}, qc)
    with pytest.raises(ValueError, match=r"VAR arguments \['widht'\] are not arguments of the official constructor"):
        VARConfig.from_official({**vc, "widht": 3}, qc)
    with pytest.raises(ValueError, match=r"VQVAE v_patch_nums \(1, 2, 3\) differ"):
        VARConfig.from_official(vc, {**qc, "v_patch_nums": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"VQVAE argument using_znorm=True is not implemented"):
        VQVAEConfig.from_official({**qc, "using_znorm": True})
    with pytest.raises(ValueError, match=r"VQVAE ch=64 and its ddconfig ch=32 differ"):
        VQVAEConfig.from_official({**qc, "ch": 64})
    with pytest.raises(TypeError, match="VAR arguments must be a mapping"):
        VARConfig.from_official([("depth", 2)], qc)


def test_var_model_from_official_equals_build_model(var_golden):
    from test_var_golden import decoder_weights

    golden = var_golden
    var_sd = {k: v.float() if v.is_floating_point() else v for k, v in golden["var_state_dict"].items()}
    vae_sd = {k: v.float() for k, v in golden["vqvae_state_dict"].items()}
    vae_sd.update(decoder_weights(golden["vqvae_decoder_recipe"]))
    model = VARModel.from_official(golden["var_config"], golden["vqvae_config"], var_sd, vae_sd)
    reference = build_model(VARConfig.from_official(golden["var_config"], golden["vqvae_config"]),
                            VQVAEConfig.from_official(golden["vqvae_config"]), var_weights=var_sd, vae_weights=vae_sd)
    indices = [i.long() for i in golden["indices"]]
    labels = golden["labels"].tolist()
    mine = model.teacher_forced(labels, indices, cfg=golden["args"]["cfg"])
    theirs = reference.teacher_forced(labels, indices, cfg=golden["args"]["cfg"])
    for s, (a, b, gold) in enumerate(zip(mine.logits, theirs.logits, golden["logits"])):
        assert torch.equal(a, b), f"scale {s}"
        assert (a - gold).abs().max().item() <= 1e-4 * gold.abs().max().item()  # golden README tolerance
    assert torch.equal(mine.images, theirs.images)
