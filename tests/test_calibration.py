"""ScaleKV calibration on synthetic attention maps: planted drafters must be recovered."""

import json

import pytest
import torch
import torch.nn.functional as F

from kvpolicy import ScaleSchedule, get_policy
from kvpolicy.attention_stats import AttentionStatistics
from policies.heatkv.schedule import HeatSchedule
from policies.scalekv.budget_file import BudgetFile
from policies.scalekv.calibration import CalibrationResult, ScaleKVStatsCollector

SCHEDULE = ScaleSchedule([1, 2, 4, 6, 8, 12])  # cumulative 1, 5, 21, 57, 121, 265
DIM, HEADS = 16, 2
# Layer kinds: drafters spread attention over everything; "current" refiners look mostly at the
# current map (the rest of their attention on a few sink-like history tokens); "selective" refiners
# put a large share on a few history tokens.
KINDS = ["drafter", "current", "selective", "drafter", "current", "selective"]
QUERY_DIRECTION = {"drafter": (0.0, 0.0), "current": (4.0, 4.0), "selective": (2.0, 5.0), "pure": (12.0, 0.0)}


def _maps(scale, kind, generator, batch=2):
    length, n = SCHEDULE.cumulative[scale], SCHEDULE.tokens(scale)
    start = length - n
    noise = torch.randn(batch, HEADS, length, DIM, generator=generator)
    noise[..., :2] = 0
    keys = F.normalize(noise, dim=-1) * 0.5
    keys[:, :, start:, 0] = 1.0  # the current map shares direction e0
    keys[:, :, :min(4, start), 1] = 1.0  # four history "anchors" share direction e1
    q_noise = 0.2 * torch.randn(batch, HEADS, n, DIM, generator=generator)
    towards_current, towards_anchors = QUERY_DIRECTION[kind]
    queries = q_noise.clone()
    queries[..., 0] += towards_current
    queries[..., 1] += towards_anchors
    return queries, keys, start


def _calibrate(calls=2, max_queries=64, kinds=KINDS, **result_options):
    collector = ScaleKVStatsCollector(len(kinds), SCHEDULE.num_scales, top_k=4, max_queries=max_queries, seed=3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(calls):  # "prompts"
        for scale in range(SCHEDULE.num_scales):
            for layer, kind in enumerate(kinds):
                queries, keys, start = _maps(scale, kind, generator)
                collector.observe(layer, scale, queries, keys, current_start=start)
    return collector.result(**result_options)


@pytest.mark.parametrize("operator", ["multiplicative", "additive"])
def test_planted_drafters_are_recovered(operator):
    result = _calibrate(operator=operator)
    budget = 40  # compression starts after scale 3 (57 > 40): roles matter at scales 4 and 5
    drafters = result.drafters(SCHEDULE, budget, num_drafters=4)
    assert drafters == {4: [0, 3], 5: [0, 3]}
    z = result.zscores()
    for scale in (3, 4, 5):
        lowest = sorted(range(len(KINDS)), key=lambda l: z[l][scale])[:2]
        assert sorted(lowest) == [0, 3]


@pytest.mark.parametrize("operator, history", [("additive", "mass"), ("multiplicative", "share")])
def test_a_purely_current_focused_layer_is_a_refiner(operator, history):
    # Such a layer has almost no history attention; the additive form and the history share
    # still rank it above the drafters (see CalibrationResult: the printed product would not).
    result = _calibrate(kinds=["drafter", "pure", "pure", "drafter"], operator=operator, history=history)
    assert result.drafters(SCHEDULE, 40, num_drafters=4) == {4: [0, 3], 5: [0, 3]}


def test_statistics_match_a_direct_computation():
    collector = ScaleKVStatsCollector(1, SCHEDULE.num_scales, top_k=3, max_queries=1000)
    generator = torch.Generator().manual_seed(1)
    queries, keys, start = _maps(5, "selective", generator)
    collector.observe(0, 5, queries, keys, current_start=start)
    probs = torch.softmax(queries.double() @ keys.double().transpose(-1, -2), dim=-1)
    result = collector.result()
    assert result.current_ratio[0][5] == pytest.approx(float(probs[..., start:].sum(-1).mean()), rel=1e-5)
    top = probs[..., :start].topk(3).values.sum(-1)
    assert result.history_topk[0][5] == pytest.approx(float(top.mean()), rel=1e-5)
    assert result.history_share[0][5] == pytest.approx(float((top / probs[..., :start].sum(-1)).mean()), rel=1e-5)
    assert result.history_topk[0][0] is None and result.current_ratio[0][1] is None


def test_grouped_query_heads_and_sampling_are_deterministic():
    generator = torch.Generator().manual_seed(2)
    queries, keys, start = _maps(5, "current", generator)
    queries = queries.repeat_interleave(2, dim=1)  # 4 query heads over 2 key heads
    results = []
    for _ in range(2):
        collector = ScaleKVStatsCollector(1, SCHEDULE.num_scales, max_queries=16, seed=5)
        collector.observe(0, 5, queries, keys, current_start=start)
        results.append(collector.result())
    assert results[0] == results[1]
    assert results[0].samples[0][5] == 2 * 4 * 16
    assert results[0].current_ratio[0][5] > 0.9


def test_observe_validates_inputs():
    collector = ScaleKVStatsCollector(2, 3)
    q, k = torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 9, 8)
    with pytest.raises(ValueError, match="current_start=4"):
        collector.observe(0, 1, q, k, current_start=4)
    with pytest.raises(IndexError, match="layer 2"):
        collector.observe(2, 1, q, k, current_start=5)
    with pytest.raises(ValueError, match="do not fit"):
        collector.observe(0, 1, torch.zeros(1, 3, 4, 8), k, current_start=5)
    with pytest.raises(TypeError, match="queries and keys must be floating point, got torch.int64 and torch.float32"):
        collector.observe(0, 1, q.long(), k, current_start=5)
    # NaN statistics would read as "not observed" in the result: refused where they come in.
    with pytest.raises(ValueError, match=r"attention at layer 0, scale 1 is not finite \(NaN or inf in the queries or keys\)"):
        collector.observe(0, 1, torch.full_like(q, float("nan")), k, current_start=5)
    assert collector.calls == 0 and collector.result().current_ratio[0][1] is None


