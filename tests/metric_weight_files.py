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
