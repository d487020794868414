"""Output files every command shares: checking a folder before work starts, lossless PNGs, and the
versions of everything that can change an image or a timing."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import kvpolicy


def prepare_output(out: Path) -> None:
    """Create the folder and prove it is writable before any work starts."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"output folder {str(out)!r} is not writable ({exc.strerror or exc}); choose another --out") from None


def save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image.cpu().numpy()).save(path)


def load_png(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB")))


def library_versions() -> dict:
    """Versions of everything that can change an image or a timing (None: not installed / no GPU)."""
    from importlib import metadata

    import PIL

    def installed(name: str) -> Optional[str]:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"kvpolicy": kvpolicy.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__, "transformers": installed("transformers"),
            "huggingface_hub": installed("huggingface_hub"), "safetensors": installed("safetensors"),
            "python": platform.python_version(), "platform": platform.platform(), "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
