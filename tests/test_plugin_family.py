"""A third model family registered from a user's file (``--plugin``) runs through every command:
list, plan, generate, calibrate, compare and bench-gpu's dry run; nothing in the harness names it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from adapters.families import family_of, get_geometry, list_families
from benchmarks import reports
from benchmarks.cli import main

PLUGIN = str(Path(__file__).resolve().parent / "plugins" / "toy_family.py")


def run(capsys, *argv):
    code = main(["--plugin", PLUGIN, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_shows_the_plugin_family(capsys):
    code, out, err = run(capsys, "list", "--models")
    assert code == 0, err
    assert re.search(r"^toy-tiny\s+toy\s+label\s+runnable, tiny", out, re.M)
    assert re.search(r"^toy-large\s+toy\s+label\s+geometry only", out, re.M)
    assert "toy" in list_families() and family_of("toy-tiny").conditioning == "label"


def test_plan_a_plugin_geometry_without_weights(capsys):
    code, out, err = run(capsys, "plan", "--model", "toy-large", "--policy", "snapkv", "--budget", "50%", "--json")
    assert code == 0, err
    plan = json.loads(out)
    schedule = get_geometry("toy-large").schedule
    assert plan["family"] == "toy" and plan["num_layers"] == 48 and plan["num_heads"] == 32
    assert plan["schedule"] == [[n, n] for n in (1, 2, 3, 4, 6, 8)]
    # bytes counted from the geometry: 48 layers x 2 (K, V) x 32 heads x 128 dims x bf16 x 2 CFG rows per token
    assert plan["full_kv_bytes"][-1] == schedule.total * 48 * 2 * 32 * 128 * 2 * 2
    assert plan["budget_tokens"] == round(0.5 * schedule.reference_length)


def test_generate_with_the_plugin_family(tmp_path, capsys):
    code, out, err = run(capsys, "generate", "--model", "toy-tiny", "--label", "3", "--label", "7", "--policy",
                         "sliding_window", "--budget", "40%", "--out", str(tmp_path / "toy.png"))
    assert code == 0, err
    for i in (0, 1):
        assert Image.open(tmp_path / f"toy_{i}.png").size == (16, 16)
    assert "sliding_window" in out
    code, _, err = run(capsys, "generate", "--model", "toy-tiny", "--prompt", "a cube", "--out", str(tmp_path / "x.png"))
    assert code == 2 and "class-conditional model: use --label, not --prompt" in err
    code, _, err = run(capsys, "generate", "--model", "toy-tiny", "--label", "12", "--out", str(tmp_path / "x.png"))
    assert code == 2 and "classes are 0..9" in err  # the family's num_classes, checked before loading


def test_calibrate_the_plugin_family_for_the_calibrated_policies(tmp_path, capsys):
    out = tmp_path / "toy-calibration.json"
    code, text, err = run(capsys, "calibrate", "--model", "toy-tiny", "--out", str(out))
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["num_layers"] == 2 and data["num_scales"] == 6
    assert "on 3 condition(s)" in text  # the family's own calibration conditions


def test_compare_the_plugin_family(tmp_path, capsys):
    code, text, err = run(capsys, "compare", "--model", "toy-tiny", "--policies", "sliding_window,streamingllm",
                          "--out", str(tmp_path / "run"), "--no-progress", "--no-learned-metrics")
    assert code == 0, err
    rows = reports.read_rows(tmp_path / "run" / "results.jsonl")
    # the family's evaluation labels (4, 5) x (reference + 2 policies x the tiny budgets 20%, 40%)
    assert sorted({r["label"] for r in rows}) == [4, 5] and len(rows) == 2 * 5
    assert {r["budget"] for r in rows if r["policy"] != "reference"} == {"20%", "40%"}
    assert (tmp_path / "run" / "summary.md").is_file()


def test_bench_gpu_dry_run_on_the_plugin_family(tmp_path, capsys):
    code, text, err = run(capsys, "bench-gpu", "--dry-run", "--models", "toy-tiny", "--policies", "sliding_window",
                          "--batches", "1", "--max-batch", "2", "--out", str(tmp_path))
    assert code == 0, err
    data = json.loads(next(tmp_path.glob("bench_gpu_dryrun_*.json")).read_text())
    assert [(r["model"], r["policy"]) for r in data["rows"]] == [("toy-tiny", "full"), ("toy-tiny", "sliding_window")]


@pytest.mark.parametrize("argv, message", [
    (["plan", "--model", "toy-tiy", "--policy", "snapkv", "--budget", "10%"], "did you mean 'toy-tiny'"),
    (["generate", "--model", "toy-large", "--label", "1"], "unknown model 'toy-large'"),
    (["generate", "--model", "toy-tiny", "--label", "1", "--vae-weights", "random"], "toy models take --weights"),
])
def test_plugin_family_errors(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err, err
