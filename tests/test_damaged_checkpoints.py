"""Damaged checkpoint files end in one line naming the file, what it was meant to be and the option
that gave it, before any model loads (issue 16, item 5): an empty .pth (was an EOFError traceback),
a corrupt .safetensors (SafetensorError traceback), a text file ('error: 101') and a truncated .pth
(a raw zip-reader message naming neither the file nor the option)."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from adapters.checkpoint_io import (CheckpointError, CheckpointMismatchError, DamagedCheckpointError,
                                    check_checkpoint_file, load_safetensors_file, load_torch_file)
from benchmarks.cli import main

ROLE = "transformer checkpoint (--weights)"


def _good_pth(path, **kwargs):
    torch.save({"w": torch.randn(64, 64)}, path, **kwargs)
    return path.read_bytes()


def _damage(tmp_path, kind):
    path = tmp_path / kind
    if kind == "empty.pth":
        path.write_bytes(b"")
    elif kind in ("text.pth", "text.safetensors"):
        path.write_text("<html>404 Not Found</html>\n")
    elif kind == "truncated.pth":  # cut in the middle of the tensor data
        data = _good_pth(tmp_path / "good.pth")
        path.write_bytes(data[: len(data) // 2])
    elif kind == "tail-cut.pth":  # only the zip's central directory is gone
        data = _good_pth(tmp_path / "good.pth")
        path.write_bytes(data[:-200])
    elif kind == "legacy-cut.pth":  # the pre-1.6 pickle format, cut short: only the reader can tell
        data = _good_pth(tmp_path / "good.pth", _use_new_zipfile_serialization=False)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "objects.pth":  # a pickle weights-only loading refuses
        torch.save({"args": argparse.Namespace(lr=1)}, path)
    else:
        save_file({"w": torch.randn(8, 8)}, str(tmp_path / "good.safetensors"))
        data = (tmp_path / "good.safetensors").read_bytes()
        path.write_bytes(data[:12] + b"garbage" * 4 if kind == "corrupt.safetensors" else data[:-40])
    return path


@pytest.mark.parametrize("kind", ["empty.pth", "text.pth", "truncated.pth", "tail-cut.pth", "legacy-cut.pth"])
def test_damaged_pth_files_raise_one_error_naming_file_and_role(tmp_path, kind):
    path = _damage(tmp_path, kind)
    with pytest.raises(DamagedCheckpointError) as info:
        load_torch_file(path, ROLE)
    message = str(info.value)
    assert message.startswith(f"{ROLE} '{path}' ") and "\n" not in message
    assert ("is empty (0 bytes)" in message if kind == "empty.pth" else
            "is not a readable PyTorch checkpoint (.pth / .bin, written by torch.save): " in message)


def test_a_pickle_of_objects_is_refused_with_what_it_holds(tmp_path):
    path = _damage(tmp_path, "objects.pth")
    with pytest.raises(CheckpointError) as info:
        load_torch_file(path, ROLE)
    assert str(info.value) == (f"{ROLE} '{path}' holds objects other than tensors and plain containers "
                               "(argparse.Namespace), which weights-only loading refuses: give a file holding a "
                               "state dict (torch.save(model.state_dict(), path))")


@pytest.mark.parametrize("kind, detail", [
    ("corrupt.safetensors", "its header length does not fit in the file"),
    ("truncated.safetensors", "past the end of the file"),
    ("text.safetensors", "its header length does not fit in the file"),
])
def test_damaged_safetensors_raise_one_error_naming_file_and_role(tmp_path, kind, detail):
    path = _damage(tmp_path, kind)
    with pytest.raises(DamagedCheckpointError, match=rf"^{ROLE.replace('(', '.').replace(')', '.')} '{path}' "
                                                     r"\([\d,]+ bytes\) is not a readable safetensors file: .*"
                                                     + detail):
        load_safetensors_file(path, ROLE)


def test_the_header_checks_pass_every_format_torch_and_safetensors_write(tmp_path):
    """No false alarm: zip and legacy .pth files and a safetensors file (with metadata) pass and load."""
    zipped, legacy = tmp_path / "zip.pth", tmp_path / "legacy.pth"
    _good_pth(zipped)
    _good_pth(legacy, _use_new_zipfile_serialization=False)
    tensors = {"w": torch.randn(3, 5), "b": torch.zeros(0)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"source": "test"})
    for path in (zipped, legacy, tmp_path / "t.safetensors"):
        check_checkpoint_file(path, ROLE)
    assert load_torch_file(zipped, ROLE)["w"].shape == (64, 64)
    assert load_torch_file(legacy, ROLE)["w"].shape == (64, 64)
    assert torch.equal(load_safetensors_file(tmp_path / "t.safetensors", ROLE)["w"], tensors["w"])


def test_damaged_and_mismatched_files_are_user_errors():
    """Both are ValueErrors (one-line CLI errors); a mismatch stays a KeyError for older callers."""
    assert issubclass(DamagedCheckpointError, CheckpointError) and issubclass(CheckpointError, ValueError)
    assert issubclass(CheckpointMismatchError, CheckpointError) and issubclass(CheckpointMismatchError, KeyError)


@pytest.fixture
def nothing_loads(monkeypatch):
    """A damaged file of either role fails before any weights are copied into a model."""
    import adapters.infinity.pipeline as infinity
    import adapters.var.generate as var

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the damaged file was reported")

    monkeypatch.setattr(infinity, "load_transformer_weights", refuse)
    monkeypatch.setattr(var, "fill_var", refuse)


@pytest.mark.parametrize("kind, option, argv, role", [
    ("empty.pth", "--weights", ["--model", "var-tiny", "--label", "1"], "VAR transformer checkpoint"),
    ("text.pth", "--weights", ["--model", "var-tiny", "--label", "1"], "VAR transformer checkpoint"),
    ("truncated.pth", "--vae-weights", ["--model", "var-tiny", "--label", "1"], "VQVAE checkpoint"),
    ("corrupt.safetensors", "--weights", ["--model", "var-tiny", "--label", "1"], "VAR transformer checkpoint"),
    ("empty.pth", "--weights", ["--model", "infinity-tiny", "--prompt", "a"], "Infinity transformer checkpoint"),
    ("text.pth", "--vae-weights", ["--model", "infinity-tiny", "--prompt", "a"], "BSQ-VAE checkpoint"),
    ("tail-cut.pth", "--weights", ["--model", "infinity-tiny", "--prompt", "a"], "Infinity transformer checkpoint"),
    ("truncated.safetensors", "--vae-weights", ["--model", "infinity-tiny", "--prompt", "a"], "BSQ-VAE checkpoint"),
])
def test_generate_with_a_damaged_file_is_one_line_before_any_loading(tmp_path, capsys, nothing_loads, kind, option,
                                                                     argv, role):
    path = _damage(tmp_path, kind)
    out = tmp_path / "out.png"
    assert main(["generate", *argv, option, str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"kvpolicy generate: error: {role} ({option[2:].replace('-', '_')}= / {option}) '{path}' ")
    assert "is empty (0 bytes)" in err or "is not a readable" in err
    assert not out.exists()