def test_result_json_round_trip_and_policy_use(tmp_path):
    result = _calibrate(calls=1, drafter_fraction=0.2)
    path = tmp_path / "calib.json"
    result.save(path)
    loaded = CalibrationResult.load(path)
    assert loaded == result
    # 0.2 x 6 layers x 2 ranked scales = 2.4 -> 2 drafter pairs (the lowest Z overall)
    assert sum(len(v) for v in loaded.drafters(SCHEDULE, 40).values()) == 2
    policy = get_policy("scalekv", budget=40, calibration=str(path), num_drafters=4)
    plan = policy.plan(SCHEDULE, 6)
    assert plan == get_policy("scalekv", budget=40, calibration=result, num_drafters=4).plan(SCHEDULE, 6)
    assert [plan.roles[4][l] for l in range(6)] == ["drafter", "refiner", "refiner", "drafter", "refiner", "refiner"]
    for s in (3, 4, 5):
        assert sum(plan.capacities[s]) == 40 * 6
    config = json.loads(json.dumps(policy.to_config()))
    assert type(policy).from_config(config).plan(SCHEDULE, 6) == plan
    # Export to the released format and load it back as a budget file: same capacities.
    exported = result.to_budget_file(SCHEDULE, 40, num_drafters=4, refiner_floor=16)
    file_path = tmp_path / "budget.json"
    exported.save(file_path)
    again = get_policy("scalekv", budget_file=file_path).plan(SCHEDULE, 6)
    assert again.capacities == plan.capacities  # the policy's floor is the window size here
    assert BudgetFile.load(file_path).implied_budget() == 40


def test_unobserved_scales_cannot_be_ranked():
    collector = ScaleKVStatsCollector(2, SCHEDULE.num_scales)
    generator = torch.Generator().manual_seed(0)
    queries, keys, start = _maps(4, "drafter", generator)
    collector.observe(0, 4, queries, keys, current_start=start)
    with pytest.raises(ValueError, match="scale 4 was not observed"):
        collector.result().drafters(SCHEDULE, 40)
    with pytest.raises(FileNotFoundError, match="calibration file"):
        CalibrationResult.load("/nonexistent/calib.json")
    with pytest.raises(ValueError, match="num_drafters"):
        _calibrate(calls=1).drafters(SCHEDULE, 40, num_drafters=99)


def _corrupt(data, **changes):
    out = json.loads(json.dumps(data))
    for key, value in changes.items():
        if value is _DROP:
            del out[key]
        else:
            out[key] = value
    return out


_DROP = object()


