"""ScaleKV ``mode="reference"`` against a plain restatement of the released arithmetic.

The restatement below follows ``ScaleKVCluster.update_kv`` (StargazerX0/ScaleKV @ eb0615a,
reference/scalekv.md §4.2) one (row, head) at a time: the 16 window queries times the keys in the
operands' dtype (under bf16 autocast for float32 keys with bf16 queries, as in the real pipeline),
divided by √D, window columns masked through a boolean mask, summed over the 16 rows, pooled, the
pooled scores cloned and the window masked again, a sorted top-k, the window appended, sorted.
Reference mode must keep exactly the same tokens — also where a max-pooling plateau makes scores
tie at the top-k boundary — in float32, bfloat16 and the mixed flow.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from adapters.infinity.schedule import infinity_schedule
from kvpolicy import compress, get_policy
from policies.common import patch_window
from policies.common.released_scores import released_compute_dtype

from policies.scalekv import released_budget_file
from conftest import require_golden


def restated_release(keys, raw_queries, window, capacity, *, kernel_size=5, pooling="max"):
    """The released selection, one batch row and head at a time (mixed dtypes under autocast)."""
    batch, heads, length, dim = keys.shape
    start = length - raw_queries.shape[2]
    mixed = keys.dtype != raw_queries.dtype
    low = raw_queries.dtype if raw_queries.dtype in (torch.bfloat16, torch.float16) else keys.dtype
    out = torch.empty(batch, heads, capacity, dtype=torch.long)
    for b in range(batch):
        for h in range(heads):
            window_q = raw_queries[b, h][window - start]
            with torch.autocast("cpu", dtype=low, enabled=mixed):
                logits = torch.matmul(window_q, keys[b, h].transpose(0, 1)) / math.sqrt(dim)
            mask = torch.ones(1, length, dtype=torch.bool)
            mask[0, window] = False
            logits = logits.masked_fill(~mask, float("-inf"))
            scores = logits.sum(dim=0)
            pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
            pooled = pool(scores[None], kernel_size, padding=kernel_size // 2, stride=1)[0].clone()
            pooled[window] = float("-inf")
            top = pooled.topk(capacity - window.numel()).indices
            out[b, h] = torch.cat([top, window]).sort().values
    return out


def _boundary_ties(keys, raw_queries, window, capacity):
    """How many (row, head) pairs have a tie straddling the top-k boundary (restated scores)."""
    batch, heads, length, dim = keys.shape
    start = length - raw_queries.shape[2]
    count = 0
    for b in range(batch):
        for h in range(heads):
            q = raw_queries[b, h][window - start]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=keys.dtype != q.dtype):
                logits = torch.matmul(q, keys[b, h].T) / math.sqrt(dim)
            logits[:, window] = float("-inf")
            pooled = F.max_pool1d(logits.sum(0)[None], 5, padding=2, stride=1)[0]
            pooled[window] = float("-inf")
            ranked = pooled.sort(descending=True).values
            k = capacity - window.numel()
            count += bool(ranked[k - 1] == ranked[k])
    return count


SCHEDULE = infinity_schedule(1024)
FLOWS = {
    "float32": (torch.float32, torch.float32),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "mixed": (torch.float32, torch.bfloat16),  # float32 cached keys, bf16 queries (bf16 autocast)
}


def _inputs(seed, batch, heads, length, n, dim, key_dtype, query_dtype):
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(batch, heads, length, dim, generator=g), dim=-1).to(key_dtype)
    values = torch.randn(batch, heads, length, dim, generator=g).to(key_dtype)
    raw = torch.randn(batch, heads, n, dim, generator=g).to(query_dtype)
    return keys, values, raw


@pytest.fixture(scope="module")
def budget_file():
    return released_budget_file("infinity-2b-10%")  # shipped with kvpolicy


@pytest.mark.parametrize("flow", list(FLOWS))
@pytest.mark.parametrize("layer", [0, 5], ids=["drafter", "refiner"])
def test_reference_mode_equals_restated_release_2b_geometry(flow, layer, budget_file):
    """Infinity-2B geometry (H=16, D=128) before the last scale (L=6425, the 48x48 map current)."""
    key_dtype, query_dtype = FLOWS[flow]
    scale = 11
    length, n = SCHEDULE.cumulative[scale], SCHEDULE.tokens(scale)
    keys, values, raw = _inputs(11 + layer, 1, 16, length, n, 128, key_dtype, query_dtype)
    policy = get_policy("scalekv", mode="reference", budget_file=budget_file)
    result = compress(policy, keys, values, schedule=SCHEDULE, scale=scale, layer=layer, num_layers=32,
                      raw_queries=raw)
    window = patch_window.observation_window_positions(48, 48, 16, length - n)
    expected = restated_release(keys, raw, window, result.capacity)
    assert torch.equal(result.indices, expected)
    gather = expected[..., None].expand(-1, -1, -1, 128)
    assert torch.equal(result.keys, torch.gather(keys, 2, gather))
    assert torch.equal(result.values, torch.gather(values, 2, gather))


@pytest.mark.parametrize("flow", list(FLOWS))
@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("capacity", [40, 300, 2400])  # torch's top-k: partial sort / nth_element, refiner / drafter
def test_reference_mode_equals_restated_release_on_plateaus(flow, pooling, capacity):
    """Keys on a coarse grid make many equal logits: max pooling spreads them into plateaus that
    straddle the top-k boundary, where only the same arithmetic picks the same tied tokens."""
    key_dtype, query_dtype = FLOWS[flow]
    schedule = SCHEDULE
    scale = 9  # 32x32 map, L = 2521
    length, n = schedule.cumulative[scale], schedule.tokens(scale)
    g = torch.Generator().manual_seed(3)
    keys = (torch.randint(-2, 3, (2, 4, length, 32), generator=g).float() / 4).to(key_dtype)
    values = torch.randn(2, 4, length, 32, generator=g).to(key_dtype)
    raw = (torch.randint(-2, 3, (2, 4, n, 32), generator=g).float() / 2).to(query_dtype)
    policy = get_policy("uniform", mode="reference", budget=capacity, pooling=pooling)
    result = compress(policy, keys, values, schedule=schedule, scale=scale, layer=0, num_layers=2, raw_queries=raw)
    assert result.capacity == capacity
    window = patch_window.observation_window_positions(32, 32, 16, length - n)
    assert torch.equal(result.indices, restated_release(keys, raw, window, capacity, pooling=pooling))
    if pooling == "max":
        assert _boundary_ties(keys, raw, window, capacity) > 0, "the inputs must exercise boundary ties"


def test_reference_mode_equals_restated_release_on_golden_inputs(golden_dir, budget_file):
    """The golden ScaleKV inputs in all three dtype flows (float32 is also checked against the
    released code's own outputs by test_scalekv_golden)."""
    golden = torch.load(require_golden(golden_dir / "scalekv" / "cases.pt"), weights_only=True)
    meta = golden["meta"]
    case = max(golden["cases"], key=lambda c: c["scale_ind"] if c["scale_ind"] < 12 else -1)
    si, key_len, start = case["scale_ind"], case["key_len"], case["query_start"]
    for flow, (key_dtype, query_dtype) in FLOWS.items():
        keys = (golden["key_codes"][:, :, :key_len].float() * meta["key_scale"]).to(key_dtype)
        values = (golden["value_codes"][:, :, :key_len].float() * meta["value_scale"]).to(key_dtype)
        raw = (golden["value_codes"][:, :, start:key_len].float() * meta["value_scale"]).to(query_dtype)
        policy = get_policy("scalekv", mode="reference", budget_file=budget_file)
        result = compress(policy, keys, values, schedule=SCHEDULE, scale=si, layer=case["layer_idx"],
                          num_layers=32, raw_queries=raw)
        h, w = SCHEDULE.shape(si)
        window = patch_window.observation_window_positions(h, w, 16, key_len - SCHEDULE.tokens(si))
        assert torch.equal(result.indices, restated_release(keys, raw, window, result.capacity)), flow


def test_summing_queries_first_is_not_the_release_in_bfloat16():
    """The algebra (Σq)·K in float32 (what reference mode did before) keeps other tokens than the
    release in bf16: the restatement is sensitive to the order of operations."""
    scale = 9
    length, n = SCHEDULE.cumulative[scale], SCHEDULE.tokens(scale)
    keys, _, raw = _inputs(4, 2, 4, length, n, 64, torch.bfloat16, torch.bfloat16)
    window = patch_window.observation_window_positions(32, 32, 16, length - n)
    q = raw[:, :, window - (length - n)]
    summed = patch_window.summed_window_logits(q, keys, window)
    pooled = F.max_pool1d(summed, 5, padding=2, stride=1).index_fill_(-1, window, float("-inf"))
    algebra = torch.cat([pooled.topk(284).indices, window.expand(2, 4, -1)], -1).sort(-1).values
    assert not torch.equal(algebra, restated_release(keys, raw, window, 300))


def test_compute_dtype_follows_autocast():
    assert released_compute_dtype(torch.bfloat16, torch.float32) == torch.bfloat16
    assert released_compute_dtype(torch.float32, torch.float16) == torch.float16
    assert released_compute_dtype(torch.float32, torch.float32) == torch.float32
    with pytest.raises(ValueError, match="float64"):
        released_compute_dtype(torch.float64, torch.float32)


@pytest.mark.parametrize("length", [300, 1000, 2521])
def test_blocked_cast_product_equals_whole_cache_cast(length, monkeypatch):
    """The mixed flow casts the float32 keys block by block (last block partial); the products are
    the whole-cache autocast product bit for bit."""
    from policies.common import released_scores
    monkeypatch.setattr(released_scores, "_CAST_BLOCK", 128)
    g = torch.Generator().manual_seed(length)
    keys = torch.randn(2, 3, length, 64, generator=g)
    q = torch.randn(2, 3, 16, 64, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = torch.matmul(q, keys.transpose(2, 3))
    assert torch.equal(released_scores._cast_blocked_matmul(q, keys, torch.bfloat16), whole)


def _small_case(flow, seed=5):
    key_dtype, query_dtype = FLOWS[flow]
    scale = 9  # 32x32 map, L = 2521
    length, n = SCHEDULE.cumulative[scale], SCHEDULE.tokens(scale)
    keys, values, raw = _inputs(seed, 2, 4, length, n, 32, key_dtype, query_dtype)
    window = patch_window.observation_window_positions(32, 32, 16, length - n)
    return scale, keys, values, raw, window


@pytest.mark.parametrize("flow", list(FLOWS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["history", "window"])
def test_non_finite_keys_are_refused_without_a_second_read(flow, bad, where):
    """Reference mode proves the keys finite from its own scores (compress then skips its read of
    the cache): a NaN or ±inf anywhere, a window key included, still gets the one-line error, also
    where every window query is exactly 0 in the bad key's dimension (IEEE: inf · 0 = NaN)."""
    scale, keys, values, raw, window = _small_case(flow)
    position = int(window[3]) if where == "window" else 17
    broken = keys.clone()
    broken[1, 2, position, 5] = bad
    zeroed = raw.clone()
    zeroed[..., 5] = 0
    policy = get_policy("uniform", mode="reference", budget=300)
    for queries in (raw, zeroed):
        with pytest.raises(ValueError, match=r"keys or queries at scale 9, layer 0 hold NaN or infinite values"):
            compress(policy, broken, values, schedule=SCHEDULE, scale=scale, layer=0, num_layers=2, raw_queries=queries)


@pytest.mark.parametrize("flow", list(FLOWS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_only_the_window_queries_are_checked(flow, bad):
    """Reference mode reads 16 raw query rows of the current map; its sums prove those finite, and
    compress checks no other row: a NaN or ±inf in a row the policy never reads keeps the same
    tokens as a finite row would, while one in a window row (also in a dimension where every key
    is 0: IEEE inf · 0 = NaN) still gets the one-line error."""
    scale, keys, values, raw, window = _small_case(flow)
    start = keys.shape[2] - raw.shape[2]
    policy = get_policy("uniform", mode="reference", budget=300)
    kwargs = dict(schedule=SCHEDULE, scale=scale, layer=0, num_layers=2)
    clean = compress(policy, keys, values, raw_queries=raw, **kwargs)
    outside = next(r for r in range(raw.shape[2]) if r + start not in window.tolist())
    broken = raw.clone()
    broken[1, 2, outside, 5] = bad
    result = compress(policy, keys, values, raw_queries=broken, **kwargs)
    assert torch.equal(result.indices, clean.indices) and torch.equal(result.keys, clean.keys)
    zero_dim = keys.clone()
    zero_dim[..., 5] = 0
    for cache in (keys, zero_dim):
        broken = raw.clone()
        broken[1, 2, int(window[7]) - start, 5] = bad
        with pytest.raises(ValueError, match=r"keys or queries at scale 9, layer 0 hold NaN or infinite values"):
            compress(policy, cache, values, raw_queries=broken, **kwargs)


@pytest.mark.parametrize("flow", ["float32", "mixed"])
def test_finite_keys_whose_products_overflow_are_kept(flow):
    """Finite keys whose window logits overflow fail the proof; compress reads them, finds them
    finite and keeps the selection (the release would keep a window token twice: unique tokens)."""
    scale, keys, values, raw, window = _small_case(flow)
    keys = keys * 3e38  # |k| <= 3e38: finite in float32, products with the queries overflow
    assert torch.isfinite(keys).all()
    from policies.common.released_scores import released_window_scores
    assert not released_window_scores(raw[:, :, window - (keys.shape[2] - raw.shape[2])], keys, window)[1]
    policy = get_policy("uniform", mode="reference", budget=300)
    result = compress(policy, keys, values, schedule=SCHEDULE, scale=scale, layer=0, num_layers=2, raw_queries=raw)
    assert result.indices.shape == (2, 4, 300)
    assert bool((result.indices[..., 1:] > result.indices[..., :-1]).all())
    assert bool(torch.isin(window, result.indices[0, 0]).all())


@pytest.mark.parametrize("keep", [3, 200, 2300])
def test_ascending_union_equals_appending_and_sorting(keep, monkeypatch):
    """The mask read-back that replaces the sort where most of the cache is kept gives the sorted
    union; where the top-k overlaps the window (scores whose window was not at −∞) released_topk
    falls back to the sort, duplicates and all."""
    from policies.common import released_scores
    g = torch.Generator().manual_seed(keep)
    length = 2521
    scores = torch.randn(3, 5, length, generator=g)
    window = patch_window.observation_window_positions(32, 32, 16, length - 1024)
    masked = scores.clone().index_fill_(-1, window, float("-inf"))
    top = masked.topk(keep, dim=-1, sorted=False).indices
    expected = torch.cat([top, window.expand(3, 5, -1)], -1).sort(-1).values
    union, overlap = released_scores._ascending_union(top, window, length)
    assert torch.equal(union, expected) and not bool(overlap)
    assert bool(released_scores._ascending_union(top[..., :-1].clone().index_fill_(-1, torch.tensor([0]), int(window[0])),
                                                 window, length)[1])  # a window position in the top-k: overlap
    monkeypatch.setattr(released_scores, "_MASK_KEEP_FRACTION", 10 ** 9)  # always the mask path
    assert torch.equal(released_scores.released_topk(masked, window, keep + 16), expected)
    unmasked = scores.topk(keep, dim=-1, sorted=False).indices  # may hold window positions
    overlap = torch.cat([unmasked, window.expand(3, 5, -1)], -1).sort(-1).values
    assert torch.equal(released_scores.released_topk(scores, window, keep + 16), overlap)


@pytest.mark.parametrize("threads", [1, 2])  # 2: one block, or 4x larger blocks where keys are cast
@pytest.mark.parametrize("batch", [3, 5, 6])
@pytest.mark.parametrize("flow", list(FLOWS))
def test_blocked_window_sums_are_exact_at_any_batch(batch, threads, flow):
    """The default blocks at the 2B geometry (H=16, D=128, L=6425) for batches whose block is not a
    power of two. Blocks of positions (float32; B=3: 2^18 / (3·16·16) = 341 positions): MKL's
    float32 product rounds the columns of a block that ends off its kernel's panel width differently
    from the whole product's same columns (measured: 12539 of 308400 sums differed at 341), so they
    start at multiples of 64 positions. Blocks of (row, head)s (bf16: 5 of 48 at B=3, the last
    block partial; the mixed flow at 2 threads: 20 of 48)."""
    from policies.common import released_scores
    key_dtype, query_dtype = FLOWS[flow]
    compute = released_compute_dtype(query_dtype, key_dtype)
    g = torch.Generator().manual_seed(batch)
    keys = torch.randn(batch, 16, 6425, 128, generator=g).to(key_dtype)
    q = torch.randn(batch, 16, 16, 128, generator=g).to(query_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=key_dtype != query_dtype):
        whole = (torch.matmul(q, keys.transpose(2, 3)) / math.sqrt(128)).sum(dim=2)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(released_scores._blocked_window_sums(q.to(compute), keys, compute), whole)
    finally:
        torch.set_num_threads(previous)


def test_block_sizes_at_one_and_more_threads():
    """At 1 thread blocks of ~2^19 product elements; at more, one block (fewer parallel regions),
    except where the keys are cast block by block (the mixed flow): blocks of ~2^21, so that the
    whole float32 cache is never cast at once."""
    from policies.common.released_scores import _row_block_size
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _row_block_size(48, 16, 6425, cast=True) == _row_block_size(48, 16, 6425, cast=False) == 5
        assert _row_block_size(4, 16, 10 ** 6, cast=False) == 2  # at least 2 (row, head)s
        torch.set_num_threads(2)
        assert _row_block_size(48, 16, 6425, cast=False) == 48
        assert _row_block_size(48, 16, 6425, cast=True) == 20
        assert _row_block_size(256, 16, 10521, cast=True) == 12
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("flow", list(FLOWS))
# the least block (2 (row, head)s; 64 positions), 3 of the 8 (row, head)s at L=300 (last block partial), the whole cache
@pytest.mark.parametrize("block_elements", [1, 3000, 15000, 1 << 30])
@pytest.mark.parametrize("length", [300, 2521])
@pytest.mark.parametrize("contiguous", [True, False])  # blocks of (row, head)s; of positions (a strided cache)
def test_blocked_window_sums_equal_the_whole_product(flow, block_elements, length, contiguous, monkeypatch):
    """On CPU the window logits are formed, divided and summed block by block: of whole (row, head)s
    for half-precision or cast keys of a contiguous cache, else of positions (last block partial);
    the sums are the whole product's (as the release forms it) bit for bit."""
    from policies.common import released_scores
    monkeypatch.setattr(released_scores, "_SUM_BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(released_scores, "_ROW_BLOCK_ELEMENTS", block_elements)
    key_dtype, query_dtype = FLOWS[flow]
    keys, _, q = _inputs(length, 2, 4, length, 16, 64, key_dtype, query_dtype)
    if not contiguous:
        keys = keys.transpose(1, 2).contiguous().transpose(1, 2)
        assert not keys.is_contiguous()
    compute = released_compute_dtype(query_dtype, key_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=key_dtype != query_dtype):
        whole = (torch.matmul(q, keys.transpose(2, 3)) / math.sqrt(64)).sum(dim=2)
    assert whole.dtype == compute
    assert torch.equal(released_scores._blocked_window_sums(q.to(compute), keys, compute), whole)
