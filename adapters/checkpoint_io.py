"""Reading pickled checkpoint files and describing key mismatches, shared by every adapter loader."""

from __future__ import annotations

import os
from typing import Any


def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True``, memory-mapped where the file's format allows
    (a multi-GB checkpoint is then not copied once more); legacy-format files are read normally."""
    import torch

    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)


def describe_keys(keys, limit: int = 10) -> str:
    """The first ``limit`` keys, sorted, and how many more there are."""
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" … and {len(keys) - limit} more" if len(keys) > limit else "")
