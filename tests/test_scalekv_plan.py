"""ScaleKV capacity plans: released budget files (§3.3–§3.6), allocations, export, validation."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from adapters.geometry import infinity_schedule
from kvpolicy import ScaleSchedule, get_policy, simulate
from policies.scalekv.allocation import allocate, compression_start, decision_scales, default_refiner_floor
from policies.scalekv.budget_file import plan_to_budget_file

INF = infinity_schedule(1024)

# reference/scalekv.md §3.6: kept length per layer after si 7..12 (drafter, refiner).
KEPT = {
    "2b": [(920, 632), (1490, 594), (2510, 526), (4100, 420), (6385, 465), (6385, 465)],
    "8b": [(909, 629), (1464, 584), (2463, 503), (4054, 374), (6200, 200), (6200, 200)],
}
DRAFTERS = {"2b": [{0, 23}] * 4 + [{0}] * 2, "8b": [{0, 1, 2}] * 6}
DEPTH = {"2b": 32, "8b": 40}


@pytest.fixture(scope="module")
def budget_dir(golden_dir):
    return golden_dir / "scalekv" / "budgets"


def _file(budget_dir, model):
    return budget_dir / f"infinity-{model}-10pct.json"


@pytest.mark.parametrize("model", ["2b", "8b"])
def test_released_file_gives_documented_kept_lengths(budget_dir, model):
    depth = DEPTH[model]
    policy = get_policy("scalekv", mode="reference", budget_file=_file(budget_dir, model))
    plan = policy.plan(INF, depth)
    assert plan.budget_tokens == 650
    kept = plan.kept_lengths()
    for si in range(7):
        assert kept[si] == [INF.cumulative[si]] * depth
        assert plan.roles[si] == (None,) * depth
    for i, si in enumerate(range(7, 13)):
        high, low = KEPT[model][i]
        expected = [high if layer in DRAFTERS[model][i] else low for layer in range(depth)]
        assert kept[si] == expected, si
        assert sum(kept[si]) == 650 * depth
        assert [r == "drafter" for r in plan.roles[si]] == [l in DRAFTERS[model][i] for l in range(depth)]
    assert plan.compressed_scales() == list(range(7, 13))
    assert "2 drafters" in str(plan) or "3 drafters" in str(plan)


def test_simulated_cache_holds_the_planned_lengths(budget_dir):
    policy = get_policy("scalekv", mode="reference", budget_file=_file(budget_dir, "2b"))
    report = simulate(policy, schedule=INF, num_layers=32, num_heads=1, head_dim=8, batch=1, cfg=False)
    assert report.kept_lengths == policy.plan(INF, 32).kept_lengths()
    assert [sum(r) for r in report.kept_lengths[7:]] == [650 * 32] * 6


@pytest.mark.parametrize("model", ["2b", "8b"])
def test_released_generator_reproduces_every_row(budget_dir, model):
    depth = DEPTH[model]
    drafters = {si + 1: sorted(DRAFTERS[model][i]) for i, si in enumerate(range(7, 12))}
    plan = allocate(INF, depth, 650, drafters)
    loaded = get_policy("scalekv", budget_file=_file(budget_dir, model)).plan(INF, depth)
    assert plan.capacities == loaded.capacities
    assert plan.roles == loaded.roles
    # Same through the policy, with the explicit drafter sets.
    assert get_policy("scalekv", budget=650, drafters=drafters).plan(INF, depth).capacities == loaded.capacities


@pytest.mark.parametrize("model", ["2b", "8b"])
def test_export_round_trips_the_released_file(budget_dir, model):
    path = _file(budget_dir, model)
    policy = get_policy("scalekv", budget_file=path)
    exported = policy.budget_file_export(INF, DEPTH[model])
    assert exported.to_dict() == json.loads(path.read_text())  # High and Limit included


def test_budget_file_scale_mapping_and_defaults():
    assert compression_start(INF, 650) == 7
    assert decision_scales(INF, 650) == [8, 9, 10, 11, 12]
    assert compression_start(INF, 265) == 6 and compression_start(INF, 1300) == 8
    assert compression_start(INF, 10521) is None
    assert default_refiner_floor(650) == 200 and default_refiner_floor(265) == 82


def _write(tmp_path, data, name="b.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _released(budget_dir):
    return json.loads(_file(budget_dir, "2b").read_text())


def test_budget_file_validation(budget_dir, tmp_path):
    data = _released(budget_dir)
    with pytest.raises(ValueError, match="num_layers=40"):
        get_policy("scalekv", budget_file=_file(budget_dir, "2b")).plan(INF, 40)
    missing = {k: v for k, v in data.items() if k != "Scale 11"}
    with pytest.raises(ValueError, match=r"missing \['Scale 11'\]"):
        get_policy("scalekv", budget_file=_write(tmp_path, missing)).plan(INF, 32)
    extra = dict(data, **{"Scale 8": data["Scale 9"]})  # a 4 %-style row that 650 tokens never use
    with pytest.raises(ValueError, match=r"unused \['Scale 8'\]"):
        get_policy("scalekv", budget_file=_write(tmp_path, extra)).plan(INF, 32)
    with pytest.raises(ValueError, match="averages 650"):
        get_policy("scalekv", budget_file=_write(tmp_path, data), budget="10%").plan(INF, 32)  # 643 tokens
    with pytest.raises(ValueError, match=r"unused \['Scale 11', 'Scale 12', 'Scale 13'\]"):  # 0.25M: 10 scales
        get_policy("scalekv", budget_file=_write(tmp_path, data)).plan(infinity_schedule("0.25M"), 32)
    no_block = json.loads(json.dumps(data))
    del no_block["Scale 10"]["Block 7"]
    with pytest.raises(ValueError, match="Block 7"):
        get_policy("scalekv", budget_file=_write(tmp_path, no_block))
    bad_flag = json.loads(json.dumps(data))
    bad_flag["Scale 10"]["Block 3"] = 2
    with pytest.raises(ValueError, match="Block 3 is 2"):
        get_policy("scalekv", budget_file=_write(tmp_path, bad_flag))
    no_max = json.loads(json.dumps(data))
    del no_max["Scale 12"]["Max"]
    with pytest.raises(ValueError, match="'Max'"):
        get_policy("scalekv", budget_file=_write(tmp_path, no_max))
    with pytest.raises(ValueError, match="unexpected top-level key"):
        get_policy("scalekv", budget_file=_write(tmp_path, {"scale 9": {}}))
    with pytest.raises(FileNotFoundError):
        get_policy("scalekv", budget_file=tmp_path / "absent.json")
    with pytest.raises(ValueError, match="do not apply to budget_file"):
        get_policy("scalekv", budget_file=_file(budget_dir, "2b"), allocation="paper")
    # With an explicit budget a file without a common mean loads, but no row may average above it.
    over = json.loads(json.dumps(data))
    over["Scale 11"]["Min"] += 1  # layer mean 650 + 30/32
    with pytest.raises(ValueError, match=r"row 'Scale 11' averages 650.94 tokens per layer, above the budget 650"):
        get_policy("scalekv", budget_file=_write(tmp_path, over), budget=650).plan(INF, 32)
    under = json.loads(json.dumps(data))
    under["Scale 11"]["Min"] -= 1
    plan = get_policy("scalekv", budget_file=_write(tmp_path, under), budget=650).plan(INF, 32)
    assert sum(plan.capacities[9]) == 650 * 32 - 30


def test_policy_needs_one_role_source(budget_dir):
    with pytest.raises(ValueError, match="exactly one source"):
        get_policy("scalekv", budget="10%")
    with pytest.raises(ValueError, match="exactly one source"):
        get_policy("scalekv", budget_file=_file(budget_dir, "2b"), drafters=[0])
    with pytest.raises(ValueError, match="decision scales"):
        get_policy("scalekv", budget=650, drafters={3: [0]}).plan(INF, 32)
    with pytest.raises(ValueError, match="layers are 0..31"):
        get_policy("scalekv", budget=650, drafters=[40]).plan(INF, 32)
    with pytest.raises(ValueError, match="window_size=16"):
        get_policy("scalekv", budget=20, drafters=[0], refiner_floor=8).plan(INF, 4)
    with pytest.raises(ValueError, match="paper"):
        get_policy("scalekv", budget=650, drafters=[0], refiner_decay=10)


def test_config_round_trip(budget_dir):
    for policy in (get_policy("scalekv", budget_file=_file(budget_dir, "2b"), mode="reference"),
                   get_policy("scalekv", budget="10%", drafters={8: [0], 9: [0, 5], 10: [], 11: [1], 12: [1]},
                              allocation="paper", refiner_decay=40)):
        config = json.loads(json.dumps(policy.to_config()))
        again = type(policy).from_config(config)
        assert again == policy
        assert again.plan(INF, 32) == policy.plan(INF, 32)


def test_paper_allocation_decays_refiners_and_keeps_the_mean():
    plan = get_policy("scalekv", budget=650, drafters=list(range(8)), allocation="paper").plan(INF, 32)
    # Eq. 4 with the ablation's B_r(0) = 600, δ = 70; the freed memory goes to the 8 drafters.
    assert [plan.capacities[s][8] for s in range(7, 12)] == [600, 530, 460, 390, 320]
    assert [plan.capacities[s][0] for s in range(7, 12)] == [800, 1010, 1220, 1430, 1640]
    assert plan.capacities[12] == plan.capacities[11]  # the last scale reuses the previous row
    for s in range(7, 13):
        assert sum(plan.capacities[s]) == 650 * 32
    # An explicit B_r(0) below the refiner floor would never be used: refused, not clamped away.
    with pytest.raises(ValueError, match="refiner_initial 600 is below refiner_floor 640"):
        get_policy("scalekv", budget=650, drafters=[0], allocation="paper", refiner_floor=640,
                   refiner_initial=600).plan(INF, 32)
    with pytest.raises(ValueError, match="refiner_initial 10 is below refiner_floor 200"):  # the default floor
        get_policy("scalekv", budget=650, drafters=[0], allocation="paper", refiner_initial=10).plan(INF, 32)


def test_paper_allocation_never_gives_drafters_more_than_they_hold():
    # With two drafters Eq. 4 would give them more than their whole cache (e.g. 1400 > 921 after
    # scale 7): they are capped at that length and the rest returns to the refiners.
    plan = get_policy("scalekv", budget=650, drafters=[0, 23], allocation="paper").plan(INF, 32)
    kept = plan.kept_lengths()
    assert plan.capacities[7][0] <= 921
    for s in range(7, 13):
        assert sum(plan.capacities[s]) == 650 * 32
        assert sum(kept[s]) == 650 * 32  # the capacities are really used
        assert plan.capacities[s][0] >= plan.capacities[s][1]


@settings(max_examples=60, deadline=None)
@given(sides=st.lists(st.integers(1, 12), min_size=2, max_size=8), num_layers=st.integers(1, 12),
       budget=st.integers(16, 300), data=st.data(), allocation=st.sampled_from(["released", "paper"]))
def test_allocation_invariants(sides, num_layers, budget, data, allocation):
    schedule = ScaleSchedule(sorted(sides))
    scales = decision_scales(schedule, budget)
    drafters = {s: data.draw(st.lists(st.integers(0, num_layers - 1), unique=True, max_size=num_layers)) for s in scales}
    plan = allocate(schedule, num_layers, budget, drafters, allocation=allocation)
    start = compression_start(schedule, budget)
    for s in range(schedule.num_scales):
        row, roles = plan.capacities[s], plan.roles[s]
        if start is None or s < start:
            assert set(row) == {None}
            continue
        assert sum(row) == budget * num_layers  # layer mean exactly the budget
        d = [c for c, r in zip(row, roles) if r == "drafter"]
        r = [c for c, r in zip(row, roles) if r == "refiner"]
        assert len(set(d)) <= 1 and len(set(r)) <= 1
        if d and r:
            assert min(d) >= max(r)
            if allocation == "released":
                assert min(r) >= default_refiner_floor(budget)
    if start is not None:
        assert plan_to_budget_file(plan, schedule).rows  # always exportable


def test_export_refuses_plans_without_one_capacity_per_role():
    uniform_plan = get_policy("uniform", budget=650).plan(INF, 4)
    with pytest.raises(ValueError, match="roles"):
        plan_to_budget_file(uniform_plan, INF)
    nothing = allocate(INF, 4, 20000, {})
    with pytest.raises(ValueError, match="compresses nothing"):
        plan_to_budget_file(nothing, INF)


def test_config_of_a_relative_budget_file_reloads_from_another_directory(budget_dir, tmp_path, monkeypatch):
    """A config records where the file is, not where the process happened to run."""
    monkeypatch.chdir(budget_dir)
    policy = get_policy("scalekv", budget_file="infinity-2b-10pct.json")
    config = json.loads(json.dumps(policy.to_config()))
    monkeypatch.chdir(tmp_path)
    again = type(policy).from_config(config)
    assert again == policy and again.plan(INF, 32) == policy.plan(INF, 32)
