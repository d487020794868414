"""VAR generation: ``VAR.autoregressive_infer_cfg`` with a pluggable KV-cache policy
(``shared/reference/var.md`` §5–§6; sampling as in ``shared/golden/README.md``).

Per scale si of K: run the blocks on the current map (2B rows: conditional first), mix the logits
with the ramped guidance t = cfg·si/(K-1): (1+t)·cond − t·uncond, top-k then top-p masking, one
multinomial draw per token, codebook lookup, f_hat += phi(bicubic up), next input = area-resized
f_hat. The image is (clamp(decoder(post_quant_conv(f_hat)), -1, 1) + 1) / 2.

Deviation (for reproducibility across devices): draws use one CPU ``torch.Generator`` seeded once
per ``generate`` call (the official code uses a generator on the model's device, so its CUDA
samples differ from its CPU ones; on CPU both agree). Probabilities are moved to the CPU for the
draw. With ``batch_size`` smaller than the number of labels the batches run one after another
on the same generator, so, as in the official code, samples depend on the batch composition.
"""

from __future__ import annotations

import contextlib
import numbers
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import attrs
import numpy as np
import torch

from adapters.base import BatchResult, GenerationOutput, GenerationSetup, NextScaleModel, ScaleTimer, resolve_policy
from adapters.families import ModelGeometry
from adapters.checkpoint_io import check_checkpoint_file
from adapters.dtypes import parse_dtype
from adapters.validators import int_argument, real_argument
from kvpolicy import KVCache, ScaleSchedule
from kvpolicy.kept import kept_tokens_cache

from .config import VAE_FILE, VARConfig, VQVAEConfig
from .model import VARTransformer
from .vqvae import VQVAE
from .weights import FILE_ROLES, fill_var, fill_vqvae, materialize, resolve_source

def mask_top_k_top_p_(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """In place, as the official sampler: drop logits below the k-th largest (ties kept), then, on the
    ascending sort, the tokens whose cumulative probability is <= 1 - top_p (never the largest)."""
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        logits.masked_fill_(drop.scatter(drop.ndim - 1, order, drop), -torch.inf)
    return logits


def sample_indices(logits: torch.Tensor, generator: torch.Generator, top_k: int, top_p: float) -> torch.Tensor:
    """One multinomial draw per token from (B, l, V) logits (masked in place); (B, l) int64."""
    b, l, v = logits.shape
    probs = mask_top_k_top_p_(logits, top_k, top_p).softmax(dim=-1).view(-1, v)
    drawn = torch.multinomial(probs.cpu(), num_samples=1, replacement=True, generator=generator)
    return drawn.view(b, l).to(logits.device)


def gumbel_codes(masked_logits: torch.Tensor, ratio: float, generator: torch.Generator,
                 codebook: torch.Tensor) -> torch.Tensor:
    """``more_smooth`` (visualisation only): softmax((logits·(1+ratio) + Gumbel)/g) @ codebook with
    g = max(0.27·(1 − 0.95·ratio), 0.005); (B, l, Cvae)."""
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    exp = torch.empty(masked_logits.shape, dtype=masked_logits.dtype).exponential_(generator=generator)
    gumbels = -exp.to(masked_logits.device).log()
    weights = ((masked_logits.mul(1 + ratio) + gumbels) / tau).softmax(dim=-1)
    return weights @ codebook.to(weights.dtype).unsqueeze(0)


def check_labels(labels, num_classes: int) -> list[int]:
    """Class labels 0..num_classes-1 as a list (an int, a sequence or a 1-D integer tensor)."""
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if isinstance(labels, torch.Tensor):
        if labels.dim() > 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels tensor must be 1-D integer, got {labels.dtype} {tuple(labels.shape)}")
        labels = labels.reshape(-1).tolist()
    elif isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
        labels = [labels]
    elif isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise TypeError(f"labels must be class indices (an int, a list of ints or a 1-D tensor), got {labels!r}")
    out = []
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, numbers.Integral):
            raise TypeError(f"class label {label!r} is not an int; VAR takes ImageNet class indices 0..{num_classes - 1}")
        if not 0 <= label < num_classes:
            raise ValueError(f"class label {label} is out of range 0..{num_classes - 1}")
        out.append(int(label))
    if not out:
        raise ValueError("labels is empty; give at least one class index")
    return out


