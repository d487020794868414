"""The head-wise field policies (AdaKV, HACK-style head_aware, HeatKV): each method's defining
rule against a small independent reference."""

from __future__ import annotations

import math

import pytest
import torch

import kvpolicy
from kvpolicy import ScaleSchedule
from policies.adakv import adaptive_head_lengths
from policies.head_aware import (CONTEXTUAL, STRUCTURAL, classify_heads, locality_mask, locality_measure,
                                 otsu_split, split_head_capacities)
from policies.heatkv.schedule import HeatSchedule, orders_from_scas, prune_count, scas_from_means

VAR_256 = ScaleSchedule([1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
# -- AdaKV -----------------------------------------------------------------------------------------

def test_adakv_floor_then_global_topk_matches_hand_computation():
    # Two heads, 3 scored slots each (6 in all), floor_alpha 0.34 -> floor 1 slot per head.
    # Head 0 scores: 9 8 7 1 0 ; head 1 scores: 5 .5 .4 .3 .2
    # Floors: head 0 keeps 9, head 1 keeps 5. Remaining 4 slots to the best of the rest of both
    # heads: head 0 {8, 7, 1} and head 1 {.5, .4, .3, .2} -> 8, 7, 1, .5 -> head 0 +3, head 1 +1.
    scores = torch.tensor([[[9., 8, 7, 1, 0], [5, .5, .4, .3, .2]]])
    assert adaptive_head_lengths(scores, 3, 0.34).tolist() == [[4, 2]]
    # Without a floor the global top-6 is 9 8 7 5 1 .5 -> head 0 four, head 1 two (the same here);
    # with floor 1.0 every head keeps exactly its 3.
    assert adaptive_head_lengths(scores, 3, 0.0).tolist() == [[4, 2]]
    assert adaptive_head_lengths(scores, 3, 1.0).tolist() == [[3, 3]]
    # A head never gets more than its candidates; the row sum is exact.
    lopsided = torch.tensor([[[9., 9, 9], [0, 0, 0]], [[0., 0, 0], [1, 1, 1]]])
    lengths = adaptive_head_lengths(lopsided, 2, 0.5)
    assert lengths.tolist() == [[3, 1], [1, 3]] and lengths.sum(dim=1).tolist() == [4, 4]


# -- HeatKV ----------------------------------------------------------------------------------------

def test_heatkv_prune_count_keeps_the_total_within_budget():
    # slots 4 reading 100 tokens each, budget 50, 10 protected: ceil(4 * 50 / 90) = 3 atoms per scale.
    assert prune_count(100, 50, 10, 4) == 3
    assert 4 * 100 - 3 * (100 - 10) <= 4 * 50 < 4 * 100 - 2 * (100 - 10)
    assert prune_count(50, 50, 10, 4) == 0 and prune_count(1000, 11, 10, 4) == 4


def _planted_means(num_layers, num_heads, schedule, protected, score):
    """means[j][l][t][h] = score(l, h, j, t) for t > j, NaN elsewhere."""
    S = schedule.num_scales
    return {j: [[[score(l, h, j, t) if t > j else math.nan for h in range(num_heads)] for t in range(S)]
                for l in range(num_layers)] for j in range(S)}


def test_heatkv_scas_is_the_mean_over_later_scales_and_orders_ascend():
    schedule = VAR_256
    means = _planted_means(2, 3, schedule, 2, lambda l, h, j, t: (l * 3 + h) * 0.01 + t * 0.001)
    scas = scas_from_means(means, schedule.num_scales, 2)
    # S-CAS(l, h, j) = mean_{t=j+1..9} ((3l + h)/100 + t/1000)
    for l in range(2):
        for h in range(3):
            for j in range(2, 9):
                expected = (3 * l + h) / 100 + sum(range(j + 1, 10)) / (9 - j) / 1000
                assert scas[l][h][j] == pytest.approx(expected)
            assert scas[l][h][0] is None and scas[l][h][9] is None
    orders = orders_from_scas(scas, 2, schedule.num_scales)
    assert orders[2] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def _random_schedule(num_layers=3, num_heads=4, protected=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    scas = torch.rand(num_layers, num_heads, VAR_256.num_scales, generator=g).tolist()
    return HeatSchedule.from_scas(scas, num_scales=VAR_256.num_scales, protected_scales=protected)


def test_heatkv_schedule_positions_follow_a_per_head_cache_and_fit_the_budget():
    heat = _random_schedule()
    budget = 120
    caps = heat.head_capacities(VAR_256, budget)
    # Reference: follow every head's cache as a list of global token ids through the scales.
    held = [[[] for _ in range(heat.num_heads)] for _ in range(heat.num_layers)]
    for t in range(VAR_256.num_scales):
        new = list(range(VAR_256.offsets[t], VAR_256.cumulative[t]))
        dropped = heat.dropped(VAR_256, budget, t)
        for l in range(heat.num_layers):
            positions = heat.kept_positions(VAR_256, budget, t, l)
            for h in range(heat.num_heads):
                cache = held[l][h] + new
                if positions is not None:
                    cache = [cache[p] for p in positions[h]]
                held[l][h] = cache
                scales_held = {VAR_256.locate(tok)[0] for tok in cache}
                assert scales_held == set(range(t + 1)) - dropped[l][h]
                assert set(range(min(t + 1, heat.protected_scales))) <= scales_held
                if caps[t][l] is not None:
                    assert len(cache) == caps[t][l][h]
        total = sum(len(c) for row in held for c in row)
        if t < VAR_256.num_scales - 1:
            assert total <= heat.num_layers * heat.num_heads * max(budget, VAR_256.cumulative[t])
    # once dropped, always dropped
    for t in range(1, VAR_256.num_scales):
        before, now = heat.dropped(VAR_256, budget, t - 1), heat.dropped(VAR_256, budget, t)
        assert all(before[l][h] <= now[l][h] for l in range(heat.num_layers) for h in range(heat.num_heads))


def test_heatkv_saved_schedule_reloads_and_reproduces_the_plan(tmp_path):
    heat = _random_schedule(seed=3)
    path = tmp_path / "heat.json"
    heat.save(path)
    again = HeatSchedule.load(path)
    assert again == heat
    for budget in (40, 120, 300):
        assert again.head_capacities(VAR_256, budget) == heat.head_capacities(VAR_256, budget)
        assert again.plan(VAR_256, budget) == heat.plan(VAR_256, budget)


def test_heatkv_budget_below_protected_tokens_is_refused():
    heat = _random_schedule()
    with pytest.raises(ValueError, match="below the 14 tokens of the 3 protected scales"):
        heat.removal_counts(VAR_256, 13)


# -- head_aware (HACK) -----------------------------------------------------------------------------

def _planted_probs(schedule, scale, positions, structural):
    """Attention of sampled queries: structural heads look at their spatial counterparts on every
    map, contextual heads at the same three tokens of the coarse maps."""
    length = schedule.cumulative[scale]
    mask = locality_mask(schedule, scale, positions, length, radius=0).double()
    local = mask / mask.sum(dim=1, keepdim=True)
    vertical = torch.zeros_like(local)
    vertical[:, [0, 2, 7]] = 1 / 3
    heads = [local if s else vertical for s in structural]
    return torch.stack(heads)[None, :, None].float()  # (1, H, 1, q, L)


def test_head_aware_classification_recovers_planted_heads():
    schedule = VAR_256
    planted = [[True, False, True, False], [False, False, True, True], [True, True, True, False]]
    measure = locality_measure(schedule)
    locality = []
    for l, kinds in enumerate(planted):
        per_head = torch.zeros(len(kinds), dtype=torch.float64)
        count = 0
        for scale in range(3, schedule.num_scales):
            positions = torch.arange(schedule.tokens(scale))
            probs = _planted_probs(schedule, scale, positions, kinds)
            values = measure(probs, schedule.offsets[scale], positions=positions, scale=scale, layer=l)["head_aware/locality"]
            per_head += values.double().sum(dim=(0, 2, 3))
            count += positions.numel()
        locality.append((per_head / count).tolist())
    kinds = classify_heads(locality)
    assert kinds == [[STRUCTURAL if s else CONTEXTUAL for s in row] for row in planted]
    assert all(v > 0.99 for row, p in zip(locality, planted) for v, s in zip(row, p) if s)


def test_head_aware_locality_mask_matches_a_loop_over_cells():
    """Independent reference for what "local" means (the planted-heads test builds its structural
    heads with this mask): key j is local to query i when, on j's own map, j's cell is within
    ``radius`` rows and columns of the cell that contains the centre of i's cell."""
    schedule = ScaleSchedule([(1, 1), (2, 3), (3, 4), (5, 6)])
    for scale in range(schedule.num_scales):
        h, w = schedule.shape(scale)
        positions = torch.arange(h * w)
        length = schedule.cumulative[scale]
        for radius in (0, 1):
            mask = locality_mask(schedule, scale, positions, length, radius)
            for i in range(h * w):
                centre_y, centre_x = (i // w + 0.5) / h, (i % w + 0.5) / w
                for j in range(length):
                    s, r, c = schedule.locate(j)
                    kh, kw = schedule.shape(s)
                    near = abs(r - math.floor(centre_y * kh)) <= radius and abs(c - math.floor(centre_x * kw)) <= radius
                    assert bool(mask[i, j]) == near, (scale, radius, i, j)


def test_otsu_split_and_fraction():
    assert 0.2 < otsu_split([0.1, 0.15, 0.2, 0.8, 0.9]) < 0.8
    assert classify_heads([[0.1, 0.5, 0.9]], contextual_fraction=1 / 3) == [[CONTEXTUAL, STRUCTURAL, STRUCTURAL]]
    with pytest.raises(ValueError, match="same locality"):
        otsu_split([0.5, 0.5])


def test_head_aware_capacities_are_asymmetric_and_within_the_budget():
    kinds = [CONTEXTUAL, STRUCTURAL, STRUCTURAL, CONTEXTUAL]
    caps = split_head_capacities(kinds, 60, 0.5, 1000, 4)
    # 2c + 2s = 240 with c = s/2 -> s = 80, c = 40
    assert caps == (40, 80, 80, 40)
    capped = split_head_capacities(kinds, 60, 0.5, 70, 4)
    assert max(capped) <= 70 and sum(capped) <= 240 and capped[0] < capped[1]
    assert split_head_capacities(kinds, 60, 0.5, 50, 4) == (50,) * 4


def test_heatkv_source_mass_measure():
    from policies.heatkv.schedule import source_mass_measure

    schedule = ScaleSchedule([1, 2, 3])
    probs = torch.softmax(torch.randn(1, 2, 1, 9, schedule.total), dim=-1)
    out = source_mass_measure(schedule)(probs, 5, scale=2)
    assert set(out) == {"heatkv/source_mass/0", "heatkv/source_mass/1"}
    assert torch.allclose(out["heatkv/source_mass/1"], probs[..., 1:5].sum(-1))


def test_adakv_head_budgets_count_the_window_and_skip_padding():
    from policies.adakv import adakv_head_budgets

    # capacity 4 with a 1-token window (position 5): 3 scored slots per head, 6 per row.
    # floor_alpha 0.34 -> floor 1. Head 1's first two positions are padding (a ragged view).
    scores = torch.tensor([[[9., 8, 7, 1, 0, 5], [5, 4, .5, .4, .3, 9]]])
    valid = torch.tensor([[[True] * 6, [False, False, True, True, True, True]]])
    budgets = adakv_head_budgets(scores, torch.tensor([5]), 4, 0.34, valid)
    # candidates: head 0 {9 8 7 1 0}, head 1 {.5 .4 .3}; floors 9 and .5; remaining 4 -> 8 7 1 .4
    # -> head 0 scored 4, head 1 scored 2; plus the window each.
    assert budgets.tolist() == [[5, 3]]


# -- end to end through the core's cache (ragged per head) --------------------------------------------

def follow(policy, schedule, *, layers=2, rows=2, heads=2, dim=8, seed=0):
    """Drive ``policy`` through a generation with the real KVCache; return {(scale, layer): [b][h]
    list of the global token ids each (row, head) holds after compression}."""
    g = torch.Generator().manual_seed(seed)
    cache = kvpolicy.KVCache(layers, schedule, policy)
    held = [[[[] for _ in range(heads)] for _ in range(rows)] for _ in range(layers)]
    out = {}
    for scale in range(schedule.num_scales):
        n, offset = schedule.tokens(scale), schedule.offset(scale)
        for layer in range(layers):
            keys = torch.nn.functional.normalize(torch.randn(rows, heads, n, dim, generator=g), dim=-1)
            values = torch.randn(rows, heads, n, dim, generator=g)
            queries = 6 * torch.nn.functional.normalize(torch.randn(rows, heads, n, dim, generator=g), dim=-1)
            cache.append(layer, scale, keys, values)
            for b in range(rows):
                for h in range(heads):
                    held[layer][b][h] = held[layer][b][h] + list(range(offset, offset + n))
            result = cache.compress(layer, scale, queries=queries if policy.needs_queries else None)
            width = max(len(held[layer][b][h]) for b in range(rows) for h in range(heads))
            for b in range(rows):
                for h in range(heads):
                    own = held[layer][b][h]
                    count = int(result.lengths[b, h]) if result.lengths is not None else result.indices.shape[2]
                    pad = width - len(own)
                    positions = result.indices[b, h, :count].tolist()
                    assert positions == sorted(set(positions)) and all(p >= pad for p in positions)
                    held[layer][b][h] = [own[p - pad] for p in positions]
            out[(scale, layer)] = [[list(ids) for ids in row] for row in held[layer]]
    return out, cache


def test_heatkv_keeps_exactly_the_scheduled_scales_per_head(tmp_path):
    schedule = VAR_256
    heat = _random_schedule(num_layers=2, num_heads=2, protected=3, seed=4)
    heat.save(tmp_path / "heat.json")
    policy = kvpolicy.get_policy("heatkv", budget="20%", schedule_file=str(tmp_path / "heat.json"))
    budget = policy.budget_tokens(schedule)
    held, cache = follow(policy, schedule, layers=2, heads=2)
    plan = policy.plan(schedule, 2)
    for (scale, layer), per_row in held.items():
        dropped = heat.dropped(schedule, budget, scale)[layer]
        for row in per_row:
            for h, ids in enumerate(row):
                scales = {schedule.locate(t)[0] for t in ids}
                assert scales == set(range(scale + 1)) - dropped[h], (scale, layer, h)
                caps = plan.head_capacity(scale, layer)
                if caps is not None:
                    assert len(ids) == caps[h]
    # the total the last scale reads fits the budget (over every layer and head)
    last = schedule.num_scales - 2
    total = sum(len(ids) for layer in range(2) for ids in held[(last, layer)][0])
    assert total <= 2 * 2 * budget


def test_heatkv_calibrated_schedule_saved_and_reloaded_reproduces_the_plan_and_the_tokens(tmp_path):
    """Calibrate once, reuse: a schedule derived from calibration statistics (attention of random
    queries; head 1 of each layer planted to attend to the current map only, so its earlier scales
    go first), exported with the policy's plan-file option and reloaded, gives the same plan and
    keeps the same tokens as the calibrated policy."""
    schedule = VAR_256
    measures = kvpolicy.calibration_measures(schedule, ["heatkv"])
    collector = kvpolicy.AttentionStatsCollector(2, schedule.num_scales, measures, seed=0)
    g = torch.Generator().manual_seed(11)
    u = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=0)
    for scale in range(schedule.num_scales):
        start = schedule.offsets[scale]
        keys = torch.nn.functional.normalize(torch.randn(1, 2, schedule.cumulative[scale], 8, generator=g), dim=-1)
        keys[:, 1, :start], keys[:, 1, start:] = -u, u  # head 1: logits -8 on history, +8 on the map
        for layer in range(2):
            queries = 4 * torch.nn.functional.normalize(torch.randn(1, 2, schedule.tokens(scale), 8, generator=g),
                                                        dim=-1)
            queries[:, 1] = 8 * u
            collector.observe(layer, scale, queries, keys, current_start=start)
    stats = collector.statistics(source="planted")
    calibrated = kvpolicy.get_policy("heatkv", budget="20%", calibration=stats)
    path = tmp_path / "heat.json"
    calibrated.export_plan_file(schedule, 2, path)
    reloaded = kvpolicy.get_policy("heatkv", budget="20%", schedule_file=str(path))
    plan = calibrated.plan(schedule, 2)
    assert reloaded.plan(schedule, 2) == plan
    caps = [plan.head_capacity(s, l) for s in range(schedule.num_scales) for l in range(2)]
    assert any(c is not None and len(set(c)) > 1 for c in caps)  # heads differ: the schedule is not trivial
    # the planted head 1 (no attention on history) loses its earlier scales before head 0
    last = schedule.num_scales - 2
    assert all(plan.head_capacity(last, l)[1] <= plan.head_capacity(last, l)[0] for l in range(2))
    held_a, _ = follow(calibrated, schedule, layers=2, heads=2, seed=5)
    held_b, _ = follow(reloaded, schedule, layers=2, heads=2, seed=5)
    assert held_a == held_b


def test_head_aware_structural_heads_keep_the_most_recent_tokens():
    schedule = VAR_256
    policy = kvpolicy.get_policy("head_aware", budget=40, kinds=[["contextual", "structural"]] * 2,
                                 window_size=4, kernel_size=3)
    held, _ = follow(policy, schedule, layers=2, heads=2)
    plan = policy.plan(schedule, 2)
    for (scale, layer), per_row in held.items():
        caps = plan.head_capacity(scale, layer)
        for row in per_row:
            context, structural = row
            end = schedule.cumulative[scale]
            if caps is None:
                assert structural == list(range(end))
                continue
            assert caps[0] < caps[1] and caps[0] + caps[1] <= 2 * 40
            assert structural == list(range(end - len(structural), end)) and len(structural) == min(caps[1], end)
            window = list(range(end - min(4, schedule.tokens(scale)), end))
            assert set(window) <= set(context) and len(context) == min(caps[0], end)


def test_adakv_rows_share_the_layer_budget_across_heads():
    schedule = VAR_256
    policy = kvpolicy.get_policy("adakv", budget=30, window_size=4, kernel_size=3, floor_alpha=0.25)
    held, _ = follow(policy, schedule, layers=1, heads=3)
    floor = math.floor(0.25 * (30 - 4))
    uneven = False
    for (scale, layer), per_row in held.items():
        for row in per_row:
            sizes = [len(ids) for ids in row]
            if schedule.cumulative[scale] <= 30:
                assert sizes == [schedule.cumulative[scale]] * 3
                continue
            assert sum(sizes) == 3 * 30 and min(sizes) >= floor + min(4, schedule.tokens(scale))
            uneven |= len(set(sizes)) > 1
            window = set(range(schedule.cumulative[scale] - 4, schedule.cumulative[scale]))
            assert all(window <= set(ids) for ids in row)
    assert uneven  # the point of AdaKV: heads do not all keep the same number


def test_head_aware_contextual_heads_match_a_float64_vote_reference():
    """One compression of a dense cache: the contextual head keeps the window plus the top pooled
    window votes (reference: float64 loops), the structural head the most recent tokens."""
    schedule = ScaleSchedule([1, 2, 3, 4, 5])
    scale, window, kernel, budget = 4, 3, 3, 24
    length, n = schedule.cumulative[scale], schedule.tokens(scale)
    g = torch.Generator().manual_seed(7)
    keys = torch.nn.functional.normalize(torch.randn(1, 2, length, 8, generator=g, dtype=torch.float64), dim=-1)
    queries = 5 * torch.nn.functional.normalize(torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64), dim=-1)
    policy = kvpolicy.get_policy("head_aware", budget=budget, kinds=[["contextual", "structural"]],
                                 window_size=window, kernel_size=kernel, pooling="max", contextual_ratio=0.5)
    caps = policy.plan(schedule, 1).head_capacity(scale, 0)
    result = kvpolicy.compress(policy, keys.float(), keys.float(), schedule=schedule, scale=scale, layer=0,
                               num_layers=1, queries=queries.float())
    kept = [result.indices[0, h, :int(result.lengths[0, h])].tolist() for h in range(2)]
    # reference, head 0 (contextual)
    votes = [0.0] * length
    for i in range(n - window, n):
        logits = [float(queries[0, 0, i] @ keys[0, 0, j]) for j in range(length)]
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        total = sum(weights)
        for j in range(length):
            votes[j] += weights[j] / total
    candidates = length - window
    pooled = [max(votes[max(0, j - 1):min(candidates, j + 2)]) for j in range(candidates)]
    best = sorted(range(candidates), key=lambda j: -pooled[j])[: caps[0] - window]
    chosen, windowed = kept[0][: caps[0] - window], kept[0][caps[0] - window:]
    assert windowed == list(range(candidates, length))
    # max pooling makes neighbours tie: compare the kept scores, not which of two equal ones won
    assert sorted(pooled[j] for j in chosen) == pytest.approx(sorted(pooled[j] for j in best), abs=1e-6)
    assert kept[1] == list(range(length - caps[1], length))


def test_heatkv_released_infinity_orders_fit_the_budget():
    """The authors' released S-CAS orders (shipped data) plan Infinity-2B at 10 %: the cache the last
    scale reads holds at most 32 x 16 x 643 tokens in all, every head a union of whole scales."""
    from itertools import combinations

    schedule = ScaleSchedule([1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64])  # Infinity 1024^2, 1:1
    policy = kvpolicy.get_policy("heatkv", budget="10%", schedule_file="infinity-2b")
    plan = policy.plan(schedule, 32)
    budget = plan.budget_tokens
    assert budget == 643
    heads = [plan.head_capacity(11, layer) for layer in range(32)]
    assert sum(sum(h) for h in heads) <= 32 * 16 * budget < sum(sum(h) for h in heads) + 2 * (6425 - 21)
    sums = {sum(c) for k in range(10) for c in combinations(schedule.lengths[3:12], k)}
    assert all(cap - 21 in sums for h in heads for cap in h)
    assert len({cap for h in heads for cap in h}) > 10  # heads differ: the point of HeatKV
    with pytest.raises(ValueError, match="covers 13 scales x 32 layers x 16 heads"):
        policy.plan(schedule, 40)


def test_head_aware_prior_allocation_follows_history_reliance():
    from policies.head_aware import prior_head_capacities

    # 4 heads, budget 50 (200 in all), floor 10: 160 shared as 1:1:2:4 -> 20, 20, 40, 80 (+ floors)
    assert prior_head_capacities([0.1, 0.1, 0.2, 0.4], 50, 1000, 10) == (30, 30, 50, 90)
    # a head cannot hold more than the cache: its excess goes to the others
    capped = prior_head_capacities([0.0, 0.0, 0.0, 1.0], 50, 100, 10)
    assert capped[3] == 100 and sum(capped) == 200 and min(capped) >= 10
    assert prior_head_capacities([1, 2], 50, 40, 10) == (40, 40)


def test_head_aware_prior_plan_from_statistics():
    schedule = ScaleSchedule([1, 2, 3, 4, 6])
    history = [[[None, None]] + [[0.2, 0.6]] * 4]  # layer 0: head 1 relies 3x more on earlier scales
    locality = [[[0.9, 0.1]] * 5]
    counts = [[4] * 5]
    stats = kvpolicy.AttentionStatistics(num_layers=1, num_scales=5, num_heads=2,
                                         means={"head_aware/history_mass": history, "head_aware/locality": locality},
                                         counts={"head_aware/history_mass": counts, "head_aware/locality": counts})
    policy = kvpolicy.get_policy("head_aware", budget=20, calibration=stats, allocation="prior", window_size=4,
                                 min_map_tokens=1)
    plan = policy.plan(schedule, 1)
    assert plan.head_capacity(4, 0) == (4 + 8, 4 + 24)  # 32 shared 1:3 after the windows
    assert policy.head_kinds(schedule, 1) == (("structural", "contextual"),)
    with pytest.raises(ValueError, match="allocation='prior' needs calibration"):
        kvpolicy.get_policy("head_aware", budget=20, stand_in_heads=2, allocation="prior").plan(schedule, 1)


def test_adaptive_heads_wrap_any_scored_selector():
    from policies.adakv import AdaptiveHeads
    from policies.common import PatchWindowSelector, UniformAllocation

    kvpolicy.compose("test_adakv_patch", AdaptiveHeads, UniformAllocation, PatchWindowSelector)
    policy = kvpolicy.get_policy("test_adakv_patch", budget=30, window_size=4, kernel_size=3, floor_alpha=0.5)
    assert policy.head_adaptive
    held, _ = follow(policy, VAR_256, layers=1, heads=3)
    for (scale, _), per_row in held.items():
        for row in per_row:
            if VAR_256.cumulative[scale] > 30:
                assert sum(len(ids) for ids in row) <= 3 * 30 and min(len(ids) for ids in row) >= 13 + 4
