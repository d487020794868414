"""The descriptive attention-structure measures every calibration records (entropy, history locality),
checked against per-query loops and against cases with a known answer."""

import math

import pytest
import torch

import kvpolicy
from kvpolicy import ScaleSchedule
from kvpolicy.attention_stats import (ENTROPY, HISTORY_LOCALITY, entropy_measure, history_locality_measure,
                                      shared_collector, uniform_history_locality)

SCHEDULE = ScaleSchedule([(1, 1), (2, 2), (3, 3), (2, 4), (5, 5)])


def _observe_all(measures, queries_per_scale, keys, layers=1):
    collector = kvpolicy.AttentionStatsCollector(layers, SCHEDULE.num_scales, measures, max_queries=1000)
    for scale in range(SCHEDULE.num_scales):
        end = SCHEDULE.offsets[scale] + SCHEDULE.tokens(scale)
        collector.observe(0, scale, queries_per_scale[scale], keys[:, :, :end], current_start=SCHEDULE.offsets[scale])
    return collector


def _random_inputs(seed=0, batch=2, heads=2, dim=8):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, SCHEDULE.total, dim, generator=g)
    queries = [2 * torch.randn(batch, heads, SCHEDULE.tokens(s), dim, generator=g) for s in range(SCHEDULE.num_scales)]
    return queries, keys


def _cell(token):
    """(scale, row, col) of a token by walking the maps (independent of ScaleSchedule.locate)."""
    for scale, (h, w) in enumerate(SCHEDULE.shapes):
        if token < h * w:
            return scale, token // w, token % w
        token -= h * w
    raise AssertionError


