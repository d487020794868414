"""Command-line arguments that choose where a model runs and which files it loads.

``--device`` is checked before anything is loaded (torch's own failure for an unavailable device is
a traceback deep inside the first tensor move). ``--weights``, ``--vae-weights`` and
``--text-encoder`` are forwarded to ``adapters.load_model`` unchanged, so the command line reaches
every source the Python API accepts: a local file or folder, ``random``, or (not given) the
official files from the Hugging Face hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

WEIGHT_OPTIONS = {"weights": "--weights", "vae_weights": "--vae-weights", "text_encoder": "--text-encoder"}


def add_weights_args(parser) -> None:
    group = parser.add_argument_group("model files (default: the official files from the Hugging Face hub; "
                                      "*-tiny: the trained weights shipped in the package; *-tiny-random: random weights)")
    group.add_argument("--weights", default=None, metavar="PATH|random",
                       help="transformer checkpoint: Infinity-2B's .pth file, Infinity-8B's shard folder (index JSON "
                            "+ shards) or VAR's var_dNN.pth (a folder holding it works too); 'random' for seeded "
                            "random weights of the same shapes")
    group.add_argument("--vae-weights", default=None, metavar="PATH|random",
                       help="VAE checkpoint: infinity_vae_d32reg.pth / infinity_vae_d56_f8_14_patchify.pth, or VAR's "
                            "vae_ch160v4096z32.pth; 'random' for random weights")
    group.add_argument("--text-encoder", default=None, metavar="DIR|HUB_NAME|random",
                       help="Infinity only: the flan-t5-xl folder (transformers format) or hub name; 'random' for a "
                            "small random T5 with a byte tokenizer")


def weights_kwargs(args, model: str) -> dict:
    """The ``load_model`` keyword arguments given on the command line, checked before loading."""
    chosen = {key: getattr(args, key, None) for key in WEIGHT_OPTIONS}
    chosen = {key: value for key, value in chosen.items() if value is not None}
    from adapters.families import family_of

    family = family_of(model)
    for key in chosen:
        if key not in family.weight_options:
            takes = ", ".join(WEIGHT_OPTIONS.get(k, k) for k in family.weight_options) or "no weight files"
            raise ValueError(f"{WEIGHT_OPTIONS[key]} does not apply to {model} ({family.name} models take {takes})")
    for key in ("weights", "vae_weights"):
        value = chosen.get(key)
        if value is not None and value != "random" and not Path(value).expanduser().exists():
            raise ValueError(f"{WEIGHT_OPTIONS[key]} {value!r} does not exist (give a local file or folder, or 'random')")
    return chosen


def check_device(text: str) -> str:
    """``text`` if torch can run there; otherwise a one-line error that says what is available."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a device name torch knows: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return text
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device {text}: CUDA is not available on this machine (torch {torch.__version__}, "
                             f"{build}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
        return text
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {text}: MPS is not available on this machine; use --device cpu")
        return text
    raise ValueError(f"--device {text!r}: only cpu, cuda, cuda:N and mps are supported")


def default_dtype(device: str, dtype: Optional[str]) -> str:
    """fp32 on CPU (bf16 matmuls are slow there), bf16 on accelerators, unless --dtype says otherwise."""
    return dtype or ("fp32" if torch.device(device).type == "cpu" else "bf16")


def cpu_threads(threads: Optional[int], device: str) -> Optional[int]:
    """--threads checked; on CPU it defaults to 1: with more, a 2-core machine that is also running
    something else slows the tiny models 10-20x (threads spin waiting for a busy core)."""
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if threads is None and torch.device(device).type == "cpu":
        return 1
    return threads


def set_threads(threads: Optional[int]) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def key_dtype_kwargs(key_dtype: Optional[str], geometry, compute_dtype: str) -> dict:
    """``load_model``'s key-cache dtype for ``--key-dtype``, checked before loading.

    Not given: nothing (the family's default, the official layout: Infinity float32 keys). A model
    whose official layout caches keys in the compute dtype (VAR) takes only that dtype."""
    if key_dtype is None:
        return {}
    if geometry.key_cache_dtype is None and key_dtype != compute_dtype:
        raise ValueError(f"--key-dtype {key_dtype}: {geometry.name} caches keys in its compute dtype "
                         f"({compute_dtype}); use --dtype {key_dtype} instead")
    if geometry.key_cache_dtype is None:
        return {}
    from .policy_spec import parse_dtype

    return {"key_dtype": parse_dtype(key_dtype)}
