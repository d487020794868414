"""AMS-KV's defining rules against small independent references, and the shared calibration
statistics every calibrated policy reads (one ``kvpolicy calibrate`` run for all of them)."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy import ScaleSchedule
from policies.amskv import condensed_tokens, demanding_layers, kept_positions, split_capacities

VAR_256 = ScaleSchedule([1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
# -- AMS-KV ----------------------------------------------------------------------------------------

def test_amskv_keeps_exactly_the_condensed_and_recent_scales():
    schedule = VAR_256
    condensed = condensed_tokens(schedule, 2)
    assert condensed == 5
    s = 7  # the cache after scale 7 holds scales 0..7 uncompressed
    length = schedule.cumulative[s]
    capacity = condensed + schedule.tokens(s) + schedule.tokens(s - 1)
    kept = kept_positions(length, capacity, condensed)
    assert {schedule.locate(p)[0] for p in kept} == {0, 1, s - 1, s}
    assert len(kept) == capacity


def test_amskv_policy_keeps_the_condensed_and_recent_scales_through_the_cache():
    """The registered policy in a real KVCache, scale after scale: after every compression each
    (row, head) holds exactly the condensed scales 0-1 plus the newest tokens in generation order
    (independent reference: global token ids); with capacity condensed + tokens(s) + tokens(s - 1)
    that is exactly the scales {0, 1, s - 1, s} after scale s = 7."""
    schedule, s = VAR_256, 7
    condensed = condensed_tokens(schedule, 2)
    budget = condensed + schedule.tokens(s) + schedule.tokens(s - 1)
    policy = kvpolicy.get_policy("amskv", budget=budget)
    cache = kvpolicy.KVCache(1, schedule, policy)
    g = torch.Generator().manual_seed(0)
    held = [[[] for _ in range(2)] for _ in range(2)]  # [row][head] global ids
    for scale in range(schedule.num_scales):
        n, offset, end = schedule.tokens(scale), schedule.offsets[scale], schedule.cumulative[scale]
        cache.append(0, scale, torch.randn(2, 2, n, 4, generator=g), torch.randn(2, 2, n, 4, generator=g))
        result = cache.compress(0, scale)
        expected = list(range(end)) if end <= budget else list(range(condensed)) + list(range(end - (budget - condensed), end))
        for row in range(2):
            for head in range(2):
                own = held[row][head] + list(range(offset, end))
                count = result.indices.shape[2] if result.lengths is None else int(result.lengths[row, head])
                held[row][head] = [own[p] for p in result.indices[row, head, :count].tolist()]
                assert held[row][head] == expected, (scale, row, head)
        if scale == s:
            assert {schedule.locate(t)[0] for t in held[0][0]} == {0, 1, s - 1, s}
            assert len(held[0][0]) == budget


def test_harnesses_calibrate_amskv_unless_its_layer_split_is_given():
    """needs_calibration drives harnesses: amskv alone is calibrated; a calibration (file or plain
    per-layer list) or uniform_layers=True (the uncalibrated split, asked for) is a plan source."""
    from benchmarks.policy_spec import calibrated_policies, policies_to_calibrate

    assert "amskv" in calibrated_policies()
    assert policies_to_calibrate(["amskv", "snapkv"]) == ["amskv"]
    assert policies_to_calibrate(["amskv"], {"amskv": {"uniform_layers": False}}) == ["amskv"]
    assert policies_to_calibrate(["amskv"], {"amskv": {"uniform_layers": True}}) == []
    assert policies_to_calibrate(["amskv"], {"amskv": {"calibration": [0.9, 0.1]}}) == []
    assert policies_to_calibrate(["amskv"], calibration="calib.json") == []
    with pytest.raises(ValueError, match="one source of its layer split"):
        kvpolicy.get_policy("amskv", budget=20, uniform_layers=True, calibration=[0.9, 0.1])


def test_amskv_python_api_without_calibration_is_still_the_uniform_split():
    # users' code: get_policy("amskv", budget=...) builds and plans without a calibration, as before
    plain = kvpolicy.get_policy("amskv", budget=20).plan(VAR_256, 4)
    uniform = kvpolicy.get_policy("amskv", budget=20, uniform_layers=True).plan(VAR_256, 4)
    assert plain.capacities == uniform.capacities and plain.roles is None
    assert all(len(set(row)) == 1 for row in plain.capacities)  # one capacity for every layer
    split = kvpolicy.get_policy("amskv", budget=20, calibration=[0.9, 0.1, 0.8, 0.7]).plan(VAR_256, 4)
    assert split.capacities[-1][1] > split.capacities[-1][0]  # the calibrated split differs


def test_amskv_layer_split():
    assert demanding_layers([0.9, 0.2, 0.8, 0.1], 0.5) == [1, 3]
    caps = split_capacities(4, 100, [1, 3], 2.0, 10_000, 6)
    # 2e + 2d = 400 with d = 2e: e = floor(400 / 6) = 66, d = 132; the rest (8) to the efficient layers
    assert caps == [68, 132, 68, 132]
    saturated = split_capacities(4, 100, [1, 3], 3.0, 140, 6)
    assert max(saturated) <= 140 and sum(saturated) <= 400


def test_amskv_inter_scale_similarity_against_a_loop():
    schedule = ScaleSchedule([1, 2, 3])
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, schedule.total, 4, generator=g)
    from policies.amskv import inter_scale_similarity

    got = inter_scale_similarity(keys, schedule, 2)
    for b in range(2):
        for h in range(3):
            sims = []
            for r in range(3):
                for c in range(3):
                    prev = keys[b, h, 1 + (r * 2 // 3) * 2 + (c * 2 // 3)]  # nearest: floor(r * 2 / 3)
                    cur = keys[b, h, 5 + r * 3 + c]
                    sims.append(float(torch.dot(prev, cur) / prev.norm() / cur.norm()))
            assert float(got[b, h]) == pytest.approx(sum(sims) / 9, abs=1e-5)
    # identical maps (a constant key everywhere) are perfectly similar
    same = torch.ones(1, 1, schedule.total, 4)
    assert float(inter_scale_similarity(same, schedule, 2)) == pytest.approx(1.0)


# -- generic calibration statistics ------------------------------------------------------------------

def test_collector_context_and_key_measures_and_saved_statistics(tmp_path):
    schedule = ScaleSchedule([1, 2, 3])
    seen = []

    def spatial(probs, current_start, *, positions, scale, layer):
        seen.append((layer, scale, positions.tolist()))
        return {"first_token": probs[..., 0]}

    spatial.takes_context = True

    def key_norm(keys, current_start, *, scale, layer):
        return {"key_norm": keys[:, :, current_start:].norm(dim=-1).mean(dim=-1)}

    key_norm.on_keys = True
    collector = kvpolicy.AttentionStatsCollector(1, 3, [spatial, key_norm], max_queries=2, seed=0)
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 2, schedule.total, 4, generator=g)
    for scale in range(3):
        end = schedule.cumulative[scale]
        queries = torch.randn(2, 2, schedule.tokens(scale), 4, generator=g)
        collector.observe(0, scale, queries, keys[:, :, :end], current_start=schedule.offsets[scale])
    # positions are the sampled queries' places in the current map (at most 2 of them, sorted)
    assert [s for _, s, _ in seen] == [0, 1, 2] and all(len(p) <= 2 for _, _, p in seen)
    stats = collector.statistics(source="toy")
    expected = keys[:, :, 5:].norm(dim=-1).mean(dim=-1).double().mean(dim=0)  # (H,) at scale 2
    assert torch.allclose(stats.head_means("key_norm")[0, 2], expected)
    path = tmp_path / "stats.json"
    stats.save(path)
    again = kvpolicy.load_statistics(path)
    assert again == stats and again.names == ["first_token", "key_norm"]
    assert again.layer_mean("key_norm")[0] == pytest.approx(float(
        sum(keys[:, :, schedule.offsets[s]:schedule.cumulative[s]].norm(dim=-1).mean(dim=-1).double().mean()
            for s in range(3)) / 3))
    with pytest.raises(ValueError, match="has no statistic 'nope'"):
        again.head_means("nope")


def test_calibration_measures_gather_every_registered_policy():
    names = [getattr(m, "__name__", "") for m in kvpolicy.calibration_measures(VAR_256)]
    assert "amskv.similarity_key_measure" in names and any(n.startswith("scalekv_measure") for n in names)


def test_scalekv_reads_the_shared_calibration_statistics(tmp_path):
    from policies.scalekv.calibration import CalibrationResult, ScaleKVStatsCollector

    schedule = ScaleSchedule([1, 2, 3, 4])
    shared = kvpolicy.AttentionStatsCollector(2, 4, kvpolicy.calibration_measures(schedule, ["scalekv", "amskv"]))
    own = ScaleKVStatsCollector(2, 4)
    g = torch.Generator().manual_seed(5)
    for scale in range(4):
        keys = torch.randn(1, 2, schedule.cumulative[scale], 8, generator=g)
        for layer in range(2):
            queries = 3 * torch.randn(1, 2, schedule.tokens(scale), 8, generator=g)
            for collector in (shared, own):
                collector.observe(layer, scale, queries, keys, current_start=schedule.offsets[scale])
    path = tmp_path / "calibration.json"
    shared.statistics(source="toy").save(path)
    from_shared = CalibrationResult.load(path)
    direct = own.result(source="toy")
    for name in ("current_ratio", "history_topk", "history_share"):
        for a, b in zip(getattr(from_shared, name), getattr(direct, name)):
            assert a == pytest.approx(b, rel=1e-9)
    policy = kvpolicy.get_policy("scalekv", budget=8, calibration=str(path), window_size=4, kernel_size=3)
    assert policy.plan(schedule, 2).num_layers == 2


def test_amskv_calibration_finds_the_planted_cache_demanding_layer():
    """Layer 0's keys repeat the coarser map at every scale (high inter-scale similarity), layer 1's
    are fresh noise: layer 1 is the cache-demanding one and gets the larger capacity."""
    schedule = ScaleSchedule([1, 2, 3, 4, 6])
    collector = kvpolicy.AttentionStatsCollector(2, 5, kvpolicy.calibration_measures(schedule, ["amskv"]))
    g = torch.Generator().manual_seed(0)
    smooth = torch.randn(1, 2, 1, 8, generator=g).expand(1, 2, schedule.total, 8).clone()
    noisy = torch.randn(1, 2, schedule.total, 8, generator=g)
    for scale in range(5):
        end = schedule.cumulative[scale]
        queries = torch.randn(1, 2, schedule.tokens(scale), 8, generator=g)
        for layer, keys in enumerate((smooth, noisy)):
            collector.observe(layer, scale, queries, keys[:, :, :end], current_start=schedule.offsets[scale])
    stats = collector.statistics(source="planted")
    similarity = stats.layer_mean("amskv/key_similarity")
    assert similarity[0] == pytest.approx(1.0) and similarity[1] < 0.5
    policy = kvpolicy.get_policy("amskv", budget=20, calibration=stats, demanding_fraction=0.5)
    plan = policy.plan(schedule, 2)
    last = plan.capacities[-1]
    assert last[1] > last[0] and sum(last) <= 2 * 20
    assert plan.roles[-1] == ("efficient", "demanding")


def test_kvpolicy_calibrate_writes_one_file_for_every_calibrated_policy(tmp_path, capsys):
    """One calibration run records ScaleKV's and AMS-KV's statistics (and those of every other
    registered policy) in one file, which each of them reads."""
    import json

    from benchmarks.cli import main

    calib = tmp_path / "calib.json"
    assert main(["calibrate", "--model", "var-tiny", "--labels", "1", "--out", str(calib)]) == 0
    calibrated_for = capsys.readouterr().out.split(" for ")[1].split(":")[0].split(", ")
    assert {"amskv", "head_aware", "heatkv", "scalekv"} <= set(calibrated_for)  # the default set
    data = json.loads(calib.read_text())
    assert data["kind"] == "kvpolicy-attention-statistics"
    assert {"current_ratio", "history_topk", "amskv/key_similarity"} <= set(data["means"])
    stats = kvpolicy.load_statistics(calib)
    from adapters import geometry

    g = geometry.get_geometry("var-tiny")
    for name in ("scalekv", "amskv"):
        kvpolicy.get_policy(name, budget="30%", calibration=str(calib)).plan(g.schedule, g.num_layers)
    assert stats.num_layers == g.num_layers
