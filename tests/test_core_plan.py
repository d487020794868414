"""CapacityPlan: validation, kept lengths, compressed scales, printing and JSON round-trip."""

import json

import pytest

import kvpolicy
from kvpolicy import CapacityPlan, ScaleSchedule


def example_plan() -> CapacityPlan:
    return CapacityPlan(capacities=[[None, None], [4, 6], [4, 2]], budget_tokens=5, policy="x",
                        roles=[[None, None], ["drafter", "refiner"], ["drafter", "refiner"]], cumulative=[1, 5, 14])


def test_lookups_and_kept_lengths():
    plan = example_plan()
    assert plan.num_scales == 3 and plan.num_layers == 2
    assert plan.capacity(1, 1) == 6 and plan.capacity(0, 0) is None
    # after scale s a layer holds min(capacity, kept after s-1 + new tokens): new = 1, 4, 9
    assert plan.kept_lengths() == [[1, 1], [4, 5], [4, 2]]
    assert plan.kept_lengths([1, 2, 3]) == [[1, 1], [2, 2], [3, 2]]
    assert plan.mean_capacity(1) == 5.0 and plan.mean_capacity(0) is None
    assert plan.compressed_scales() == [1, 2]
    with pytest.raises(IndexError, match=r"scale 3 out of range 0\.\.2"):
        plan.capacity(3, 0)
    with pytest.raises(IndexError, match=r"layer 2 out of range 0\.\.1"):
        plan.capacity(0, 2)
    with pytest.raises(ValueError, match="needs the schedule's cumulative lengths"):
        CapacityPlan(capacities=[[1]]).kept_lengths()
    assert CapacityPlan(capacities=[[None], [3]]).compressed_scales() == [1]  # without lengths: any limit


def test_printing():
    text = str(example_plan())
    assert text.splitlines() == [
        "CapacityPlan(policy=x, budget_tokens=5, 3 scales x 2 layers)",
        "  scale  0 len      1 kept mean      1.0: unlimited",
        "  scale  1 len      5 kept mean      4.5: min 4 max 6 mean 5.0 (1 drafters, 1 refiners)",
        "  scale  2 len     14 kept mean      3.0: min 2 max 4 mean 3.0 (1 drafters, 1 refiners)",
    ]
    assert "650 every layer" in str(kvpolicy.get_policy("sliding_window", budget=650).plan(ScaleSchedule([1, 2]), 3))


def test_json_round_trip(tmp_path):
    plan = example_plan()
    text = plan.to_json()
    assert json.loads(text)["capacities"] == [[None, None], [4, 6], [4, 2]]
    assert CapacityPlan.from_json(text) == plan
    path = tmp_path / "plan.json"
    plan.to_json(path, indent=1)
    assert CapacityPlan.from_json(path) == plan and CapacityPlan.from_json(str(path)) == plan
    assert CapacityPlan.from_dict(plan.to_dict()) == plan
    # Every registered baseline's plan survives the round trip.
    schedule = ScaleSchedule([1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64])
    for name, options in [("pyramidkv", {"budget": "10%"}), ("snapkv", {"budget": "10%"}), ("h2o", {"budget": "10%"}),
                          ("full", {}), ("streamingllm", {"budget": "10%"})]:
        made = kvpolicy.get_policy(name, **options).plan(schedule, 32)
        assert CapacityPlan.from_json(made.to_json()) == made


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(capacities=[]), "at least one scale"),
    (dict(capacities=[[1, 2], [1]]), r"same number \(>= 1\) of layers, got \[1, 2\]"),
    (dict(capacities=[[]]), r"same number \(>= 1\) of layers, got \[0\]"),
    (dict(capacities=[[1, 0]]), r"capacity at scale 0, layer 1 is 0; capacities are >= 1 or None"),
    (dict(capacities=[[1, -5]]), "layer 1 is -5"),
    (dict(capacities=[[1, 2]], roles=[["a"]]), "roles must have the same"),
    (dict(capacities=[[1], [2]], cumulative=[1]), "one length per scale"),
    (dict(capacities=[[2.7, 3]]), r"capacity at scale 0, layer 0 is 2.7; capacities are whole numbers >= 1 or None"),
    (dict(capacities=[["abc"]]), r"capacity at scale 0, layer 0 is 'abc'"),
    (dict(capacities=[[True]]), r"capacity at scale 0, layer 0 is True"),
    (dict(capacities="x"), r"capacities must be a \[scale\]\[layer\] table"),
    (dict(capacities=[[3]], budget_tokens="x"), r"budget_tokens must be a whole number >= 1 or None, got 'x'"),
    (dict(capacities=[[3]], cumulative=[1.5]), r"cumulative must list whole token counts, got \[1.5\]"),
])
def test_bad_plans(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        CapacityPlan(**kwargs)


def test_bad_json():
    with pytest.raises(ValueError, match=r"unknown CapacityPlan fields \['capacity'\]"):
        CapacityPlan.from_dict({"capacity": [[1]]})
    with pytest.raises(ValueError, match="needs a 'capacities'"):
        CapacityPlan.from_dict({"policy": "x"})


def test_policy_plan_is_cached_and_checked():
    policy = kvpolicy.get_policy("sliding_window", budget="10%")
    schedule = ScaleSchedule([1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
    plan = policy.plan(schedule, 4)
    assert plan is policy.plan(schedule, 4) and plan.capacities[0] == (42, 42, 42, 42)
    assert plan.cumulative == schedule.cumulative and plan.budget_tokens == 42 and plan.policy == "sliding_window"
    assert policy.plan(schedule, 4, budget=100).budget_tokens == 100
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_layers must be a positive int"):
            policy.plan(schedule, bad)
    with pytest.raises(TypeError, match="schedule must be a ScaleSchedule, got list"):
        policy.plan([1, 2], 4)
    with pytest.raises(ValueError, match=r"policy 'sliding_window' needs a budget"):
        kvpolicy.get_policy("sliding_window").plan(schedule, 4)
