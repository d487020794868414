"""Reading checkpoint files and the one strict state-dict check, shared by every adapter loader."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping


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


class CheckpointMismatchError(ValueError, KeyError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped keys. A ValueError (a
    bad input); also a KeyError, which the VAE loader raised before the three checks became one."""

    def __str__(self) -> str:  # KeyError would print the message's repr
        return str(self.args[0]) if self.args else ""


def check_state_dict(own: Mapping[str, "torch.Tensor"], state: Mapping[str, "torch.Tensor"], *, what: str,
                     target: str, ignored: Iterable[str] = (), optional: Callable[[str], bool] = lambda key: False,
                     strict: bool = True) -> None:
    """The one strict check every loader makes before copying weights.

    own: the model's state dict (names and shapes); state: the file's, already mapped to the model's
    names. ``ignored``: file keys dropped on purpose (training-time buffers); ``optional(key)``: model
    keys a file may lack (they keep their initial values). Missing, mis-shaped and unexpected keys are
    one ``CheckpointMismatchError`` that names them all (``what`` does not fit ``target``: …). With
    ``strict=False`` missing and unexpected keys are a warning instead; a wrong shape is always an
    error (the copy could not even be made).
    """
    ignored = set(ignored)
    missing = [k for k in own if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in own and k not in ignored]
    wrong = [f"{k} {tuple(state[k].shape)} (model: {tuple(own[k].shape)})"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [f"{kind}: {describe_keys(keys)}" for kind, keys in
                (("missing keys", missing), ("wrong shapes", wrong), ("unexpected keys", unexpected)) if keys]
    if not problems:
        return
    message = f"{what} does not fit {target}: " + "; ".join(problems)
    if strict or wrong:
        raise CheckpointMismatchError(message)
    import warnings

    warnings.warn(message + " (strict=False: continuing; missing weights keep their initial values)", stacklevel=3)


def copy_state_dict(own: Mapping[str, "torch.Tensor"], state: Mapping[str, "torch.Tensor"]) -> None:
    """Copy every key ``state`` has into the model's tensors (their device and dtype)."""
    import torch

    with torch.no_grad():
        for key, target in own.items():
            if key in state:
                target.copy_(state[key].to(device=target.device, dtype=target.dtype))
