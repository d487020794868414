"""A compress call reads the device at most once (issue 12: "no per-call host syncs beyond one").

On a GPU every read of a device value into Python (``bool(t)``, ``t.item()``, ``int(t)``,
``t.tolist()``, ``t.numpy()``, a copy to the CPU) waits for all queued work, and so does every
operation whose output size depends on the data (``nonzero``, boolean-mask indexing, ``unique``).
These tests run on CPU, so they count those operations instead of timing anything: every aten op
of the call passes through a ``TorchDispatchMode`` (``_local_scalar_dense`` is what ``bool``,
``int``, ``float`` and ``item`` call; the data-dependent ops are listed), and the Python-level
reads that bypass the dispatcher (``tolist``, ``numpy``, ``__array__``) are patched with counters.
A sync added anywhere in the call (core, selector, scoring helpers) is counted.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvpolicy import ScaleSchedule, compress, get_policy
from kvpolicy.ragged import Ragged

SCHEDULE = ScaleSchedule([1, 2, 4, 6, 8, 12])  # cumulative 1, 5, 21, 57, 121, 265

# Ops that make the host wait for the device: a scalar read, or an output whose size is data-dependent.
_SYNCING_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique",
                "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::unique_dim_consecutive",
                "aten::equal", "aten::is_nonzero", "aten::repeat_interleave"}


class _CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in _SYNCING_OPS and not (name == "aten::repeat_interleave" and kwargs.get("output_size") is not None):
            self.syncs.append(str(func))
        elif name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self.syncs.append(f"{func} with a bool mask")
        elif name in ("aten::_to_copy", "aten::copy_") and _leaves_device(func, args, kwargs):
            self.syncs.append(f"{func} to the host")
        return func(*args, **kwargs)


def _leaves_device(func, args, kwargs) -> bool:
    source = args[1] if func._schema.name == "aten::copy_" else args[0]
    target = args[0].device if func._schema.name == "aten::copy_" else kwargs.get("device", source.device)
    return source.device.type != "cpu" and torch.device(target).type == "cpu"


@pytest.fixture
def count_syncs(monkeypatch):
    """Call ``count_syncs(fn)``: fn's result and the list of its host syncs."""
    def run(fn):
        mode = _CountSyncs()
        for name in ("tolist", "numpy", "__array__"):
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, _name=name, **kwargs):
                mode.syncs.append(f"Tensor.{_name}")
                return _original(self, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)
        try:
            with mode:
                result = fn()
        finally:
            monkeypatch.undo()
        return result, mode.syncs
    return run


def test_the_counter_sees_every_kind_of_sync(count_syncs):
    """Each way of reading the device counts once (else the tests below could not fail)."""
    t = torch.arange(6.0)
    for read in (lambda: bool(t[0] > 1), lambda: t[1].item(), lambda: int(t[2]), lambda: float(t[3]),
                 lambda: t.tolist(), lambda: t.numpy(), lambda: t.nonzero(), lambda: t[t > 2],
                 lambda: t.unique(), lambda: torch.equal(t, t)):
        assert len(count_syncs(read)[1]) == 1
    assert count_syncs(lambda: torch.nonzero_static(t, size=6))[1] == []
    assert count_syncs(lambda: (t > 2).all() & (t < 9).all())[1] == []


