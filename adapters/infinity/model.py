"""The Infinity transformer: text conditioning, blocks, head (reference §3, §4, §6).

``InfinityTransformer`` holds exactly the official state-dict keys (``block_chunks.{c}.module.{j}…``,
buffers ``zero_k_bias`` included); the generation loop lives in ``generate.py`` and the user-facing
model (text encoder + transformer + VAE) in ``pipeline.py``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from .attention import TextAttentivePool
from .blocks import AdaLNBeforeHead, CrossAttentionBlock
from .config import InfinityConfig
from .rope import rope_table


class RMSNorm(nn.Module):
    """``text_norm``: x * rsqrt(mean(x^2) + eps) * weight, float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class BlockChunk(nn.Module):
    """One ``block_chunks.{c}`` entry; its blocks live under ``.module``."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


@attrs.frozen
class TextContext:
    """Per-generation conditioning: rows are conditional prompts first, then unconditional ones."""

    text: torch.Tensor  # (rows, Lt, C) projected text for cross-attention
    mask: torch.Tensor  # (rows, Lt) bool, True = real token
    cond: torch.Tensor  # (rows, C) cond_BD, the pooled SOS vector
    gss: torch.Tensor  # (rows, 1, 6, C) shared AdaLN output
    num_prompts: int

    @property
    def rows(self) -> int:
        return self.cond.shape[0]


class InfinityTransformer(nn.Module):
    """Infinity's transformer with the official module tree (see ``InfinityConfig``)."""

    def __init__(self, config: InfinityConfig):
        super().__init__()
        if not isinstance(config, InfinityConfig):
            raise TypeError(f"config must be an InfinityConfig, got {type(config).__name__}")
        self.config = c = config
        width, text = c.embed_dim, c.text_channels
        self.cfg_uncond = nn.Parameter(torch.zeros(c.text_maxlen, text))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, width))
        self.text_norm = RMSNorm(text, c.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(width, text, c.pool_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(text, width), nn.GELU(approximate="tanh"),
                                              nn.Linear(width, width))
        self.lvl_embed = nn.Embedding(c.num_level_embeddings, width)
        self.word_embed = nn.Linear(c.token_bits, width)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(width, 6 * width))
        self.head_nm = AdaLNBeforeHead(width, width, c.norm_eps)
        self.head = nn.Linear(width, c.head_outputs)
        per_chunk = c.blocks_per_chunk
        self.block_chunks = nn.ModuleList(
            BlockChunk([CrossAttentionBlock(width, c.num_heads, width, c.ffn_dim, c.norm_eps) for _ in range(per_chunk)])
            for _ in range(c.block_chunks))
        self._rope_tables: dict = {}
        # None: cache K in the compute dtype; torch.float32: the official bf16 run's K layout (§9);
        # load_infinity sets float32 (the official layout) unless told otherwise.
        self.key_dtype: Optional[torch.dtype] = None

    # -- structure -------------------------------------------------------------------------------
    def blocks(self) -> list[CrossAttentionBlock]:
        """Blocks in global order (layer index = chunk * blocks_per_chunk + index)."""
        return [block for chunk in self.block_chunks for block in chunk.module]

    @property
    def block_dtype(self) -> torch.dtype:
        return self.block_chunks[0].module[0].sa.mat_qkv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.pos_start.device

    def set_block_dtype(self, dtype: torch.dtype) -> None:
        """Cast the blocks' linear layers (the compute) to ``dtype``; everything else stays float32,
        as the official bf16 setup (reference §9)."""
        for block in self.blocks():
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    module.to(dtype)

    def rope(self, template: Sequence[tuple[int, int]]) -> torch.Tensor:
        key = (tuple(map(tuple, template)), self.device)
        table = self._rope_tables.get(key)
        if table is None:
            c = self.config
            table = rope_table(key[0], c.head_dim, base=c.rope_base, grid=c.rope_grid).to(self.device)
            self._rope_tables[key] = table
        return table

    # -- text ------------------------------------------------------------------------------------
    def prepare_text(self, features: Sequence[torch.Tensor], *, guidance: bool) -> TextContext:
        """features: per prompt, its T5 features (len_i, text_channels). With guidance the rows are
        [conditional..., unconditional...], the unconditional text being ``cfg_uncond[:len_i]``."""
        c = self.config
        rows = [f.to(self.device, torch.float32) for f in features]
        for i, f in enumerate(rows):
            if f.ndim != 2 or f.shape[1] != c.text_channels or f.shape[0] < 1:
                raise ValueError(f"text features of prompt {i} must be (tokens >= 1, {c.text_channels}), got {tuple(f.shape)}")
            if f.shape[0] > c.text_maxlen:
                raise ValueError(f"prompt {i} has {f.shape[0]} text tokens; this model allows at most "
                                 f"{c.text_maxlen} (the rows of cfg_uncond)")
        if guidance:
            rows = rows + [self.cfg_uncond[: f.shape[0]].float() for f in rows]
        longest = max(f.shape[0] for f in rows)
        padded = torch.zeros(len(rows), longest, c.text_channels, device=self.device)
        mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=self.device)
        for i, f in enumerate(rows):
            padded[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = True
        normed = self.text_norm(padded)
        cond = self.text_proj_for_sos(normed, mask).float()
        text = self.text_proj_for_ca(normed)
        gss = self.shared_ada_lin(cond).float().view(-1, 1, 6, c.embed_dim)
        return TextContext(text=text, mask=mask, cond=cond, gss=gss, num_prompts=len(features))

    # -- one scale ---------------------------------------------------------------------------------
    def start_tokens(self, ctx: TextContext) -> torch.Tensor:
        """The first scale's input: cond_BD + pos_start, (rows, 1, C)."""
        return ctx.cond.unsqueeze(1) + self.pos_start.float()

    def embed_codes(self, codes: torch.Tensor, rows: int) -> torch.Tensor:
        """Next-scale input from resized codes (B, token_bits, h, w): word_embed, repeated for CFG rows."""
        tokens = codes.flatten(2).transpose(1, 2)
        x = F.linear(tokens.float(), self.word_embed.weight.float(), self.word_embed.bias.float())
        return x.repeat(rows // codes.shape[0], 1, 1)

    def forward_scale(self, x: torch.Tensor, scale: int, ctx: TextContext, *, cache, rope_table: torch.Tensor,
                      rope_start: int, compute_dtype: torch.dtype, stats=None) -> torch.Tensor:
        """Run every block on the current map x (rows, h*w, C) at ``scale``; returns the hidden states."""
        x = x + self.lvl_embed.weight[scale].float()
        for layer, block in enumerate(self.blocks()):
            x = block(x, ctx.gss, ctx.text, ctx.mask, cache=cache, layer=layer, scale=scale,
                      rope_table=rope_table, rope_start=rope_start, compute_dtype=compute_dtype,
                      key_dtype=self.key_dtype, stats=stats, stats_rows=ctx.num_prompts)
        return x

    def logits(self, hidden: torch.Tensor, ctx: TextContext) -> torch.Tensor:
        """Head on all rows, float32: (rows, h*w, 2 * token_bits)."""
        return F.linear(self.head_nm(hidden, ctx.cond), self.head.weight.float(), self.head.bias.float())
