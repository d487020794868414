"""``compress``: the one functional entry point every adapter calls after a layer's attention."""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch

from .policy import CompressionContext, Policy
from .schedule import ScaleSchedule


@attrs.frozen
class CompressionResult:
    keys: torch.Tensor  # (B, H, k, D), compact
    values: torch.Tensor  # (B, H, k, Dv), compact
    indices: torch.Tensor  # (B, H, k) int64, strictly ascending per row and head
    state: Any = None
    capacity: Optional[int] = None


def _check_query(name, tensor, keys, n_current):
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
        raise ValueError(f"{name} must be a (B, H, n_current, D) tensor, got "
                         f"{getattr(tensor, 'shape', type(tensor).__name__)}")
    b, h, n, _ = tensor.shape
    if b != keys.shape[0] or n != n_current or h % keys.shape[1]:
        raise ValueError(f"{name} shape {tuple(tensor.shape)} does not fit keys {tuple(keys.shape)}: "
                         f"need (B={keys.shape[0]}, a multiple of H={keys.shape[1]}, n_current={n_current}, D)")
    if tensor.shape[3] != keys.shape[3]:
        raise ValueError(f"{name} head dim {tensor.shape[3]} does not match the keys' head dim {keys.shape[3]} "
                         "(queries are dotted with the cached keys)")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {tensor.dtype}")
    if tensor.device != keys.device:
        raise ValueError(f"{name} is on {tensor.device} but keys are on {keys.device}")


def validate_inputs(keys, values, schedule, scale, layer, num_layers, queries, raw_queries) -> None:
    if not isinstance(schedule, ScaleSchedule):
        raise TypeError(f"schedule must be a ScaleSchedule, got {type(schedule).__name__}")
    schedule.tokens(scale)  # range check with a clear message
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise IndexError(f"layer {layer!r} out of range 0..{num_layers - 1}")
    for name, t in (("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (B, H, L, D) tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if keys.shape[:3] != values.shape[:3]:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must agree on (B, H, L)")
    if keys.device != values.device:
        raise ValueError(f"keys are on {keys.device} but values on {values.device}")
    length, n_current, full = keys.shape[2], schedule.tokens(scale), schedule.cumulative_length(scale)
    if not n_current <= length <= full:
        raise ValueError(f"cache length {length} at scale {scale} must lie in {n_current}..{full} "
                         f"(the current {schedule.shape(scale)} map up to every token of scales 0..{scale})")
    _check_query("queries", queries, keys, n_current)
    _check_query("raw_queries", raw_queries, keys, n_current)


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


def compress(policy: Policy, keys: torch.Tensor, values: torch.Tensor, *, schedule: ScaleSchedule,
             scale: int, layer: int, num_layers: int, queries: torch.Tensor | None = None,
             raw_queries: torch.Tensor | None = None, state: Any = None) -> CompressionResult:
    """Reduce one layer's cache after its self-attention at ``scale``.

    keys/values hold every cached token of scales 0..scale in generation order (the kept history
    followed by the current map). Queries are the current map's attention queries, such that
    ``queries @ keys^T`` are the model's attention logits (softmax scale folded in); raw queries
    are the bare projection ``x @ W_q^T``. Pass what the policy declares it needs.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a Policy (see kvpolicy.get_policy), got {type(policy).__name__}")
    validate_inputs(keys, values, schedule, scale, layer, num_layers, queries, raw_queries)
    if policy.needs_queries and queries is None:
        raise ValueError(f"policy {policy.name!r} needs queries= (the current map's attention queries)")
    if policy.needs_raw_queries and raw_queries is None:
        raise ValueError(f"policy {policy.name!r} needs raw_queries= (the bare query projection x @ W_q^T)")
    batch, heads, length, _ = keys.shape
    capacity = policy.capacity(schedule, num_layers, scale, layer)

    def keep_all(new_state):
        indices = torch.arange(length, device=keys.device).expand(batch, heads, length)
        return CompressionResult(keys, values, indices, new_state, capacity)

    if not policy.stateful and (capacity is None or length <= capacity):
        return keep_all(state)
    ctx = CompressionContext(schedule=schedule, scale=scale, layer=layer, num_layers=num_layers,
                             capacity=capacity, length=length, queries=queries,
                             raw_queries=raw_queries, state=state)
    selection = policy.select(keys, values, ctx)
    if selection.indices is None:
        if capacity is not None and length > capacity:
            raise RuntimeError(f"policy {policy.name!r} kept all {length} tokens over capacity {capacity}")
        return keep_all(selection.state)
    indices = selection.indices
    if indices.dim() != 3 or indices.shape[:2] != (batch, heads) or indices.dtype != torch.long:
        raise RuntimeError(f"policy {policy.name!r} returned indices {tuple(indices.shape)} {indices.dtype}; "
                           f"need (B={batch}, H={heads}, k) int64")
    kept = indices.shape[2]
    if capacity is not None and kept > capacity:
        raise RuntimeError(f"policy {policy.name!r} kept {kept} tokens over capacity {capacity}")
    # One device->host sync per call (this runs once per layer and scale): ascending rows lie in
    # range iff their first index is >= 0 and their last < length.
    if kept and not bool(((indices[..., 1:] > indices[..., :-1]).all() & (indices[..., 0] >= 0).all()
                          & (indices[..., -1] < length).all())):
        raise RuntimeError(f"policy {policy.name!r} returned indices that are not unique, ascending and in 0..{length - 1}")
    return CompressionResult(gather_tokens(keys, indices), gather_tokens(values, indices), indices,
                             selection.state, capacity)
