"""Fidelity metrics against the full-cache image: PSNR, SSIM, LPIPS, FID and token agreement per scale.

Protocol (shared/reference/scalekv.md §6.1; ScaleKV and HeatKV measure the same way): every metric
compares a policy's image with the full-cache model's own image for the same prompt and seed.

- PSNR: per image over (C, H, W) with data range 1, averaged over images; equal to torchmetrics
  ``PeakSignalNoiseRatio(data_range=(0, 1), dim=(1, 2, 3))``.
- SSIM (the paper reports none): Gaussian window 11, sigma 1.5, in one of two conventions
  (``SSIM_CONVENTIONS``): "valid" (Wang et al. 2004, MATLAB, skimage: the mean over the windows that
  fit inside the image; the default) or "torchmetrics" (reflect-pad 5 px, variances clamped at 0, the
  mean over every pixel: ``StructuralSimilarityIndexMeasure(data_range=1.0)``).
- LPIPS: v0.1 with the AlexNet backbone on [0, 1] inputs mapped to [-1, 1]: torchmetrics
  ``LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)``.
- FID between the full-cache set and the policy's set, as clean-fid ``compute_fid(dir_a, dir_b)``
  computes it: by default its "clean" mode (``FID_MODES``).

Why our own code rather than calling the libraries: torchmetrics' image metrics and clean-fid import
torchvision, whose PyPI wheels pull a CUDA build of torch onto CPU machines, so the core install
cannot depend on them. The networks here run in plain torch from the libraries' own weight files and
are proven equal to the libraries by ``.ci/metric_equivalence.py`` (a separate CI step, in an
environment that has them). With ``pip install 'kvpolicy[metrics]'`` the weights come through the
libraries' usual download and cache; offline, pre-fill those caches (the skip message says where).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_CONVENTIONS = {
    "valid": "Wang et al. 2004 / MATLAB / skimage convention: Gaussian window 11, sigma 1.5, data range 1, "
             "the mean over the windows that fit inside the image",
    "torchmetrics": "torchmetrics convention (StructuralSimilarityIndexMeasure(data_range=1.0)): Gaussian window "
                    "11, sigma 1.5, reflect-padded by 5 px, variances clamped at 0, the mean over every pixel",
}
DEFAULT_SSIM_CONVENTION = "valid"


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


def check_ssim_convention(convention: str) -> str:
    if convention not in SSIM_CONVENTIONS:
        raise ValueError(f"SSIM convention {convention!r} is not one of {', '.join(SSIM_CONVENTIONS)}")
    return convention


def ssim(images: torch.Tensor, reference: torch.Tensor, convention: str = DEFAULT_SSIM_CONVENTION) -> list[float]:
    """Mean SSIM per image (Wang et al. 2004): Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data
    range 1, per channel, averaged; ``convention`` (see ``SSIM_CONVENTIONS``) decides the border."""
    check_ssim_convention(convention)
    x, y = _pair(images, reference)
    n, c, h, w = x.shape
    pad = SSIM_WINDOW // 2
    if convention == "valid" and (h < SSIM_WINDOW or w < SSIM_WINDOW):
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}")
    if convention == "torchmetrics":
        if h <= pad or w <= pad:  # reflect padding needs more pixels than the pad
            raise ValueError(f"SSIM (torchmetrics convention) needs images of at least {pad + 1}x{pad + 1} pixels, "
                             f"got {h}x{w}")
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    g = gaussian_window()
    kernel_h = g.view(1, 1, SSIM_WINDOW, 1).repeat(c, 1, 1, 1)
    kernel_w = g.view(1, 1, 1, SSIM_WINDOW).repeat(c, 1, 1, 1)

    def blur(t):  # separable Gaussian, depthwise, valid region (of the padded image, if padded)
        return F.conv2d(F.conv2d(t, kernel_h, groups=c), kernel_w, groups=c)

    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    if convention == "torchmetrics":
        var_x, var_y = var_x.clamp_min(0), var_y.clamp_min(0)
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


# -- weight files: where the libraries keep them ------------------------------------------------------

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet (IMAGENET1K_V1), in torch's hub cache
ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_FILE  # torchvision's own URL for it
LPIPS_LIN_FILE = "alex.pth"  # LPIPS v0.1 linear layers, shipped inside torchmetrics and lpips
INCEPTION_FILE = "inception-2015-12-05.pt"  # the TorchScript Inception of StyleGAN2-ADA, used by clean-fid
METRICS_EXTRA = "pip install 'kvpolicy[metrics]'"


class MetricUnavailable(RuntimeError):
    """A learned metric cannot run here; the message says what to provide."""


def _torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _package_dir(name: str) -> Optional[Path]:
    """Folder of an installed package, found without importing it (torchmetrics' image metrics,
    lpips and clean-fid import torchvision)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def _cleanfid_folder() -> Path:
    """Where clean-fid downloads and looks for the Inception file (its ``feature_extractor``)."""
    return Path("./" if os.name == "nt" else "/tmp")


