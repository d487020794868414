"""Infinity's BSQ-VAE: the decoder path and the bit -> code conversion, in plain PyTorch.

Facts: ``shared/reference/infinity.md`` §8.2 (bits -> codes, resizing), §8.5 (image conversion) and
§10 (structure, keys, quantizer), checked against ``shared/golden/bsq_vae``. Binary Spherical
Quantization: Zhao et al., arXiv 2406.07548; the autoencoder follows the official Infinity code
(FoundationVision/Infinity, ``infinity/models/bsq_vae``).

Deviations from the official code:
- Only the decoder and the quantizer's ``indices_to_codes`` are built (inference needs nothing else);
  the encoder and the ``lfq.mask`` buffer are read from files only to be skipped (the mask is
  shape-checked).
- Loading is strict: missing or mis-shaped decoder keys are errors (the official loader skips them).
- ``images_to_uint8`` returns RGB by default; the official code flips to BGR for OpenCV
  (``bgr=True`` reproduces that).
- Only the 2-D image path (no 3-D/video convolutions, no attention, no pixel-shuffle upsampler):
  the released checkpoints use none of them, and asking for them is an error.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any, Mapping, Optional, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from adapters.checkpoint_io import (CheckpointError, CheckpointMismatchError, check_state_dict, describe_keys as _describe,
                                    load_torch_file)
from adapters.validators import positive_int

__all__ = [
    "BSQVAEConfig",
    "BSQVAEDecoder",
    "bits_to_codes",
    "images_to_uint8",
    "load_bsq_vae",
    "resize_codes",
]

# Buffers the official quantizer stores twice (``quantize`` aliases ``quantizer``); not needed.
QUANTIZER_MASK_KEYS = ("quantizer.lfq.mask", "quantize.lfq.mask")
DECODER_PREFIX = "decoder."
VAE_FILE = "BSQ-VAE checkpoint (vae_weights= / --vae-weights)"
ENCODER_PREFIX = "encoder."


def _group_count(channels: int) -> int:
    """GroupNorm groups as the official ``Normalize``: 32 if they divide, else 24."""
    if channels % 32 == 0:
        return 32
    if channels % 24 == 0:
        return 24
    raise ValueError(f"BSQ-VAE width {channels} must be a multiple of 32 or 24 (GroupNorm groups)")


def _check_multipliers(instance, attribute, value):
    if not value:
        raise ValueError("BSQVAEConfig.channel_multipliers needs at least one level")
    for m in value:
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"BSQVAEConfig.channel_multipliers entries must be positive ints, got {value!r}")


def _check_patch_size(instance, attribute, value):
    positive_int(instance, attribute, value)
    if value & (value - 1):
        raise ValueError(f"BSQVAEConfig.patch_size must be a power of two, got {value}")


@attrs.frozen
class BSQVAEConfig:
    """Shape of the BSQ-VAE decoder (official ``AutoEncoder`` arguments, decoder side).

    codebook_dim: latent channels = bits per VAE position (32 for 2B, 14 for 8B).
    base_channels, channel_multipliers: level i has ``base_channels * channel_multipliers[i]``
    channels (official ``base_ch``, ``decoder_ch_mult``). num_res_blocks: the official value; every
    decoder level holds ``num_res_blocks + 1`` residual blocks. patch_size: levels 1..log2(patch_size)
    upsample by 2. spatial_patchify: transformer tokens are 2x2 patches of VAE positions (8B).
    """

    codebook_dim: int = attrs.field(validator=positive_int)
    base_channels: int = attrs.field(default=128, validator=positive_int)
    channel_multipliers: tuple[int, ...] = attrs.field(
        default=(1, 2, 4, 4, 4), converter=tuple, validator=_check_multipliers
    )
    num_res_blocks: int = attrs.field(default=2, validator=positive_int)
    patch_size: int = attrs.field(default=16, validator=_check_patch_size)
    spatial_patchify: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def __attrs_post_init__(self):
        for width in self.level_channels:
            _group_count(width)
        if not self.upsample_levels:
            raise ValueError(
                f"BSQVAEConfig with patch_size {self.patch_size} and {self.num_levels} level(s) has no "
                "upsampler; it needs patch_size >= 2 and at least 2 levels"
            )

    # -- presets -----------------------------------------------------------------------------
    @classmethod
    def infinity_2b(cls) -> "BSQVAEConfig":
        """``infinity_vae_d32reg.pth``: d = 32, stride 16 (reference §10.1)."""
        return cls(codebook_dim=32, channel_multipliers=(1, 2, 4, 4, 4), patch_size=16)

    @classmethod
    def infinity_8b(cls) -> "BSQVAEConfig":
        """``infinity_vae_d56_f8_14_patchify.pth``: d = 14, stride 8, 2x2 spatial patchify (§7.4)."""
        return cls(codebook_dim=14, channel_multipliers=(1, 2, 4, 4), patch_size=8, spatial_patchify=True)

    @classmethod
    def tiny(cls, codebook_dim: int = 32, spatial_patchify: bool = False) -> "BSQVAEConfig":
        """Official structure at width 32/64 (random-weight tests and ``infinity-tiny``).

        Same strides as the real presets: 16 (five levels), or 8 (four levels) with patchify.
        """
        multipliers = (1, 1, 2, 2) if spatial_patchify else (1, 1, 2, 2, 2)
        return cls(
            codebook_dim=codebook_dim,
            base_channels=32,
            channel_multipliers=multipliers,
            patch_size=8 if spatial_patchify else 16,
            spatial_patchify=spatial_patchify,
        )

    @classmethod
    def from_official(cls, fields: Mapping[str, Any], *, spatial_patchify: Optional[bool] = None) -> "BSQVAEConfig":
        """Build from official-style fields: the golden ``decoder_config`` (``ch``, ``z_channels``…),
        the ``AutoEncoder`` argument namespace (``base_ch``, ``decoder_ch_mult``…, also as a dict),
        or an Infinity ``vae_config`` (``codebook_dim``, ``patch_size``; widths then follow the
        official loader: base 128, ch_mult [1,2,4,4,4] at patch 16, [1,2,4,4] at patch 8).

        ``spatial_patchify`` defaults to ``patch_size == 8``, the coupling the official loader uses.
        """
        if not isinstance(fields, Mapping):
            fields = vars(fields)  # argparse.Namespace
        if "z_channels" in fields and "ch" in fields:  # golden decoder_config summary
            _require_value(fields, "use_pxsf", (False, None))
            _require_value(fields, "attention", ("no", None))
            codebook_dim, base, mult = fields["z_channels"], fields["ch"], fields["ch_mult"]
            blocks, patch = fields.get("num_res_blocks", 2), fields["patch_size"]
        elif "base_ch" in fields and "decoder_ch_mult" in fields:  # AutoEncoder(args)
            _require_value(fields, "use_pxsf", (False, None))
            _require_value(fields, "cnn_attention", ("no", None))
            _require_value(fields, "cnn_type", ("2d", None))
            _require_value(fields, "norm_type", ("group", None))
            _require_value(fields, "use_vae", (False, None))
            _require_value(fields, "quantizer_type", ("MultiScaleBSQ", None))
            codebook_dim, base, mult = fields["codebook_dim"], fields["base_ch"], fields["decoder_ch_mult"]
            blocks, patch = fields["num_res_blocks"], fields["patch_size"]
        elif "codebook_dim" in fields and "patch_size" in fields:  # Infinity vae_config
            _require_value(fields, "quantizer", ("MultiScaleBSQ", None))
            _require_value(fields, "z_interplote_up", ("trilinear", None))
            codebook_dim, patch, base, blocks = fields["codebook_dim"], fields["patch_size"], 128, 2
            if patch not in (8, 16):
                raise ValueError(f"vae_config patch_size {patch!r}: the official loader knows 8 and 16 only")
            mult = (1, 2, 4, 4) if patch == 8 else (1, 2, 4, 4, 4)
        else:
            raise ValueError(
                "unrecognised BSQ-VAE fields: expected a decoder_config (ch, ch_mult, z_channels, patch_size), "
                "AutoEncoder args (base_ch, decoder_ch_mult, codebook_dim, patch_size) or a vae_config "
                f"(codebook_dim, patch_size); got keys {sorted(fields)[:20]}"
            )
        size = fields.get("codebook_size")
        if size is not None and size != 2**codebook_dim:
            raise ValueError(f"codebook_size {size} is not 2**codebook_dim = 2**{codebook_dim}")
        return cls(
            codebook_dim=codebook_dim,
            base_channels=base,
            channel_multipliers=tuple(mult),
            num_res_blocks=blocks,
            patch_size=patch,
            spatial_patchify=(patch == 8) if spatial_patchify is None else spatial_patchify,
        )

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "BSQVAEConfig":
        """Read the decoder's shape from its weights (either key spelling; only shapes are used).

        A released layout gets its preset (so the d56 file gets spatial patchify); any other layout
        gets ``patch_size = 2**(number of upsamplers)``, which builds the same decoder.
        """
        return _infer_config(state)

    # -- derived -----------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.channel_multipliers)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_multipliers)

    @property
    def upsample_levels(self) -> tuple[int, ...]:
        """Levels followed by an upsampler: 1 <= i <= log2(patch_size), as the official decoder."""
        max_up = int(math.log2(self.patch_size))
        return tuple(i for i in range(self.num_levels) if 1 <= i <= max_up)

    @property
    def upsample_factor(self) -> int:
        """Image pixels per latent position along each side."""
        return 2 ** len(self.upsample_levels)

    @property
    def token_bits(self) -> int:
        """Bits per transformer token: d, or 4d with spatial patchify."""
        return self.codebook_dim * (4 if self.spatial_patchify else 1)

    @property
    def token_to_latent(self) -> int:
        """Latent positions per transformer token along each side (2 with spatial patchify)."""
        return 2 if self.spatial_patchify else 1


def _require_value(fields: Mapping[str, Any], name: str, allowed: tuple) -> None:
    value = fields.get(name)
    if value not in allowed:
        allowed_text = [a for a in allowed if a is not None]
        raise ValueError(f"BSQ-VAE field {name}={value!r} is not supported; only {allowed_text} is implemented")


# ---------------------------------------------------------------------------------------------
# Quantizer pieces: bits -> codes, code resizing.
# ---------------------------------------------------------------------------------------------


def bits_to_codes(bits: torch.Tensor, codebook_dim: int, *, spatial_patchify: bool = False) -> torch.Tensor:
    """Bits ``(B, h, w, k)`` -> BSQ codes ``(B, d, h', w')`` float32, as ``lfq.indices_to_codes``.

    code = bit * 2s - s with s = 1/sqrt(d), then L2-normalised over the d bits, which can move a
    value by one float32 ulp (for d = 32 the official value is 0.1767767071723938, one ulp above
    1/sqrt(32)); we do the same arithmetic, so the codes are bit-identical.
    Without patchify k = d and (h', w') = (h, w). With spatial patchify (8B) the bits are in
    transformer-token layout, k = 4d, and are pixel-shuffled by 2 first (token channel j goes to VAE
    channel j // 4 at (2y + (j % 4) // 2, 2x + j % 2)), giving (h', w') = (2h, 2w).
    """
    if not isinstance(bits, torch.Tensor) or bits.ndim != 4:
        shape = tuple(bits.shape) if isinstance(bits, torch.Tensor) else type(bits).__name__
        raise ValueError(f"bits must be a (B, h, w, bits) tensor, got {shape}")
    if bits.is_floating_point() or bits.is_complex():
        raise ValueError(f"bits must be an integer or bool tensor of 0/1, got dtype {bits.dtype}")
    expected = codebook_dim * (4 if spatial_patchify else 1)
    if bits.shape[-1] != expected:
        layout = f"4 x {codebook_dim} (spatial patchify)" if spatial_patchify else f"{codebook_dim}"
        raise ValueError(f"bits have {bits.shape[-1]} per position; this VAE expects {layout} = {expected}")
    bits = bits.long()  # the official loop passes the int64 samples
    if bits.numel() and bool(((bits != 0) & (bits != 1)).any()):
        raise ValueError(f"bits must be 0 or 1; found values {torch.unique(bits)[:8].tolist()}")
    if spatial_patchify:
        bits = F.pixel_shuffle(bits.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    scale = 1.0 / math.sqrt(codebook_dim)
    # Same expression and order as the official bits_to_codes (int64 * float -> float32).
    codes = bits * scale * 2 - scale
    codes = F.normalize(codes, dim=-1)  # the L2 normalisation BSQ requires (a no-op up to an ulp)
    # A channels-last view, like the official rearrange; resizing and convolution pick kernels by
    # memory format, so keeping it keeps the official float32 rounding.
    return codes.permute(0, 3, 1, 2)


def resize_codes(codes: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize ``(B, d, h, w)`` codes to ``size = (H, W)`` as the official loop does.

    The official code resizes 5-D ``(B, d, 1, h, w)`` tensors with trilinear interpolation
    (align_corners False) both up and down; with T = 1 that is bilinear up to rounding, so we call
    trilinear itself to stay bit-exact.
    """
    if codes.ndim != 4:
        raise ValueError(f"codes must be (B, d, h, w), got shape {tuple(codes.shape)}")
    height, width = (int(s) for s in size)
    if (height, width) == tuple(codes.shape[-2:]):
        return codes  # identity weights (1 and 0) in the official call: exact copy
    return F.interpolate(codes.unsqueeze(2), size=(1, height, width), mode="trilinear").squeeze(2)


# ---------------------------------------------------------------------------------------------
# Decoder modules. Names mirror the official module tree so that state-dict keys match it
# (a conv is wrapped in a module holding ``.conv``, a GroupNorm in one holding ``.norm``).
# ---------------------------------------------------------------------------------------------


class _Conv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Norm(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_group_count(channels), channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no per-device query
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # written out as the official code does (not F.silu)


class _ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus a (1x1-projected when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _Norm(in_channels)
        self.conv1 = _Conv(in_channels, out_channels, 3)
        self.norm2 = _Norm(out_channels)
        self.conv2 = _Conv(out_channels, out_channels, 3)
        if in_channels != out_channels:
            self.nin_shortcut = _Conv(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class _Upsample(nn.Module):
    """Nearest x2 then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _Conv(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    def __init__(self, blocks: list[nn.Module], upsample: Optional[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if upsample is not None:
            self.upsample = upsample


class BSQVAEDecoder(nn.Module):
    """The BSQ-VAE decoder: latent codes ``(B, d, H, W)`` -> image ``(B, 3, sH, sW)`` in [-1, 1].

    ``state_dict()`` keys are the official ones without the ``decoder.`` prefix;
    ``official_state_dict()`` gives them as in the released files.
    """

    def __init__(self, config: BSQVAEConfig):
        super().__init__()
        if not isinstance(config, BSQVAEConfig):
            raise TypeError(f"config must be a BSQVAEConfig, got {type(config).__name__}")
        self.config = config
        widths = config.level_channels
        top = widths[-1]
        self.conv_in = _Conv(config.codebook_dim, top, 3)
        self.mid = nn.Module()
        self.mid.block_1 = _ResnetBlock(top, top)
        self.mid.block_2 = _ResnetBlock(top, top)
        levels: list[Optional[_Level]] = [None] * config.num_levels
        width_in = top
        for level in reversed(range(config.num_levels)):  # built top-down, stored by level index
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(_ResnetBlock(width_in, widths[level]))
                width_in = widths[level]
            upsample = _Upsample(width_in) if level in config.upsample_levels else None
            levels[level] = _Level(blocks, upsample)
        self.up = nn.ModuleList(levels)
        self.norm_out = _Norm(width_in)
        self.conv_out = _Conv(width_in, 3, 3)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Raw decoder output (not clamped)."""
        d = self.config.codebook_dim
        if codes.ndim != 4 or codes.shape[1] != d or not codes.is_floating_point():
            raise ValueError(
                f"decoder input must be floating (B, {d}, H, W) codes, got {tuple(codes.shape)} {codes.dtype}"
            )
        if not _autocast_enabled(codes.device.type):
            codes = codes.to(self.conv_in.conv.weight.dtype)  # run in the weights' dtype
        h = self.conv_in(codes)
        h = self.mid.block_2(self.mid.block_1(h))
        for level in reversed(range(self.config.num_levels)):
            stage = self.up[level]
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))

    def decode(self, summed_codes: torch.Tensor) -> torch.Tensor:
        """``AutoEncoder.decode``: decoder output clamped to [-1, 1]."""
        return torch.clamp(self(summed_codes), min=-1, max=1)

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """Bits ``(B, h, w, token_bits)`` uint8 -> codes ``(B, d, h', w')``; see :func:`bits_to_codes`."""
        return bits_to_codes(bits, self.config.codebook_dim, spatial_patchify=self.config.spatial_patchify)

    def decode_bits(self, bits_per_scale: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``AutoEncoder.decode_from_indices(…, "bit_label")``: returns (summed codes, image).

        Every scale's codes are resized (trilinear) to the last scale's size and summed in order.
        """
        if not bits_per_scale:
            raise ValueError("decode_bits needs the bits of at least one scale")
        codes = [self.bits_to_codes(b) for b in bits_per_scale]
        size = codes[-1].shape[-2:]
        summed = torch.zeros_like(codes[-1])
        for c in codes:
            summed = summed + resize_codes(c, size)
        return summed, self.decode(summed)

    def official_state_dict(self, spelling: str = "wrapped") -> dict[str, torch.Tensor]:
        """Weights under the released files' names: ``decoder.…conv.weight`` (``"wrapped"``) or the
        alternative spelling the official loader also accepts (``"unwrapped"``: ``decoder.…weight``)."""
        if spelling not in ("wrapped", "unwrapped"):
            raise ValueError(f"spelling must be 'wrapped' or 'unwrapped', got {spelling!r}")
        out = {}
        for key, value in self.state_dict().items():
            name = DECODER_PREFIX + key
            out[_unwrap(name) if spelling == "unwrapped" else name] = value
        return out


_WRAPPER = re.compile(r"\.(conv|norm)\.(weight|bias)$")


def _unwrap(key: str) -> str:
    """``X.conv.weight`` -> ``X.weight`` (the spelling without the Conv/Normalize wrapper)."""
    return _WRAPPER.sub(r".\2", key)


# ---------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------


def _select_state_dict(obj: Any, entry: Optional[str]) -> Mapping[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise TypeError(f"BSQ-VAE source must be a file path or a state-dict mapping, got {type(obj).__name__}")
    if entry is not None:
        if entry not in obj or not isinstance(obj[entry], Mapping):
            raise CheckpointMismatchError(f"BSQ-VAE checkpoint has no state-dict entry {entry!r}; top-level keys: {sorted(obj)[:20]}")
        return obj[entry]
    if isinstance(obj.get("vae"), Mapping):  # the released files (reference §10.5)
        return obj["vae"]
    if any(isinstance(k, str) and k.startswith(DECODER_PREFIX) for k in obj):
        return obj
    raise CheckpointMismatchError(
        "BSQ-VAE source has neither a 'vae' entry nor 'decoder.*' keys; "
        f"top-level keys: {sorted(map(str, obj))[:20]}"
    )


def _find(state: Mapping[str, torch.Tensor], wrapped_key: str) -> Optional[torch.Tensor]:
    if wrapped_key in state:
        return state[wrapped_key]
    return state.get(_unwrap(wrapped_key))


def _infer_config(state: Mapping[str, torch.Tensor]) -> BSQVAEConfig:
    """Read the decoder's shape from its weights; a known released layout gets its preset."""
    p = DECODER_PREFIX
    conv_in = _find(state, p + "conv_in.conv.weight")
    conv_out = _find(state, p + "conv_out.conv.weight")
    if conv_in is None or conv_out is None:
        raise CheckpointMismatchError("cannot infer the BSQ-VAE shape: decoder.conv_in / decoder.conv_out weights are missing; pass config=")
    codebook_dim, base = conv_in.shape[1], conv_out.shape[1]
    multipliers, level = [], 0
    while (w := _find(state, f"{p}up.{level}.block.0.conv1.conv.weight")) is not None:
        if w.shape[0] % base:
            raise ValueError(f"cannot infer the BSQ-VAE shape: up.{level} width {w.shape[0]} is not a multiple of {base}")
        multipliers.append(w.shape[0] // base)
        level += 1
    blocks = 0
    while _find(state, f"{p}up.0.block.{blocks}.conv1.conv.weight") is not None:
        blocks += 1
    upsamplers = [i for i in range(level) if _find(state, f"{p}up.{i}.upsample.conv.conv.weight") is not None]
    if not multipliers or blocks < 2 or upsamplers != list(range(1, len(upsamplers) + 1)):
        raise ValueError(
            f"cannot infer the BSQ-VAE shape (levels {multipliers}, blocks per level {blocks}, "
            f"upsampling levels {upsamplers}); pass config="
        )
    inferred = BSQVAEConfig(
        codebook_dim=int(codebook_dim),
        base_channels=int(base),
        channel_multipliers=tuple(multipliers),
        num_res_blocks=blocks - 1,
        patch_size=2 ** len(upsamplers),
    )
    for preset in (BSQVAEConfig.infinity_2b(), BSQVAEConfig.infinity_8b()):
        if attrs.evolve(preset, spatial_patchify=False) == inferred:
            return preset  # e.g. the d56 file is the 8B's patchify VAE
    return inferred



def load_bsq_vae(
    source: str | os.PathLike | Mapping[str, Any],
    config: Optional[BSQVAEConfig] = None,
    *,
    strict: bool = True,
    entry: Optional[str] = None,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
) -> BSQVAEDecoder:
    """Build the decoder and load official weights.

    source: a ``.pth`` path (weights under ``'vae'``, as released; ``entry='ema'`` picks another
    entry), a checkpoint dict, or a flat state dict. Both key spellings are accepted
    (``decoder.conv_in.conv.weight`` and ``decoder.conv_in.weight``). ``encoder.*`` keys and the
    quantizer's ``lfq.mask`` buffers are skipped explicitly. config: None infers the shape from the
    weights (the released layouts map to their presets, so the d56 file gets spatial patchify).

    strict: missing decoder keys and unknown ``decoder.*`` keys (parts this decoder does not have,
    e.g. attention) are errors; with ``strict=False`` they are warnings and missing weights keep
    their initial values. A shape mismatch is always an error. Keys outside ``decoder.*`` and
    ``encoder.*`` cannot affect decoding: they are skipped with a warning that lists them.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BSQ-VAE file not found: {path!r}")
        source = load_torch_file(path, VAE_FILE)
        if not isinstance(source, Mapping):
            raise CheckpointError(f"{VAE_FILE} {path!r} holds a {type(source).__name__}, not a state dict")
    state = _select_state_dict(source, entry)
    if config is None:
        config = BSQVAEConfig.from_state_dict(state)
    model = BSQVAEDecoder(config)
    own = model.state_dict()
    wrapped_to_own = {DECODER_PREFIX + k: k for k in own}
    unwrapped_to_wrapped = {_unwrap(k): k for k in wrapped_to_own}

    found: dict[str, torch.Tensor] = {}
    unexpected, foreign, duplicated = [], [], []
    for key, value in state.items():
        if key in wrapped_to_own:
            target = key
        elif key in unwrapped_to_wrapped:
            target = unwrapped_to_wrapped[key]
        elif isinstance(key, str) and key.startswith(ENCODER_PREFIX):
            continue  # the encoder is not needed to generate
        elif key in QUANTIZER_MASK_KEYS:
            if tuple(value.shape) != (config.codebook_dim,):
                raise ValueError(
                    f"{key} has shape {tuple(value.shape)}: this file's codebook has {value.shape[0] if value.ndim else '?'} "
                    f"bits but the config says codebook_dim={config.codebook_dim}"
                )
            continue  # powers of two for int labels; bit labels do not use it
        elif isinstance(key, str) and key.startswith(DECODER_PREFIX):
            unexpected.append(key)  # a decoder part we do not build: a different architecture
            continue
        else:
            foreign.append(str(key))  # cannot affect decoding; reported, never an error
            continue
        if target in found:
            duplicated.append(target)
        found[target] = value

    if duplicated:
        raise ValueError(f"BSQ-VAE keys given in both spellings (ambiguous): {_describe(duplicated)}")
    # the one strict check, on the wrapped (``decoder.*``) names the files use
    own_wrapped = {wrapped: own[own_key] for wrapped, own_key in wrapped_to_own.items()}
    check_state_dict(own_wrapped, {**found, **{k: state[k] for k in unexpected}}, what="BSQ-VAE state dict",
                     target=f"the decoder ({config})", strict=strict)

    if foreign:
        prefixes = sorted({k.split(".")[0] for k in foreign})
        warnings.warn(
            f"BSQ-VAE source: ignored {len(foreign)} keys outside decoder.*/encoder.* "
            f"(prefixes {prefixes}): {_describe(foreign, 6)}",
            stacklevel=2,
        )
    with torch.no_grad():
        for key, value in found.items():
            param = own[wrapped_to_own[key]]
            param.copy_(value.to(dtype=param.dtype, device=param.device))
    model.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


# ---------------------------------------------------------------------------------------------
# Image conversion.
# ---------------------------------------------------------------------------------------------


def images_to_uint8(images: torch.Tensor, *, bgr: bool = False) -> torch.Tensor:
    """Decoded images ``(B, 3, H, W)`` in [-1, 1] -> ``(B, H, W, 3)`` uint8, reference §8.5.

    ``(x + 1) / 2 * 255`` in the images' own dtype, then a cast that truncates (no rounding).
    RGB order by default; ``bgr=True`` adds the official channel flip (it writes with OpenCV).
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
    if images.numel():
        low, high = images.min().item(), images.max().item()
        if not (-1.0 <= low and high <= 1.0):  # also catches NaN
            raise ValueError(f"images must lie in [-1, 1] (decode clamps them); got range [{low}, {high}]")
    out = ((images + 1) / 2).permute(0, 2, 3, 1).mul(255).to(torch.uint8)
    return out.flip(dims=(3,)) if bgr else out
