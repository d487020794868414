"""Infinity's next-scale generation loop with a policy-driven KV cache (reference §8).

Per scale si: add the scale embedding, run every block (each self-attention appends the map's K/V to
the ``KVCache`` and lets the policy compress it), compute bit logits on all rows, divide by tau, mix
CFG as cfg * cond + (1 - cfg) * uncond, sample one bit per pair, turn bits into BSQ codes, accumulate
them at full latent size and build the next scale's input by resizing the accumulated codes.

Sampling follows the official code exactly: one CPU ``torch.Generator`` seeded once per call; per
scale top-k (a no-op for 2 classes), top-p on the ascending sort, then one ``torch.multinomial`` over
all (row, token, bit) pairs. Sampling always happens on the CPU, so a seed gives the same bits on any
device when the logits agree (the official code samples on the model's device).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import attrs
import torch
import torch.nn.functional as F

from adapters.validators import int_argument, real_argument
from adapters.base import ScaleTimer
from kvpolicy import KVCache, ScaleSchedule

from .bsq_vae import bits_to_codes, resize_codes
from .model import InfinityTransformer, TextContext


def sample_bits(logits: torch.Tensor, *, top_k: int, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """logits (B, N, 2) float32 -> sampled class per pair (B, N) int64, drawn on the CPU."""
    logits = logits.detach().float().cpu().clone()
    classes = logits.shape[-1]
    k = min(int(top_k), classes)
    if k > 0:
        kth = logits.topk(k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -math.inf)
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False  # the most likely value is never removed
        logits.masked_fill_(remove.scatter(order.ndim - 1, order, remove), -math.inf)
    probs = logits.softmax(dim=-1).view(-1, classes)
    draws = torch.multinomial(probs, num_samples=1, replacement=True, generator=generator)
    return draws.view(logits.shape[:-1])


def per_scale(name: str, value, num_scales: int, **limits) -> list[float]:
    """One number for every scale, or a list/tuple of one per scale (the official loop's ``cfg_list``
    and ``tau_list``) -> ``num_scales`` checked floats. ``limits``: ``real_argument``'s bounds."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_scales:
            raise ValueError(f"{name} has {len(value)} values but the schedule has {num_scales} scales; give one "
                             f"number or one per scale")
        return [real_argument(f"{name}[{i}]", v, **limits) for i, v in enumerate(value)]
    return [real_argument(name, value, **limits)] * num_scales


def uses_guidance(cfg) -> bool:
    """Whether the unconditional rows are needed: some scale's cfg differs from 1."""
    return any(v != 1 for v in cfg) if isinstance(cfg, (list, tuple)) else cfg != 1


def _check_sampling(cfg, tau, top_k, top_p, num_scales: int) -> tuple[list[float], list[float]]:
    """(cfg per scale, tau per scale), after checking every sampling option."""
    cfgs = per_scale("cfg", cfg, num_scales, note=" (1 = no guidance)")
    taus = per_scale("tau", tau, num_scales, low=0, low_open=True, note=" (a temperature)")
    int_argument("top_k", top_k, low=0, note=" (0 = off)")
    real_argument("top_p", top_p, low=0, high=1, note=" (0 or 1 = off)")
    return cfgs, taus


@attrs.define
class LoopResult:
    bits: list[torch.Tensor]  # per scale (B, h, w, token_bits) uint8, CPU: the bits fed forward
    sampled_bits: list[torch.Tensor]  # per scale, what the sampler drew (differs only when forced)
    summed_codes: torch.Tensor  # (B, codebook_dim, H, W) float32, the decoder input
    logits: Optional[list[torch.Tensor]]  # per scale (B, h*w*token_bits, 2), when asked for
    cache: KVCache
    scale_seconds: list[float] = attrs.field(factory=list)  # timed by the loop (the cache counts bytes only)


def vae_shapes(schedule: ScaleSchedule, patchify: bool) -> list[tuple[int, int]]:
    factor = 2 if patchify else 1
    return [(h * factor, w * factor) for h, w in schedule.shapes]


