"""``compress``: the one functional entry point every adapter calls after a layer's attention.

Layer-wise results are dense (B, H, k, D) tensors. When (row, head)s keep different numbers of
tokens (head-wise plans, head-adaptive policies) the kept keys and values are a ``Ragged`` (packed,
no padding), and a ragged cache comes back in the same form: the policy then sees it left-padded
to its longest (row, head), with ``ctx.lengths`` saying what is real (see ``CompressionContext``).
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch

from .policy import CompressionContext, Policy
from .ragged import Ragged, gather_ragged
from .scoring import PerHeadTopk
from .schedule import ScaleSchedule


@attrs.frozen
class CompressionResult:
    keys: Any  # (B, H, k, D) tensor, compact; a Ragged when (row, head)s keep different lengths
    values: Any  # (B, H, k, D) tensor or Ragged, like keys (its dtype may differ: Infinity keeps K float32, V bf16)
    indices: torch.Tensor  # (B, H, k) int64: indices[b, h, :lengths[b, h]] strictly ascending (positions in the policy's view)
    state: Any = None
    capacity: Optional[int] = None
    lengths: Optional[torch.Tensor] = None  # (B, H) int64 tokens each (row, head) keeps
    head_capacities: Optional[tuple] = None  # the plan's per-head capacities at this (scale, layer), if any

    @property
    def ragged(self) -> bool:
        return isinstance(self.keys, Ragged)


def _check_query(name, tensor, shape, n_current, device):
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
        raise ValueError(f"{name} must be a (B, H, n_current, D) tensor, got "
                         f"{getattr(tensor, 'shape', type(tensor).__name__)}")
    b, h, n, _ = tensor.shape
    if b != shape[0] or n != n_current or h % shape[1]:
        raise ValueError(f"{name} shape {tuple(tensor.shape)} does not fit keys {tuple(shape)}: "
                         f"need (B={shape[0]}, a multiple of H={shape[1]}, n_current={n_current}, D)")
    if tensor.shape[3] != shape[3]:
        raise ValueError(f"{name} head dim {tensor.shape[3]} does not match the keys' head dim {shape[3]} "
                         "(queries are dotted with the cached keys)")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but keys are on {device}")


def _shape(t) -> tuple:
    """(B, H, L, D) of a dense tensor, or of a Ragged's left-padded view (L = its longest)."""
    if isinstance(t, Ragged):
        return (t.batch, t.heads, t.max_length, t.dim)
    return tuple(t.shape)


def validate_inputs(keys, values, schedule, scale, layer, num_layers, queries, raw_queries) -> None:
    if not isinstance(schedule, ScaleSchedule):
        raise TypeError(f"schedule must be a ScaleSchedule, got {type(schedule).__name__}")
    schedule.tokens(scale)  # range check with a clear message
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise IndexError(f"layer {layer!r} out of range 0..{num_layers - 1}")
    if isinstance(keys, Ragged) != isinstance(values, Ragged):
        raise ValueError("keys and values must both be dense tensors or both Ragged")
    for name, t in (("keys", keys), ("values", values)):
        if isinstance(t, Ragged):
            if not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be floating point, got {t.dtype}")
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (B, H, L, D) tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    k_shape, v_shape = _shape(keys), _shape(values)
    if k_shape != v_shape or (isinstance(keys, Ragged) and keys.host != values.host):
        raise ValueError(f"keys {k_shape} and values {v_shape} must agree on (B, H, L, D): "
                         "one key and one value of the same head dim per cached token")
    if keys.device != values.device:
        raise ValueError(f"keys are on {keys.device} but values on {values.device}")
    length, n_current, full = k_shape[2], schedule.tokens(scale), schedule.cumulative_length(scale)
    if not n_current <= length <= full:
        raise ValueError(f"cache length {length} at scale {scale} must lie in {n_current}..{full} "
                         f"(the current {schedule.shape(scale)} map up to every token of scales 0..{scale})")
    if isinstance(keys, Ragged) and min(min(row) for row in keys.host) < n_current:
        raise ValueError(f"a ragged cache at scale {scale} holds fewer tokens in some (row, head) than the current "
                         f"map's {n_current}")
    _check_query("queries", queries, k_shape, n_current, keys.device)
    _check_query("raw_queries", raw_queries, k_shape, n_current, keys.device)


