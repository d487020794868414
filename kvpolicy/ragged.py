"""Physically ragged per-(row, head) token storage and exact attention over it.

When heads keep different numbers of tokens (head-wise budgets, AdaKV-style allocations), a
padded (B, H, L_max, D) tensor would hold memory the policy freed. ``Ragged`` keeps every
(row, head)'s tokens packed with no padding: ``data`` is (N, D) with N = lengths.sum(), segments
in head-major order (head 0 of rows 0..B-1, then head 1, ...), so that the rows of one head are
contiguous and, when they have equal lengths (any static head-wise plan), one head is a (B, L_h, D)
view with no copy. Its bytes are exactly sum(lengths) x D x itemsize.

``ragged_attention`` computes softmax attention of dense queries over ragged keys/values with
PyTorch's own ``scaled_dot_product_attention`` (no home-made kernel), by one of

- ``"per_head"``: one SDPA per head over its (B, L_h, D) view (one per (row, head) when that
  head's rows differ in length); no copy of the cache;
- ``"padded"``: one SDPA over a transient left-padded copy with a boolean mask;

chosen per device by measurement (``ATTENTION_METHOD``; ``benchmarks/bench_ragged.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# The default method per device type. CPU: measured with benchmarks/bench_ragged.py (one thread,
# Infinity-2B geometry, benchmarks/results/ragged-attention-cpu/): the per-head loop is within a few
# percent of dense attention at equal tokens on the scales that cost time, the padded method
# 1.2-1.6x slower (it copies the cache). CUDA: not measured yet (no GPU run recorded); per_head is
# the choice that copies nothing. Run the benchmark with --device cuda and update this table.
ATTENTION_METHOD = {"cpu": "per_head", "cuda": "per_head"}
METHODS = ("per_head", "padded")


class Ragged:
    """Per-(row, head) sequences of D-vectors, packed head-major without padding.

    ``data`` (N, D); ``lengths`` (B, H) int64 on ``data``'s device. Segment (b, h) starts at
    ``offsets[h * B + b]``. ``host_lengths`` ([H][B] ints) may be passed to avoid a device sync.
    """

    __slots__ = ("data", "lengths", "offsets", "host", "_head_starts")

    def __init__(self, data: torch.Tensor, lengths: torch.Tensor, host_lengths: Optional[list] = None):
        if not isinstance(data, torch.Tensor) or data.dim() != 2:
            raise ValueError(f"Ragged data must be an (N, D) tensor, got {getattr(data, 'shape', type(data).__name__)}")
        if not isinstance(lengths, torch.Tensor) or lengths.dim() != 2 or lengths.dtype != torch.long:
            raise ValueError(f"Ragged lengths must be a (B, H) int64 tensor, got "
                             f"{getattr(lengths, 'shape', type(lengths).__name__)} {getattr(lengths, 'dtype', '')}")
        self.data = data
        self.lengths = lengths.to(data.device)
        self.host = [list(map(int, row)) for row in host_lengths] if host_lengths is not None else self.lengths.t().tolist()
        total = sum(map(sum, self.host))
        if total != data.shape[0]:
            raise ValueError(f"Ragged lengths sum to {total} but data holds {data.shape[0]} vectors")
        flat = self.lengths.t().reshape(-1)
        self.offsets = torch.zeros(flat.numel() + 1, dtype=torch.long, device=data.device)
        torch.cumsum(flat, 0, out=self.offsets[1:])
        starts = [0]
        for row in self.host:
            starts.append(starts[-1] + sum(row))
        self._head_starts = starts  # host offset of each head's first row

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "Ragged":
        """A (B, H, L, D) tensor as a Ragged of equal lengths (one copy into head-major order)."""
        batch, heads, length, dim = dense.shape
        data = dense.transpose(0, 1).reshape(heads * batch * length, dim).clone()
        lengths = torch.full((batch, heads), length, dtype=torch.long, device=dense.device)
        return cls(data, lengths, [[length] * batch for _ in range(heads)])

    @classmethod
    def from_padded(cls, padded: torch.Tensor, lengths: torch.Tensor, *, side: str = "left") -> "Ragged":
        """Keep the last (``side="left"``) or first (``"right"``) lengths[b, h] positions of each (b, h)."""
        batch, heads, length, dim = padded.shape
        positions = torch.arange(length, device=padded.device)
        lengths = lengths.to(padded.device)
        if side == "left":
            valid = positions >= (length - lengths).unsqueeze(-1)
        else:
            valid = positions < lengths.unsqueeze(-1)
        data = padded.transpose(0, 1)[valid.transpose(0, 1)]  # boolean indexing keeps head-major order
        return cls(data, lengths)

    # -- properties ---------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def heads(self) -> int:
        return self.lengths.shape[1]

    @property
    def dim(self) -> int:
        return self.data.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def max_length(self) -> int:
        return max((max(row) for row in self.host), default=0)

    @property
    def uniform(self) -> bool:
        first = self.host[0][0] if self.host and self.host[0] else 0
        return all(v == first for row in self.host for v in row)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def host_lengths(self) -> list[list[int]]:
        """[b][h] lengths as Python ints (no device sync)."""
        return [list(col) for col in zip(*self.host)]

    def head_view(self, h: int) -> Optional[torch.Tensor]:
        """Head h's rows as a (B, L_h, D) view when they all have L_h tokens, else None."""
        lengths = self.host[h]
        if any(v != lengths[0] for v in lengths):
            return None
        start = self._head_starts[h]
        return self.data[start:start + self.batch * lengths[0]].view(self.batch, lengths[0], self.dim)

    def segment(self, b: int, h: int) -> torch.Tensor:
        start = self._head_starts[h] + sum(self.host[h][:b])
        return self.data[start:start + self.host[h][b]]

    # -- conversions --------------------------------------------------------------------------
    def _segment_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(segment id, position within the segment) of every stored vector."""
        flat = self.lengths.t().reshape(-1)
        ids = torch.repeat_interleave(torch.arange(flat.numel(), device=self.device), flat, output_size=self.data.shape[0])
        return ids, torch.arange(self.data.shape[0], device=self.device) - self.offsets[ids]

    def padded(self, length: Optional[int] = None) -> torch.Tensor:
        """A left-padded (B, H, length, D) copy (zeros before each (row, head)'s tokens)."""
        length = self.max_length if length is None else length
        out = self.data.new_zeros(self.heads, self.batch, length, self.dim)
        ids, pos = self._segment_ids()
        flat_len = self.lengths.t().reshape(-1)
        dest = ids * length + (length - flat_len[ids]) + pos
        out.view(-1, self.dim).index_copy_(0, dest, self.data)
        return out.transpose(0, 1)

    def dense(self) -> torch.Tensor:
        """(B, H, L, D) when every (row, head) holds L tokens (a copy: the storage is head-major)."""
        if not self.uniform:
            raise ValueError("this Ragged holds different lengths per (row, head); use padded()")
        length = self.host[0][0]
        return self.data.view(self.heads, self.batch, length, self.dim).transpose(0, 1).contiguous()

    def append(self, new: torch.Tensor) -> "Ragged":
        """Every (row, head) followed by its n new vectors from ``new`` (B, H, n, D)."""
        batch, heads, n, dim = new.shape
        if (batch, heads, dim) != (self.batch, self.heads, self.dim):
            raise ValueError(f"new tokens {tuple(new.shape)} do not continue a ragged cache of B={self.batch}, "
                             f"H={self.heads}, D={self.dim}")
        segments = heads * batch
        out = self.data.new_empty(self.data.shape[0] + segments * n, dim)
        ids, _ = self._segment_ids()
        old_dest = torch.arange(self.data.shape[0], device=self.device) + ids * n
        flat_len = self.lengths.t().reshape(-1)
        starts = self.offsets[:-1] + torch.arange(segments, device=self.device) * n + flat_len  # first new slot
        new_dest = (starts.unsqueeze(1) + torch.arange(n, device=self.device)).reshape(-1)
        out.index_copy_(0, old_dest, self.data)
        out.index_copy_(0, new_dest, new.transpose(0, 1).reshape(segments * n, dim).to(self.dtype))
        return Ragged(out, self.lengths + n, [[v + n for v in row] for row in self.host])

    def gather(self, indices: torch.Tensor, lengths: torch.Tensor, *, padding: Optional[torch.Tensor] = None,
               host_lengths: Optional[list] = None) -> "Ragged":
        """Keep ``indices[b, h, :lengths[b, h]]`` of every (row, head). Indices count in a view
        where (row, head) is preceded by ``padding[b, h]`` positions (the left-padded view)."""
        flat = indices.transpose(0, 1)  # (H, B, k)
        keep = torch.arange(flat.shape[2], device=self.device) < lengths.t().unsqueeze(-1)
        shift = self.offsets[:-1].view(self.heads, self.batch, 1)
        if padding is not None:
            shift = shift - padding.t().unsqueeze(-1)
        source = _kept(flat + shift, keep, host_lengths)
        return Ragged(self.data.index_select(0, source), lengths, host_lengths)


def gather_ragged(dense: torch.Tensor, indices: torch.Tensor, lengths: torch.Tensor,
                  host_lengths: Optional[list] = None) -> Ragged:
    """From a dense (B, H, L, D) cache keep ``indices[b, h, :lengths[b, h]]`` into a Ragged."""
    batch, heads, length, dim = dense.shape
    flat = indices.transpose(0, 1)
    keep = torch.arange(flat.shape[2], device=dense.device) < lengths.t().unsqueeze(-1)
    base = (torch.arange(batch, device=dense.device) * heads).view(1, batch, 1) \
        + torch.arange(heads, device=dense.device).view(heads, 1, 1)  # (b * H + h) in the (B, H) layout
    source = _kept(flat + base * length, keep, host_lengths)
    return Ragged(dense.reshape(-1, dim).index_select(0, source), lengths, host_lengths)


def _kept(positions: torch.Tensor, keep: torch.Tensor, host_lengths: Optional[list]) -> torch.Tensor:
    """``positions[keep]`` in order; with the lengths known on the host its size is too, and
    ``nonzero_static`` finds the kept entries without a device->host sync (boolean indexing syncs)."""
    if host_lengths is None:
        return positions[keep]
    total = sum(sum(map(int, row)) for row in host_lengths)
    return positions.reshape(-1).index_select(0, torch.nonzero_static(keep.reshape(-1), size=total).squeeze(1))


def ragged_attention(queries: torch.Tensor, keys: Ragged, values: Ragged, *, scale: float = 1.0,
                     method: Optional[str] = None) -> torch.Tensor:
    """softmax(scale · q kᵀ) v per (row, head) over each one's own tokens: (B, Hq, n, Dv).

    queries (B, Hq, n, D) with Hq a multiple of the key heads (grouped-query attention). Exact:
    the same as attending over a dense cache that holds only each (row, head)'s tokens.
    """
    batch, q_heads, n, _ = queries.shape
    heads = keys.heads
    if (keys.batch, keys.heads) != (values.batch, values.heads) or keys.host != values.host:
        raise ValueError("ragged keys and values must hold the same lengths")
    if keys.batch != batch or q_heads % heads:
        raise ValueError(f"queries {tuple(queries.shape)} do not fit a ragged cache of B={keys.batch}, H={heads}")
    method = method or ATTENTION_METHOD.get(queries.device.type, "per_head")
    if method not in METHODS:
        raise ValueError(f"ragged attention method must be one of {METHODS}, got {method!r}")
    group = q_heads // heads
    dtype = queries.dtype
    if keys.uniform:  # equal lengths everywhere: one SDPA over the (B, H, L, D) view of the storage
        length = keys.host[0][0] if keys.host and keys.host[0] else 0
        k = keys.data.view(heads, batch, length, keys.dim).transpose(0, 1).to(dtype)
        v = values.data.view(heads, batch, length, values.dim).transpose(0, 1).to(dtype)
        if group > 1:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(queries, k, v, scale=scale)
    if method == "padded":
        length = keys.max_length
        k, v = keys.padded(length).to(dtype), values.padded(length).to(dtype)
        valid = torch.arange(length, device=queries.device) >= (length - keys.lengths).unsqueeze(-1)  # (B, H, L)
        if group > 1:
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            valid = valid.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(queries, k, v, attn_mask=valid.unsqueeze(2), scale=scale)
    out = queries.new_empty(batch, q_heads, n, values.dim)
    for h in range(heads):
        q = queries[:, h * group:(h + 1) * group]
        k, v = keys.head_view(h), values.head_view(h)
        if k is not None:
            k, v = k.unsqueeze(1), v.unsqueeze(1)
            if group > 1:
                k, v = k.expand(batch, group, -1, -1), v.expand(batch, group, -1, -1)
            if k.dtype != dtype:
                k, v = k.to(dtype), v.to(dtype)
            out[:, h * group:(h + 1) * group] = F.scaled_dot_product_attention(q, k, v, scale=scale)
            continue
        for b in range(batch):  # this head's rows differ in length (data-dependent allocations)
            k_b, v_b = keys.segment(b, h).to(dtype), values.segment(b, h).to(dtype)
            length = k_b.shape[0]
            out[b, h * group:(h + 1) * group] = F.scaled_dot_product_attention(
                q[b:b + 1], k_b.expand(1, group, length, keys.dim), v_b.expand(1, group, length, values.dim),
                scale=scale)[0]
    return out
