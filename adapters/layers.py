"""Layers that Infinity and VAR share exactly (both descend from the same VAR code base).

``FeedForward`` is the official ``FFN``: fc2(GELU_tanh(fc1(x))), hidden 4C, no dropout at
inference. Inputs are cast to the weights' dtype, because Infinity keeps its residual stream in
float32 while its linear layers run in bf16 on a GPU (a no-op for VAR, whose stream has the
weights' dtype).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, layer: nn.Linear, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``layer(x)`` in the layer's weight dtype (the residual stream may be float32)."""
    weight = layer.weight
    if bias is None:
        bias = layer.bias
    return F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))


class FeedForward(nn.Module):
    """fc2(GELU_tanh(fc1(x))); parameter names as in the official checkpoints (``ffn.fc1``, ``ffn.fc2``)."""

    def __init__(self, embed_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.gelu(linear(x, self.fc1), approximate="tanh"), self.fc2)
