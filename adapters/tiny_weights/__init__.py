"""Trained weights of the tiny presets (``infinity-tiny``, ``var-tiny``), made by ``kvpolicy train-tiny``.

One folder per preset, safetensors files with the official key layouts; see ``adapters/tiny/train.py``
and the README section "Trained tiny models".
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def packaged_file(preset: str, name: str) -> Path:
    """Path of a shipped weight file; a clear error when the package was built without it."""
    path = ROOT / preset / name
    if not path.is_file():
        raise FileNotFoundError(f"the trained {preset} weights ({path}) are not installed; rebuild them with "
                                f"`kvpolicy train-tiny --install` or use the random preset {preset}-random")
    return path