def _may_download(library: str) -> bool:
    """Weights are downloaded only for users who installed the metrics extra (the library is there)."""
    return _package_dir(library) is not None


def _lpips_lin_candidates() -> list[Path]:
    out = []
    tm = _package_dir("torchmetrics")
    if tm is not None:
        out.append(tm / "functional" / "image" / "lpips_models" / LPIPS_LIN_FILE)
    lp = _package_dir("lpips")
    if lp is not None:
        out.append(lp / "weights" / "v0.1" / LPIPS_LIN_FILE)
    return out


def _find(filename: str, env: str, extra: Sequence[Path] = ()) -> Optional[Path]:
    candidates = []
    value = os.environ.get(env)
    if value:
        p = Path(value)
        candidates.append(p if p.suffix else p / filename)
    candidates.append(_torch_hub_checkpoints() / filename)
    candidates.extend(extra)
    for p in candidates:
        if p.is_file():
            return p
    return None


def file_digest(path: Path, length: int = 12) -> str:
    """First hex digits of the file's SHA-256: tells real weight files from stand-ins in reports."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def lpips_help() -> str:
    hub = _torch_hub_checkpoints()
    return (f"{METRICS_EXTRA} downloads it on first use; offline, copy {ALEXNET_FILE} (torchvision's AlexNet) "
            f"into {hub} and {LPIPS_LIN_FILE} (LPIPS v0.1 linear layers, shipped in torchmetrics and lpips) there "
            f"too, or both into a folder named by KVPOLICY_LPIPS_DIR")


def fid_help() -> str:
    return (f"{METRICS_EXTRA} downloads it on first use into clean-fid's cache {_cleanfid_folder() / INCEPTION_FILE}; "
            f"offline, copy the file there or into {_torch_hub_checkpoints()}, or set KVPOLICY_FID_INCEPTION=PATH")


def locate_lpips_files() -> tuple[Path, Path]:
    """(AlexNet weights, LPIPS linear layers): local files first, else the libraries' download."""
    alex = _find(ALEXNET_FILE, "KVPOLICY_LPIPS_DIR")
    if alex is None and _may_download("torchmetrics"):
        try:  # torchvision's weights download: the same URL, the same cache file
            torch.hub.load_state_dict_from_url(ALEXNET_URL, progress=True, check_hash=True)
        except Exception as exc:  # offline, proxy, disk: say so in the skip message
            raise MetricUnavailable(f"LPIPS skipped: downloading {ALEXNET_FILE} failed ({exc}); " + lpips_help()) from None
        alex = _find(ALEXNET_FILE, "KVPOLICY_LPIPS_DIR")
    lin = _find(LPIPS_LIN_FILE, "KVPOLICY_LPIPS_DIR", _lpips_lin_candidates())
    missing = [f for f, p in ((ALEXNET_FILE, alex), (LPIPS_LIN_FILE, lin)) if p is None]
    if missing:
        raise MetricUnavailable(f"LPIPS skipped: {' and '.join(missing)} not found; " + lpips_help())
    return alex, lin


def locate_inception_file() -> Path:
    """clean-fid's TorchScript Inception: local file first, else clean-fid's own download."""
    folder = _cleanfid_folder()
    path = _find(INCEPTION_FILE, "KVPOLICY_FID_INCEPTION", [folder / INCEPTION_FILE])
    if path is None and _may_download("cleanfid"):
        try:
            from cleanfid.downloads_helper import check_download_inception

            check_download_inception(fpath=str(folder))
        except Exception as exc:
            raise MetricUnavailable(f"FID skipped: downloading {INCEPTION_FILE} failed ({exc}); " + fid_help()) from None
        path = _find(INCEPTION_FILE, "KVPOLICY_FID_INCEPTION", [folder / INCEPTION_FILE])
    if path is None:
        raise MetricUnavailable(f"FID skipped: {INCEPTION_FILE} not found; " + fid_help())
    return path


# -- LPIPS ----------------------------------------------------------------------------------------

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
        self.sources: dict[str, str] = {}
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
        alex, lin = locate_lpips_files()
        net = cls(torch.load(alex, map_location="cpu", weights_only=True),
                  torch.load(lin, map_location="cpu", weights_only=True))
        net.sources = {"alexnet": f"{alex} (sha256 {file_digest(alex)})", "linear layers": f"{lin} (sha256 {file_digest(lin)})"}
        return net

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


# -- FID ------------------------------------------------------------------------------------------

FID_SIZE = 299
FID_MODES = {
    "clean": "clean-fid's default \"clean\" mode (the paper's): each channel resized to 299x299 by PIL bicubic "
             "in float mode, clipped to [0, 255], (x - 128) / 128, then the Inception's layers",
    "legacy_tensorflow": "clean-fid's \"legacy_tensorflow\" mode (StyleGAN's FID): uint8 values into the "
                         "TorchScript Inception, which resizes bilinearly without antialiasing",
}
DEFAULT_FID_MODE = "clean"
FID_PAPER_IMAGES = 5000  # images per set in ScaleKV's Table 1 (COCO-2017 val)
FID_FULL_RANK_IMAGES = 2049  # more images than feature dimensions: the covariances can be full rank