def test_malformed_calibration_json_is_rejected_clearly(tmp_path):
    data = _calibrate(calls=1).to_dict()
    bad_cell = json.loads(json.dumps(data))
    bad_cell["current_ratio"][1][2] = "abc"
    out_of_range = json.loads(json.dumps(data))
    out_of_range["history_topk"][0][3] = 1.5
    infinite = json.loads(json.dumps(data))
    infinite["current_ratio"][0][1] = float("inf")
    cases = [
        (_corrupt(data, history_topk=_DROP), r"missing field\(s\) \['history_topk'\]"),
        (_corrupt(data, num_layers="6"), r"num_layers must be an int >= 1, got '6'"),
        (_corrupt(data, current_ratio="x"), r"current_ratio must be a \[6 layers\]\[6 scales\] table"),
        (bad_cell, r"current_ratio\[layer 1\]\[scale 2\] is 'abc'; entries are numbers in \[0, 1\] or null"),
        (out_of_range, r"history_topk\[layer 0\]\[scale 3\] is 1.5; entries are numbers in \[0, 1\] or null"),
        (infinite, r"current_ratio\[layer 0\]\[scale 1\] is inf"),
        (_corrupt(data, top_k=-1), r"top_k must be an int >= 1, got -1"),
        (_corrupt(data, epsilon=-1), r"epsilon must be a finite number > 0 .*, got -1"),
        (_corrupt(data, samples=[[1]]), r"samples must be a \[6 layers\]\[6 scales\] table of counts >= 0"),
        (_corrupt(data, calls="x"), r"calls must be an int >= 0, got 'x'"),
        (_corrupt(data, operator="mult"), r"operator must be one of \('multiplicative', 'additive'\), got 'mult'"),
    ]
    for broken, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            CalibrationResult.from_dict(broken)
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"calibration file '.*broken.json' is not valid JSON"):
        CalibrationResult.load(path)
    with pytest.raises(ValueError, match=r"calibration file '.*broken.json' is not valid JSON"):
        get_policy("scalekv", calibration=path)


def test_calibration_plan_and_policy_agree_on_small_budgets():
    """Below 52 tokens ⌈200·B/650⌉ is smaller than the 16-token window: the calibration's own plan (and
    the budget file it exports) must use the same window-aware floor as the scalekv policy, so that an
    exported file loads into the policy."""
    import kvpolicy
    from policies.scalekv.allocation import window_refiner_floor
    from policies.scalekv.calibration import CalibrationResult

    schedule = kvpolicy.ScaleSchedule([1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
    layers, scales = 6, schedule.num_scales
    result = CalibrationResult(num_layers=layers, num_scales=scales,
                               current_ratio=[[0.1 + 0.1 * l] * scales for l in range(layers)],
                               history_topk=[[0.5] * scales for _ in range(layers)], top_k=4)
    assert window_refiner_floor(30, 16) == 16 and window_refiner_floor(650, 16) == 200 and window_refiner_floor(10, 16) == 10
    policy = kvpolicy.get_policy("scalekv", budget=30, calibration=result)
    assert result.plan(schedule, 30).capacities == policy.plan(schedule, layers).capacities
    refiners = [c for s, row in enumerate(policy.plan(schedule, layers).capacities)
                for l, c in enumerate(row) if policy.plan(schedule, layers).roles[s][l] == "refiner"]
    assert refiners and min(refiners) >= 16


def test_a_calibration_for_another_model_is_refused_naming_where_it_came_from(tmp_path):
    import kvpolicy
    from policies.scalekv.calibration import CalibrationResult

    result = CalibrationResult(num_layers=3, num_scales=4, current_ratio=[[0.5] * 4] * 3,
                               history_topk=[[0.5] * 4] * 3, source="var-tiny-random, 3 layers, schedule 1x1 2x2 3x3 4x4")
    path = tmp_path / "calibration.json"
    result.save(path)
    assert CalibrationResult.load(path) == result  # the source survives the JSON round trip
    with pytest.raises(ValueError, match=r"covers 4 scales \(made for var-tiny-random, 3 layers.*\), the schedule has 7"):
        kvpolicy.get_policy("scalekv", budget=40, calibration=path).plan(kvpolicy.ScaleSchedule([1, 2, 4, 6, 8, 12, 16]), 3)
    with pytest.raises(ValueError, match=r"calibration has 3 layers \(made for var-tiny-random.*\), the model 5"):
        kvpolicy.get_policy("scalekv", budget=3, calibration=path).plan(kvpolicy.ScaleSchedule([1, 2, 3, 4]), 5)


@pytest.mark.parametrize("load,what,hint", [
    (AttentionStatistics.load, "calibration file", " (make one with kvpolicy calibrate)"),
    (CalibrationResult.load, "calibration file", ""),
    (BudgetFile.load, "ScaleKV budget file", ""),
    (HeatSchedule.load, "HeatKV schedule", ""),
], ids=["statistics", "scalekv_calibration", "budget_file", "heatkv_schedule"])
def test_every_json_file_a_user_names_fails_in_one_line_naming_it(tmp_path, load, what, hint):
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError) as info:
        load(missing)
    assert str(info.value) == f"{what} {str(missing)!r} does not exist{hint}"
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError) as info:
        load(broken)
    assert str(info.value).startswith(f"{what} {str(broken)!r} is not valid JSON: Expecting property name")
    assert "\n" not in str(info.value)
