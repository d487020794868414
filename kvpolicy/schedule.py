"""Scale schedules: the sequence of token maps a next-scale model generates.

A next-scale ("visual autoregressive") model writes a whole h x w token map per step. The
schedule is the ordered list of those map shapes; tokens are laid out scale by scale, row-major
inside a scale, which is also the order of every KV cache in this project.
"""

from __future__ import annotations

from typing import Sequence

import attrs
import torch


def _to_shapes(value: Sequence[Sequence[int]] | Sequence[int]) -> tuple[tuple[int, int], ...]:
    shapes = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            shapes.append((item, item))  # VAR-style patch_nums: square maps
            continue
        if isinstance(item, (str, bytes)) or not hasattr(item, "__iter__"):
            raise ValueError(f"schedule entry {item!r} must be (h, w), (1, h, w) or a side length (int)")
        pair = tuple(item)
        if len(pair) == 3:  # Infinity's (t, h, w) triples; t is always 1 at inference
            if pair[0] != 1:
                raise ValueError(f"schedule entry {pair!r}: only t=1 (images) is supported")
            pair = pair[1:]
        if len(pair) != 2:
            raise ValueError(f"schedule entry {item!r} must be (h, w), (1, h, w) or a side length")
        shapes.append((pair[0], pair[1]))
    return tuple(shapes)


def _check_shapes(instance, attribute, value):
    if not value:
        raise ValueError("a ScaleSchedule needs at least one scale")
    for h, w in value:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (h, w)) or h < 1 or w < 1:
            raise ValueError(f"scale shape ({h!r}, {w!r}) must be two positive integers")


@attrs.frozen
class ScaleSchedule:
    """Token-map shapes ``(h, w)`` in generation order, with offsets and lookups.

    ``ScaleSchedule([(1, 1), (2, 2), (4, 4)])`` or ``ScaleSchedule([1, 2, 4])`` (square sides).
    """

    shapes: tuple[tuple[int, int], ...] = attrs.field(converter=_to_shapes, validator=_check_shapes)

    @property
    def num_scales(self) -> int:
        return len(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def lengths(self) -> tuple[int, ...]:
        """Tokens per scale (h * w)."""
        return tuple(h * w for h, w in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Index of each scale's first token in the whole sequence."""
        out, acc = [], 0
        for n in self.lengths:
            out.append(acc)
            acc += n
        return tuple(out)

    @property
    def cumulative(self) -> tuple[int, ...]:
        """Tokens of scales 0..s, for each s: the uncompressed cache length after scale s."""
        out, acc = [], 0
        for n in self.lengths:
            acc += n
            out.append(acc)
        return tuple(out)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def reference_length(self) -> int:
        """N_ref: the longest cache the last scale reads (all tokens but the last scale's).

        Ratio budgets are fractions of this (6425 for Infinity 1024^2, 424 for VAR 256^2). For a
        one-scale schedule there is no prefix; the scale's own length is used.
        """
        return self.total - self.lengths[-1] if self.num_scales > 1 else self.total

    def tokens(self, scale: int) -> int:
        return self.lengths[self._check_scale(scale)]

    def shape(self, scale: int) -> tuple[int, int]:
        return self.shapes[self._check_scale(scale)]

    def offset(self, scale: int) -> int:
        return self.offsets[self._check_scale(scale)]

    def cumulative_length(self, scale: int) -> int:
        return self.cumulative[self._check_scale(scale)]

    def prefix(self, num_scales: int) -> "ScaleSchedule":
        """The schedule of the first ``num_scales`` scales (Infinity's pn names are prefixes)."""
        if not 1 <= num_scales <= self.num_scales:
            raise ValueError(f"prefix length {num_scales} must be in 1..{self.num_scales}")
        return ScaleSchedule(self.shapes[:num_scales])

    def locate(self, token: int) -> tuple[int, int, int]:
        """Global token index -> (scale, row, col)."""
        if not 0 <= token < self.total:
            raise IndexError(f"token {token} out of range 0..{self.total - 1}")
        for s, (start, (h, w)) in enumerate(zip(self.offsets, self.shapes)):
            if token < start + h * w:
                row, col = divmod(token - start, w)
                return s, row, col
        raise AssertionError("unreachable")

    def locate_tensor(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Vectorised ``locate`` for an integer tensor of global indices."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.total):
            raise IndexError(f"token indices must lie in 0..{self.total - 1}")
        ends = torch.tensor(self.cumulative, dtype=torch.long, device=tokens.device)
        scale = torch.searchsorted(ends, tokens, right=True)
        starts = torch.tensor(self.offsets, dtype=torch.long, device=tokens.device)[scale]
        widths = torch.tensor([w for _, w in self.shapes], dtype=torch.long, device=tokens.device)[scale]
        local = tokens - starts
        return scale, local // widths, local % widths

    def scale_of_positions(self, length: int) -> torch.Tensor:
        """Scale index of each of the first ``length`` tokens (uncompressed order)."""
        return self.locate_tensor(torch.arange(length))[0]

    def _check_scale(self, scale: int) -> int:
        if not isinstance(scale, int) or isinstance(scale, bool) or not 0 <= scale < self.num_scales:
            raise IndexError(f"scale {scale!r} out of range 0..{self.num_scales - 1}")
        return scale

    def __str__(self) -> str:
        return " ".join(f"{h}x{w}" for h, w in self.shapes) + f" ({self.total} tokens)"
