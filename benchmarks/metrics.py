"""Fidelity metrics against the full-cache image: PSNR, SSIM (here, in torch), LPIPS and FID
(optional, with locally provided backbone weights), and token agreement per scale.

Protocol (shared/reference/scalekv.md §6.1): every metric compares a policy's image with the
full-cache model's own image for the same prompt and seed; PSNR per image over (C, H, W) with data
range 1, averaged over images; LPIPS with the AlexNet backbone on [0, 1] inputs mapped to [-1, 1];
FID between the full-cache set and the policy's set.

Deviations, stated: the paper used torchmetrics (LPIPS) and clean-fid (FID). Both (and the `lpips`
package) depend on torchvision, whose PyPI wheels pull a CUDA build of torch onto CPU machines, so
this module runs the same networks in plain torch from the official weight files the user puts on
disk (see ``LPIPS_HELP``/``FID_HELP``). FID features come from the TorchScript Inception of
StyleGAN2-ADA / clean-fid (``inception-2015-12-05.pt``) with its built-in resize, so values follow
the StyleGAN-style FID rather than clean-fid's PIL-bicubic "clean" mode.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 (or one (H, W, 3) image) -> (N, 3, H, W) float64 in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(images)
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, C) or (H, W, C) with C in (1, 3), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.to(torch.float64) / 255.0
    elif images.is_floating_point():
        x = images.to(torch.float64)
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError("float images must lie in [0, 1]")
    else:
        raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    return x.permute(0, 3, 1, 2).contiguous()


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = to_unit_float(a), to_unit_float(b)
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def psnr(images: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """PSNR in dB per image (data range 1, MSE over C, H, W); ``inf`` for identical images."""
    x, y = _pair(images, reference)
    mse = ((x - y) ** 2).flatten(1).mean(dim=1)
    return [math.inf if m == 0 else 10.0 * math.log10(1.0 / float(m)) for m in mse]


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (float64)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(images: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Mean SSIM per image (Wang et al. 2004): Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03,
    data range 1, computed per channel over the valid region (no padding) and averaged."""
    x, y = _pair(images, reference)
    n, c, h, w = x.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}")
    g = gaussian_window()
    kernel_h = g.view(1, 1, SSIM_WINDOW, 1).repeat(c, 1, 1, 1)
    kernel_w = g.view(1, 1, 1, SSIM_WINDOW).repeat(c, 1, 1, 1)

    def blur(t):  # separable Gaussian, depthwise, valid region
        return F.conv2d(F.conv2d(t, kernel_h, groups=c), kernel_w, groups=c)

    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return [float(v) for v in smap.flatten(1).mean(dim=1)]