def _check_finite(finite: torch.Tensor, policy, scale: int, layer: int) -> None:
    if not bool(finite):
        raise ValueError(f"keys or queries at scale {scale}, layer {layer} hold NaN or infinite values; policy "
                         f"{policy.name!r} cannot score them (check the model's numerics, e.g. its dtype)")


def _all_finite(tensor: torch.Tensor) -> torch.Tensor:
    """A device bool: no NaN/inf in ``tensor``. Its minimum and maximum (NaN propagates through both)
    read it once in its own dtype: a float32 sum could overflow on large finite values, and summing
    bf16 data into float32 converted every element (151 ms vs 2 ms for a 2x16x6425x128 bf16 cache,
    1 CPU thread)."""
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    low, high = torch.aminmax(tensor)
    return torch.isfinite(low) & torch.isfinite(high)


def _finite(keys, queries, raw_queries) -> torch.Tensor:
    """A device bool: keys and queries hold no NaN/inf (fused into the index check's one device
    sync); a Ragged is checked on its packed data; ``keys=None`` checks the queries only."""
    finite = torch.ones((), dtype=torch.bool)
    if keys is not None:
        finite = _all_finite(keys.data if isinstance(keys, Ragged) else keys)
    for query in (queries, raw_queries):
        if query is not None:
            finite = finite & _all_finite(query)
    return finite


def _proven_finite(keys, queries, raw_queries, keys_proof, queries_proof) -> torch.Tensor:
    """``_finite`` where a policy's proofs (0-d device bools, or None) stand in for reading the keys
    and the queries respectively."""
    finite = _finite(None if keys_proof is not None else keys,
                     *((queries, raw_queries) if queries_proof is None else (None, None)))
    for p in (keys_proof, queries_proof):
        if p is not None:
            finite = finite.to(p.device) & p.reshape(())
    return finite


def gather_tokens(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) gathered at (B, H, k) -> a new compact (B, H, k, D) tensor.

    Whole D-rows are copied with one ``index_select`` over the flattened (B*H*L, D) view: the same
    values as ``torch.gather`` with an index expanded over D, but 4-30x faster on CPU (measured at
    B=2, H=16, L=6425, D=128), because gather reads one index per element.
    """
    batch, heads, length, dim = tensor.shape
    row_starts = torch.arange(batch * heads, device=indices.device).view(batch, heads, 1) * length
    rows = (indices + row_starts).reshape(-1)
    kept = indices.shape[2]
    return tensor.reshape(batch * heads * length, dim).index_select(0, rows).view(batch, heads, kept, dim)


# Rows staged per step of an in-place compaction: 4 MiB of float32 rows of D = 128, which stay in
# the CPU's cache between being read and written back.
_COMPACT_ROWS = 8192


def _compaction_sources(indices: torch.Tensor, length: int) -> tuple[torch.Tensor, int]:
    """``compact_tokens_``'s flattened source rows (B·H·k,) and its chunk size."""
    batch, heads, _ = indices.shape
    row_starts = torch.arange(batch * heads, device=indices.device).view(batch, heads, 1) * length
    sources = (indices + row_starts).reshape(-1)
    return sources, max(1, min(_COMPACT_ROWS, sources.numel()))