def _local_share(history, scale, i, radius=1):
    """Share of history attention ``history`` (over the tokens before ``scale``) that query ``i`` of
    ``scale``'s map puts within ``radius`` cells of its centre, by a loop over the history tokens."""
    h, w = SCHEDULE.shapes[scale]
    y, x = (i // w + 0.5) / h, (i % w + 0.5) / w
    local = 0.0
    for j in range(SCHEDULE.offsets[scale]):
        key_scale, row, col = _cell(j)
        kh, kw = SCHEDULE.shapes[key_scale]
        if abs(row - math.floor(y * kh)) <= radius and abs(col - math.floor(x * kw)) <= radius:
            local += float(history[j])
    return local / float(sum(history))


def test_entropy_matches_a_per_query_loop():
    queries, keys = _random_inputs()
    collector = _observe_all([entropy_measure()], queries, keys)
    means = collector.layer_means(ENTROPY)
    assert means[0][0] is None  # a one-key cache has no entropy
    for scale in range(1, SCHEDULE.num_scales):
        end = SCHEDULE.offsets[scale] + SCHEDULE.tokens(scale)
        values = []
        for b in range(2):
            for h in range(2):
                for i in range(SCHEDULE.tokens(scale)):
                    p = torch.softmax(keys[b, h, :end].double() @ queries[scale][b, h, i].double(), dim=0).tolist()
                    values.append(-sum(x * math.log(x) for x in p if x > 0) / math.log(end))
        assert means[0][scale] == pytest.approx(sum(values) / len(values), rel=1e-5)


def test_entropy_is_one_for_uniform_and_near_zero_for_one_hot_attention():
    _, keys = _random_inputs(1)
    zeros = [torch.zeros(2, 2, SCHEDULE.tokens(s), 8) for s in range(SCHEDULE.num_scales)]
    uniform = _observe_all([entropy_measure()], zeros, keys).layer_means(ENTROPY)[0]
    assert uniform[1:] == pytest.approx([1.0] * (SCHEDULE.num_scales - 1), abs=1e-6)
    # every query equal to a large multiple of key 0 (keys orthonormal-ish): all mass on key 0
    keys = torch.zeros(1, 1, SCHEDULE.total, SCHEDULE.total)
    keys[0, 0] = torch.eye(SCHEDULE.total)
    sharp = [100 * keys[:, :, :1].expand(1, 1, SCHEDULE.tokens(s), SCHEDULE.total) for s in range(SCHEDULE.num_scales)]
    peaked = _observe_all([entropy_measure()], sharp, keys).layer_means(ENTROPY)[0]
    assert max(peaked[1:]) < 1e-3


def test_history_locality_matches_a_per_query_loop():
    queries, keys = _random_inputs(2)
    collector = _observe_all([history_locality_measure(SCHEDULE, radius=1)], queries, keys)
    means = collector.layer_means(HISTORY_LOCALITY)
    assert means[0][0] is None  # the first map has no history
    for scale in range(1, SCHEDULE.num_scales):
        start = SCHEDULE.offsets[scale]
        h, w = SCHEDULE.shapes[scale]
        values = []
        for b in range(2):
            for head in range(2):
                for i in range(h * w):
                    p = torch.softmax(keys[b, head, :start + h * w].double() @ queries[scale][b, head, i].double(), 0)
                    values.append(_local_share(p[:start], scale, i))
        assert means[0][scale] == pytest.approx(sum(values) / len(values), rel=1e-5)


def test_history_locality_known_answers():
    _, keys = _random_inputs(3)
    zeros = [torch.zeros(2, 2, SCHEDULE.tokens(s), 8) for s in range(SCHEDULE.num_scales)]
    # uniform attention scores the neighbourhood's share of the history tokens
    for radius in (0, 1):
        got = _observe_all([history_locality_measure(SCHEDULE, radius=radius)], zeros, keys).layer_means(HISTORY_LOCALITY)
        for scale in range(1, SCHEDULE.num_scales):
            assert got[0][scale] == pytest.approx(uniform_history_locality(SCHEDULE, scale, radius), rel=1e-6)
    # scale 1 (2x2) reads the 1x1 map only: its one history key is every query's neighbour
    assert uniform_history_locality(SCHEDULE, 1, 0) == 1.0
    # scale 2 (3x3) with radius 0: the history is the 1x1 token (always under the query) and the 2x2 map,
    # whose cell under each query is one of 4: (1 + 1) / 5 history tokens
    assert uniform_history_locality(SCHEDULE, 2, 0) == pytest.approx(2 / 5)
    # attention all on the 1x1 token (local to every query at radius 0) -> 1; all on a far cell -> 0
    keys = torch.zeros(1, 1, SCHEDULE.total, SCHEDULE.total)
    keys[0, 0] = torch.eye(SCHEDULE.total)
    at_first = [100 * keys[:, :, :1].expand(1, 1, SCHEDULE.tokens(s), SCHEDULE.total) for s in range(SCHEDULE.num_scales)]
    got = _observe_all([history_locality_measure(SCHEDULE, radius=0)], at_first, keys).layer_means(HISTORY_LOCALITY)
    assert got[0][1:] == pytest.approx([1.0] * (SCHEDULE.num_scales - 1), abs=1e-6)
    # every scale-2 (3x3) query attending to the 2x2 map's bottom-right token (1 + 3): under radius 0
    # it is local to the 4 queries whose centre falls in that cell (rows and cols 1-2) -> 4/9
    queries = [torch.zeros(1, 1, SCHEDULE.tokens(s), SCHEDULE.total) for s in range(SCHEDULE.num_scales)]
    queries[2][0, 0, :, 4] = 100.0
    got = _observe_all([history_locality_measure(SCHEDULE, radius=0)], queries, keys).layer_means(HISTORY_LOCALITY)
    assert got[0][2] == pytest.approx(4 / 9, abs=1e-6)


def test_history_locality_of_a_query_whose_history_probabilities_underflow():
    # one head attends so sharply to the current map that every history probability is 0 in float32
    # (exp(-400)): its renormalised history attention is still the softmax over the history logits
    queries, keys = _random_inputs(5, batch=1, heads=1)
    scale = 3
    start, end = SCHEDULE.offsets[scale], SCHEDULE.offsets[scale] + SCHEDULE.tokens(scale)
    keys[0, 0, start:end] = 0.0
    keys[0, 0, start:end, 0] = 50.0
    queries[scale][0, 0, :, 0] = 10.0
    logits = queries[scale][0, 0] @ keys[0, 0, :end].T
    assert (torch.softmax(logits, -1)[:, :start] == 0).all()
    got = _observe_all([history_locality_measure(SCHEDULE, radius=1)], queries, keys).layer_means(HISTORY_LOCALITY)
    h, w = SCHEDULE.shapes[scale]
    values = [_local_share(torch.softmax(logits[i, :start].double(), 0), scale, i) for i in range(h * w)]
    assert got[0][scale] == pytest.approx(sum(values) / len(values), rel=1e-5)


def test_history_locality_refuses_a_compressed_cache_and_a_bad_radius():
    measure = history_locality_measure(SCHEDULE)
    probs = torch.full((1, 1, 1, 4), 0.25)
    with pytest.raises(ValueError, match="uncompressed calibration cache"):
        measure(probs, 3, positions=torch.tensor([0]), scale=2)
    with pytest.raises(ValueError, match="radius must be an int >= 0"):
        history_locality_measure(SCHEDULE, radius=-1)


def test_the_shared_calibration_records_the_structure_measures():
    collector = shared_collector(1, SCHEDULE.num_scales, SCHEDULE, names=["scalekv"])
    queries, keys = _random_inputs(4)
    for scale in range(SCHEDULE.num_scales):
        end = SCHEDULE.offsets[scale] + SCHEDULE.tokens(scale)
        collector.observe(0, scale, queries[scale], keys[:, :, :end], current_start=SCHEDULE.offsets[scale])
    names = collector.statistics().names
    assert ENTROPY in names and HISTORY_LOCALITY in names and "current_ratio" in names
