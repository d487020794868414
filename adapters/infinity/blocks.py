"""Infinity's transformer block with shared AdaLN and the head's AdaLN (reference §4).

Per block: six modulation vectors ``ada_gss + gss`` split as gamma1, gamma2, scale1, scale2, shift1,
shift2; LN = LayerNorm without affine, eps 1e-6, in float32.

    h = LN(x)(1 + scale1) + shift1;  x += SA(h) * gamma1
    x += CA(ca_norm(x), text)                               (gain 1)
    h = LN(x)(1 + scale2) + shift2;  x += FFN(h) * gamma2   (FFN = fc2(GELU_tanh(fc1(h))))

The residual stream stays float32; linear layers run in their weights' dtype (bf16 on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.layers import FeedForward

from .attention import CrossAttention, SelfAttention


def ada_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """The official fused AdaLN: layer_norm(x.float()) * (1 + scale) + shift."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps).mul(scale.add(1)).add_(shift)


class CrossAttentionBlock(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, text_dim: int, ffn_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, embed_dim))
        self.sa = SelfAttention(embed_dim, num_heads)
        self.ca = CrossAttention(embed_dim, text_dim, num_heads)
        self.ffn = FeedForward(embed_dim, ffn_dim)
        self.ca_norm = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor, gss: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                **attention) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss.float() + gss).unbind(2)
        x = x + self.sa(ada_layer_norm(x, scale1, shift1, self.eps), **attention).float().mul(gamma1)
        normed = F.layer_norm(x, (x.shape[-1],), self.ca_norm.weight.float(), self.ca_norm.bias.float(), self.eps)
        x = x + self.ca(normed, text, text_mask).float()
        return x + self.ffn(ada_layer_norm(x, scale2, shift2, self.eps)).float().mul(gamma2)


class AdaLNBeforeHead(nn.Module):
    """``head_nm``: (scale, shift) = ada_lin(cond_BD); LN(x)(1 + scale) + shift, float32."""

    def __init__(self, embed_dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.embed_dim, self.eps = embed_dim, eps
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond.float()).view(-1, 1, 2, self.embed_dim).unbind(2)
        return F.layer_norm(x.float(), (self.embed_dim,), eps=self.eps).mul(scale.add(1)).add_(shift)