def compact_tokens_(tensor: torch.Tensor, indices: torch.Tensor, *, chunk_firsts: list | None = None) -> torch.Tensor:
    """In place: (B, H, L, D) contiguous ``tensor``'s rows at ``indices`` (B, H, k), ascending in
    every (row, head), moved to the front of its own memory -> a (B, H, k, D) view of it. The same
    values as ``gather_tokens``, written into memory that is already mapped (a fresh allocation on
    CPU is mostly page faults: 100 vs 15-19 ms for 204,320 float32 rows of 128, one thread); the
    memory after the first B·H·k rows stays allocated until the tensor is freed, and ``tensor``
    itself no longer holds its old contents.

    Flattened, kept row r (= (b·H + h)·k + j) comes from source row s(r) = (b·H + h)·L + indices[b,
    h, j] >= r, and s grows with r; so copying the rows in chunks in order of r never overwrites a
    row that a later chunk still reads. A chunk whose first source lies past its own rows is read
    straight into place; one that overlaps its sources goes through a small buffer. Which is which
    takes one device->host read of every chunk's first source, unless the caller read them already
    (``chunk_firsts``: ``compress`` reads them with its checks, for keys and values at once).
    """
    batch, heads, length, dim = tensor.shape
    if not tensor.is_contiguous():
        raise ValueError("compact_tokens_ needs a contiguous tensor (it reuses the tensor's own memory)")
    kept = indices.shape[2]
    flat = tensor.view(batch * heads * length, dim)
    sources, step = _compaction_sources(indices, length)
    total = sources.numel()
    if chunk_firsts is None:
        chunk_firsts = sources[::step].tolist()
    stage = None
    for start, first in zip(range(0, total, step), chunk_firsts):
        stop = min(total, start + step)
        chunk = sources[start:stop]
        if first >= stop:  # the sources lie after the rows written: index_select sees disjoint memory
            torch.index_select(flat[stop:], 0, chunk - stop, out=flat[start:stop])
            continue
        if stage is None:
            stage = torch.empty(step, dim, dtype=tensor.dtype, device=tensor.device)
        part = stage[:stop - start]
        torch.index_select(flat, 0, chunk, out=part)
        flat[start:stop].copy_(part)
    return flat[:total].view(batch, heads, kept, dim)


