"""Random stand-ins for the LPIPS weight files (torchvision AlexNet + LPIPS v0.1 linear layers), with
the official key names and shapes, for tests of the local-weights path."""

from __future__ import annotations

from pathlib import Path

import torch

ALEXNET_CONV_SHAPES = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3),
                       10: (256, 256, 3, 3)}
LPIPS_CHANNELS = (64, 192, 384, 256, 256)


def write_random_lpips_files(folder: Path, seed: int = 0) -> tuple[dict, dict]:
    """Write both files into ``folder``; returns their state dicts (AlexNet, LPIPS linear layers)."""
    from benchmarks import metrics

    g = torch.Generator().manual_seed(seed)
    alex = {}
    for idx, shape in ALEXNET_CONV_SHAPES.items():
        alex[f"features.{idx}.weight"] = torch.randn(*shape, generator=g) * 0.05
        alex[f"features.{idx}.bias"] = torch.zeros(shape[0])
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(LPIPS_CHANNELS)}
    torch.save(alex, Path(folder) / metrics.ALEXNET_FILE)
    torch.save(lin, Path(folder) / metrics.LPIPS_LIN_FILE)
    return alex, lin


class InceptionStandIn(torch.nn.Module):
    """The interface of clean-fid's TorchScript ``inception-2015-12-05.pt`` around any ``layers``:
    ``layers`` maps (x - 128) / 128 at 299x299 to pool features; ``forward(img, return_features=True)``
    takes [0, 255] images of any size and first resizes them bilinearly without antialiasing, as the
    real file does (clean-fid's legacy_tensorflow mode calls it that way). Only features are returned:
    nothing here asks for the classifier."""

    def __init__(self, layers: torch.nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, img: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = img.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (x - 128) / 128
        return self.layers(x).reshape(x.shape[0], -1)


def small_inception_layers(seed: int = 0, features: int = 64) -> torch.nn.Module:
    """A small random conv trunk ending in ``features`` pooled channels (fast stand-in for tests)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 5, stride=3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2),
                               torch.nn.ReLU(), torch.nn.Conv2d(32, features, 3, stride=2), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1))


def write_inception_file(path: Path, layers: torch.nn.Module | None = None) -> Path:
    """Save a TorchScript stand-in of clean-fid's Inception file (random ``layers`` by default)."""
    module = InceptionStandIn(layers if layers is not None else small_inception_layers()).eval()
    torch.jit.script(module).save(str(path))
    return Path(path)
