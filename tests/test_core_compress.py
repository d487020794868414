"""compress: input validation, the keep-all path, checks on what a policy returns, simple baselines."""

import attrs
import pytest
import torch

import kvpolicy
from kvpolicy import Policy, ScaleSchedule, Selection, compress

SCHEDULE = ScaleSchedule([1, 2, 4, 6])  # cumulative 1, 5, 21, 57
KW = dict(schedule=SCHEDULE, scale=3, layer=0, num_layers=2)


def tensors(batch=2, heads=2, length=57, dim=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, heads, length, dim, generator=g).to(dtype),
            torch.randn(batch, heads, length, dim, generator=g).to(dtype))


@attrs.define(kw_only=True)
class Returns(Policy):
    """Returns whatever the test hands it (unregistered)."""

    indices: object = None

    def select(self, keys, values, ctx):
        return Selection(self.indices, ctx.state)


def test_keep_all_when_under_capacity():
    keys, values = tensors(length=21)
    result = compress(kvpolicy.get_policy("sliding_window", budget=21), keys, values, **{**KW, "scale": 2})
    assert result.keys is keys and result.values is values and result.capacity == 21
    assert torch.equal(result.indices, torch.arange(21).expand(2, 2, 21))


def test_sliding_window_and_streamingllm_exact_indices():
    keys, values = tensors(dtype=torch.bfloat16)
    result = compress(kvpolicy.get_policy("sliding_window", budget=10), keys, values, **KW)
    assert result.indices.tolist() == [[list(range(47, 57))] * 2] * 2
    assert torch.equal(result.keys, keys[:, :, 47:]) and torch.equal(result.values, values[:, :, 47:])
    assert result.keys.dtype == torch.bfloat16 and result.keys.is_contiguous()
    result = compress(kvpolicy.get_policy("streamingllm", budget=10), keys, values, **KW)
    assert result.indices[0, 0].tolist() == [0, 1, 2, 3] + list(range(51, 57))
    result = compress(kvpolicy.get_policy("streamingllm", budget=3, num_sinks=4), keys, values, **KW)
    assert result.indices[1, 1].tolist() == [0, 1, 2]  # budget below the sink count: first B sinks
    result = compress(kvpolicy.get_policy("streamingllm", budget=5, num_sinks=0), keys, values, **KW)
    assert result.indices[1, 0].tolist() == list(range(52, 57))
    # The kept tensors are compact copies: the input can be freed or overwritten.
    kept = result.keys.clone()
    keys.zero_()
    assert torch.equal(result.keys, kept)


def test_gqa_queries_are_accepted_and_checked():
    keys, values = tensors()
    policy = kvpolicy.get_policy("snapkv", budget=20, window_size=4)
    result = compress(policy, keys, values, queries=torch.randn(2, 4, 36, 4), **KW)
    assert result.indices.shape == (2, 2, 20)
    with pytest.raises(ValueError, match=r"queries shape \(2, 3, 36, 4\) does not fit keys \(2, 2, 57, 4\)"):
        compress(policy, keys, values, queries=torch.randn(2, 3, 36, 4), **KW)
    with pytest.raises(ValueError, match=r"queries shape \(1, 2, 36, 4\)"):
        compress(policy, keys, values, queries=torch.randn(1, 2, 36, 4), **KW)
    with pytest.raises(ValueError, match=r"queries must be a \(B, H, n_current, D\) tensor, got torch.Size\(\[2, 36, 4\]\)"):
        compress(policy, keys, values, queries=torch.randn(2, 36, 4), **KW)
    with pytest.raises(ValueError, match=r"queries head dim 8 does not match the keys' head dim 4"):
        compress(policy, keys, values, queries=torch.randn(2, 2, 36, 8), **KW)
    with pytest.raises(TypeError, match="queries must be floating point, got torch.int64"):
        compress(policy, keys, values, queries=torch.ones(2, 2, 36, 4, dtype=torch.long), **KW)
    raw_policy = kvpolicy.get_policy("uniform", mode="reference", budget=20, window_size=4)
    with pytest.raises(ValueError, match=r"raw_queries head dim 3 does not match the keys' head dim 4"):
        compress(raw_policy, keys, values, raw_queries=torch.randn(2, 2, 36, 3), **KW)
    with pytest.raises(ValueError, match="queries is on meta but keys are on cpu"):
        compress(policy, keys, values, queries=torch.randn(2, 2, 36, 4, device="meta"), **KW)
    with pytest.raises(ValueError, match=r"policy 'snapkv' needs queries= \(the current map's attention queries\)"):
        compress(policy, keys, values, **KW)


