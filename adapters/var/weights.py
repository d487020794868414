"""Finding, checking and loading VAR / VQVAE weights (``shared/reference/var.md`` §2, §7, §8).

Official files are flat pickled state dicts on https://huggingface.co/FoundationVision/var
(``var_d16.pth`` … ``var_d36.pth``, ``vae_ch160v4096z32.pth``). Unlike the official loader we
never load silently: every missing or mis-shaped key is an error, and the extras we accept are
listed explicitly:

- VAR: ``lvl_1L`` (must equal the scale index of each position), ``attn_bias_for_masking``
  (training mask, shape checked), ``blocks.i.attn.zero_k_bias`` (must be all zero);
- VQVAE: ``encoder.*``, ``quant_conv.*`` (encoding only) and ``quantize.ema_vocab_hit_SV``
  (a training statistic).

Random weights (``weights="random"``) follow the golden README's recipe so that they exercise the
same paths (top-p masking, the ln 100 temperature clamp, clamped pixels).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn

from adapters.checkpoint_io import CheckpointError, check_state_dict, copy_state_dict, load_safetensors_file, load_torch_file

from .config import HUB_REPO, VAE_FILE, VARConfig
from .model import VARTransformer
from .vqvae import VQVAE

WeightSpec = Union[str, os.PathLike, Mapping[str, torch.Tensor], None]
RANDOM = "random"

_VAE_IGNORED = re.compile(r"^(encoder\.|quant_conv\.|quantize\.ema_vocab_hit_SV$)")
_ZERO_K_BIAS = re.compile(r"^blocks\.(\d+)\.attn\.zero_k_bias$")


class WeightsUnavailableError(FileNotFoundError):
    """The checkpoint files are neither local nor downloadable."""


def hf_hub_download(repo_id: str, filename: str):  # indirection so tests can substitute the hub
    from adapters.hub import hub_download

    return hub_download(repo_id, filename)


def _offline_message(model: str, files: list[str], reason: str) -> str:
    weights_file = next((f for f in files if f != VAE_FILE), "var_dXX.pth")
    return (f"cannot get the {model} weights ({', '.join(files)}) from the Hugging Face hub repo "
            f"{HUB_REPO!r} ({reason.rstrip('. ')}). Download them once (e.g. `huggingface-cli download {HUB_REPO} "
            f"{' '.join(files)}`) or pass local paths: load_model({model!r}, "
            f"weights='/path/{weights_file}', vae_weights='/path/{VAE_FILE}') or, on the command line, "
            f"`kvpolicy generate --model {model} --weights /path/{weights_file} --vae-weights /path/{VAE_FILE}`; "
            f"weights='random', vae_weights='random' build random weights of the same shapes.")


def resolve_file(spec: WeightSpec, filename: str, *, model: str, all_files: list[str]) -> Path:
    """A local file for ``spec``: None -> the hub (or its local cache), a file, or a folder holding ``filename``."""
    if spec is None:
        try:
            return Path(hf_hub_download(repo_id=HUB_REPO, filename=filename))
        except Exception as exc:  # offline, no cache, network or auth error: say what to do instead
            raise WeightsUnavailableError(_offline_message(model, all_files, f"{type(exc).__name__}: {exc}")) from exc
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        raise WeightsUnavailableError(f"{model}: weight file {str(path)!r} does not exist (expected the official "
                                      f"{filename!r}; pass a file path or a folder containing it)")
    return path


# What each file is for, as damaged-file errors name it (the loader's argument and the CLI option).
FILE_ROLES = {"var": "VAR transformer checkpoint (weights= / --weights)",
              "vae": "VQVAE checkpoint (vae_weights= / --vae-weights)"}


def read_state_dict(path: Path, what: str = "VAR checkpoint") -> dict[str, torch.Tensor]:
    """A flat state dict from a ``.pth`` (pickled, loaded with weights_only) or ``.safetensors`` file;
    ``what`` names the file's role in the error a damaged file raises."""
    if path.suffix == ".safetensors":
        return load_safetensors_file(path, what)
    state = load_torch_file(path, what)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what} {str(path)!r}: expected a flat state dict of tensors (as the official files), got "
                         f"{type(state).__name__} with keys {list(state)[:5] if isinstance(state, Mapping) else '-'}")
    return dict(state)



def _check_and_copy(module: nn.Module, state: Mapping[str, torch.Tensor], ignored: set[str], what: str) -> None:
    own = module.state_dict()
    check_state_dict(own, state, what=what, target=f"the {type(module).__name__}", ignored=ignored)
    copy_state_dict(own, state)


