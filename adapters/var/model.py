"""The VAR transformer's inference path (VAR, arXiv 2404.02905; ``shared/reference/var.md`` §2–§4).

Module and parameter names equal the official ones, so the official state dict loads into
``VARTransformer`` key for key. Three official buffers are not modules here (``lvl_1L``,
``attn_bias_for_masking``, ``blocks.i.attn.zero_k_bias``): they are derived from the config and
checked on load by ``weights.py``.

Deviations: attention is always PyTorch SDPA through the shared ``adapters.attention`` path (the
official code may pick flash-attn or xformers, same maths); the KV cache is a ``kvpolicy.KVCache``
instead of per-module ``cached_k``/``cached_v``; no dropout / drop-path (inference only).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters.attention import cached_self_attention
from adapters.layers import FeedForward
from kvpolicy import KVCache

from .config import VARConfig

# exp(scale_mul) is clamped at 100 (the official max_scale_mul = log(100) taken in float32).
MAX_SCALE_MUL = float(torch.tensor(100.0).log())


class CosineSelfAttention(nn.Module):
    """Cosine attention with a learned per-head temperature and a per-scale KV cache.

    q, k are L2-normalised, q is multiplied by exp(min(scale_mul, ln 100)); softmax scale 1. K is
    cached after normalisation, V raw; no RoPE (positions were added at the input).
    """

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, cache: KVCache, layer: int, scale: int, stats=None,
                stats_rows: Optional[int] = None) -> torch.Tensor:
        rows, n, width = x.shape
        # The key bias is the official zero buffer: K gets no bias.
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(rows, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (rows, H, n, hd)
        scale_mul = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
        q = F.normalize(q, dim=-1).mul(scale_mul)
        k = F.normalize(k, dim=-1)

        def raw_queries() -> torch.Tensor:  # x @ W_q^T, no bias, no normalisation
            return F.linear(x, self.mat_qkv.weight[:width]).view(rows, n, self.num_heads, self.head_dim).transpose(1, 2)

        out = cached_self_attention(cache, layer, scale, q, k, v, raw_queries=raw_queries, stats=stats,
                                    stats_rows=stats_rows)
        return self.proj(out.transpose(1, 2).reshape(rows, n, width))


class AdaLNBlock(nn.Module):
    """x += Attn(LN(x)(1+s1)+b1)·γ1; x += FFN(LN(x)(1+s2)+b2)·γ2 (order γ1, γ2, s1, s2, b1, b2).

    The six modulations come from Linear(SiLU(class embedding)) per block, or (shared AdaLN, d36)
    from ``ada_gss`` plus the model's shared projection.
    """

    def __init__(self, config: VARConfig):
        super().__init__()
        c = config.embed_dim
        self.width = c
        self.shared_aln = config.shared_aln
        self.attn = CosineSelfAttention(c, config.num_heads)
        self.ffn = FeedForward(c, config.ffn_dim)
        self.ln_wo_grad = nn.LayerNorm(c, eps=config.norm_eps, elementwise_affine=False)
        if self.shared_aln:
            self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, c))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))

    def forward(self, x, cond, cache: KVCache, layer: int, scale: int, stats=None, stats_rows=None):
        if self.shared_aln:
            mods = self.ada_gss + cond  # cond: shared projection (rows, 1, 6, C)
        else:
            mods = self.ada_lin(cond).view(-1, 1, 6, self.width)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unbind(2)
        attn_in = self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1)
        x = x + self.attn(attn_in, cache, layer, scale, stats, stats_rows).mul_(gamma1)
        x = x + self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2)
        return x


class HeadNorm(nn.Module):
    """AdaLN before the head: LN(x)·(1 + scale) + shift, (scale, shift) = Linear(SiLU(cond))."""

    def __init__(self, config: VARConfig):
        super().__init__()
        self.width = config.embed_dim
        self.ln_wo_grad = nn.LayerNorm(self.width, eps=config.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(self.width, 2 * self.width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.width).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


class VARTransformer(nn.Module):
    """Class-conditional next-scale transformer; one ``step`` per scale."""

    def __init__(self, config: VARConfig):
        super().__init__()
        self.config = config
        c, first = config.embed_dim, config.patch_nums[0] ** 2
        self.pos_start = nn.Parameter(torch.zeros(1, first, c))
        self.pos_1LC = nn.Parameter(torch.zeros(1, config.total_tokens, c))
        self.word_embed = nn.Linear(config.cvae, c)
        self.class_emb = nn.Embedding(config.num_classes + 1, c)  # last row: unconditional
        self.lvl_embed = nn.Embedding(len(config.patch_nums), c)
        if config.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.blocks = nn.ModuleList(AdaLNBlock(config) for _ in range(config.depth))
        self.head_nm = HeadNorm(config)
        self.head = nn.Linear(c, config.vocab_size)

    def level_index(self) -> torch.Tensor:
        """(1, L) scale index of every position: the official ``lvl_1L`` buffer."""
        return torch.cat([torch.full((p * p,), i, dtype=torch.long) for i, p in enumerate(self.config.patch_nums)])[None]

    def level_positions(self) -> torch.Tensor:
        """lvl_embed(lvl_1L) + pos_1LC, (1, L, C)."""
        return self.lvl_embed(self.level_index().to(self.pos_1LC.device)) + self.pos_1LC

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        """Class embeddings of 2B rows: the labels, then B unconditional rows."""
        uncond = torch.full_like(labels, self.config.num_classes)
        return self.class_emb(torch.cat((labels, uncond)))

    def first_input(self, cond: torch.Tensor, level_pos: torch.Tensor) -> torch.Tensor:
        first = self.config.patch_nums[0] ** 2
        rows = cond.shape[0]
        return (cond.unsqueeze(1).expand(rows, first, -1) + self.pos_start.expand(rows, first, -1)
                + level_pos[:, :first])

    def next_input(self, next_map: torch.Tensor, scale: int, level_pos: torch.Tensor, copies: int = 2) -> torch.Tensor:
        """Word-embed the (B, Cvae, pn, pn) map for ``scale``, repeated ``copies`` times (2: the CFG
        rows; 1: teacher-forced training, which has no unconditional copies)."""
        b, cv = next_map.shape[:2]
        start = sum(p * p for p in self.config.patch_nums[:scale])
        n = self.config.patch_nums[scale] ** 2
        tokens = next_map.reshape(b, cv, -1).transpose(1, 2)
        x = self.word_embed(tokens) + level_pos[:, start:start + n]
        return x.repeat(copies, 1, 1)

    def step(self, x: torch.Tensor, cond: torch.Tensor, cache: KVCache, scale: int, stats=None,
             stats_rows: Optional[int] = None) -> torch.Tensor:
        """All blocks on the current map, then fp32 logits (rows, n, V)."""
        block_cond = self.shared_ada_lin(cond).view(-1, 1, 6, self.config.embed_dim) if self.config.shared_aln else cond
        for layer, block in enumerate(self.blocks):
            x = block(x, block_cond, cache, layer, scale, stats, stats_rows)
        # Official: head(head_nm(x.float(), cond).float()).float(); the cast to the head's dtype
        # only matters for bf16 weights without autocast.
        h = self.head_nm(x.float(), cond).float()
        return self.head(h.to(self.head.weight.dtype)).float()
