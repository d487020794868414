"""Where the official files come from: local paths or the Hugging Face hub (reference §11).

``resolve_weights`` returns a local path for a preset's transformer (a file, or a folder of shards
with its index), ``resolve_vae`` for its BSQ-VAE. With no network and no local copy the error lists
every file the preset needs and how to pass local paths.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .config import HUB_REPO, InfinityPreset


def files_needed(preset: InfinityPreset) -> str:
    """A human-readable list of the files a preset needs and how to pass them."""
    lines = [f"{preset.name} needs these files:"]
    if preset.weights_file:
        kind = "folder of shards + index JSON" if not preset.weights_file.endswith(".pth") else "file"
        lines.append(f"  transformer: {HUB_REPO} / {preset.weights_file} ({kind})")
    if preset.vae_file:
        lines.append(f"  BSQ-VAE:     {HUB_REPO} / {preset.vae_file}")
    if preset.text_encoder:
        lines.append(f"  text encoder: {preset.text_encoder} (hub repository, transformers format)")
    files = " ".join(f for f in (preset.weights_file, preset.vae_file) if f)
    lines.append(f"Download them (e.g. `hf download {HUB_REPO} {files} --local-dir DIR`"
                 + (f" and `hf download {preset.text_encoder} --local-dir T5DIR`" if preset.text_encoder else "")
                 + ") and pass local paths: load_model(" + repr(preset.name)
                 + ", weights='DIR/" + (preset.weights_file or "...") + "', vae_weights='DIR/"
                 + (preset.vae_file or "...") + "', text_encoder='T5DIR')")
    lines.append("On the command line: kvpolicy generate --model " + preset.name + " --weights DIR/"
                 + (preset.weights_file or "...") + " --vae-weights DIR/" + (preset.vae_file or "...")
                 + (" --text-encoder T5DIR" if preset.text_encoder else "") + " (also for compare and calibrate)")
    return "\n".join(lines)


class MissingFilesError(FileNotFoundError):
    """An official file is neither local nor downloadable (offline, or not on the hub)."""


def _download(filename: str, preset: InfinityPreset) -> Path:
    from adapters.hub import hub_download

    try:
        return Path(hub_download(HUB_REPO, filename))
    except Exception as error:  # offline, missing file, network or auth failure: all need the same advice
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        raise MissingFilesError(f"could not get {HUB_REPO}/{filename} from the Hugging Face hub ({reason}).\n"
                                + files_needed(preset)) from error


def _local(spec: str | os.PathLike, what: str, preset: InfinityPreset) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        raise MissingFilesError(f"{what} path {str(path)!r} does not exist.\n" + files_needed(preset))
    return path


def resolve_weights(spec: Optional[str | os.PathLike], preset: InfinityPreset) -> Path:
    """Transformer weights: a local file/folder, or (spec None) the preset's hub file or shard folder."""
    if spec is not None:
        return _local(spec, "transformer weights", preset)
    if not preset.weights_file:
        raise MissingFilesError(f"{preset.name} has no released weights; pass weights=PATH or weights='random'")
    if preset.weights_file.endswith((".pth", ".bin", ".safetensors")):
        return _download(preset.weights_file, preset)
    # A sharded folder: the index first, then every shard it names (hub paths keep the folder).
    index_names = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
    index, errors = None, []
    for name in index_names:
        try:
            index = _download(f"{preset.weights_file}/{name}", preset)
            break
        except MissingFilesError as error:
            errors.append(error)
    if index is None:
        raise errors[0]
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        _download(f"{preset.weights_file}/{shard}", preset)
    return index.parent


def resolve_vae(spec: Optional[str | os.PathLike], preset: InfinityPreset) -> Path:
    if spec is not None:
        return _local(spec, "BSQ-VAE weights", preset)
    if not preset.vae_file:
        raise MissingFilesError(f"{preset.name} has no released VAE file; pass vae_weights=PATH or 'random'")
    return _download(preset.vae_file, preset)


def check_text_encoder(spec, preset: InfinityPreset) -> None:
    """Fail before any weights are read when the T5 encoder is a hub name that is neither cached nor
    reachable (a local folder, 'random' or an encoder object need nothing)."""
    from adapters.hub import HubUnreachableError, check_repo_available

    name = spec if spec is not None else preset.text_encoder
    if not isinstance(name, (str, os.PathLike)) or name == "random" or Path(name).expanduser().is_dir():
        return
    try:
        check_repo_available(os.fspath(name))
    except HubUnreachableError as error:
        raise MissingFilesError(f"{error}.\n" + files_needed(preset)) from error
