"""VAR's registration in the model-family registry (entry point ``kvpolicy.models``)."""

from __future__ import annotations

from kvpolicy import ScaleSchedule

from adapters.families import ModelFamily, Preset, register_family

from .config import PRESETS
from .schedule import VAR_PATCH_NUMS

NUM_CLASSES = 1000  # ImageNet


def schedule(preset: Preset, resolution=None, aspect_ratio: float = 1.0) -> ScaleSchedule:
    """A VAR model generates square images at the size it was trained for only."""
    if aspect_ratio != 1.0:
        raise ValueError(f"{preset.name} generates square images only (aspect ratio 1.0), got {aspect_ratio}")
    resolution = preset.resolution if resolution is None else resolution
    if resolution not in VAR_PATCH_NUMS:
        raise ValueError(f"VAR resolution {resolution!r} is not one of {sorted(VAR_PATCH_NUMS)}")
    if resolution != preset.resolution:
        raise ValueError(f"{preset.name} is trained at {preset.resolution}^2; got resolution {resolution}")
    return ScaleSchedule(VAR_PATCH_NUMS[resolution])


def load(name: str, **kwargs):
    from .loader import load_var

    return load_var(name, **kwargs)


FAMILY = register_family(ModelFamily(
    name="var",
    description="VAR (arXiv 2404.02905): class-conditional ImageNet, next-scale prediction",
    conditioning="label",
    num_classes=NUM_CLASSES,
    schedule=schedule,
    load=load,
    # the registry's resolution names the patch list (the trained var-tiny decodes it to 32x32 pixels)
    presets=[Preset(p.name, p.var.depth, p.var.num_heads, p.var.head_dim,
                    next((r for r, nums in VAR_PATCH_NUMS.items() if tuple(nums) == p.var.patch_nums), p.resolution),
                    tiny=p.hub_file is None)
             for p in PRESETS.values()],
    weight_options=("weights", "vae_weights"),
    resolutions=f"the model's own size ({sorted(VAR_PATCH_NUMS)}), square",
))