def check_fid_mode(mode: str) -> str:
    if mode not in FID_MODES:
        raise ValueError(f"FID mode {mode!r} is not one of {', '.join(FID_MODES)}")
    return mode


def clean_resize(images: torch.Tensor, size: int = FID_SIZE) -> torch.Tensor:
    """clean-fid's "clean" preprocessing: (N, H, W, 3) uint8 -> (N, 3, size, size) float32 in [0, 255].

    Every channel goes through PIL as a 32-bit float image ('F' mode) and is resized with PIL's
    bicubic filter (antialiased when shrinking), then clipped to [0, 255]; no rounding to uint8."""
    from PIL import Image

    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError("clean_resize takes (N, H, W, 3) uint8 images")
    out = np.empty((images.shape[0], 3, size, size), dtype=np.float32)
    for i, image in enumerate(images.cpu().numpy()):
        for c in range(3):
            plane = Image.fromarray(image[:, :, c].astype(np.float32))
            if plane.mode != "F":
                raise RuntimeError(f"PIL made a {plane.mode!r} image from float32 data, expected 'F'")
            resized = plane.resize((size, size), resample=Image.Resampling.BICUBIC)
            out[i, c] = np.asarray(resized, dtype=np.float32).clip(0, 255)
    return torch.from_numpy(out)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) in float64, covariances with N - 1.

    tr((S_a S_b)^(1/2)) is the sum of square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), a
    symmetric PSD matrix with the same eigenvalues as S_a S_b. clean-fid takes scipy's general
    ``sqrtm(S_a S_b)`` instead. .ci/metric_equivalence.py measured the two 6.7e-11 apart (relative)
    with full-rank covariances (2,304 images per set, 2,048 features; the paper used 5,000 images)
    and 3e-7 apart with 10 images per set, where the covariances are singular and sqrtm is less
    accurate; its CI bounds are 1e-9 and 1e-4."""
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
    """Pool features (N, 2048) of clean-fid's TorchScript Inception in one of ``FID_MODES``."""

    def __init__(self, module, mode: str = DEFAULT_FID_MODE, source: str = ""):
        self.module = module
        self.mode = check_fid_mode(mode)
        self.source = source
        if mode == "clean" and not hasattr(module, "layers"):
            raise ValueError("the Inception module has no 'layers' submodule, which clean mode calls "
                             f"(clean-fid's {INCEPTION_FILE} has one)")

    @classmethod
    def from_local_files(cls, mode: str = DEFAULT_FID_MODE) -> "InceptionFeatures":
        check_fid_mode(mode)
        path = locate_inception_file()
        return cls(torch.jit.load(str(path), map_location="cpu").eval(), mode,
                   source=f"{path} (sha256 {file_digest(path)})")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dtype != torch.uint8:
            raise TypeError(f"FID features take uint8 images (the saved PNGs), got {images.dtype}")
        n = images.shape[0]
        if self.mode == "clean":
            x = clean_resize(images)
            return self.module.layers((x - 128) / 128).reshape(n, -1)
        x = images.permute(0, 3, 1, 2).to(torch.float32).contiguous()  # uint8 values, NCHW
        return self.module(x, return_features=True).reshape(n, -1)


class LearnedMetrics:
    """Lazily built LPIPS and FID backends; when one cannot run, its value is None and the reason is
    kept (and printed once by the harness)."""

    def __init__(self, enabled: bool = True, fid_mode: str = DEFAULT_FID_MODE):
        self.enabled = enabled
        self.fid_mode = check_fid_mode(fid_mode)
        self._lpips = self._fid = None
        self.reasons: dict[str, str] = {}
        if not enabled:
            self.reasons = {"lpips": "LPIPS and FID disabled (--no-learned-metrics)"}
            self.reasons["fid"] = self.reasons["lpips"]

    def _backend(self, name: str):
        if name in self.reasons:
            return None
        attr = "_" + name
        if getattr(self, attr) is None:
            try:
                setattr(self, attr, LPIPS.from_local_files() if name == "lpips"
                        else InceptionFeatures.from_local_files(self.fid_mode))
            except MetricUnavailable as exc:
                self.reasons[name] = str(exc)
                return None
        return getattr(self, attr)

    def sources(self) -> dict[str, str]:
        """The weight files of the backends built so far."""
        out = {}
        if self._lpips is not None:
            out.update({f"LPIPS {k}": v for k, v in self._lpips.sources.items()})
        if self._fid is not None:
            out["FID Inception"] = self._fid.source
        return out

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


# -- what the reports say about the metrics (benchmarks.builtin_metrics) ------------------------------

EQUIVALENCE_CHECK = ".ci/metric_equivalence.py"
