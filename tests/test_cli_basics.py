"""The command itself: --version, and which failures are one-line user errors and which are bugs
that keep their traceback (issue 16, items 4 and 9)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import kvpolicy
from benchmarks import cli
from benchmarks.cli import main


def test_version_prints_the_package_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"kvpolicy {kvpolicy.__version__} (torch ")


def test_version_of_the_console_script():
    done = subprocess.run([sys.executable, "-m", "benchmarks.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith(f"kvpolicy {kvpolicy.__version__}")


@pytest.mark.parametrize("error", [TypeError("unsupported operand"), KeyError("layers"),
                                   RuntimeError("shape mismatch"), AttributeError("no attribute x")])
def test_programming_errors_keep_their_traceback(monkeypatch, capsys, error):
    def broken(args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "list", broken)
    with pytest.raises(type(error)):
        main(["list"])
    assert "error:" not in capsys.readouterr().err  # not disguised as a one-line user error


@pytest.mark.parametrize("error", [ValueError("--budget 'x' is not understood"), FileNotFoundError("no such file"),
                                   cli.CommandError("plugin 'p' is missing")])
def test_user_errors_are_one_line_with_exit_2_and_debug_shows_the_traceback(monkeypatch, capsys, error):
    calls = []

    def failing(args):
        calls.append(args)
        raise error

    monkeypatch.setitem(cli.COMMANDS, "list", failing)
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert err == f"kvpolicy list: error: {error}\n"
    with pytest.raises(type(error)):
        main(["--debug", "list"])


def test_an_unknown_policy_option_is_still_a_user_error(capsys):
    # the registry raises TypeError for it (a Python API contract); on the command line it is the user's typo
    code = main(["plan", "--model", "var-d16", "--policy", "snapkv", "--budget", "50%", "--option", "snapkv.windw=3"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kvpolicy plan: error: policy 'snapkv' has no option(s) ['windw']")
    assert err.count("\n") == 1


def test_bench_gpu_without_cuda_is_a_user_error(capsys):
    code = main(["bench-gpu"])
    err = capsys.readouterr().err
    assert code == 2 and "bench-gpu needs a CUDA GPU" in err and "--dry-run" in err
