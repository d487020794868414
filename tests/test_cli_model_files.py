"""Where a model runs and which files it loads, from the command line and the Python API:
--weights / --vae-weights / --text-encoder reach load_model; with no network (and no
HF_HUB_OFFLINE set) the official presets fail in seconds with the list of files and the options
to pass; --device values that cannot run here are one-line errors before anything loads."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

from adapters import load_model
from benchmarks.cli import build_parser, main

PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """A hub endpoint that refuses connections, an empty cache, HF_HUB_OFFLINE unset."""
    from huggingface_hub import constants

    from adapters import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)
    hub._probe.cache_clear()
    yield
    hub._probe.cache_clear()


@pytest.mark.parametrize("name, files", [("infinity-2b", ["infinity_2b_reg.pth", "infinity_vae_d32reg.pth"]),
                                         ("var-d30", ["var_d30.pth", "vae_ch160v4096z32.pth"])])
def test_no_network_fails_fast_naming_files_and_options(no_network, name, files):
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        load_model(name)
    assert time.perf_counter() - started < 8  # huggingface_hub alone retries for ~25 s per file
    message = str(info.value)
    for needed in files + ["unreachable", "weights=", "--weights", "--vae-weights"]:
        assert needed in message, (needed, message)


def test_no_network_t5_is_checked_before_the_transformer_is_read(no_network):
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="google/flan-t5-xl"):
        load_model("infinity-2b", weights="random", vae_weights="random")
    assert time.perf_counter() - started < 8


def test_cli_no_network_is_a_one_line_error(no_network, capsys):
    assert main(["generate", "--model", "var-d30", "--label", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvpolicy generate: error:") and "--weights /path/var_d30.pth" in err


def test_generate_weights_options_reach_load_model(tmp_path, capsys):
    source = load_model("infinity-tiny-random", seed=7)
    weights, vae = tmp_path / "transformer.pth", tmp_path / "vae.pth"
    torch.save(source.transformer.state_dict(), weights)
    torch.save({"vae": source.vae.official_state_dict("wrapped")}, vae)
    out = tmp_path / "cli.png"
    assert main(["generate", "--model", "infinity-tiny-random", "--weights", str(weights), "--vae-weights", str(vae),
                 "--prompt", "a red cube", "--out", str(out)]) == 0
    cli_image = np.array(Image.open(out))
    api = load_model("infinity-tiny-random", weights=str(weights), vae_weights=str(vae)).generate(["a red cube"], seed=0)
    default = load_model("infinity-tiny-random").generate(["a red cube"], seed=0)
    assert np.array_equal(cli_image, api.images[0].numpy())
    assert not np.array_equal(cli_image, default.images[0].numpy())


def test_compare_records_weights_in_settings_and_resume_fingerprint(tmp_path):
    from benchmarks.compare import settings_from_args

    args = build_parser().parse_args(["compare", "--model", "var-tiny-random", "--labels", "1", "--weights", "random",
                                      "--vae-weights", "random", "--out", str(tmp_path / "o")])
    settings = settings_from_args(args)
    assert settings.weights == {"weights": "random", "vae_weights": "random"}
    assert settings.fingerprint()["weights"] == {"vae_weights": "random", "weights": "random"}
    plain = settings_from_args(build_parser().parse_args(["compare", "--model", "var-tiny-random", "--out", "o"]))
    assert "weights" not in plain.fingerprint()


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "var-tiny-random", "--label", "1", "--text-encoder", "random"], "--text-encoder does not apply to var-tiny-random"),
    (["generate", "--model", "var-tiny-random", "--label", "1", "--weights", "/no/such/var.pth"], "--weights '/no/such/var.pth' does not exist"),
    (["calibrate", "--model", "infinity-tiny-random", "--out", "c.json", "--vae-weights", "/no/vae.pth"], "--vae-weights '/no/vae.pth'"),
    (["generate", "--model", "infinity-tiny-random", "--prompt", "x", "--device", "cuda:99"], "--device cuda:99"),
    (["calibrate", "--model", "var-tiny-random", "--out", "c.json", "--device", "cuda:99"], "--device cuda:99"),
    (["compare", "--device", "cuda:99"], "--device cuda:99"),
    (["generate", "--model", "infinity-tiny-random", "--prompt", "x", "--device", "tpu"], "not a device name"),
])
def test_model_file_and_device_errors(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kvpolicy {argv[0]}: error:") and message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("typo, meant, condition", [("infinty-tiny", "infinity-tiny", ["--prompt", "x"]),
                                                     ("var-tiy", "var-tiny", ["--label", "1"])])
def test_misspelt_model_suggests_the_tiny_presets(typo, meant, condition):
    """In a fresh process (no adapter imported yet), as a user's first command would run."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "benchmarks.cli", "generate", "--model", typo, *condition],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"did you mean {meant!r}" in done.stderr, done.stderr


def test_generate_uses_one_cpu_thread_by_default_and_checks_threads(tmp_path, capsys):
    """As compare does: on a busy 2-core machine more threads made the tiny models 10-20x slower."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["generate", "--model", "var-tiny-random", "--label", "3", "--out", str(tmp_path / "a.png")]) == 0
        assert "(cpu, fp32, 1 CPU thread(s))" in capsys.readouterr().out
        assert main(["generate", "--model", "var-tiny-random", "--label", "3", "--threads", "0"]) == 2
        assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_ctrl_c_is_one_line_with_the_resume_hint(monkeypatch, capsys):
    from benchmarks import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "compare", interrupted)
    assert main(["compare", "--out", "x"]) == 130
    err = capsys.readouterr().err
    assert err == ("kvpolicy compare: interrupted (finished rows are kept: run the same command again to resume)\n")
