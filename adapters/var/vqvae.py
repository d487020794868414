"""The decoding half of VAR's multi-scale VQVAE (``shared/reference/var.md`` §5.5–§5.7, §7).

What inference needs: the codebook (index -> Cvae vector), the partially shared residual convs
phi_k that accumulate each scale into f_hat, ``post_quant_conv`` and the taming-style decoder.
Names equal the official ones (``quantize.embedding``, ``quantize.quant_resi.qresi_ls.k``,
``post_quant_conv``, ``decoder.*``). The encoder, ``quant_conv`` and the training statistic
``quantize.ema_vocab_hit_SV`` are not built (``weights.py`` accepts and ignores them).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VQVAEConfig


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))) + shortcut(x); 1x1 ``nin_shortcut`` if widths differ."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, softmax scale C^-1/2, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        c = self.channels
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        weights = torch.bmm(q.transpose(1, 2), k).mul_(int(c) ** -0.5).softmax(dim=2)  # (b, query, key)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Decoder(nn.Module):
    """conv_in -> mid (block, attn, block) -> up levels from coarse to fine -> norm, SiLU, conv_out.

    Level i has width ch*ch_mult[i] and num_res_blocks+1 ResnetBlocks; the coarsest level also has
    one attention block after each ResnetBlock; every level but 0 ends with an upsampler.
    """

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        mult, levels = config.ch_mult, len(config.ch_mult)
        width = config.ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, width, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(width, width)
        self.mid.attn_1 = AttnBlock(width) if config.using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(width, width)
        up = [None] * levels
        for level in reversed(range(levels)):
            stage = nn.Module()
            out = config.ch * mult[level]
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                stage.block.append(ResnetBlock(width, out))
                width = out
                if level == levels - 1 and config.using_sa:
                    stage.attn.append(AttnBlock(width))
            if level != 0:
                stage.upsample = Upsample(width)
            up[level] = stage
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """phi(z) = (1 - r) z + r conv3x3(z), r = |quant_resi| (0.5)."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class PhiPartiallyShared(nn.Module):
    """K convs shared over the scales: scale si uses the one whose tick is nearest si/(S-1)."""

    def __init__(self, channels: int, count: int, ratio: float):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, ratio) for _ in range(count))
        # float64 ticks exactly as the official code, so that ties resolve identically
        margin = 1 / 3 / count if count == 4 else 1 / 2 / count
        self.ticks = np.linspace(margin, 1 - margin, count)

    def index(self, scale: int, num_scales: int) -> int:
        return int(np.argmin(np.abs(self.ticks - scale / (num_scales - 1))))

    def forward(self, h: torch.Tensor, scale: int, num_scales: int) -> torch.Tensor:
        return self.qresi_ls[self.index(scale, num_scales)](h)


class MultiScaleQuantizer(nn.Module):
    """Codebook lookup and the residual accumulation of the scales into f_hat."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.z_channels)
        self.quant_resi = PhiPartiallyShared(config.z_channels, config.share_quant_resi, config.quant_resi)

    def lookup(self, indices: torch.Tensor, side: int) -> torch.Tensor:
        """(B, side*side) indices -> (B, Cvae, side, side)."""
        return self.embedding(indices).transpose(1, 2).reshape(indices.shape[0], -1, side, side)

    def accumulate(self, scale: int, patch_nums, f_hat: torch.Tensor, h: torch.Tensor):
        """f_hat += phi(upsample(h)); returns (f_hat, next scale's input map or None at the end).

        Not the last scale: bicubic up to the last side, phi, add; the next input is f_hat
        area-resized to the next side. Last scale: phi(h) is added directly.
        """
        last, count = patch_nums[-1], len(patch_nums)
        if scale != count - 1:
            f_hat = f_hat + self.quant_resi(F.interpolate(h, size=(last, last), mode="bicubic"), scale, count)
            side = patch_nums[scale + 1]
            return f_hat, F.interpolate(f_hat, size=(side, side), mode="area")
        return f_hat + self.quant_resi(h, scale, count), None


class VQVAE(nn.Module):
    """Decoder side of the VQVAE: quantizer pieces, ``post_quant_conv`` and the decoder."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        self.quantize = MultiScaleQuantizer(config)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 3, padding=1)
        self.decoder = Decoder(config)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decoded image in [-1, 1], (B, 3, 16·side, 16·side) for the official ch_mult."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)
