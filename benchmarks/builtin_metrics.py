"""The built-in fidelity metrics of ``kvpolicy compare``, registered like any other metric (see
``benchmarks.metric_registry``), in the order of the summary's columns: FID, LPIPS, PSNR, SSIM,
token agreement. The implementations live in ``benchmarks.metrics``."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import metrics as m
from .metric_registry import PER_IMAGE, PER_SET, ImageBatch, Metric, MetricContext, SetPair, register_metric


def _installed_version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# -- FID ------------------------------------------------------------------------------------------

FID_FEATURE_BATCH = 32  # images per Inception call (a COCO-sized run never holds every image at once)


def _features(context: MetricContext, load, keys, cache: Optional[dict] = None) -> Optional[torch.Tensor]:
    found = {} if cache is None else cache
    todo = [k for k in keys if k not in found]
    for i in range(0, len(todo), FID_FEATURE_BATCH):
        chunk = todo[i:i + FID_FEATURE_BATCH]
        features = context.learned.features(load(chunk))
        if features is None:
            return None
        found.update(zip(chunk, features))
    return torch.stack([found[k] for k in keys])


def compute_fid(pair: SetPair, context: MetricContext) -> Optional[float]:
    """FID between the full-cache images and the configuration's images of the same keys."""
    if not context.learned.enabled:
        return None
    if len(pair.keys) < 2:
        if pair.keys:
            context.note("fid_small", "FID needs at least 2 images per set")
        return None
    context.set_sizes.append(len(pair.keys))
    reference = _features(context, pair.load_reference, pair.keys, pair.cache.setdefault("reference", {}))
    if reference is None:
        return None
    return context.learned.fid_from_features(_features(context, pair.load, pair.keys), reference)


def describe_fid(context: MetricContext) -> str:
    learned = context.learned
    if learned._fid is None:
        reason = learned.reasons.get("fid") or learned.reasons.get("fid_small") or "no set compared"
        return f"FID: not measured ({reason})."
    call = "compute_fid(full_dir, policy_dir" + (")" if context.fid_mode == "clean" else f", mode={context.fid_mode!r})")
    text = (f"FID ({context.fid_mode!r}): {m.FID_MODES[context.fid_mode]}; the full-cache set against each "
            f"configuration's set on the same conditions and seeds = clean-fid {call}; Fréchet distance in float64 "
            "from eigenvalues (clean-fid's scipy sqrtm agrees to 7e-11 relative with full-rank covariances, "
            f"more images than 2,048, and to 3e-7 at 10 images); Inception {learned.sources()['FID Inception']}.")
    smallest = min(context.set_sizes) if context.set_sizes else None
    if smallest is not None and smallest < m.FID_PAPER_IMAGES:
        text += (f" WARNING: FID here compares sets of {smallest} image(s); the paper's Table 1 used "
                 f"{m.FID_PAPER_IMAGES:,} (COCO-2017 val). FID is biased by the set size (below "
                 f"{m.FID_FULL_RANK_IMAGES - 1:,} images the covariances are singular): compare it only between runs "
                 f"with equal set sizes, and use {m.FID_PAPER_IMAGES:,} for numbers comparable with the paper.")
    return text


# -- per-image metrics ------------------------------------------------------------------------------

def describe_lpips(context: MetricContext) -> str:
    learned = context.learned
    if learned._lpips is None:
        return f"LPIPS: not measured ({learned.reasons.get('lpips', 'no image compared')})."
    files = "; ".join(f"{k.split(' ', 1)[1]}: {v}" for k, v in learned.sources().items() if k.startswith("LPIPS"))
    return ("LPIPS: v0.1, AlexNet, [0, 1] inputs = torchmetrics LearnedPerceptualImagePatchSimilarity("
            f"net_type='alex', normalize=True); weights {files}.")


def describe_ssim(context: MetricContext) -> str:
    return f"SSIM ({context.ssim_convention!r}): {m.SSIM_CONVENTIONS[context.ssim_convention]}."


def token_agreement_mean(batch: ImageBatch, context: MetricContext) -> list[Optional[float]]:
    if batch.tokens is None or batch.reference_tokens is None:
        return [None] * len(batch.images)
    per_image = m.token_agreement(batch.tokens, batch.reference_tokens)
    return [sum(scales) / len(scales) for scales in per_image]


register_metric(Metric(name="fid", per=PER_SET, compute=compute_fid, column="FID↓", fmt=".2f", describe=describe_fid,
                       definition="Fréchet Inception Distance between the full-cache images and this configuration's "
                                  "images of the same conditions and seeds (one value per set; lower is closer; needs "
                                  "at least 2 images and the Inception weights)"))
register_metric(Metric(name="lpips", per=PER_IMAGE, column="LPIPS↓", fmt=".3f", describe=describe_lpips,
                       definition="learned perceptual distance (LPIPS, AlexNet) to the full-cache image of the same "
                                  "condition and seed, mean over images; 0 = identical",
                       compute=lambda batch, context: context.learned.lpips(batch.images, batch.references)))
register_metric(Metric(name="psnr", per=PER_IMAGE, column="PSNR↑", fmt=".2f", identical_value=float("inf"),
                       definition="peak signal-to-noise ratio in dB against the full-cache image of the same "
                                  "condition and seed (RGB in [0, 1]), mean over images; inf when every image is "
                                  "identical to its reference",
                       compute=lambda batch, context: m.psnr(batch.images, batch.references),
                       describe="PSNR: per image over (C, H, W), data range 1, averaged over images = torchmetrics "
                                "PeakSignalNoiseRatio(data_range=(0, 1), dim=(1, 2, 3)); identical images count as "
                                "+inf."))
register_metric(Metric(name="ssim", per=PER_IMAGE, column="SSIM↑", fmt=".4f", describe=describe_ssim,
                       definition="structural similarity to the full-cache image of the same condition and seed "
                                  "(1 = identical), mean over images; the convention is named under Metrics",
                       compute=lambda batch, context: m.ssim(batch.images, batch.references,
                                                             convention=context.ssim_convention)))
register_metric(Metric(name="token_agreement", per=PER_IMAGE, column="token agr.↑", fmt=".4f", plot=False,
                       definition="token agreement: the fraction of sampled tokens (bits or codebook indices, as the "
                                  "model samples them) equal to the full-cache run's at the same position, per scale, "
                                  "averaged over scales (each scale weighs the same), then over images; 1 = the same "
                                  "tokens",
                       row_field="token_agreement_mean", compute=token_agreement_mean,
                       describe="Token agreement: the fraction of equal tokens (bits or codebook indices, as the "
                                "model samples them) per scale, averaged over scales, then over images."))


def describe_implementations(context: MetricContext) -> str:
    """The line above the per-metric lines: whose code, which versions."""
    import PIL

    libraries = ", ".join(f"{name} {_installed_version(name) or 'not installed'}" for name in ("torchmetrics", "clean-fid"))
    return (f"Implementations: kvpolicy's own, in plain torch {torch.__version__} (numpy {np.__version__}, Pillow "
            f"{PIL.__version__}); the built-ins are checked equal to the paper's libraries by "
            f"{m.EQUIVALENCE_CHECK}, which are not called here ({libraries}).")
