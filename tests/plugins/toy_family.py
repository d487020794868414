"""A third model family, written as a user would: one file, one registration.

``kvpolicy --plugin tests/plugins/toy_family.py plan|generate|compare|calibrate|bench-gpu --model
toy-tiny ...``. The model is a small deterministic next-scale generator conditioned on class
labels: per scale, a state map is embedded, attends over every layer's cached history through the
shared cached-attention path (so any policy compresses it and the calibration collector observes
it), and each token is classified into one of 8 codes; the last map's codes become the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kvpolicy
from adapters.attention import cached_self_attention
from adapters.base import BatchResult, GenerationSetup, NextScaleModel, ScaleTimer
from adapters.families import ModelFamily, Preset, register_family

PATCH_NUMS = {16: (1, 2, 3, 4, 6, 8)}  # pixels -> side of each scale's map (image = 2x the last map)


def schedule(preset, resolution=None, aspect_ratio=1.0):
    resolution = preset.resolution if resolution is None else resolution
    if resolution not in PATCH_NUMS or aspect_ratio != 1.0:
        raise ValueError(f"toy models generate {sorted(PATCH_NUMS)} px squares, got {resolution!r} at {aspect_ratio}")
    return kvpolicy.ScaleSchedule(PATCH_NUMS[resolution])


class ToyModel(NextScaleModel):
    """Only the model-specific steps: the template (adapters.base.NextScaleModel) does seeds,
    batches, the policy, progress and the cache report."""

    def __init__(self, preset, width=16, codes=8, seed=1234):
        super().__init__()
        self.name, self.preset, self.width = preset.name, preset, width
        self.heads, self.head_dim, self.layers = preset.num_heads, preset.head_dim, preset.num_layers
        gen = torch.Generator().manual_seed(seed)
        inner = self.heads * self.head_dim
        self.w_qkv = [torch.randn(width, 3 * inner, generator=gen) / width ** 0.5 for _ in range(self.layers)]
        self.w_out = torch.randn(inner, codes, generator=gen) / inner ** 0.5
        self.embed = torch.randn(codes, width, generator=gen)
        self.label_embed = torch.randn(FAMILY.num_classes, width, generator=gen)
        self.palette = torch.randint(0, 256, (codes, 3), generator=gen, dtype=torch.uint8)

    @property
    def num_layers(self):
        return self.layers

    def check_conditions(self, labels):
        labels = [int(x) for x in labels]
        if not labels or not all(0 <= x < FAMILY.num_classes for x in labels):
            raise ValueError(f"toy labels are 0..{FAMILY.num_classes - 1}, got {labels}")
        return labels

    def setup(self, *, resolution, aspect_ratio, dtype, sampling):
        return GenerationSetup(schedule=schedule(self.preset, resolution, aspect_ratio), compute_dtype=torch.float32,
                               rows_per_condition=1)

    def generate_batch(self, labels, setup, *, cache, generator, stats, on_scale):
        rows = len(labels)
        state = self.label_embed[torch.tensor(labels)][:, None, None, :]
        tokens = []
        timer = ScaleTimer(setup.schedule.num_scales)
        for scale, (h, w) in enumerate(setup.schedule.shapes):
            timer.start(scale)
            x = F.interpolate(state.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False)
            x = x.permute(0, 2, 3, 1).reshape(rows, h * w, self.width)
            x = x + 0.3 * torch.randn(rows, h * w, self.width, generator=generator)
            for layer in range(self.layers):
                q, k, v = (x @ self.w_qkv[layer]).split(self.heads * self.head_dim, dim=-1)
                q, k, v = (t.reshape(rows, h * w, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
                out = cached_self_attention(cache, layer, scale, 4 * F.normalize(q, dim=-1), F.normalize(k, dim=-1), v,
                                            raw_queries=q, stats=stats)
                x = x + out.transpose(1, 2).reshape(rows, h * w, -1)[..., : self.width]
            code = (out.transpose(1, 2).reshape(rows, h * w, -1) @ self.w_out).argmax(-1)
            tokens.append(code)
            state = self.embed[code].reshape(rows, h, w, self.width)
            timer.stop(scale)
            on_scale()
        h, w = setup.schedule.shapes[-1]
        images = self.palette[tokens[-1]].reshape(rows, h, w, 3).repeat_interleave(2, 1).repeat_interleave(2, 2)
        return BatchResult(images=images, tokens=tokens, scale_seconds=timer.seconds)

    def generate(self, labels, *, policy=None, budget=None, seed=0, batch_size=None, dtype=None, stats=None,
                 progress=None, resolution=None, aspect_ratio=1.0):
        return self.run_generation(labels, policy=policy, budget=budget, seed=seed, batch_size=batch_size, dtype=dtype,
                                   stats=stats, progress=progress, resolution=resolution, aspect_ratio=aspect_ratio)


def load(name, *, device="cpu", dtype=None, weights=None):
    if weights not in (None, "random"):
        raise ValueError(f"toy models have no weight files, got weights={weights!r}")
    return ToyModel(FAMILY.presets[name])


FAMILY = register_family(ModelFamily(
    name="toy",
    description="a toy next-scale family registered from a user's file",
    conditioning="label",
    num_classes=10,
    schedule=schedule,
    load=load,
    presets=[Preset("toy-tiny", 2, 2, 8, 16, tiny=True),
             Preset("toy-large", 48, 32, 128, 16, runnable=False)],  # plannable without weights only
    weight_options=("weights",),
    calibration_conditions=(1, 2, 3),
    evaluation_conditions=(4, 5),
))
