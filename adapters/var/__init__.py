"""VAR (Tian et al., arXiv 2404.02905): class-conditional next-scale prediction, with any KV policy.

``load_model("var-tiny")`` (random weights, CPU in about a second) or ``load_model("var-d30",
weights=None|path|"random", vae_weights=None|path|"random", device="cuda", dtype=torch.bfloat16)``;
``None`` downloads the official files from the Hugging Face hub (``FoundationVision/var``).
"""

from __future__ import annotations

from typing import Optional

import torch

from adapters.base import register_model
from adapters.geometry import register_geometry

from .config import PRESETS, VAE_FILE, VARConfig, VARPreset, VQVAEConfig
from .generate import TeacherForcedOutput, VARModel, check_labels, parse_dtype
from .model import VARTransformer
from .vqvae import VQVAE
from .weights import WeightsUnavailableError, fill_var, fill_vqvae, materialize, resolve_source

__all__ = ["PRESETS", "VARConfig", "VQVAEConfig", "VARModel", "VARTransformer", "VQVAE", "TeacherForcedOutput",
           "WeightsUnavailableError", "build_model", "load_var", "check_labels"]


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
    """Load a preset. Official presets default to the hub files; ``var-tiny`` to random weights."""
    preset: VARPreset = PRESETS[name]
    if preset.hub_file is None:  # tiny: nothing released
        weights = "random" if weights is None else weights
        vae_weights = "random" if vae_weights is None else vae_weights
    return build_model(preset.var, preset.vqvae, var_weights=weights, vae_weights=vae_weights, name=name,
                       resolution=preset.resolution, device=device, dtype=dtype, seed=seed,
                       hub_file=preset.hub_file, official_vae=preset.hub_file is not None)


def _register() -> None:
    for name, preset in PRESETS.items():
        register_model(name, lambda _name=name, **kw: load_var(_name, **kw))
        if name == "var-tiny":
            c = preset.var
            register_geometry(name, "var", c.depth, c.num_heads, c.head_dim, preset.resolution)


_register()