def token_agreement(tokens: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> list[list[float]]:
    """Per image, per scale: the fraction of equal entries (Infinity: bits; VAR: codebook indices)."""
    if len(tokens) != len(reference):
        raise ValueError(f"{len(tokens)} scales of tokens vs {len(reference)} in the reference")
    per_scale = []
    for s, (a, b) in enumerate(zip(tokens, reference)):
        if a.shape != b.shape:
            raise ValueError(f"scale {s}: token shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
        per_scale.append((a.cpu() == b.cpu()).flatten(1).to(torch.float64).mean(dim=1))
    return [[float(per_scale[s][i]) for s in range(len(per_scale))] for i in range(per_scale[0].shape[0])] if per_scale else []


# -- optional learned metrics ---------------------------------------------------------------------

def _torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_LIN_FILE = "alex.pth"
INCEPTION_FILE = "inception-2015-12-05.pt"

LPIPS_HELP = (
    "LPIPS needs two local files: the torchvision AlexNet weights '" + ALEXNET_FILE + "' and the LPIPS "
    "v0.1 linear layers '" + LPIPS_LIN_FILE + "' (inside the 'lpips' package, lpips/weights/v0.1/; "
    "`pip install --no-deps lpips` provides it without torchvision and it is then found there). Put the "
    "files in a folder and set KVPOLICY_LPIPS_DIR to it, or put them in torch's hub checkpoint folder ({hub}).")
FID_HELP = (
    "FID needs the TorchScript Inception '" + INCEPTION_FILE + "' (the file clean-fid and "
    "StyleGAN2-ADA use). Set KVPOLICY_FID_INCEPTION to its path, or put it in torch's hub checkpoint "
    "folder ({hub}).")


class MetricUnavailable(RuntimeError):
    """A learned metric cannot run here; the message says what to provide."""


def _lpips_package_dir() -> Path:
    """Folder of an installed 'lpips' package, located without importing it (it needs torchvision)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        spec = None
    return Path(spec.origin).parent if spec is not None and spec.origin else Path("/nonexistent-lpips")


def _find(filename: str, env: str) -> Optional[Path]:
    candidates = []
    value = os.environ.get(env)
    if value:
        p = Path(value)
        candidates.append(p if p.suffix else p / filename)
    candidates.append(_torch_hub_checkpoints() / filename)
    if filename == LPIPS_LIN_FILE:
        candidates.append(_lpips_package_dir() / "weights" / "v0.1" / filename)
    for p in candidates:
        if p.is_file():
            return p
    return None


class _AlexFeatures(torch.nn.Module):
    """torchvision's AlexNet ``features`` trunk; LPIPS taps the five ReLU outputs."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d
        self.convs = torch.nn.ModuleList([conv(3, 64, 11, 4, 2), conv(64, 192, 5, 1, 2), conv(192, 384, 3, 1, 1),
                                          conv(384, 256, 3, 1, 1), conv(256, 256, 3, 1, 1)])

    def forward(self, x):
        taps = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):  # max-pool before conv2 and conv3, as in AlexNet
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(conv(x))
            taps.append(x)
        return taps


class LPIPS(torch.nn.Module):
    """LPIPS v0.1 with the AlexNet backbone (Zhang et al. 2018): unit-normalise each tapped feature
    along channels, square the difference, weight channels with the learned 1x1 layers, average over
    space, sum over taps. Inputs are [0, 1] images (torchmetrics ``normalize=True``)."""

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)
    TORCHVISION_CONV_INDICES = (0, 3, 6, 8, 10)

    def __init__(self, alexnet_state: dict | None = None, lin_state: dict | None = None):
        super().__init__()
        self.trunk = _AlexFeatures()
        self.lins = torch.nn.ModuleList([torch.nn.Conv2d(c, 1, 1, bias=False) for c in (64, 192, 384, 256, 256)])
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1))
        if alexnet_state is not None:
            for conv, idx in zip(self.trunk.convs, self.TORCHVISION_CONV_INDICES):
                conv.weight.data.copy_(alexnet_state[f"features.{idx}.weight"])
                conv.bias.data.copy_(alexnet_state[f"features.{idx}.bias"])
        if lin_state is not None:
            for i, lin in enumerate(self.lins):
                lin.weight.data.copy_(lin_state[f"lin{i}.model.1.weight"])
        self.eval()

    @classmethod
    def from_local_files(cls) -> "LPIPS":
        alex = _find(ALEXNET_FILE, "KVPOLICY_LPIPS_DIR")
        lin = _find(LPIPS_LIN_FILE, "KVPOLICY_LPIPS_DIR")
        if alex is None or lin is None:
            missing = [f for f, p in ((ALEXNET_FILE, alex), (LPIPS_LIN_FILE, lin)) if p is None]
            raise MetricUnavailable(f"LPIPS skipped: missing {', '.join(missing)}. "
                                    + LPIPS_HELP.format(hub=_torch_hub_checkpoints()))
        return cls(torch.load(alex, map_location="cpu", weights_only=True),
                   torch.load(lin, map_location="cpu", weights_only=True))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        x, y = _pair(images, reference)
        x, y = (x.float() * 2 - 1 - self.shift) / self.scale, (y.float() * 2 - 1 - self.shift) / self.scale
        total = torch.zeros(x.shape[0])
        for fx, fy, lin in zip(self.trunk(x), self.trunk(y), self.lins):
            nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += lin((nx - ny) ** 2).mean(dim=(1, 2, 3))
        return total


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) in float64.

    tr((S_a S_b)^(1/2)) is the sum of square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2),
    a symmetric PSD matrix, so no general matrix square root is needed."""
    a, b = feats_a.to(torch.float64), feats_b.to(torch.float64)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("FID needs at least 2 images per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * trace_sqrt)


class InceptionFeatures:
    """2048-d pool features of the FID Inception (TorchScript file, uint8-range NCHW input)."""

    def __init__(self, module):
        self.module = module

    @classmethod
    def from_local_files(cls) -> "InceptionFeatures":
        path = _find(INCEPTION_FILE, "KVPOLICY_FID_INCEPTION")
        if path is None:
            raise MetricUnavailable(f"FID skipped: {INCEPTION_FILE} not found. "
                                    + FID_HELP.format(hub=_torch_hub_checkpoints()))
        return cls(torch.jit.load(str(path), map_location="cpu").eval())

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit_float(images).float() * 255.0
        return self.module(x, return_features=True).reshape(x.shape[0], -1)


class LearnedMetrics:
    """Lazily built LPIPS and FID backends; when one cannot run, its value is None and the reason is
    kept (and printed once by the harness)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._lpips = self._fid = None
        self.reasons: dict[str, str] = {}
        if not enabled:
            self.reasons = {"lpips": "disabled (--no-learned-metrics)", "fid": "disabled (--no-learned-metrics)"}

    def _backend(self, name: str):
        if name in self.reasons:
            return None
        attr = "_" + name
        if getattr(self, attr) is None:
            try:
                setattr(self, attr, LPIPS.from_local_files() if name == "lpips" else InceptionFeatures.from_local_files())
            except MetricUnavailable as exc:
                self.reasons[name] = str(exc)
                return None
        return getattr(self, attr)

    def lpips(self, images, reference) -> list[Optional[float]]:
        model = self._backend("lpips")
        n = to_unit_float(images).shape[0]
        return [None] * n if model is None else [float(v) for v in model(images, reference)]

    def features(self, images) -> Optional[torch.Tensor]:
        """FID Inception features (N, 2048) of uint8 images, or None when FID cannot run."""
        extractor = self._backend("fid")
        return None if extractor is None else extractor(images)

    def fid_from_features(self, features: torch.Tensor, reference: torch.Tensor) -> Optional[float]:
        if features.shape[0] < 2:
            self.reasons.setdefault("fid_small", "FID needs at least 2 images per set")
            return None
        return frechet_distance(reference, features)

    def fid(self, images, reference) -> Optional[float]:
        extractor = self._backend("fid")
        if extractor is None:
            return None
        if len(images) < 2:
            self.reasons.setdefault("fid_small", "FID needs at least 2 images per set")
            return None
        return frechet_distance(extractor(reference), extractor(images))
