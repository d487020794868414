"""Loading a VAR preset (official files, local paths or random); ``build_model`` (in ``generate``) builds from configs."""

from __future__ import annotations

import torch

from .config import PRESETS, VARPreset
from .generate import VARModel, build_model  # build_model lived here before VARModel.from_official used it


def load_var(name: str, *, weights=None, vae_weights=None, device="cpu", dtype=torch.float32, seed: int = 0) -> VARModel:
    """Load a preset. Official presets default to the hub files; ``var-tiny`` to its shipped trained
    files; ``var-tiny-random`` to random weights."""
    preset: VARPreset = PRESETS[name]
    if preset.packaged is not None:  # trained tiny weights shipped in the package
        from adapters.tiny_weights import packaged_file

        weights = packaged_file(preset.packaged, "var.safetensors") if weights is None else weights
        vae_weights = packaged_file(preset.packaged, "vqvae.safetensors") if vae_weights is None else vae_weights
    elif preset.hub_file is None:  # tiny random: nothing released
        weights = "random" if weights is None else weights
        vae_weights = "random" if vae_weights is None else vae_weights
    return build_model(preset.var, preset.vqvae, var_weights=weights, vae_weights=vae_weights, name=name,
                       resolution=preset.resolution, device=device, dtype=dtype, seed=seed,
                       hub_file=preset.hub_file, official_vae=preset.hub_file is not None)
