"""Reading checkpoint files and the one strict state-dict check, shared by every adapter loader."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping


class CheckpointError(ValueError):
    """A checkpoint file the user gave that cannot be used (damaged, of another format, or not the
    model's): a bad input, reported by the command line in one line, never a bug's traceback."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read at all: empty, truncated, a text file, not a tensor file."""


TORCH_KIND = "PyTorch checkpoint (.pth / .bin, written by torch.save)"
SAFETENSORS_KIND = "safetensors file"


def _damaged(path: str, what: str, kind: str, detail: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"{what} {path!r} ({os.path.getsize(path):,} bytes) is not a readable {kind}: "
                                  f"{detail}; the file is damaged, truncated or of another format: download or "
                                  "save it again")


def _reason(error: BaseException) -> str:
    """The first line of a reader's message (zip and pickle readers write long ones), with its type."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def check_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> None:
    """Cheap structural checks (headers only, never the tensors) that a loader runs on every file
    before reading any, so a damaged second file fails before minutes spent loading the first.

    Empty files; safetensors files whose header is unreadable or whose tensors end past the file's
    end; ``.pth`` files that are neither a zip archive (torch.save's format since 1.6), a legacy
    pickle nor a legacy tar, or a zip archive whose end (its central directory) is missing.
    ``what`` names the file's role, e.g. "VAR transformer checkpoint (weights= / --weights)".
    Raises ``DamagedCheckpointError``. Damage these checks cannot see is reported by the loaders."""
    import json
    import struct
    import tarfile
    import zipfile

    path = os.fspath(path)
    safetensors = path.endswith(".safetensors")
    kind = SAFETENSORS_KIND if safetensors else TORCH_KIND
    size = os.path.getsize(path)
    if size == 0:
        raise DamagedCheckpointError(f"{what} {path!r} is empty (0 bytes), not a {kind}: download or save it again")
    with open(path, "rb") as file:
        head = file.read(8)
        if safetensors:
            header_length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if header_length is None or header_length > size - 8:
                raise _damaged(path, what, kind, "its header length does not fit in the file")
            try:
                header = json.loads(file.read(header_length))
                ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
                raise _damaged(path, what, kind, f"its JSON header is unreadable ({_reason(error)})") from None
            if 8 + header_length + max(ends, default=0) > size:
                raise _damaged(path, what, kind, f"its tensors end at byte {8 + header_length + max(ends):,}, "
                                                 "past the end of the file")
            return
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            raise _damaged(path, what, kind, "a zip archive without its end (central directory): the file was cut short")
        return
    if head.startswith(b"\x80") or tarfile.is_tarfile(path):  # a legacy pickle (protocol 2+) or tar
        return
    raise _damaged(path, what, kind, f"it starts with {head!r}, neither a zip archive nor a pickle")


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load`` on the CPU with ``weights_only=True``, memory-mapped where the file's format allows
    (a multi-GB checkpoint is then not copied once more); legacy-format files are read normally.

    A damaged file (empty, truncated, text) raises ``DamagedCheckpointError`` naming the file and
    ``what`` it was meant to be; a pickle of objects weights-only loading refuses, ``CheckpointError``."""
    import pickle

    import torch

    path = os.fspath(path)
    check_checkpoint_file(path, what)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # these already name the file and the problem
    except pickle.UnpicklingError as error:  # not damaged: a pickle of objects (a whole model, its args, ...)
        import re

        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise CheckpointError(f"{what} {path!r} holds objects other than tensors and plain containers"
                              f"{' (' + found.group(1) + ')' if found else ''}, which weights-only loading refuses: "
                              "give a file holding a state dict (torch.save(model.state_dict(), path))") from None
    # what torch's readers raise on damage: EOFError (cut pickle), KeyError (a legacy pickle's
    # unknown record), RuntimeError/OSError (the zip reader), ValueError/IndexError/UnicodeDecodeError
    except (EOFError, KeyError, RuntimeError, OSError, ValueError, IndexError) as error:
        raise _damaged(path, what, TORCH_KIND, _reason(error)) from None


def load_safetensors_file(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """``safetensors.torch.load_file`` on the CPU; a damaged file raises ``DamagedCheckpointError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    check_checkpoint_file(path, what)
    try:
        return load_file(path, device="cpu")
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise _damaged(path, what, SAFETENSORS_KIND, _reason(error)) from None


def describe_keys(keys, limit: int = 10) -> str:
    """The first ``limit`` keys, sorted, and how many more there are."""
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" … and {len(keys) - limit} more" if len(keys) > limit else "")


class CheckpointMismatchError(CheckpointError, KeyError):
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
