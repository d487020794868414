"""Values the command used to accept silently (issue 16, item 7): off-template aspect ratios were
snapped to the nearest template, negative seeds were taken, repeated seeds got the wrong reason.
Each is now one line naming the value and what is allowed, before any work. And `kvpolicy plan |
head` ends quietly instead of reporting the closed pipe as an error."""

from __future__ import annotations

import os
import sys

import pytest

from adapters.infinity.schedule import INFINITY_TEMPLATES, infinity_schedule
from benchmarks.cli import main

TEMPLATES = "0.333, 0.4, 0.5, 0.571, 0.666, 0.75, 0.8, 1, 1.25, 1.333, 1.5, 1.75, 2, 2.5, 3"


@pytest.fixture
def no_loading(monkeypatch):
    import adapters

    monkeypatch.setattr(adapters, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.parametrize("ratio, closest", [("1.37", "1.333"), ("100", "3"), ("0.1", "0.333")])
def test_plan_refuses_an_aspect_ratio_that_names_no_template(capsys, ratio, closest):
    code = main(["plan", "--model", "infinity-2b", "--policy", "snapkv", "--budget", "10%", "--aspect-ratio", ratio])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err == (f"kvpolicy plan: error: aspect ratio h/w {float(ratio):g} is not one of Infinity's "
                            f"templates ({TEMPLATES}); the closest is {closest}\n")


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "infinity-tiny", "--prompt", "a", "--out", "a.png"],
    ["compare", "--model", "infinity-tiny", "--out", "run"],
    ["calibrate", "--model", "infinity-tiny", "--out", "c.json"],
])
def test_commands_refuse_an_off_template_aspect_ratio_before_loading(no_loading, tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--aspect-ratio", "1.37"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"kvpolicy {argv[0]}: error: aspect ratio h/w 1.37 is not one of Infinity's templates "
                            f"({TEMPLATES}); the closest is 1.333\n")
    assert not list(tmp_path.iterdir())  # no output folder, image or calibration


@pytest.mark.parametrize("ratio, key", [(4 / 3, 1.333), (2 / 3, 0.666), (4 / 7, 0.571), (1 / 3, 0.333), (2.0, 2.0)])
def test_exact_ratios_find_their_truncated_template_keys(ratio, key):
    assert infinity_schedule("1M", ratio).shapes == INFINITY_TEMPLATES[key]


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "var-tiny", "--label", "1", "--seed", "-1"],
     "--seed -1 is not a seed: use an integer from 0 to 9223372036854775807"),
    (["calibrate", "--model", "var-tiny", "--out", "c.json", "--seed", "-5"],
     "--seed -5 is not a seed: use an integer from 0 to 9223372036854775807"),
    (["compare", "--model", "var-tiny", "--seeds", "-1"],
     "--seeds '-1': seed -1 is not a seed: use an integer from 0 to 9223372036854775807"),
    (["compare", "--model", "var-tiny", "--seeds", "0,0"],
     "--seeds '0,0' repeats [0]: each seed is generated once per condition"),
    (["compare", "--model", "var-tiny", "--seeds", "0,x"],
     "--seeds '0,x': 'x' is not an integer; give comma-separated integers from 0 to 9223372036854775807"),
])
def test_bad_seeds_are_one_line_before_any_work(no_loading, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert capsys.readouterr().err == f"kvpolicy {argv[0]}: error: {message}\n"
    assert not list(tmp_path.iterdir())


def test_plan_into_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    """`kvpolicy plan ... | head -1`: the reader is gone; exit 0 without an error line (was
    'kvpolicy plan: error: [Errno 32] Broken pipe', exit 2)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    stdout = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        code = main(["plan", "--model", "var-d16", "--policy", "snapkv", "--budget", "10%"])
    finally:
        stdout.close()  # its fd now points at /dev/null: closing flushes nothing into the broken pipe
    assert code == 0
    assert capsys.readouterr().err == ""
