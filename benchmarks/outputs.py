"""Output files every command shares: checking a folder before work starts, lossless PNGs, and the
versions of everything that can change an image or a timing.

Where commands write: fresh, named folders by default, nothing overwritten silently, and every
destination proven writable before any work starts (a run must not die at its last step).
Defaults live under ``kvpolicy-runs/`` in the working directory, one new folder per run named
after the command, the model and the start time (``kvpolicy-runs/generate-infinity-tiny-20261201-
153000/``); a second run in the same second gets ``-2``. ``compare`` resumes, so its default is
stable instead (``kvpolicy-runs/compare-MODEL/``): the same command continues where it stopped, and a
run with other image-changing settings there is refused, never overwritten. An explicit file that
exists is refused unless ``--overwrite`` says so.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
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


RUNS_DIR = Path("kvpolicy-runs")


def _safe_name(kind: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in kind)


def fresh_run_dir(kind: str, *, base: Path = RUNS_DIR, now: Optional[float] = None) -> Path:
    """A folder name under ``base`` that does not exist yet (not created here)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    safe = _safe_name(kind)
    candidate, n = Path(base) / f"{safe}-{stamp}", 2
    while candidate.exists():
        candidate, n = Path(base) / f"{safe}-{stamp}-{n}", n + 1
    return candidate


def resumable_run_dir(kind: str, *, base: Path = RUNS_DIR) -> Path:
    """``base/KIND``, the same name every time, for a command that resumes (not created here)."""
    return Path(base) / _safe_name(kind)


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return path


def probe_writable(folder: Path, option: str) -> None:
    """Create and remove a file in ``folder`` (os.access is no proof: root passes it for /proc)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".kvpolicy-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ValueError(f"{option}: {str(folder)!r} is not writable ({exc.strerror or exc}); "
                         f"choose another {option}") from None


def check_output_dir(path: Path, option: str) -> None:
    """A folder that exists (or can be created) and accepts files; nothing is created here."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {str(path)!r} exists and is not a folder")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise ValueError(f"{option} {str(path)!r}: {str(existing)!r} is a file, not a folder")
    probe_writable(existing, option)


def check_new_file(path: Path, option: str, *, overwrite: bool = False) -> None:
    """A file about to be written: refused if it exists (unless ``overwrite``), its folder writable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise ValueError(f"{option} {str(path)!r} already exists; choose another name or pass --overwrite")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"{option} {str(path)!r}: {str(path.parent)!r} is not a folder")
    check_output_dir(path.parent, option)
