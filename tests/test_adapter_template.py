"""One adapter template: Infinity and VAR share ``adapters.base.NextScaleModel.generate`` (seeds,
batches, policy resolution, cache report), so they refuse bad input with the same error and report
the same keys; the three weight loaders make one strict state-dict check."""

from __future__ import annotations

import pytest
import torch

from adapters import load_model
from adapters.base import NextScaleModel
from adapters.checkpoint_io import CheckpointMismatchError, check_state_dict
from adapters.infinity.bsq_vae import BSQVAEConfig, BSQVAEDecoder, load_bsq_vae
from adapters.infinity.weights import load_transformer_weights
from adapters.var.weights import load_var_state_dict

CONDITIONS = {"infinity-tiny": ["a red cube", "a lighthouse", "a cat"], "var-tiny": [1, 2, 3]}


@pytest.fixture(scope="module", params=["infinity-tiny", "var-tiny"])
def model(request):
    return request.param, load_model(request.param)


def test_both_families_generate_through_the_template(model):
    name, m = model
    assert isinstance(m, NextScaleModel) and type(m).generate is not NextScaleModel.run_generation
    out = m.generate(CONDITIONS[name], seed=3, batch_size=2, progress=False)
    extra = out.cache_report.extra
    assert {"batch_size": 2, "num_batches": 2, "rows_per_batch": 4}.items() <= extra.items()
    assert extra["dtype"] == "float32" and len(out.cache_report.scale_seconds) == m.geometry().schedule.num_scales
    assert out.images.shape[0] == 3 and all(t.shape[0] == 3 for t in out.tokens)
    for key in ("model", "policy", "seed", "batch_size", "dtype", "device"):
        assert key in out.config
    # the same seed gives the same images through the shared template
    again = m.generate(CONDITIONS[name], seed=3, batch_size=2, progress=False)
    assert torch.equal(out.images, again.images)


@pytest.mark.parametrize("seed, error", [("1", TypeError), (1.5, TypeError), (True, TypeError)])
def test_a_bad_seed_is_the_same_error_in_every_family(model, seed, error):
    name, m = model
    with pytest.raises(error, match="seed must be an int"):
        m.generate(CONDITIONS[name][:1], seed=seed, progress=False)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_a_bad_batch_size_is_the_same_error_in_every_family(model, batch_size):
    name, m = model
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        m.generate(CONDITIONS[name][:1], batch_size=batch_size, progress=False)


def test_a_budget_without_a_policy_is_the_same_error_in_every_family(model):
    name, m = model
    with pytest.raises(ValueError, match="without policy="):
        m.generate(CONDITIONS[name][:1], budget="10%", progress=False)


def test_one_strict_check_names_every_problem():
    own = {"a": torch.zeros(2), "b": torch.zeros(3), "opt": torch.zeros(1)}
    state = {"a": torch.zeros(2), "b": torch.zeros(4), "extra": torch.zeros(1), "skip": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError) as info:
        check_state_dict(own, state, what="f.pth", target="the toy", ignored={"skip"}, optional=lambda k: k == "opt")
    assert str(info.value) == "f.pth does not fit the toy: wrong shapes: b (4,) (model: (3,)); unexpected keys: extra"
    with pytest.warns(UserWarning, match="missing keys: b"):
        check_state_dict(own, {"a": torch.zeros(2)}, what="f.pth", target="the toy", strict=False,
                         optional=lambda k: k == "opt")
    check_state_dict(own, {**own}, what="f.pth", target="the toy")  # a fitting file passes


def test_the_three_loaders_raise_the_same_error():
    infinity = load_model("infinity-tiny")
    state = dict(infinity.transformer.state_dict())
    state.pop("head.weight")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: head\.weight"):
        load_transformer_weights(infinity.transformer, state)
    var = load_model("var-tiny")
    state = dict(var.transformer.state_dict())
    state["head.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError, match=r"wrong shapes: head\.bias \(3,\)"):
        load_var_state_dict(var.transformer, state)
    decoder_state = {f"decoder.{k}": v for k, v in BSQVAEDecoder(BSQVAEConfig.tiny()).state_dict().items()}
    decoder_state["decoder.mystery.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: decoder\.mystery\.weight"):
        load_bsq_vae(decoder_state, BSQVAEConfig.tiny())
    # still a KeyError for code written against the VAE loader's old error, and a ValueError for the CLI
    assert issubclass(CheckpointMismatchError, KeyError) and issubclass(CheckpointMismatchError, ValueError)