def compress(policy: Policy, keys: torch.Tensor, values: torch.Tensor, *, schedule: ScaleSchedule,
             scale: int, layer: int, num_layers: int, queries: torch.Tensor | None = None,
             raw_queries: torch.Tensor | None = None, state: Any = None, in_place: bool = False) -> CompressionResult:
    """Reduce one layer's cache after its self-attention at ``scale``.

    keys/values hold every cached token of scales 0..scale in generation order (the kept history
    followed by the current map). Queries are the current map's attention queries, such that
    ``queries @ keys^T`` are the model's attention logits (softmax scale folded in); raw queries
    are the bare projection ``x @ W_q^T``. Pass what the policy declares it needs.

    ``in_place=True`` hands keys and values over to be overwritten: where every (row, head) keeps
    the same tokens of a dense contiguous cache, the kept tokens are moved to the front of their
    own memory (``compact_tokens_``) and the result's keys/values are views of it, which keep the
    whole old allocation alive (a caller counting memory counts their storage); anything else is
    copied as usual. Do not use keys/values afterwards.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a Policy (see kvpolicy.get_policy), got {type(policy).__name__}")
    validate_inputs(keys, values, schedule, scale, layer, num_layers, queries, raw_queries)
    if not isinstance(in_place, bool):
        raise TypeError(f"in_place must be True or False, got {in_place!r}")
    if policy.needs_queries and queries is None:
        raise ValueError(f"policy {policy.name!r} needs queries= (the current map's attention queries)")
    if policy.needs_raw_queries and raw_queries is None:
        raise ValueError(f"policy {policy.name!r} needs raw_queries= (the bare query projection x @ W_q^T)")
    batch, heads, length, _ = _shape(keys)
    plan = policy.plan(schedule, num_layers)
    capacity = plan.capacity(scale, layer)
    head_caps = plan.head_capacity(scale, layer)
    if head_caps is not None and len(head_caps) != heads:
        raise ValueError(f"policy {policy.name!r} planned {len(head_caps)} heads at scale {scale}, layer {layer} but the "
                         f"cache has H={heads}")
    ragged_in = isinstance(keys, Ragged)
    view_lengths = keys.lengths if ragged_in else None
    host = keys.host_lengths() if ragged_in else None  # [b][h]

    def keep_all(new_state):
        indices = torch.arange(length, device=keys.device).expand(batch, heads, length)
        if not ragged_in:
            return CompressionResult(keys, values, indices, new_state, capacity,
                                     torch.full((batch, heads), length, dtype=torch.long, device=keys.device), head_caps)
        # In the left-padded view (row, head)'s tokens are its last lengths[b, h] positions.
        shifted = indices + (length - view_lengths).unsqueeze(-1)
        real = shifted < length
        return CompressionResult(keys, values, torch.where(real, shifted, torch.zeros_like(shifted)), new_state,
                                 capacity, view_lengths, head_caps)

    def fits() -> bool:
        if capacity is None:
            return True
        if head_caps is None or policy.head_adaptive:
            return length <= capacity
        if host is None:
            return length <= min(head_caps)
        return all(host[b][h] <= head_caps[h] for b in range(batch) for h in range(heads))

    if not policy.stateful and fits():
        return keep_all(state)
    ctx = CompressionContext(schedule=schedule, scale=scale, layer=layer, num_layers=num_layers,
                             capacity=capacity, length=length, queries=queries, raw_queries=raw_queries, state=state,
                             head_capacities=None if head_caps is None else torch.tensor(head_caps, device=keys.device),
                             lengths=view_lengths,
                             host_lengths=None if host is None else tuple(tuple(row) for row in host))
    if ragged_in:  # the policy sees a transient left-padded view (never stored)
        selection = policy.select(keys.padded(length), values.padded(length), ctx)
    else:
        selection = policy.select(keys, values, ctx)
    return _use_selection(policy, keys, values, ctx, selection, head_caps=head_caps, fits=fits, keep_all=keep_all,
                          in_place=in_place)


def _one_bool(value) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype == torch.bool


def _use_selection(policy, keys, values, ctx, selection, *, head_caps, fits, keep_all, in_place) -> CompressionResult:
    """Check ``selection`` and keep it. Every device value the checks need (finite inputs, valid
    indices, the policy's ``redo_if``) is read in ONE device->host sync per call; only when that
    read fails do the checks read again to say which failed (and ``redo()`` replaces the selection)."""
    batch, heads, length, _ = _shape(keys)
    capacity, queries, raw_queries = ctx.capacity, ctx.queries, ctx.raw_queries
    scale, layer = ctx.scale, ctx.layer
    ragged_in = isinstance(keys, Ragged)
    proof, query_proof = selection.keys_finite, selection.queries_finite
    for field, value in (("keys_finite", proof), ("queries_finite", query_proof)):
        if value is not None and not _one_bool(value):
            raise RuntimeError(f"policy {policy.name!r} returned {field}={value!r}; need a one-element bool tensor")
    redo_if = selection.redo_if
    if (redo_if is None) != (selection.redo is None) or (redo_if is not None and not (
            _one_bool(redo_if) and callable(selection.redo))):
        raise RuntimeError(f"policy {policy.name!r} returned redo_if={redo_if!r} and redo={selection.redo!r}; need "
                           "both or neither: a one-element bool tensor and a callable returning a Selection")
    # Keys (queries) the policy proved finite while scoring are not read again: one pass over the
    # cache (all of the current map's queries, though reference mode reads 16 rows) saved.
    finite = _proven_finite(keys, queries, raw_queries, proof, query_proof)
    if redo_if is not None:
        redo_if = redo_if.reshape(()).to(finite.device)

    def passed(*flags) -> torch.Tensor:
        """The flags and-ed with ``finite`` and "no redo": the one value read on the common path."""
        ok = finite
        for flag in flags:
            ok = ok & flag.to(finite.device)
        return ok if redo_if is None else ok & ~redo_if

    def redone():
        """On a failing read only: the policy's replacement selection when it asked for one, else None."""
        if redo_if is not None and bool(redo_if):
            return _use_selection(policy, keys, values, ctx, selection.redo(), head_caps=head_caps, fits=fits,
                                  keep_all=keep_all, in_place=in_place)
        return None

    def confirm_finite(finite):
        """On a failing check only: a proof that failed proves nothing (finite keys whose products
        overflow), so read what it did not prove before calling the inputs non-finite."""
        if (proof is not None or query_proof is not None) and not bool(finite):
            finite = _proven_finite(keys, queries, raw_queries, *(
                p if p is not None and bool(p) else None for p in (proof, query_proof)))
        _check_finite(finite, policy, scale, layer)

    if selection.indices is None:
        if not bool(passed()):
            result = redone()
            if result is not None:
                return result
            confirm_finite(finite)
        if not fits():
            raise RuntimeError(f"policy {policy.name!r} kept all {length} tokens over capacity "
                               f"{capacity if head_caps is None else list(head_caps)}")
        return keep_all(selection.state)
    indices = selection.indices
    if isinstance(indices, PerHeadTopk):
        return _ragged_result(policy, keys, values, ctx, selection, head_caps, finite, confirm_finite, passed,
                              redone)
    if not isinstance(indices, torch.Tensor) or indices.dim() != 3 or indices.shape[:2] != (batch, heads) \
            or indices.dtype != torch.long:
        raise RuntimeError(f"policy {policy.name!r} returned indices {tuple(getattr(indices, 'shape', ()))} "
                           f"{getattr(indices, 'dtype', type(indices).__name__)}; need (B={batch}, H={heads}, k) int64")
    kept = indices.shape[2]
    if selection.lengths is None and not ragged_in and head_caps is None:
        # The layer-wise path: every (row, head) keeps k tokens of a dense cache.
        if capacity is not None and kept > capacity:
            raise RuntimeError(f"policy {policy.name!r} kept {kept} tokens over capacity {capacity}")
        # One device->host sync per call (this runs once per layer and scale): ascending rows lie in
        # range iff their first index is >= 0 and their last < length.
        index_ok = ((indices[..., 1:] > indices[..., :-1]).all() & (indices[..., 0] >= 0).all()
                    & (indices[..., -1] < length).all()) if kept else None
        ok = passed() if index_ok is None else passed(index_ok)
        compact = in_place and keys.is_contiguous() and values.is_contiguous()
        if compact:  # the in-place move's chunk starts come back in the same read
            sources, step = _compaction_sources(indices, length)
            ok, *firsts = torch.cat([ok.to(sources.device).reshape(1), sources[::step]]).tolist()
        else:
            ok = bool(ok)
        if not ok:
            result = redone()
            if result is not None:
                return result
            confirm_finite(finite)
            if index_ok is not None and not bool(index_ok):
                raise RuntimeError(f"policy {policy.name!r} returned indices that are not unique, ascending and "
                                   f"in 0..{length - 1}")
        if compact:
            moved_keys = compact_tokens_(keys, indices, chunk_firsts=firsts)
            moved_values = compact_tokens_(values, indices, chunk_firsts=firsts)
        else:
            moved_keys, moved_values = gather_tokens(keys, indices), gather_tokens(values, indices)
        return CompressionResult(moved_keys, moved_values, indices,
                                 selection.state, capacity, torch.full((batch, heads), kept, dtype=torch.long,
                                                                       device=keys.device), head_caps)
    return _ragged_result(policy, keys, values, ctx, selection, head_caps, finite, confirm_finite, passed, redone)


def _ragged_result(policy, keys, values, ctx, selection, head_caps, finite, confirm_finite, passed,
                   redone) -> CompressionResult:
    """Check a per-(row, head) selection and keep it: dense when every (row, head) keeps the same
    count, a Ragged otherwise. A deferred ``PerHeadTopk`` gets its indices here, once its lengths
    came back in the one read (the core forms them from the ranking: valid by construction)."""
    batch, heads = _shape(keys)[:2]
    deferred = selection.indices if isinstance(selection.indices, PerHeadTopk) else None
    state = selection.state
    if deferred is not None:
        if selection.lengths is not None:
            raise RuntimeError(f"policy {policy.name!r} returned lengths with a PerHeadTopk selection (it holds its "
                               "own lengths)")
        lengths = deferred.lengths
        if tuple(lengths.shape) != (batch, heads) or tuple(deferred.ranked.shape) != (batch, heads, ctx.length):
            raise RuntimeError(f"policy {policy.name!r} returned a PerHeadTopk for {tuple(deferred.ranked.shape)} "
                               f"scores; need (B={batch}, H={heads}, L={ctx.length})")
        device = lengths.device
        padding = ctx.padding()
        # The one device->host sync of this path: the lengths, the checks and "no (row, head) has more
        # forced positions than its budget" in one read.
        *host, ok = torch.cat([lengths.reshape(-1),
                               passed(~deferred.overfull).to(lengths.device).reshape(1)]).tolist()
        if not ok:
            result = redone()
            if result is not None:
                return result
            deferred.check()  # topk_per_head's error, before the finiteness one (as when the policy raised it)
            confirm_finite(finite)
        kept = max(0, max(host, default=0))
        indices = deferred.indices(kept)
        if deferred.state_from is not None:
            state = deferred.state_from(indices, lengths)
    else:
        indices = selection.indices
        batch, heads, kept = indices.shape
        device = indices.device
        lengths = selection.lengths
        if lengths is None:
            lengths = torch.full((batch, heads), kept, dtype=torch.long, device=device)
        elif (not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (batch, heads)
              or lengths.dtype != torch.long):
            raise RuntimeError(f"policy {policy.name!r} returned lengths {getattr(lengths, 'shape', lengths)!r}; need "
                               f"a (B={batch}, H={heads}) int64 tensor")
        lengths = lengths.to(device)
        padding = ctx.padding()
        low = padding.unsqueeze(-1) if padding is not None else 0
        real = torch.arange(kept, device=device) < lengths.unsqueeze(-1)
        ascending = (indices[..., 1:] > indices[..., :-1]) | ~real[..., 1:]
        in_range = ((indices >= low) & (indices < ctx.length)) | ~real
        index_ok = ascending.all() & in_range.all()
        # The one device->host sync of this path: the lengths and the checks' flag in one read.
        *host, ok = torch.cat([lengths.reshape(-1), passed(index_ok).to(lengths.device).reshape(1)]).tolist()
        if not ok:
            result = redone()
            if result is not None:
                return result
            confirm_finite(finite)
            if not bool(index_ok):
                raise RuntimeError(f"policy {policy.name!r} returned indices that are not unique, ascending and in "
                                   f"range (each (row, head)'s real positions of 0..{ctx.length - 1})")
    host = [host[b * heads:(b + 1) * heads] for b in range(batch)]
    flat = [v for row in host for v in row]
    if min(flat) < 0 or max(flat) > kept:
        raise RuntimeError(f"policy {policy.name!r} returned lengths outside 0..{kept} (the indices' last dim)")
    capacity = ctx.capacity
    if capacity is not None:
        if policy.head_adaptive:
            for b, row in enumerate(host):
                if sum(row) > heads * capacity:
                    raise RuntimeError(f"policy {policy.name!r} kept {sum(row)} tokens in row {b} over H x capacity = "
                                       f"{heads} x {capacity}")
        else:
            caps = head_caps if head_caps is not None else (capacity,) * heads
            for b, row in enumerate(host):
                for h, (n, cap) in enumerate(zip(row, caps)):
                    if n > cap:
                        raise RuntimeError(f"policy {policy.name!r} kept {n} tokens in (row {b}, head {h}) over its "
                                           f"capacity {cap}")
    head_major = [list(col) for col in zip(*host)]
    if not isinstance(keys, Ragged) and all(v == flat[0] for v in flat):
        order = indices[..., :flat[0]]  # every (row, head) keeps the same count: stay dense
        return CompressionResult(gather_tokens(keys, order), gather_tokens(values, order), indices, state,
                                 capacity, lengths, head_caps)
    if isinstance(keys, Ragged):
        new_keys = keys.gather(indices, lengths, padding=padding, host_lengths=head_major)
        new_values = values.gather(indices, lengths, padding=padding, host_lengths=head_major)
        if new_keys.uniform:  # back to equal lengths: dense storage again
            new_keys, new_values = new_keys.dense(), new_values.dense()
    else:
        new_keys = gather_ragged(keys, indices, lengths, head_major)
        new_values = gather_ragged(values, indices, lengths, head_major)
    return CompressionResult(new_keys, new_values, indices, state, capacity, lengths, head_caps)
