"""Which tokens a policy kept: global positions per layer, scale, row and head.

``KeptTokensCache`` is a ``KVCache`` that also follows, for every layer and (row, head), the global
position of each token it holds (generation order: ``schedule.offset(scale) + row * w + col``) and
hands a ``KeptTokens`` record to ``on_compress`` after each layer's compression step at each scale.
Adapters build one when their ``generate`` gets ``on_compress=``::

    seen = []
    model.generate(["a red cube"], policy="adakv", budget="10%", on_compress=seen.append)
    record = seen[-1]
    record.of(0, 3)  # the global positions row 0, head 3 of layer record.layer holds after record.scale

Head-wise policies keep different tokens, and different numbers of them, per (row, head): a
record holds ``positions`` (B, H, k) with ``positions[b, h, :lengths[b, h]]`` ascending and -1
after them (the convention of ``CompressionResult.indices``). Rows are the cache's rows: with
classifier-free guidance, the conditional rows first, then the unconditional ones.

Tracking costs one small int64 tensor per layer and one device-to-host copy per callback; a cache
built without ``on_compress`` (``KVCache``) does none of it.
"""

from __future__ import annotations

from typing import Callable, Optional

import attrs
import torch

from .cache import KVCache
from .compress import CompressionResult


@attrs.frozen
class KeptTokens:
    """The tokens one layer holds after its compression step at one scale."""

    scale: int
    layer: int
    positions: torch.Tensor  # (B, H, k) int64 on the CPU: positions[b, h, :lengths[b, h]] ascending, then -1
    lengths: torch.Tensor  # (B, H) int64 on the CPU: tokens each (row, head) holds
    generated: int  # tokens of scales 0..scale (what a full cache would hold)
    batch: int = 0  # which batch of a generate call (its cache is rebuilt per batch)

    def of(self, row: int, head: int) -> torch.Tensor:
        """The global positions (row, head) holds, ascending (1-D int64)."""
        return self.positions[row, head, : int(self.lengths[row, head])]

    @property
    def evicted(self) -> bool:
        """Some (row, head) holds fewer tokens than were generated."""
        return bool((self.lengths < self.generated).any())

    @property
    def head_wise(self) -> bool:
        """(row, head)s hold different numbers of tokens (the cache is stored ragged)."""
        return bool((self.lengths != self.lengths.flatten()[0]).any())


OnCompress = Callable[[KeptTokens], object]


class KeptTokensCache(KVCache):
    """A ``KVCache`` that reports the global positions each layer holds after every compression step
    (also without a policy, when every token is kept). ``batch`` is copied into the records."""

    def __init__(self, *args, on_compress: OnCompress, batch: int = 0, **kwargs):
        if not callable(on_compress):
            raise TypeError(f"on_compress must be a callable taking a KeptTokens record, got {on_compress!r}")
        self.on_compress = on_compress
        self.batch = batch
        super().__init__(*args, **kwargs)

    def reset(self) -> None:
        super().reset()
        # per layer: (B, H, L) left-padded with -1 like the policy's view of a ragged layer (each
        # (row, head)'s positions are its last lengths[b, h] entries), L = the layer's longest
        self._positions: list[Optional[torch.Tensor]] = [None] * self.num_layers

    def append(self, layer: int, scale: int, keys: torch.Tensor, values: torch.Tensor):
        out = super().append(layer, scale, keys, values)
        start, count = self.schedule.offset(scale), self.schedule.tokens(scale)
        new = torch.arange(start, start + count, device=keys.device).expand(keys.shape[0], keys.shape[1], count)
        held = self._positions[layer]
        self._positions[layer] = new.clone() if held is None else torch.cat([held, new], dim=2)
        return out

    def compress(self, layer: int, scale: int, **kwargs) -> Optional[CompressionResult]:
        result = super().compress(layer, scale, **kwargs)
        held = self._positions[layer]
        if result is None:  # no policy: every (row, head) holds every token
            positions = held
            lengths = torch.full(held.shape[:2], held.shape[2], dtype=torch.long, device=held.device)
        else:
            length = held.shape[2]
            lengths = result.lengths if result.lengths is not None else torch.full(
                held.shape[:2], result.indices.shape[2], dtype=torch.long, device=held.device)
            lengths = lengths.to(held.device)
            # the indices count in the policy's view of the layer, which is our layout (left-padded)
            kept = held.gather(2, result.indices.to(held.device).clamp(0, max(length - 1, 0)))
            real = torch.arange(kept.shape[2], device=held.device) < lengths.unsqueeze(-1)
            width = int(lengths.max()) if lengths.numel() else 0
            positions = torch.where(real, kept, torch.full_like(kept, -1))[:, :, :width]
            if self.layers[layer].length != width:
                raise RuntimeError(f"layer {layer} holds {self.layers[layer].length} tokens in its longest (row, "
                                   f"head) but the kept indices say {width}")
            # ascending positions after -1 padding: sorting left-pads every (row, head) again
            self._positions[layer] = positions.sort(dim=2).values
        self.on_compress(KeptTokens(scale=scale, layer=layer, positions=positions.cpu(), lengths=lengths.cpu(),
                                    generated=self.schedule.cumulative_length(scale), batch=self.batch))
        return result


def kept_tokens_cache(num_layers: int, schedule, policy, on_compress: Optional[OnCompress], *,
                      batch: int = 0) -> KVCache:
    """A plain ``KVCache``, or a ``KeptTokensCache`` when ``on_compress`` is given."""
    if on_compress is None:
        return KVCache(num_layers, schedule, policy)
    return KeptTokensCache(num_layers, schedule, policy, on_compress=on_compress, batch=batch)