@attrs.define
class TeacherForcedOutput:
    """Per-scale CFG-mixed fp32 logits (B, pn², V), f_hat (B, Cvae, pn, pn), images in [0, 1] (B, 3, H, W)."""

    logits: list[torch.Tensor]
    f_hat: torch.Tensor
    images: torch.Tensor


class VARModel(NextScaleModel):
    """A loaded VAR: transformer + VQVAE decoder, with ``generate`` (the shared template,
    ``adapters.base.NextScaleModel``) and ``geometry``."""

    def __init__(self, name: str, transformer: VARTransformer, vqvae: VQVAE, *, resolution: int, sources: dict | None = None):
        super().__init__()
        if transformer.config.vocab_size != vqvae.config.vocab_size or transformer.config.cvae != vqvae.config.z_channels:
            raise ValueError(f"VAR (V={transformer.config.vocab_size}, Cvae={transformer.config.cvae}) and VQVAE "
                             f"(V={vqvae.config.vocab_size}, Cvae={vqvae.config.z_channels}) do not fit together")
        self.name = name
        self.transformer = transformer
        self.vqvae = vqvae
        self.resolution = resolution
        self.sources = dict(sources or {})

    @classmethod
    def from_official(cls, var_kwargs, vqvae_kwargs, var_state_dict, vqvae_state_dict, *, name: str = "var-custom",
                      device="cpu", dtype=torch.float32) -> "VARModel":
        """One call from the official constructors' keyword arguments (``VARConfig.from_official``,
        ``VQVAEConfig.from_official``) and their state dicts (or ``.pth`` files), loaded strictly."""
        return build_model(VARConfig.from_official(var_kwargs, vqvae_kwargs), VQVAEConfig.from_official(vqvae_kwargs),
                           var_weights=var_state_dict, vae_weights=vqvae_state_dict, name=name, device=device,
                           dtype=dtype)

    @property
    def config(self):
        return self.transformer.config

    @property
    def schedule(self) -> ScaleSchedule:
        return ScaleSchedule(self.config.patch_nums)

    @property
    def device(self) -> torch.device:
        return self.transformer.head.weight.device

    @property
    def num_layers(self) -> int:
        return self.config.depth

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.head.weight.dtype

    def geometry(self) -> ModelGeometry:
        c = self.config
        return ModelGeometry(name=self.name, family="var", num_layers=c.depth, num_heads=c.num_heads,
                             head_dim=c.head_dim, schedule=self.schedule, cfg=True)

    # -- the loop ---------------------------------------------------------------------------------
    def _precision(self, dtype):
        """Run in the weights' dtype, or under autocast to a lower one (as the official demo's fp16)."""
        compute = self.dtype if dtype is None else parse_dtype(dtype)
        if compute == self.dtype:
            return contextlib.nullcontext(), compute
        if self.dtype != torch.float32:
            raise ValueError(f"generate(dtype={compute}) needs float32 weights to autocast from; this model holds "
                             f"{self.dtype} weights (load it with dtype={compute} instead)")
        return torch.autocast(self.device.type, dtype=compute), compute

    def _run(self, labels: list[int], cfg: float, choose: Callable, cache: KVCache, *, stats=None,
             on_scale: Optional[Callable[[], None]] = None, keep_logits: bool = False, synchronize=None,
             timer: Optional[ScaleTimer] = None):
        t, v = self.transformer, self.vqvae
        patch_nums = self.config.patch_nums
        count = len(patch_nums)
        b = len(labels)
        label_tensor = torch.tensor(labels, dtype=torch.long, device=self.device)
        cond = t.condition(label_tensor)
        level_pos = t.level_positions()
        x = t.first_input(cond, level_pos)
        f_hat = cond.new_zeros(b, self.config.cvae, patch_nums[-1], patch_nums[-1])
        tokens, kept_logits = [], []
        timer = timer if timer is not None else ScaleTimer(count)
        for si, pn in enumerate(patch_nums):
            timer.start(si, synchronize)
            ratio = si / (count - 1)
            logits = t.step(x, cond, cache, si, stats=stats, stats_rows=b)
            guidance = cfg * ratio
            logits = (1 + guidance) * logits[:b] - guidance * logits[b:]
            if keep_logits:
                kept_logits.append(logits.clone())
            indices, codes = choose(si, ratio, logits)
            if codes is None:
                h = v.quantize.lookup(indices, pn)
            else:
                h = codes.transpose(1, 2).reshape(b, self.config.cvae, pn, pn)
            f_hat, next_map = v.quantize.accumulate(si, patch_nums, f_hat, h)
            if next_map is not None:
                x = t.next_input(next_map, si + 1, level_pos)
            tokens.append(indices)
            timer.stop(si, synchronize)
            if on_scale is not None:
                on_scale()
        return tokens, f_hat, kept_logits

    def _decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        return self.vqvae.fhat_to_img(f_hat).add_(1).mul_(0.5)

    # -- public -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, labels, *, policy=None, budget=None, seed: int = 0, cfg: float = 4.0, top_k: Optional[int] = None,
                 top_p: float = 0.95, batch_size: Optional[int] = None, dtype=None, stats=None, progress=None,
                 more_smooth: bool = False, resolution: Optional[int] = None, aspect_ratio: float = 1.0,
                 on_compress=None) -> GenerationOutput:
        """Class-conditional images for ``labels`` (ImageNet indices 0..999), ``policy`` applied to
        every self-attention layer's cache. Defaults are the official demo's (cfg 4, top-k 900,
        top-p 0.95; ``top_k=None`` is 900, or the whole vocabulary for a model with fewer codes, such as
        the trained var-tiny's 512); the FID setting is cfg 1.5, top-p 0.96. ``resolution`` / ``aspect_ratio`` are
        accepted for a uniform harness interface but must be the model's own (square, fixed size).
        Seeds, batches, the policy and the cache report: ``adapters.base.NextScaleModel``. ``on_compress``:
        called with a ``kvpolicy.KeptTokens`` record (the global positions every (row, head) of a layer
        holds) after each layer's compression step at each scale."""
        return self.run_generation(labels, policy=policy, budget=budget, seed=seed, batch_size=batch_size, dtype=dtype,
                                   stats=stats, progress=progress, resolution=resolution, aspect_ratio=aspect_ratio,
                                   sampling={"cfg": cfg, "top_k": top_k, "top_p": top_p, "more_smooth": more_smooth},
                                   on_compress=on_compress)

    # -- the template's model-specific steps --------------------------------------------------------
    def check_conditions(self, labels) -> list[int]:
        return check_labels(labels, self.config.num_classes)

    def describe_conditions(self, labels: list) -> dict:
        return {"labels": labels}

    def setup(self, *, resolution, aspect_ratio, dtype, sampling: dict) -> GenerationSetup:
        if resolution is not None and resolution != self.resolution:
            raise ValueError(f"{self.name} generates {self.resolution}x{self.resolution} images only, got resolution={resolution!r}")
        if aspect_ratio != 1.0:
            raise ValueError(f"{self.name} generates square images only (aspect ratio 1.0), got {aspect_ratio!r}")
        cfg = real_argument("cfg", sampling["cfg"], low=0)
        top_k = min(900, self.config.vocab_size) if sampling["top_k"] is None else sampling["top_k"]
        top_k = int_argument("top_k", top_k, low=0, high=self.config.vocab_size, note=" (0 = off)")
        top_p = real_argument("top_p", sampling["top_p"], low=0, high=1, note=" (0 = off)")
        _, compute = self._precision(dtype)  # a bad dtype fails before any batch
        device = self.device  # the model's GPU, which need not be the current one (cuda:1)
        synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
        return GenerationSetup(
            schedule=self.schedule, compute_dtype=compute, context=lambda: self._precision(dtype)[0],
            sampling={"cfg": cfg, "top_k": top_k, "top_p": top_p,
                      "more_smooth": bool(sampling["more_smooth"])},
            details={"synchronize": synchronize},
            config={"weights_dtype": str(self.dtype).replace("torch.", ""), "resolution": self.resolution,
                    "sampling": "cpu_generator", "weights": self.sources})

    def generate_batch(self, labels, setup, *, cache, generator, stats, on_scale, cfg, top_k, top_p, more_smooth):
        def choose(si, ratio, logits):
            indices = sample_indices(logits, generator, top_k, top_p)
            if not more_smooth:
                return indices, None
            # logits were masked in place by the sampler, as in the official loop
            return indices, gumbel_codes(logits, ratio, generator, self.vqvae.quantize.embedding.weight)

        synchronize = setup.details["synchronize"]
        timer = ScaleTimer(len(self.config.patch_nums))
        tokens, f_hat, _ = self._run(labels, cfg, choose, cache, stats=stats, on_scale=on_scale,
                                     synchronize=synchronize, timer=timer)
        decode_started = time.perf_counter()
        images = _to_uint8(self._decode(f_hat))
        if synchronize is not None:
            synchronize()
        return BatchResult(images=images, tokens=[tok.cpu() for tok in tokens],
                           extra={"decode_seconds": time.perf_counter() - decode_started}, scale_seconds=timer.seconds)

    @torch.no_grad()
    def teacher_forced(self, labels, indices: Sequence[torch.Tensor], *, cfg: float = 4.0, policy=None, budget=None,
                       dtype=None, stats=None, on_compress=None) -> TeacherForcedOutput:
        """Run the loop feeding the given indices (B, pn²) per scale instead of samples; returns the
        mixed logits per scale, f_hat and the decoded images (parity checks, token agreement).
        ``on_compress``: as in ``generate``."""
        labels = check_labels(labels, self.config.num_classes)
        patch_nums = self.config.patch_nums
        if len(indices) != len(patch_nums):
            raise ValueError(f"need indices for all {len(patch_nums)} scales, got {len(indices)}")
        fed = []
        for si, (pn, idx) in enumerate(zip(patch_nums, indices)):
            idx = torch.as_tensor(idx).to(device=self.device, dtype=torch.long).reshape(len(labels), -1)
            if idx.shape[1] != pn * pn:
                raise ValueError(f"scale {si}: expected {pn * pn} indices per image, got {idx.shape[1]}")
            if idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
                raise ValueError(f"scale {si}: indices must lie in 0..{self.config.vocab_size - 1}")
            fed.append(idx)
        autocast, _ = self._precision(dtype)
        if on_compress is not None and not callable(on_compress):
            raise TypeError(f"on_compress must be a callable taking a kvpolicy.KeptTokens record, got {on_compress!r}")
        cache = kept_tokens_cache(self.config.depth, self.schedule, resolve_policy(policy, budget), on_compress)
        with autocast:
            _, f_hat, logits = self._run(labels, float(cfg), lambda si, ratio, _: (fed[si], None), cache,
                                         stats=stats, keep_logits=True)
            images = self._decode(f_hat)
        return TeacherForcedOutput(logits=logits, f_hat=f_hat.float(), images=images.float())


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
    for role, source in (("var", var_source), ("vae", vae_source)):  # a damaged file fails before any loading
        if isinstance(source, Path):  # a resolved local file (not "random", not a state dict)
            check_checkpoint_file(source, FILE_ROLES[role])
    with torch.device("meta"):  # no throw-away initialisation of billions of parameters
        transformer, vqvae = VARTransformer(var_config), VQVAE(vqvae_config)
    materialize(transformer, device, dtype)
    materialize(vqvae, device, dtype)
    sources = {"var": fill_var(transformer, var_source, seed=seed),
               "vae": fill_vqvae(vqvae, vae_source, seed=seed + 1)}
    if resolution is None:
        resolution = var_config.patch_nums[-1] * vqvae_config.upsample_factor
    return VARModel(name, transformer, vqvae, resolution=resolution, sources=sources).eval()


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 on the CPU (round to nearest)."""
    return images.float().mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()