def run_generation(transformer: InfinityTransformer, ctx: TextContext, *, schedule: ScaleSchedule,
                   template: Sequence[tuple[int, int]], cache: KVCache, generator: torch.Generator,
                   cfg: float | Sequence[float] = 3.0, tau: float | Sequence[float] = 1.0, top_k: int = 900,
                   top_p: float = 0.97, compute_dtype: torch.dtype = torch.float32, forced_bits: Optional[Sequence[torch.Tensor]] = None,
                   keep_logits: bool = False, stats=None, progress=None) -> LoopResult:
    """The official ``autoregressive_infer_cfg`` (bitwise path, CFG on logits) over ``schedule``.

    ``template``: the aspect-ratio template's 13 (h, w) maps (``schedule`` must be a prefix of it);
    the RoPE positions come from it. ``forced_bits`` (teacher forcing): per scale, bits that replace
    the sampled ones when building the next input (the sampler still draws, so the random stream is
    the same). ``progress``: a tqdm-like wrapper for the scale loop, or None. ``cfg`` and ``tau``: one
    number, or one per scale (the official ``cfg_list`` / ``tau_list``); the unconditional rows run
    when any scale's cfg differs from 1, and a scale with cfg 1 takes the conditional logits alone.
    """
    cfgs, taus = _check_sampling(cfg, tau, top_k, top_p, schedule.num_scales)
    c = transformer.config
    if list(schedule.shapes) != [tuple(s) for s in template[: schedule.num_scales]]:
        raise ValueError(f"schedule {schedule} is not a prefix of the RoPE template {list(template)}")
    if schedule.num_scales > c.num_level_embeddings:
        raise ValueError(f"{schedule.num_scales} scales exceed the model's {c.num_level_embeddings} scale embeddings")
    if forced_bits is not None and len(forced_bits) != schedule.num_scales:
        raise ValueError(f"forced_bits has {len(forced_bits)} scales, the schedule {schedule.num_scales}")
    guidance = uses_guidance(cfgs)
    if (ctx.rows == 2 * ctx.num_prompts) != guidance:
        raise ValueError("the text context's rows do not match the guidance setting (cfg != 1 needs cond+uncond rows)")
    batch, device = ctx.num_prompts, transformer.device
    latent_shapes = vae_shapes(schedule, c.spatial_patchify)
    summed = torch.zeros(batch, c.codebook_dim, *latent_shapes[-1], device=device)
    table = transformer.rope(template)
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    x = transformer.start_tokens(ctx)
    used, sampled, all_logits = [], [], [] if keep_logits else None
    scales = range(schedule.num_scales)
    timer = ScaleTimer(schedule.num_scales)
    for si in (progress(scales) if progress is not None else scales):
        h, w = schedule.shape(si)
        timer.start(si, synchronize)
        hidden = transformer.forward_scale(x, si, ctx, cache=cache, rope_table=table,
                                           rope_start=schedule.offset(si), compute_dtype=compute_dtype, stats=stats)
        logits = transformer.logits(hidden, ctx).mul(1 / taus[si])
        if cfgs[si] != 1:  # conditional rows first, then unconditional (the official layout)
            logits = cfgs[si] * logits[:batch] + (1 - cfgs[si]) * logits[batch:]
        elif guidance:
            logits = logits[:batch]
        logits = logits.reshape(batch, -1, 2)
        if keep_logits:
            all_logits.append(logits.detach().cpu())
        draws = sample_bits(logits, top_k=top_k, top_p=top_p, generator=generator)
        bits = draws.view(batch, h, w, c.token_bits).to(torch.uint8)
        sampled.append(bits)
        if forced_bits is not None:
            forced = torch.as_tensor(forced_bits[si]).to(torch.uint8).cpu()
            if forced.shape != bits.shape:
                raise ValueError(f"forced bits of scale {si} have shape {tuple(forced.shape)}, need {tuple(bits.shape)}")
            bits = forced
        used.append(bits)
        codes = bits_to_codes(bits.to(device), c.codebook_dim, spatial_patchify=c.spatial_patchify)
        if si < schedule.num_scales - 1:
            summed = summed + resize_codes(codes, latent_shapes[-1])
            following = resize_codes(summed, latent_shapes[si + 1])
            if c.spatial_patchify:
                following = F.pixel_unshuffle(following, 2)
            x = transformer.embed_codes(following, ctx.rows)
        else:
            summed = summed + codes
        timer.stop(si, synchronize)
    return LoopResult(bits=used, sampled_bits=sampled, summed_codes=summed, logits=all_logits, cache=cache, scale_seconds=timer.seconds)