def _inputs(batch=2, heads=4, dim=8, scale=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    length, n = SCHEDULE.cumulative_length(scale), SCHEDULE.tokens(scale)
    keys = torch.randn(batch, heads, length, dim, generator=g).to(dtype)
    values = torch.randn(batch, heads, length, dim, generator=g).to(dtype)
    queries = torch.randn(batch, heads, n, dim, generator=g).to(dtype)
    return keys, values, queries


@pytest.mark.parametrize("mode", ["reference", "attention"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("layer", [0, 1])  # keeps 253 of 265 (indices ordered by a mask), 47 (by a sort)
def test_scalekv_dense_compress_reads_the_device_once(count_syncs, mode, dtype, in_place, layer):
    policy = get_policy("scalekv", mode=mode, budget=150, drafters=[0])
    keys, values, queries = _inputs(dtype=dtype)
    expected = compress(policy, keys.clone(), values.clone(), schedule=SCHEDULE, scale=5, layer=layer, num_layers=2,
                        **{"raw_queries" if mode == "reference" else "queries": queries})
    assert expected.indices.shape[2] < keys.shape[2]  # it does evict
    result, syncs = count_syncs(lambda: compress(
        policy, keys, values, schedule=SCHEDULE, scale=5, layer=layer, num_layers=2, in_place=in_place,
        **{"raw_queries" if mode == "reference" else "queries": queries}))
    assert len(syncs) <= 1, syncs
    assert torch.equal(result.indices, expected.indices) and torch.equal(result.keys, expected.keys)


def test_a_failing_check_still_names_its_cause():
    """The one read is the common path's: a NaN key still raises the finiteness error (reading
    more to say so), and the top-k fallback still applies (no window token kept twice)."""
    policy = get_policy("scalekv", mode="reference", budget=40, drafters=[0])
    keys, values, queries = _inputs()
    keys[0, 1, 7, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values"):
        compress(policy, keys, values, schedule=SCHEDULE, scale=5, layer=0, num_layers=2, raw_queries=queries)


def test_ragged_compress_path_reads_lengths_and_checks_once(count_syncs):
    """A selection with per-(row, head) lengths: the lengths and all checks come back in one read."""
    from kvpolicy import Policy, Selection, register_policy  # noqa: F401 (a local policy below)

    class Ragged2(Policy):
        name = "ragged-sync-test"

        def plan(self, schedule, num_layers):
            return get_policy("scalekv", budget=40, drafters=[0]).plan(schedule, num_layers)

        def select(self, keys, values, ctx):
            batch, heads, length, _ = keys.shape
            indices = torch.arange(length - 30, length).expand(batch, heads, 30).clone()
            lengths = torch.full((batch, heads), 30, dtype=torch.long)
            lengths[0, 0] = 20
            indices[0, 0, 20:] = 0
            indices[0, 0, :20] = torch.arange(length - 20, length)
            return Selection(indices, ctx.state, lengths)

    keys, values, _ = _inputs()
    result, syncs = count_syncs(lambda: compress(Ragged2(), keys, values, schedule=SCHEDULE, scale=5, layer=0,
                                                 num_layers=2))
    assert isinstance(result.keys, Ragged)
    assert len(syncs) <= 1, syncs


@pytest.mark.parametrize("mode", ["reference", "attention"])
def test_the_policys_deferred_fallback_still_applies(mode):
    """Where the top-k reaches into −∞/NaN scores, ``redo`` (read in compress's one check) gives
    ``topk_with_forced``'s unique tokens, as the selector did when it read the flag itself: reference
    mode masks the window before average pooling, which spreads its −∞ until fewer finite candidates
    remain than slots; in attention mode finite keys whose logits overflow give NaN probabilities."""
    from kvpolicy.policy import CompressionContext
    from kvpolicy.scoring import topk_with_forced
    from policies.common.patch_window import observation_window_scores

    policy = get_policy("scalekv", mode=mode, budget=150, drafters=[0], pooling="avg")
    keys, values, queries = _inputs()
    if mode == "attention":  # probabilities are finite unless the logits overflow: finite keys, NaN scores
        keys = keys.clamp(-1, 1) * 3e38
    kwargs = {"raw_queries" if mode == "reference" else "queries": queries}
    capacity = policy.plan(SCHEDULE, 2).capacity(5, 0)
    ctx = CompressionContext(schedule=SCHEDULE, scale=5, layer=0, num_layers=2, capacity=capacity,
                             length=keys.shape[2], state=None, **kwargs)
    pooled, window = observation_window_scores(keys, ctx, raw=mode == "reference", pooling="avg")
    result = compress(policy, keys, values, schedule=SCHEDULE, scale=5, layer=0, num_layers=2, **kwargs)
    assert torch.equal(result.indices, topk_with_forced(pooled, window, capacity))
