"""2-D rotary position embedding of Infinity's self-attention (reference §5.3-§5.4).

Mode 2 ("star", the released setting): a token at (y, x) of an (h, w) map uses grid row
round(y * U_h / h) and column round(x * U_w / w), where (U_h, U_w) is the last map of the aspect-ratio
template's '1M' schedule; ``torch.round`` is half-to-even, as the official code. Rotation pair i
(dims 2i, 2i+1, interleaved) turns by row * inv_freq[i] for the first half of the pairs and by
column * inv_freq[i - half/2] for the second half. The table covers every token of the template's
13 scales in generation order; a scale uses the rows starting at its token offset, so a 512^2 run
reads positions on the 64-grid (the official per-pn registration of one shared table).

Deviation: the official code builds a 128 x 128 cos/sin grid and gathers from it; we compute the same
float32 angles (one multiplication each) for the used cells only.
"""

from __future__ import annotations

from typing import Sequence

import torch


def rope_inverse_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """``1 / base^(2i / half)`` for i < half / 2 with half = head_dim / 2, float32 (official expression)."""
    half = head_dim // 2
    return 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))


def star_positions(shape: tuple[int, int], last_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid (row, col) of every token of an (h, w) map, row-major, for mode 2."""
    (h, w), (uh, uw) = shape, last_shape
    rows = (torch.arange(h) * (uh / h)).round().long()
    cols = (torch.arange(w) * (uw / w)).round().long()
    return rows.repeat_interleave(w), cols.repeat(h)


def rope_table(template: Sequence[tuple[int, int]], head_dim: int, *, base: float = 10000.0,
               grid: int = 128) -> torch.Tensor:
    """cos/sin table ``(2, total_tokens, head_dim // 2)`` float32 for a template's whole schedule."""
    template = [tuple(s) for s in template]
    last = template[-1]
    if max(last) > grid:
        raise ValueError(f"template's last map {last} exceeds the {grid}x{grid} RoPE grid")
    inv_freq = rope_inverse_frequencies(head_dim, base)
    rows, cols = zip(*(star_positions(s, last) for s in template))
    rows, cols = torch.cat(rows).float(), torch.cat(cols).float()
    angles = torch.cat([rows[:, None] * inv_freq[None], cols[:, None] * inv_freq[None]], dim=-1)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=0)


def apply_rope(x: torch.Tensor, table: torch.Tensor, start: int) -> torch.Tensor:
    """Rotate ``x`` (B, H, L, hd) by table rows start..start+L-1; computed in float32, returns float32."""
    length = x.shape[-2]
    if start + length > table.shape[1]:
        raise ValueError(f"RoPE rows {start}..{start + length - 1} exceed the table ({table.shape[1]} tokens)")
    cos, sin = table[0, start:start + length].to(x.device), table[1, start:start + length].to(x.device)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([cos * even - sin * odd, sin * even + cos * odd], dim=-1)
    return rotated.reshape(x.shape)
