"""Infinity transformer configurations and the named presets (Infinity, arXiv 2412.04431).

Facts: ``shared/reference/infinity.md`` §2 (constructor settings, sizes, FFN rounding, attention-pool
heads) and §11 (hub files). Only the settings every released checkpoint uses are implemented;
``InfinityConfig.from_official`` rejects any other value of an official constructor flag by name.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import attrs

from adapters.validators import positive_int, positive_real

from .bsq_vae import BSQVAEConfig

HUB_REPO = "FoundationVision/Infinity"
TEXT_ENCODER_REPO = "google/flan-t5-xl"


@attrs.frozen
class InfinityConfig:
    """Shape of the Infinity transformer (official constructor arguments, inference side).

    token_bits: bits per transformer token (d: 32 for 2B, 56 = 4 x 14 for 8B's spatial patchify);
    the head predicts 2 logits per bit. text_channels: T5 width; text_maxlen: rows of ``cfg_uncond``.
    """

    depth: int = attrs.field(validator=positive_int)
    embed_dim: int = attrs.field(validator=positive_int)
    num_heads: int = attrs.field(validator=positive_int)
    block_chunks: int = attrs.field(validator=positive_int)
    token_bits: int = attrs.field(default=32, validator=positive_int)
    mlp_ratio: float = attrs.field(default=4.0, validator=positive_real)
    text_channels: int = attrs.field(default=2048, validator=positive_int)
    text_maxlen: int = attrs.field(default=512, validator=positive_int)
    norm_eps: float = attrs.field(default=1e-6, validator=positive_real)
    num_level_embeddings: int = attrs.field(default=15, validator=positive_int)
    rope_base: float = attrs.field(default=10000.0, validator=positive_real)
    rope_grid: int = attrs.field(default=128, validator=positive_int)  # 2048 // 16 grid cells per side
    spatial_patchify: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def __attrs_post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 (2-D RoPE rotates pairs of "
                             "dims, half of them by row and half by column)")
        if self.depth % self.block_chunks:
            raise ValueError(f"depth {self.depth} is not divisible by block_chunks {self.block_chunks}")
        if self.text_channels < self.pool_head_width or self.text_channels % self.pool_head_width:
            raise ValueError(f"text_channels {self.text_channels} must be a positive multiple of "
                             f"{self.pool_head_width} (the text attention pool has text_channels // "
                             f"{self.pool_head_width} heads)")
        if self.ffn_dim < 1:
            raise ValueError(f"FFN width round({self.embed_dim} * {self.mlp_ratio} / 256) * 256 is 0; raise mlp_ratio")
        if self.spatial_patchify and self.token_bits % 4:
            raise ValueError(f"token_bits {self.token_bits} must be 4 x the VAE codebook_dim with spatial patchify")
        if self.embed_dim % self.pool_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by the {self.pool_heads} "
                             "text attention-pool heads")

    # -- derived ------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        """``round(C * mlp_ratio / 256) * 256`` with Python's half-to-even round (2080 -> 8192)."""
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks

    @property
    def pool_head_width(self) -> int:
        """Text attention-pool head width on the T5 side: 128 when C <= 4096, else 64 (§2.2)."""
        return 128 if self.embed_dim <= 4096 else 64

    @property
    def pool_heads(self) -> int:
        return self.text_channels // self.pool_head_width

    @property
    def pool_head_dim(self) -> int:
        return self.embed_dim // self.pool_heads

    @property
    def codebook_dim(self) -> int:
        """Bits per VAE latent position (token_bits / 4 with spatial patchify)."""
        return self.token_bits // 4 if self.spatial_patchify else self.token_bits

    @property
    def head_outputs(self) -> int:
        return 2 * self.token_bits

    def block_name(self, layer: int) -> str:
        """Official state-dict prefix of global block ``layer``: ``block_chunks.{c}.module.{j}``."""
        chunk, index = divmod(layer, self.blocks_per_chunk)
        return f"block_chunks.{chunk}.module.{index}"

    # -- construction from the official constructor arguments ------------------------------------
    @classmethod
    def from_official(cls, model_config: Mapping[str, Any], *, token_bits: Optional[int] = None) -> "InfinityConfig":
        """Build from the official ``Infinity(**kwargs)`` arguments (e.g. a golden ``model_config``).

        token_bits: the VAE's bits per token (``vae_local.codebook_dim``, times 4 with
        ``apply_spatial_patchify``); the official constructor takes it from the VAE object.
        Flags other than the released settings are rejected with their name and value.
        """
        required = {
            "shared_aln": (True,), "head_aln": (True,), "rms_norm": (False,), "cos_attn": (True,),
            "swiglu": (False,), "head_depth": (1,), "nm0": (False,), "use_bit_label": (1, True),
            "rope2d_each_sa_layer": (1, True), "rope2d_normalized_by_hw": (2,),
            "add_lvl_embeding_only_first_block": (1, True), "customized_flash_attn": (False, 0),
            "fused_mlp": (False, 0),
        }
        for name, allowed in required.items():
            if name in model_config and model_config[name] not in allowed:
                raise ValueError(f"Infinity option {name}={model_config[name]!r} is not implemented; "
                                 f"supported: {allowed[0]!r} (the released checkpoints' setting)")
        if model_config.get("cross_attn_layer_scale", -1) >= 0:
            raise ValueError(f"Infinity option cross_attn_layer_scale={model_config['cross_attn_layer_scale']!r} "
                             "is not implemented; supported: a negative value (gain 1, no parameter)")
        if model_config.get("selecting_idx") is not None:
            raise ValueError(f"Infinity option selecting_idx={model_config['selecting_idx']!r} is not implemented")
        patchify = bool(model_config.get("apply_spatial_patchify", 0))
        if token_bits is None:
            raise ValueError("token_bits (the VAE codebook_dim, x4 with spatial patchify) is required: the "
                             "official constructor reads it from the VAE")
        for name in ("depth", "embed_dim", "num_heads"):
            if name not in model_config:
                raise KeyError(f"official model_config lacks {name!r}")
        return cls(
            depth=int(model_config["depth"]), embed_dim=int(model_config["embed_dim"]),
            num_heads=int(model_config["num_heads"]), block_chunks=int(model_config.get("block_chunks", 1)),
            token_bits=int(token_bits) * (4 if patchify else 1),
            mlp_ratio=float(model_config.get("mlp_ratio", 4.0)),
            text_channels=int(model_config.get("text_channels", 2048)),
            text_maxlen=int(model_config.get("text_maxlen", 512)),
            norm_eps=float(model_config.get("norm_eps", 1e-6)), spatial_patchify=patchify,
        )


def _text_encoder_spec(instance, attribute, value):
    if not isinstance(value, (str, type(None))):
        raise TypeError(f"text encoder must be a hub name, a folder or None, got {value!r}")
    return value


@attrs.frozen
class InfinityPreset:
    """A named model: transformer config, VAE config, default resolution and official files."""

    name: str
    model: InfinityConfig
    vae: Callable[[], BSQVAEConfig]
    default_resolution: int = 1024
    weights_file: Optional[str] = None  # file (2B) or folder (8B) in HUB_REPO
    vae_file: Optional[str] = None
    text_encoder: Optional[str] = attrs.field(default=TEXT_ENCODER_REPO, validator=_text_encoder_spec)
    random_only: bool = False  # infinity-tiny-random: random weights, tiny T5, byte tokenizer
    # Trained tiny weights shipped in the package: adapters/tiny_weights/<packaged>/ holds
    # transformer.safetensors, vae.safetensors and text_encoder.safetensors (T5, byte tokenizer).
    packaged: Optional[str] = None


# The d32 VAE pairs with every d32 transformer (layer12..48 have no public weights except layer12's).
D32_VAE = "infinity_vae_d32reg.pth"


def _sized(depth, width, heads, chunks=4):
    return InfinityConfig(depth=depth, embed_dim=width, num_heads=heads, block_chunks=chunks)


TINY_CONFIG = InfinityConfig(depth=4, embed_dim=64, num_heads=4, block_chunks=2, token_bits=32,
                             text_channels=128, text_maxlen=32)

# The trained tiny model (issue 17; ``adapters/tiny/train.py``): 16 bits per token, a stride-2
# BSQ-VAE (the 0.06M schedule's 16x16 last map decodes to 32x32 pixels) and a 2-layer T5 trained
# with it on the procedural scenes of ``adapters/tiny/scenes.py`` (captions up to 90 bytes). Sized so
# that all training fits a shared 2-core CPU in well under an hour.
TRAINED_TINY_CONFIG = InfinityConfig(depth=4, embed_dim=64, num_heads=4, block_chunks=2, token_bits=16,
                                     text_channels=128, text_maxlen=96)


def trained_tiny_vae() -> BSQVAEConfig:
    """The trained tiny BSQ-VAE decoder: d = 16, width 32, two levels, stride 2 (32x32 images)."""
    return BSQVAEConfig(codebook_dim=16, base_channels=32, channel_multipliers=(1, 1), num_res_blocks=1,
                        patch_size=2)

PRESETS: dict[str, InfinityPreset] = {
    "infinity-2b": InfinityPreset("infinity-2b", _sized(32, 2048, 16, 8), BSQVAEConfig.infinity_2b,
                                  weights_file="infinity_2b_reg.pth", vae_file="infinity_vae_d32reg.pth"),
    "infinity-8b": InfinityPreset("infinity-8b", attrs.evolve(_sized(40, 3584, 28, 8), token_bits=56,
                                                                spatial_patchify=True),
                                  BSQVAEConfig.infinity_8b, weights_file="infinity_8b_weights",
                                  vae_file="infinity_vae_d56_f8_14_patchify.pth"),
    # The hub's infinity_125M_256x256.pth matches layer12 (pn 0.06M; its VAE pairing is unverified).
    "infinity-layer12": InfinityPreset("infinity-layer12", _sized(12, 768, 8), BSQVAEConfig.infinity_2b,
                                       default_resolution=256, weights_file="infinity_125M_256x256.pth",
                                       vae_file="infinity_vae_d32reg.pth"),
    "infinity-layer16": InfinityPreset("infinity-layer16", _sized(16, 1152, 12), BSQVAEConfig.infinity_2b,
                                       vae_file=D32_VAE),
    "infinity-layer24": InfinityPreset("infinity-layer24", _sized(24, 1536, 16), BSQVAEConfig.infinity_2b,
                                       vae_file=D32_VAE),
    "infinity-layer32": InfinityPreset("infinity-layer32", _sized(32, 2080, 20), BSQVAEConfig.infinity_2b,
                                       vae_file=D32_VAE),
    "infinity-layer40": InfinityPreset("infinity-layer40", _sized(40, 2688, 24), BSQVAEConfig.infinity_2b,
                                       vae_file=D32_VAE),
    "infinity-layer48": InfinityPreset("infinity-layer48", _sized(48, 3360, 28), BSQVAEConfig.infinity_2b,
                                       vae_file=D32_VAE),
    # Trained on procedural captioned scenes (adapters/tiny/train.py); 0.06M schedule, 32x32 pixels.
    "infinity-tiny": InfinityPreset("infinity-tiny", TRAINED_TINY_CONFIG, trained_tiny_vae, default_resolution=256,
                                    text_encoder=None, packaged="infinity-tiny"),
    # Seeded random weights: every path runs, nothing is learned (parity and golden-style tests).
    "infinity-tiny-random": InfinityPreset("infinity-tiny-random", TINY_CONFIG, BSQVAEConfig.tiny,
                                           default_resolution=256, text_encoder=None, random_only=True),
}
