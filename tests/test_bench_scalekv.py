"""The ScaleKV reference benchmark's stand-in for the release (``restated_update_kv``) keeps the same
tokens and K/V as reference mode in every dtype flow, and a bad --release folder fails in one line."""

import importlib.util
from pathlib import Path

import pytest
import torch

from adapters.infinity.schedule import infinity_schedule
from kvpolicy import get_policy
from policies.scalekv import released_budget_file

# A script, not a module of the harness (benchmarks/ names no policy): load it from its file.
_SPEC = importlib.util.spec_from_file_location(
    "bench_scalekv", Path(__file__).resolve().parents[1] / "scripts" / "bench_scalekv.py")
bench_scalekv = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_scalekv)


@pytest.mark.parametrize("flow", list(bench_scalekv.FLOWS))
@pytest.mark.parametrize("layer", [5, 0], ids=["refiner", "drafter"])
def test_restated_release_and_reference_mode_agree(flow, layer):
    torch.manual_seed(0)
    policy = get_policy("scalekv", mode="reference", budget_file=str(released_budget_file("infinity-2b-10%")))
    plan = policy.plan(infinity_schedule(1024), 32)
    row = bench_scalekv.run_case(batch=1, scale=9, layer=layer, flow=flow, repeats=1, device="cpu",
                                 release_cls=None, policy=policy, plan=plan, settle=layer == 0)
    assert row["identical"], row["detail"]
    assert row["capacity"] == plan.capacity(9, layer) and row["L"] == 2521
    assert row["role"] == ("refiner" if layer else "drafter")
    assert row["in_place_ms"] > 0  # in-place compaction is measured (and checked identical) for every role
    # the cache compacts in place only where at most 1/8 is evicted, and the table says where it copies
    assert ("the cache copies" in bench_scalekv.table([row], "x")) == bool(layer)
    assert "| yes |" in bench_scalekv.table([row], "x")
    # the bound is the sum of its three timed parts; a drafter's write is its floor
    assert row["bound_ms"] == pytest.approx(row["scoring_ms"] + row["top_k_ms"] + row["write_ms"])
    assert row["ours_over_bound"] == pytest.approx(row["ours_ms"] / row["bound_ms"])
    if not layer:
        assert row["write_ms"] == row["floor_ms"]
    assert f"| {row['bound_ms']:.1f} |" in bench_scalekv.bound_table([row])


def _row(role, batch, speedup, release_over_bound, ours_over_floor, bound_over_floor):
    return {"role": role, "B": batch, "L": 6425, "flow": "bfloat16", "speedup": speedup,
            "release_over_bound": release_over_bound, "ours_over_floor": ours_over_floor,
            "bound_over_floor": bound_over_floor, "scoring_ms": 1.0, "top_k_ms": 1.0, "write_ms": 1.0,
            "bound_ms": 3.0, "ours_over_bound": 1.0}


def test_goals_are_met_or_out_of_reach_per_case():
    rows = [_row("refiner", 16, speedup=3.5, release_over_bound=4.5, ours_over_floor=2.2, bound_over_floor=2.1),
            _row("refiner", 2, speedup=1.5, release_over_bound=1.8, ours_over_floor=9.0, bound_over_floor=9.0),
            _row("drafter", 16, speedup=5.0, release_over_bound=6.0, ours_over_floor=1.2, bound_over_floor=1.1)]
    summary = bench_scalekv.goal_summary(rows).splitlines()
    assert summary == [
        "- release/ours >= 2: met in 2 of 3; of the 1 unmet, 1 out of reach of the bound, 0 within it",
        "- refiner B=16: release/ours >= 4: met in 0 of 1; of the 1 unmet, 0 out of reach of the bound, 1 within it",
        "- refiner B=16: ours/floor <= 2: met in 0 of 1; of the 1 unmet, 1 out of reach of the bound, 0 within it",
        "- drafter: ours/floor <= 1.3: met in 1 of 1; of the 0 unmet, 0 out of reach of the bound, 0 within it",
    ]
    table = bench_scalekv.bound_table(rows)
    assert "refiner B=16: release/ours >= 4: unmet, reachable" in table
    assert "refiner B=16: ours/floor <= 2: unmet, out of reach" in table
    assert "drafter: ours/floor <= 1.3: met, reachable" in table


def test_release_folder_without_the_code_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="has no scale_kv.py"):
        bench_scalekv.load_release(str(tmp_path))