def test_shape_dtype_device_errors():
    keys, values = tensors()
    policy = kvpolicy.get_policy("sliding_window", budget=10)
    cases = [
        (dict(keys=keys, values=values[:, :1]), ValueError, r"keys \(2, 2, 57, 4\) and values \(2, 1, 57, 4\) must agree on \(B, H, L, D\)"),
        (dict(keys=keys, values=values[:1]), ValueError, r"must agree on \(B, H, L, D\)"),
        (dict(keys=keys[0], values=values), ValueError, r"keys must be a \(B, H, L, D\) tensor, got torch.Size\(\[2, 57, 4\]\)"),
        (dict(keys=keys.numpy(), values=values), ValueError, r"keys must be a \(B, H, L, D\) tensor"),
        (dict(keys=keys, values=values.to(torch.int32)), TypeError, "values must be floating point, got torch.int32"),
        (dict(keys=keys, values=values.to("meta")), ValueError, "keys are on cpu but values on meta"),
        (dict(keys=keys[:, :, :20], values=values[:, :, :20]), ValueError, r"cache length 20 at scale 3 must lie in 36\.\.57"),
        (dict(keys=keys, values=values, scale=4), IndexError, r"scale 4 out of range 0\.\.3"),
        (dict(keys=keys, values=values, layer=-1), IndexError, r"layer -1 out of range 0\.\.1"),
        (dict(keys=keys, values=values, num_layers=0), ValueError, "num_layers must be a positive int, got 0"),
        (dict(keys=keys, values=values, schedule=[1, 2, 4, 6]), TypeError, "schedule must be a ScaleSchedule, got list"),
    ]
    for overrides, error, pattern in cases:
        args = {**KW, **overrides}
        with pytest.raises(error, match=pattern):
            compress(policy, args.pop("keys"), args.pop("values"), **args)
    with pytest.raises(TypeError, match="policy must be a Policy"):
        compress("sliding_window", keys, values, **KW)
    # One key and one value of the same head dim per token; their dtypes may differ (Infinity: K fp32, V bf16).
    with pytest.raises(ValueError, match=r"keys \(2, 2, 57, 4\) and values \(2, 2, 57, 7\) must agree on \(B, H, L, D\)"):
        compress(policy, keys, torch.randn(2, 2, 57, 7), **KW)
    mixed = compress(policy, keys, values.bfloat16(), **KW)
    assert mixed.keys.dtype == torch.float32 and mixed.values.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["snapkv", "sliding_window"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_keys_or_queries_are_refused_where_tokens_are_selected(name, bad, dtype):
    policy = kvpolicy.get_policy(name, budget=10, **({"window_size": 4} if name == "snapkv" else {}))
    keys, values = torch.randn(2, 2, 57, 4).to(dtype), torch.randn(2, 2, 57, 4).to(dtype)
    queries = torch.randn(2, 2, 36, 4).to(dtype)
    broken = keys.clone()
    broken[1, 0, 3, 2] = bad
    with pytest.raises(ValueError, match=r"keys or queries at scale 3, layer 0 hold NaN or infinite values"):
        compress(policy, broken, values, queries=queries, **KW)
    if name == "snapkv":
        broken_q = queries.clone()
        broken_q[0, 1, 5, 0] = bad
        with pytest.raises(ValueError, match="hold NaN or infinite values"):
            compress(policy, keys, values, queries=broken_q, **KW)
    # NaN in the values is the model's business (values are copied, never scored)
    odd_values = values.clone()
    odd_values[0, 0, 0, 0] = bad
    assert compress(policy, keys, odd_values, queries=queries, **KW).indices.shape == (2, 2, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_finite_keys_are_not_taken_for_infinite(dtype):
    """Finite values whose sum overflows (a float32 sum of the cache reaches inf) are still finite."""
    big = torch.finfo(dtype).max / 2
    keys = torch.full((2, 2, 57, 4), big, dtype=dtype)
    keys[0, 0, ::2] = -big
    values = torch.randn(2, 2, 57, 4).to(dtype)
    assert not torch.isfinite(keys.sum(dtype=torch.float32))
    result = compress(kvpolicy.get_policy("sliding_window", budget=5), keys, values, **KW)
    assert result.indices.shape == (2, 2, 5) and torch.equal(result.keys, keys[..., -5:, :])


@pytest.mark.parametrize("indices,pattern", [
    (None, r"kept all 57 tokens over capacity 5"),
    (torch.arange(6).expand(2, 2, 6).clone(), r"kept 6 tokens over capacity 5"),
    (torch.tensor([0, 2, 1, 3, 4]).expand(2, 2, 5).clone(), "not unique, ascending and in 0..56"),
    (torch.tensor([0, 1, 1, 3, 4]).expand(2, 2, 5).clone(), "not unique, ascending"),
    (torch.tensor([0, 1, 2, 3, 57]).expand(2, 2, 5).clone(), "in 0..56"),
    (torch.tensor([-1, 1, 2, 3, 4]).expand(2, 2, 5).clone(), "in 0..56"),
    (torch.arange(5, dtype=torch.int32).expand(2, 2, 5).clone(), r"need \(B=2, H=2, k\) int64"),
    (torch.arange(5).expand(2, 5).clone(), r"returned indices \(2, 5\)"),
])
def test_bad_policy_output_is_caught(indices, pattern):
    keys, values = tensors()
    with pytest.raises(RuntimeError, match=pattern):
        compress(Returns(budget=5, indices=indices), keys, values, **KW)


def test_fewer_than_capacity_is_allowed_and_gathered():
    keys, values = tensors()
    picked = torch.tensor([[[3, 9], [0, 56]], [[1, 2], [10, 11]]])
    result = compress(Returns(budget=5, indices=picked), keys, values, **KW)
    assert torch.equal(result.indices, picked)
    assert torch.equal(result.keys[1, 0], keys[1, 0, [1, 2]]) and torch.equal(result.values[0, 1], values[0, 1, [0, 56]])


@pytest.mark.parametrize("q_heads", [2, 4])
def test_attention_scores_convert_half_caches_in_blocks(monkeypatch, q_heads):
    """One query block: keys converted block by block (here 7 positions, the last block partial),
    equal to the whole-cache float32 product; many query blocks (H2O) take the one-copy path."""
    from kvpolicy import scoring

    monkeypatch.setattr(scoring, "_LOGIT_BLOCK_POSITIONS", 7)
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 2, 45, 8, generator=g).bfloat16()
    queries = torch.randn(2, q_heads, 5, 8, generator=g).bfloat16()
    grouped = queries.float().reshape(2, 2, q_heads // 2, 5, 8)
    logits = torch.einsum("bhgqd,bhld->bhgql", grouped, keys.float())
    for softmax in (True, False):
        expected = (torch.softmax(logits, dim=-1) if softmax else logits).sum(dim=3).mean(dim=2)
        torch.testing.assert_close(scoring.attention_scores(queries, keys, softmax=softmax), expected,
                                   rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(scoring, "_BLOCK_ELEMENTS", 2 * 2 * (q_heads // 2) * 45)  # one query per block
    torch.testing.assert_close(scoring.attention_scores(queries, keys), torch.softmax(logits, -1).sum(3).mean(2),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_tokens_copies_exactly_what_torch_gather_selects(dtype):
    """The fast row copy must equal torch.gather bit for bit, also for non-contiguous inputs and k=0."""
    from kvpolicy.compress import gather_tokens

    generator = torch.Generator().manual_seed(3)
    base = torch.randn(3, 7, 2, 5, generator=generator).to(dtype)
    tensor = base.permute(0, 2, 1, 3)  # (B=3, H=2, L=7, D=5), not contiguous
    for kept in (0, 1, 4, 7):
        indices = torch.stack([torch.randperm(7, generator=generator)[:kept].sort().values for _ in range(6)]).view(3, 2, kept)
        expected = torch.gather(tensor, 2, indices.unsqueeze(-1).expand(-1, -1, -1, 5))
        got = gather_tokens(tensor, indices)
        assert got.shape == (3, 2, kept, 5) and got.is_contiguous()
        assert torch.equal(got, expected)


def test_non_finite_keys_of_a_ragged_cache_are_refused():
    from kvpolicy.ragged import gather_ragged
    keys, values = torch.randn(2, 2, 57, 4), torch.randn(2, 2, 57, 4)
    lengths = torch.tensor([[50, 57], [45, 57]])
    indices = torch.arange(57).expand(2, 2, 57)
    keys[1, 0, 0, 1] = float("nan")  # row 1, head 0 keeps positions 0..44: the NaN is held
    ragged_keys, ragged_values = gather_ragged(keys, indices, lengths), gather_ragged(values, indices, lengths)
    policy = kvpolicy.get_policy("sliding_window", budget=10)
    with pytest.raises(ValueError, match=r"keys or queries at scale 3, layer 0 hold NaN or infinite values"):
        compress(policy, ragged_keys, ragged_values, **KW)
    keys[1, 0, 0, 1] = 0.0
    kept = compress(policy, gather_ragged(keys, indices, lengths), ragged_values, **KW)
    assert tuple(kept.indices.shape[:2]) == (2, 2)


@attrs.define(kw_only=True)
class Proves(Policy):
    """Keeps the last 10 tokens and hands compress a keys_finite proof (unregistered)."""

    proof: object = None
    query_proof: object = None

    def select(self, keys, values, ctx):
        indices = torch.arange(ctx.length - 10, ctx.length).expand(keys.shape[0], keys.shape[1], 10)
        return Selection(indices, ctx.state, keys_finite=self.proof, queries_finite=self.query_proof)


def test_a_failed_keys_finite_proof_proves_nothing():
    """keys_finite=False (e.g. finite keys whose products overflowed) makes compress read the keys
    itself: finite keys are kept, NaN keys are still refused."""
    keys, values = tensors()
    result = compress(Proves(budget=10, proof=torch.tensor(False)), keys, values, **KW)
    assert torch.equal(result.keys, keys[:, :, -10:])
    broken = keys.clone()
    broken[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="hold NaN or infinite values"):
        compress(Proves(budget=10, proof=torch.tensor(False)), broken, values, **KW)
    # a proven cache is not read again, but the queries still are
    queries = torch.randn(2, 2, 36, 4)
    queries[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="hold NaN or infinite values"):
        compress(Proves(budget=10, proof=torch.tensor(True)), keys, values, raw_queries=queries, **KW)


def test_a_queries_finite_proof_replaces_compress_reading_the_queries():
    """queries_finite=True: the policy proved finite every query row it read, so compress reads no
    query (a row the policy never read cannot change its choice); the keys are still read. False
    proves nothing: compress reads the queries, and what a True proof covers is not read again."""
    keys, values = tensors()
    queries = torch.randn(2, 2, 36, 4)
    queries[1, 0, 0, 0] = float("nan")
    kept = compress(Proves(budget=10, query_proof=torch.tensor(True)), keys, values, raw_queries=queries,
                    queries=queries, **KW)
    assert torch.equal(kept.keys, keys[:, :, -10:])
    with pytest.raises(ValueError, match="hold NaN or infinite values"):
        compress(Proves(budget=10, query_proof=torch.tensor(False)), keys, values, raw_queries=queries, **KW)
    broken = keys.clone()
    broken[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="hold NaN or infinite values"):
        compress(Proves(budget=10, query_proof=torch.tensor(True)), broken, values, raw_queries=queries, **KW)
    # a failed keys proof re-reads the keys only: the proven queries' NaN row is still never read
    kept = compress(Proves(budget=10, proof=torch.tensor(False), query_proof=torch.tensor(True)), keys, values,
                    raw_queries=queries, **KW)
    assert torch.equal(kept.keys, keys[:, :, -10:])


def test_a_malformed_keys_finite_proof_is_a_policy_error():
    keys, values = tensors()
    with pytest.raises(RuntimeError, match=r"policy '' returned keys_finite=True; need a one-element bool tensor"):
        compress(Proves(budget=10, proof=True), keys, values, **KW)
    with pytest.raises(RuntimeError, match=r"policy '' returned queries_finite=1; need a one-element bool tensor"):
        compress(Proves(budget=10, query_proof=1), keys, values, **KW)
