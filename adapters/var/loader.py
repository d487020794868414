"""Building a VAR model from configs and loading a preset (official files, local paths or random)."""

from __future__ import annotations

from typing import Optional

import torch

from .config import PRESETS, VAE_FILE, VARConfig, VARPreset, VQVAEConfig
from .generate import VARModel, parse_dtype
from .model import VARTransformer
from .vqvae import VQVAE
from .weights import fill_var, fill_vqvae, materialize, resolve_source


def build_model(var_config: VARConfig, vqvae_config: VQVAEConfig, *, var_weights, vae_weights, name: str = "var-custom",
                resolution: Optional[int] = None, device="cpu", dtype=torch.float32, seed: int = 0,
                hub_file: Optional[str] = None, official_vae: bool = False) -> VARModel:
    """Build a VAR from configs and fill it (``"random"``, a state dict, a file/folder, or None = hub)."""
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    files = [f for f in (hub_file, VAE_FILE if official_vae else None) if f]
    var_source = resolve_source(var_weights, filename=hub_file, model_name=name, files=files, what="var")
    vae_source = resolve_source(vae_weights, filename=VAE_FILE if official_vae else None, model_name=name,
                                files=files, what="vae")
    with torch.device("meta"):  # no throw-away initialisation of billions of parameters
        transformer, vqvae = VARTransformer(var_config), VQVAE(vqvae_config)
    materialize(transformer, device, dtype)
    materialize(vqvae, device, dtype)
    sources = {"var": fill_var(transformer, var_source, seed=seed),
               "vae": fill_vqvae(vqvae, vae_source, seed=seed + 1)}
    if resolution is None:
        resolution = var_config.patch_nums[-1] * vqvae_config.upsample_factor
    return VARModel(name, transformer, vqvae, resolution=resolution, sources=sources).eval()


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
