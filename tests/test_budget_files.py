"""ScaleKV's released budget files ship with kvpolicy and are found by short name; the
micro-benchmark runs scalekv with them instead of skipping it (issue 16, item 2)."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks.bench_compress import main as bench_compress
import kvpolicy
from policies.scalekv import released_budget_file, resolve_budget_file
from benchmarks.cli import main
from conftest import GOLDEN_DIR, require_golden

DEPTH = {"infinity-2b-10%": 32, "infinity-8b-10%": 40}


@pytest.mark.parametrize("name", ["infinity-2b-10%", "infinity-8b-10%"])
def test_shipped_files_are_the_released_ten_percent_budgets(name):
    data = json.loads(released_budget_file(name).read_text())
    assert sorted(data) == [f"Scale {n}" for n in (10, 11, 12, 13, 9)]
    depth = DEPTH[name]
    for row in data.values():
        drafters = sum(row[f"Block {i}"] for i in range(depth))
        assert drafters == row["High"]
        # the released files' defining property: the layer mean is exactly 650 tokens at every scale
        assert drafters * row["Max"] + (depth - drafters) * row["Min"] == 650 * depth


@pytest.mark.parametrize("name, copy", [("infinity-2b-10%", "infinity-2b-10pct.json"),
                                        ("infinity-8b-10%", "infinity-8b-10pct.json")])
def test_shipped_files_equal_the_golden_copies(name, copy):
    golden = require_golden(GOLDEN_DIR / "scalekv" / "budgets" / copy)
    assert released_budget_file(name).read_bytes() == golden.read_bytes()


@pytest.mark.parametrize("alias", ["infinity-2b-10%", "infinity-2b-10pct", "2b_10%_budget.json",
                                   "budgets/2b_10%_budget.json"])
def test_aliases_name_the_same_file(alias):
    assert resolve_budget_file(alias) == str(released_budget_file("infinity-2b-10%"))


def test_an_existing_path_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "infinity-2b-10%").write_text("{}")
    assert resolve_budget_file("infinity-2b-10%") == "infinity-2b-10%"


def test_plan_with_a_short_name_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no budget file here
    assert main(["plan", "--model", "infinity-2b", "--policy", "scalekv", "--budget-file", "infinity-2b-10%",
                 "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+11\s+48x48 .*1 drafter x 6385, 31 refiners x 465", out, re.M)
    assert re.search(r"^\s+7\s+20x20 .*2 drafters x 920, 30 refiners x 632", out, re.M)


def test_unknown_budget_name_is_one_line_naming_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["plan", "--model", "infinity-2b", "--policy", "scalekv", "--budget-file", "infinity-2b-4%"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("kvpolicy plan: error: budget file 'infinity-2b-4%' does not exist and is not a released "
                   "budget name (shipped: infinity-2b-10%, infinity-8b-10%)\n")


def test_bench_gpu_defaults_to_the_shipped_files():
    # bench-gpu and bench_compress ask the policy for the released file of a model at a budget
    scalekv = kvpolicy.policy_class("scalekv")
    assert scalekv.released_plan_file("infinity-2b", 650) == released_budget_file("infinity-2b-10%")
    assert scalekv.released_plan_file("infinity-8b", 650) == released_budget_file("infinity-8b-10%")
    assert scalekv.released_plan_file("infinity-2b", 1300) is None  # no released 20 % file


def test_bench_compress_runs_scalekv_by_default(capsys):
    bench_compress(["--policies", "scalekv,sliding_window", "--repeats", "1", "--warmup", "0", "--threads", "1"])
    out = capsys.readouterr().out
    assert re.search(r"^scalekv\s+6385\s+[\d.]+", out, re.M)  # layer 0 is a drafter of the released 2B file
    assert "not run" not in out


def test_bench_compress_refuses_a_policy_it_cannot_run_before_timing(capsys):
    with pytest.raises(SystemExit) as info:
        bench_compress(["--policies", "sliding_window,scalekv", "--budget-file", "missing.json", "--repeats", "1"])
    captured = capsys.readouterr()
    assert info.value.code == 2
    assert "policy 'scalekv' cannot run here: budget file 'missing.json' does not exist" in captured.err
    assert "median ms" not in captured.out  # nothing was timed