def load_var_state_dict(model: VARTransformer, state: Mapping[str, torch.Tensor], what: str = "VAR state dict") -> None:
    """Strict load of an official VAR state dict, checking the derived buffers it also carries."""
    config: VARConfig = model.config
    ignored = set()
    if "lvl_1L" in state:
        if not torch.equal(state["lvl_1L"].to(torch.long), model.level_index()):
            raise ValueError(f"{what}: lvl_1L does not match patch_nums {config.patch_nums} "
                             f"(the file was made for another patch list)")
        ignored.add("lvl_1L")
    if "attn_bias_for_masking" in state:
        L = config.total_tokens
        if tuple(state["attn_bias_for_masking"].shape) != (1, 1, L, L):
            raise ValueError(f"{what}: attn_bias_for_masking has shape {tuple(state['attn_bias_for_masking'].shape)}, "
                             f"expected (1, 1, {L}, {L}) for patch_nums {config.patch_nums}")
        ignored.add("attn_bias_for_masking")
    for key, tensor in state.items():
        match = _ZERO_K_BIAS.match(key)
        if match and int(match.group(1)) < config.depth:
            if tuple(tensor.shape) != (config.embed_dim,) or bool(tensor.float().abs().max() != 0):
                raise ValueError(f"{what}: {key} must be a zero vector of length {config.embed_dim} "
                                 f"(VAR adds no key bias), got shape {tuple(tensor.shape)}")
            ignored.add(key)
    _check_and_copy(model, state, ignored, what)


def load_vqvae_state_dict(model: VQVAE, state: Mapping[str, torch.Tensor], what: str = "VQVAE state dict") -> None:
    """Strict load of the decoding half; encoder keys, quant_conv and ema_vocab_hit_SV are ignored."""
    _check_and_copy(model, state, {k for k in state if _VAE_IGNORED.match(k)}, what)


# -- random weights ------------------------------------------------------------------------------
def _normal(shape, std: float, generator: torch.Generator, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * std + mean


@torch.no_grad()
def init_random_var(model: VARTransformer, seed: int) -> None:
    """Golden recipe: N(0, 0.02), except per-block AdaLN biases / ada_gss N(0, 0.3), head.weight
    N(0, 0.1), scale_mul_1H11 = log of 3, 12, 45, 120 cycled over (layer, head)."""
    gen = torch.Generator().manual_seed(seed)
    temperatures = torch.tensor([3.0, 12.0, 45.0, 120.0]).log()
    heads = model.config.num_heads
    for name, param in model.named_parameters():
        if name.endswith("scale_mul_1H11"):
            layer = int(name.split(".")[1])
            idx = (layer * heads + torch.arange(heads)) % len(temperatures)
            value = temperatures[idx].view(1, heads, 1, 1)
        elif name.endswith("ada_gss") or re.fullmatch(r"blocks\.\d+\.ada_lin\.1\.bias", name):
            value = _normal(param.shape, 0.3, gen)
        elif name == "head.weight":
            value = _normal(param.shape, 0.1, gen)
        else:
            value = _normal(param.shape, 0.02, gen)
        param.copy_(value)


@torch.no_grad()
def init_random_vqvae(model: VQVAE, seed: int) -> None:
    """Codebook N(0, 0.5); conv weights N(0, 1/fan_in) (conv_out 0.08); GroupNorm 1 + N(0, 0.1);
    biases N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name == "quantize.embedding.weight":
            value = _normal(param.shape, 0.5, gen)
        elif name.endswith(".bias"):
            value = _normal(param.shape, 0.02, gen)
        elif param.dim() == 1:  # GroupNorm weight
            value = _normal(param.shape, 0.1, gen, mean=1.0)
        elif name == "decoder.conv_out.weight":
            value = _normal(param.shape, 0.08, gen)
        else:
            fan_in = param.shape[1] * param.shape[2] * param.shape[3]
            value = _normal(param.shape, fan_in ** -0.5, gen)
        param.copy_(value)


def materialize(module: nn.Module, device, dtype) -> nn.Module:
    """Storage for a module built on the meta device (values are filled by the loaders)."""
    return module.to_empty(device=device).to(dtype=dtype)


def resolve_source(spec: WeightSpec, *, filename: Optional[str], model_name: str, files: list[str], what: str):
    """``"random"``, a state dict, or the path of a local (or downloaded) file; done before any
    model memory is allocated so that a missing file fails fast."""
    if isinstance(spec, str) and spec == RANDOM:
        return RANDOM
    if isinstance(spec, Mapping):
        return spec
    if spec is None and filename is None:
        raise ValueError(f"{model_name} has no released {what} weights: pass a local file or 'random'")
    if spec is not None and not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"{what} weights must be None (hub), 'random', a path or a state dict, got {type(spec).__name__}")
    return resolve_file(spec, filename or f"{what}.pth", model=model_name, all_files=files)


def _fill(model, source, seed: int, init_random, load_state_dict, role: str) -> str:
    if isinstance(source, str) and source == RANDOM:
        init_random(model, seed)
        return f"random(seed={seed})"
    if isinstance(source, Mapping):
        load_state_dict(model, source)
        return "state dict"
    load_state_dict(model, read_state_dict(source, role), what=str(source))
    return str(source)


def fill_var(model: VARTransformer, source, *, seed: int) -> str:
    """Fill the transformer from a resolved source; returns a description of it."""
    return _fill(model, source, seed, init_random_var, load_var_state_dict, FILE_ROLES["var"])


def fill_vqvae(model: VQVAE, source, *, seed: int) -> str:
    return _fill(model, source, seed, init_random_vqvae, load_vqvae_state_dict, FILE_ROLES["vae"])
