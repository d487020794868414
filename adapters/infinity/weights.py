"""Loading Infinity transformer weights exactly as released (reference §3.3, §11).

Accepted sources: a state-dict mapping; a single ``.pth`` file (the 2B ``infinity_2b_reg.pth``: a
pickled flat state dict); a folder of shards with an index JSON (the 8B ``infinity_8b_weights/``:
``model.safetensors.index.json`` + ``.safetensors`` shards, or ``pytorch_model.bin.index.json`` +
``.bin`` shards). Hub files are fetched with ``huggingface_hub`` (see ``hub.py``).

Deviation from the official loader (which calls ``load_state_dict(strict=False)``): missing
transformer keys, unexpected keys and wrong shapes are errors. Ignored on purpose, by name:
``lvl_1L``, ``attn_bias_for_masking``, ``Infinity_visible_kvlen``, ``Infinity_invisible_qlen``
(training-time buffers the official loader drops). ``zero_k_bias`` buffers are optional (zeros).
A ``cfg_uncond`` with another row count is a shape error too (the official loader truncates or pads
it silently; released files have 512 rows).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from adapters.checkpoint_io import (CheckpointError, CheckpointMismatchError, check_state_dict, copy_state_dict,
                                    load_safetensors_file, load_torch_file)

from .model import InfinityTransformer

IGNORED_KEYS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")
OPTIONAL_SUFFIX = "zero_k_bias"
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TRANSFORMER_FILE = "Infinity transformer checkpoint (weights= / --weights)"


def _load_shard(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"shard {str(path)!r} named in the index is missing")
    if path.suffix == ".safetensors":
        return load_safetensors_file(path, TRANSFORMER_FILE)
    return load_torch_file(path, TRANSFORMER_FILE)


def _unwrap_checkpoint(obj: Any, source: str) -> Mapping[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{TRANSFORMER_FILE} {source}: expected a state dict, got {type(obj).__name__}")
    if "trainer" in obj and isinstance(obj["trainer"], Mapping) and "gpt_fsdp" in obj["trainer"]:
        return obj["trainer"]["gpt_fsdp"]  # an (unreleased) training checkpoint
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{source}: no tensors at the top level; top-level keys: {sorted(map(str, obj))[:12]}")
    return obj


def read_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Flat state dict from a mapping, a ``.pth``/``.bin``/``.safetensors`` file or a sharded folder."""
    if isinstance(source, Mapping):
        return _unwrap_checkpoint(source, "state dict")
    path = Path(source)
    if path.is_dir():
        index = next((path / name for name in INDEX_FILES if (path / name).is_file()), None)
        if index is None:
            found = sorted(p.name for p in path.glob("*.index.json"))
            if len(found) != 1:
                raise FileNotFoundError(f"{str(path)!r} is a folder without a shard index; expected one of "
                                        f"{list(INDEX_FILES)} (found {found or 'none'})")
            index = path / found[0]
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map' in the index JSON")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors = _load_shard(path / shard)
            for key, value in tensors.items():
                if weight_map.get(key) == shard:
                    state[key] = value
        listed_missing = sorted(k for k in weight_map if k not in state)
        if listed_missing:
            raise CheckpointMismatchError(f"{index}: {len(listed_missing)} keys listed in the index are not in "
                                          f"their shard: {listed_missing[:8]}")
        return state
    if not path.is_file():
        raise FileNotFoundError(f"Infinity weights not found: {str(path)!r} (a .pth file or a sharded folder)")
    if path.suffix == ".safetensors":
        return _load_shard(path)
    return _unwrap_checkpoint(load_torch_file(path, TRANSFORMER_FILE), str(path))


def load_transformer_weights(model: InfinityTransformer, source, *, source_name: Optional[str] = None) -> InfinityTransformer:
    """Copy official weights into ``model`` strictly (see module docstring); returns the model."""
    name = source_name or (str(source) if not isinstance(source, Mapping) else "state dict")
    state = read_state_dict(source)
    own = model.state_dict()
    c = model.config
    check_state_dict(own, state, what=name, ignored=IGNORED_KEYS, optional=lambda key: key.endswith(OPTIONAL_SUFFIX),
                     target=f"the Infinity transformer (depth {c.depth}, width {c.embed_dim}, {c.num_heads} heads, "
                            f"{c.block_chunks} block chunks, {c.token_bits} bits/token)")
    copy_state_dict(own, state)
    return model


def random_init(model: InfinityTransformer, seed: int) -> InfinityTransformer:
    """Seeded random weights for tiny presets and benchmarks (nothing learned, but every path runs).

    Linear weights N(0, 0.02); norm weights 1 + N(0, 0.1); ``ada_gss`` N(0, 0.3); ``cfg_uncond``
    N(0, 1); the head N(0, 4/C) so bits are confident and top-p masking happens (as the golden
    recipe); per-head attention multipliers spread between 2.5 and 150 (ln-scaled).
    """
    device = model.pos_start.device
    device = device if device.type != "meta" else torch.device("cpu")
    generator = torch.Generator(device).manual_seed(seed)  # seeded per device type
    width = model.config.embed_dim
    multipliers = torch.tensor([2.5, 6.0, 15.0, 40.0, 90.0, 150.0])
    with torch.no_grad():
        for key, param in model.named_parameters():
            shape = param.shape

            def normal(std):
                return torch.randn(shape, generator=generator, device=device) * std

            if key.endswith("scale_mul_1H11"):
                layer = [i for i, b in enumerate(model.blocks()) if b.sa.scale_mul_1H11 is param][0]
                idx = (torch.arange(shape[1]) + layer * shape[1]) % len(multipliers)
                value = multipliers[idx].log().view(shape).to(device)
            elif key.endswith("ada_gss"):
                value = normal(0.3)
            elif key == "cfg_uncond":
                value = normal(1.0)
            elif key == "head.weight":
                value = normal((4.0 / width) ** 0.5)
            elif key.endswith("norm.weight") or key.endswith("ca_norm.weight"):
                value = 1 + normal(0.1)
            elif key.endswith(".bias") or key.endswith("_bias"):
                value = normal(0.02)
            else:
                value = normal(0.02)
            param.copy_(value.to(param.dtype))
    return model
