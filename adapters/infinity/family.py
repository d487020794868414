"""Infinity's registration in the model-family registry (entry point ``kvpolicy.models``)."""

from __future__ import annotations

from adapters.families import ModelFamily, Preset, register_family

from .config import PRESETS
from .schedule import INFINITY_PN_SCALES, INFINITY_RESOLUTION_PN, infinity_schedule


def schedule(preset: Preset, resolution=None, aspect_ratio: float = 1.0):
    """The aspect-ratio template h/w names (one of ``INFINITY_TEMPLATES``; another value is refused)
    and the first scales of it for the resolution (a pn name or a 1:1 pixel size)."""
    return infinity_schedule(preset.resolution if resolution is None else resolution, aspect_ratio)


def load(name: str, **kwargs):
    from .pipeline import load_infinity

    return load_infinity(name, **kwargs)


FAMILY = register_family(ModelFamily(
    name="infinity",
    description="Infinity (arXiv 2412.04431): text-to-image, bitwise next-scale prediction",
    conditioning="prompt",
    schedule=schedule,
    load=load,
    presets=[Preset(p.name, p.model.depth, p.model.num_heads, p.model.head_dim, p.default_resolution,
                    tiny=p.random_only or p.packaged is not None) for p in PRESETS.values()],
    weight_options=("weights", "vae_weights", "text_encoder"),
    benchmark_presets=("infinity-2b", "infinity-8b"),
    resolutions=f"{sorted(INFINITY_RESOLUTION_PN)} or a pn name {list(INFINITY_PN_SCALES)}, aspect ratios h/w "
                "0.333-3 (one of the 15 templates)",
    key_cache_dtype="float32",  # K normalised in float32 and cached so, next to V in the compute dtype
))
