"""Infinity's attention modules: cosine self-attention with 2-D RoPE and the KV cache, text
cross-attention, and the text attention pool (reference §5.1, §6.3, §6.4).

Module and parameter names mirror the official ones so that state-dict keys match
(``sa.mat_qkv.weight``, ``sa.q_bias``, ``sa.zero_k_bias``, ``ca.mat_kv.weight``, …).

Deviation: the official code runs cross-attention and the pool with a packed variable-length
flash-attention kernel; we pad the text per row and pass a key-padding mask to SDPA (same maths).
Self-attention goes through ``adapters.attention.cached_self_attention`` so that every cache policy
sees the same call.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from adapters.attention import cached_self_attention
from adapters.layers import linear

from .rope import apply_rope

MAX_LOG_SCALE = math.log(100.0)  # the learned per-head multiplier is capped at 100


class SelfAttention(nn.Module):
    """Cosine self-attention: q, k L2-normalised, q times exp(min(scale_mul, ln 100)), RoPE-2d,
    softmax scale 1, no mask (every cached token of earlier scales plus the whole current map)."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, h: torch.Tensor, *, cache, layer: int, scale: int, rope_table: torch.Tensor,
                rope_start: int, compute_dtype: torch.dtype, key_dtype: Optional[torch.dtype] = None, stats=None,
                stats_rows: Optional[int] = None):
        rows, length, width = h.shape
        heads, head_dim = self.num_heads, self.head_dim
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = linear(h, self.mat_qkv, bias).view(rows, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scale_mul = self.scale_mul_1H11.float().clamp_max(MAX_LOG_SCALE).exp()
        q = F.normalize(q.float(), dim=-1, eps=1e-12).mul(scale_mul)
        k = F.normalize(k.float(), dim=-1, eps=1e-12)
        q, k = apply_rope(q, rope_table, rope_start), apply_rope(k, rope_table, rope_start)

        def raw_queries():  # ScaleKV's reference score: x @ W_q^T, no bias, norm, scale or RoPE
            weight = self.mat_qkv.weight[:width]
            return F.linear(h.to(weight.dtype), weight).view(rows, length, heads, head_dim).transpose(1, 2)

        # Cached K in the compute dtype by default; key_dtype=float32 keeps the official bf16 layout
        # (K float32 after the float32 norm and RoPE, V bf16: 6 bytes per channel, reference §9).
        out = cached_self_attention(cache, layer, scale, q.to(compute_dtype), k.to(key_dtype or compute_dtype),
                                    v.to(compute_dtype), raw_queries=raw_queries, stats=stats,
                                    stats_rows=stats_rows)
        return linear(out.transpose(1, 2).reshape(rows, length, width), self.proj)


def _text_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q (B, H, Lq, hd), kv (B, Lt, 2, H, hd), mask (B, Lt) True = real token -> (B, Lq, H * hd)."""
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None, None, :],
                                         scale=1.0 / math.sqrt(head_dim))
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class CrossAttention(nn.Module):
    """Block cross-attention to the projected text: no QK-norm, no RoPE, softmax scale 1/sqrt(hd)."""

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.mat_q = nn.Linear(embed_dim, embed_dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows, length, width = x.shape
        q = linear(x, self.mat_q).view(rows, length, self.num_heads, self.head_dim).transpose(1, 2)
        # Recomputed at every scale, as the official code does: caching it per layer would save ~0.2 % of
        # the compute but hold rows x text x 2C per layer (GBs at batch 8 with long prompts) all along.
        kv = linear(text, self.mat_kv, torch.cat((self.zero_k_bias, self.v_bias)))
        kv = kv.view(rows, text.shape[1], 2, self.num_heads, self.head_dim)
        return linear(_text_attention(q, kv, mask, self.head_dim), self.proj)


class AttentionPool(nn.Module):
    """``text_proj_for_sos.ca``: one learned query per head (``mat_q``, not a Linear) attends over
    each row's own text; the result is the SOS token / conditioning vector ``cond_BD``."""

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        self.mat_kv = nn.Linear(kv_dim, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = text.shape[0]
        kv = linear(text, self.mat_kv, torch.cat((self.zero_k_bias, self.v_bias)))
        kv = kv.view(rows, text.shape[1], 2, self.num_heads, self.head_dim)
        q = self.mat_q.to(kv.dtype).expand(rows, -1, -1).unsqueeze(2)  # (B, H, 1, hd)
        return linear(_text_attention(q, kv, mask, self.head_dim), self.proj).squeeze(1)


class TextAttentivePool(nn.Module):
    """Holds the pool under ``.ca`` (official key prefix ``text_proj_for_sos.ca``)."""

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int):
        super().__init__()
        self.ca = AttentionPool(embed_dim, kv_dim, num_heads)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ca(text, mask)
