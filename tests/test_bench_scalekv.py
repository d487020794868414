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
    assert (row["in_place_ms"] is None) == bool(layer)  # in-place compaction is measured for drafters
    assert "| yes |" in bench_scalekv.table([row], "x")


def test_release_folder_without_the_code_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="has no scale_kv.py"):
        bench_scalekv.load_release(str(tmp_path))
