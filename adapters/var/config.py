"""VAR and VQVAE configurations and the presets (VAR, arXiv 2404.02905; ``shared/reference/var.md`` §1, §7, §8).

Widths follow ``build_vae_var``: heads = depth, C = 64 * depth, FFN 4C, LayerNorm eps 1e-6. The
VQVAE is the official ``vae_ch160v4096z32`` (ch 160, ch_mult 1,1,2,2,4, Cvae 32, V 4096).
``var-tiny-random`` keeps every structural choice (256^2 patch list 1..16, V 4096, decoder ch_mult) at a
small width so that a generation runs on a CPU in about a second; its weights are random. ``var-tiny``
is trained (``adapters/tiny/train.py``): the same patch list, 18 classes, V 512, 32x32 pixels.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import attrs

from adapters.validators import positive_int

from .schedule import VAR_PATCH_NUMS

HUB_REPO = "FoundationVision/var"
VAE_FILE = "vae_ch160v4096z32.pth"


def _patch_nums(instance, attribute, value):
    if not value or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in value):
        raise ValueError(f"patch_nums must be a non-empty sequence of positive ints, got {value!r}")
    if len(value) < 2:
        raise ValueError(f"patch_nums needs at least two scales (the guidance ramp divides by K-1), got {value!r}")
    if any(b <= a for a, b in zip(value, value[1:])):
        raise ValueError(f"patch_nums must increase strictly (small to large maps), got {value!r}")


# The official constructors' arguments and defaults (FoundationVision/VAR models/var.py, models/vqvae.py).
# Arguments that only matter for training or kernel choice are accepted and have no effect here.
_VAR_DEFAULTS = {"num_classes": 1000, "depth": 16, "embed_dim": 1024, "num_heads": 16, "mlp_ratio": 4.0,
                 "norm_eps": 1e-6, "shared_aln": False, "attn_l2_norm": False,
                 "patch_nums": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)}
_VAR_NO_EFFECT = {"drop_rate", "attn_drop_rate", "drop_path_rate", "cond_drop_rate", "flash_if_available",
                  "fused_if_available"}
_VQVAE_DEFAULTS = {"vocab_size": 4096, "z_channels": 32, "ch": 128, "quant_conv_ks": 3, "using_znorm": False,
                   "quant_resi": 0.5, "share_quant_resi": 4, "default_qresi_counts": 0,
                   "v_patch_nums": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)}
_VQVAE_NO_EFFECT = {"dropout", "beta", "test_mode"}
# The decoder settings the official VQVAE fixes internally (its ``ddconfig``); a record of them
# (e.g. the golden file's ``ddconfig``) may override them for small test decoders.
_DDCONFIG_FIELDS = {"ch", "z_channels", "in_channels", "ch_mult", "num_res_blocks", "using_sa", "using_mid_sa",
                    "dropout"}


def _official_arguments(kwargs, what: str, defaults: dict, no_effect: set, extra: set = frozenset()) -> dict:
    """The official defaults updated by ``kwargs``; an unknown argument is an error naming it."""
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{what} arguments must be a mapping (the official constructor's keyword arguments), "
                        f"got {type(kwargs).__name__}")
    known = set(defaults) | no_effect | set(extra)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"{what} arguments {unknown} are not arguments of the official constructor; "
                         f"known: {sorted(known)}")
    return {**defaults, **{k: v for k, v in kwargs.items() if k in defaults or k in extra}}


def _require(args: dict, what: str, name: str, allowed) -> None:
    if args[name] != allowed:
        raise ValueError(f"{what} argument {name}={args[name]!r} is not implemented; supported: {allowed!r} "
                         "(the released checkpoints' setting)")


@attrs.frozen
class VARConfig:
    """The transformer: ``VAR(depth, embed_dim, num_heads, patch_nums, shared_aln, ...)``."""

    depth: int = attrs.field(validator=positive_int)
    embed_dim: int = attrs.field(validator=positive_int)
    num_heads: int = attrs.field(validator=positive_int)
    patch_nums: tuple[int, ...] = attrs.field(converter=tuple, validator=_patch_nums)
    vocab_size: int = attrs.field(default=4096, validator=positive_int)
    cvae: int = attrs.field(default=32, validator=positive_int)
    num_classes: int = attrs.field(default=1000, validator=positive_int)
    shared_aln: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    mlp_ratio: float = attrs.field(default=4.0, validator=attrs.validators.gt(0))
    norm_eps: float = attrs.field(default=1e-6, validator=attrs.validators.gt(0))

    def __attrs_post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def total_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @classmethod
    def from_official(cls, var_kwargs: Mapping[str, Any],
                      vqvae_kwargs: Optional[Mapping[str, Any]] = None) -> "VARConfig":
        """From the official ``VAR(vae_local, **var_kwargs)`` keyword arguments, with the official
        defaults for missing ones; the VQVAE's (``VQVAE(**vqvae_kwargs)``) give the vocabulary and
        latent width, as the official constructor reads them from ``vae_local``. Training-only
        arguments (dropout rates, kernel switches) are accepted and have no effect; unknown arguments
        and settings this implementation lacks (``attn_l2_norm=False``, the official default, which
        no released model uses) are refused by name."""
        args = _official_arguments(var_kwargs, "VAR", _VAR_DEFAULTS, _VAR_NO_EFFECT)
        _require(args, "VAR", "attn_l2_norm", True)
        vq = _official_arguments({} if vqvae_kwargs is None else vqvae_kwargs, "VQVAE", _VQVAE_DEFAULTS, _VQVAE_NO_EFFECT, {"ddconfig"})
        if tuple(vq["v_patch_nums"]) != tuple(args["patch_nums"]):
            raise ValueError(f"VAR patch_nums {tuple(args['patch_nums'])} and VQVAE v_patch_nums "
                             f"{tuple(vq['v_patch_nums'])} differ; the two models must share one scale list")
        return cls(depth=args["depth"], embed_dim=args["embed_dim"], num_heads=args["num_heads"],
                   patch_nums=tuple(args["patch_nums"]), vocab_size=vq["vocab_size"], cvae=vq["z_channels"],
                   num_classes=args["num_classes"], shared_aln=args["shared_aln"],
                   mlp_ratio=float(args["mlp_ratio"]), norm_eps=float(args["norm_eps"]))

    @classmethod
    def official(cls, depth: int, patch_nums=VAR_PATCH_NUMS[256], shared_aln: bool = False, **kw) -> "VARConfig":
        """``build_vae_var(depth=...)``: heads = depth, width = 64 * depth."""
        return cls(depth=depth, embed_dim=64 * depth, num_heads=depth, patch_nums=patch_nums, shared_aln=shared_aln, **kw)


@attrs.frozen
class VQVAEConfig:
    """The decoder side of ``VQVAE(vocab_size, z_channels, ch, share_quant_resi, v_patch_nums)``."""

    vocab_size: int = attrs.field(default=4096, validator=positive_int)
    z_channels: int = attrs.field(default=32, validator=positive_int)
    ch: int = attrs.field(default=160, validator=positive_int)
    ch_mult: tuple[int, ...] = attrs.field(default=(1, 1, 2, 2, 4), converter=tuple)
    num_res_blocks: int = attrs.field(default=2, validator=positive_int)
    using_sa: bool = True
    using_mid_sa: bool = True
    quant_resi: float = 0.5
    share_quant_resi: int = attrs.field(default=4)

    @share_quant_resi.validator
    def _check_share(self, attribute, value):
        # 0 (one phi per scale) and 1 (one phi for all) exist in the official code, but no released
        # checkpoint uses them; the partially shared variant (K >= 2 convs) is what the files hold.
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"share_quant_resi must be an int >= 2 (partially shared phi; released files use 4), got {value!r}")

    @ch_mult.validator
    def _check_mult(self, attribute, value):
        if not value or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in value):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {value!r}")
        if any((self.ch * m) % 32 for m in value):
            raise ValueError(f"every decoder width ch*ch_mult must be a multiple of 32 (GroupNorm groups), got ch={self.ch}, ch_mult={value}")

    @classmethod
    def from_official(cls, vqvae_kwargs: Mapping[str, Any]) -> "VQVAEConfig":
        """From the official ``VQVAE(**vqvae_kwargs)`` keyword arguments, with the official defaults
        for missing ones (``ch=128``; the released ``vae_ch160v4096z32`` is built with ``ch=160``).
        The decoder layout the official class fixes (ch_mult 1,1,2,2,4, two res blocks, attention)
        may be given as a ``ddconfig`` record, as golden files carry it; its ``ch`` and
        ``z_channels`` must agree with the arguments. Unknown arguments and unimplemented settings
        are refused by name."""
        args = _official_arguments(vqvae_kwargs, "VQVAE", _VQVAE_DEFAULTS, _VQVAE_NO_EFFECT, {"ddconfig"})
        for name, allowed in (("using_znorm", False), ("quant_conv_ks", 3), ("default_qresi_counts", 0)):
            _require(args, "VQVAE", name, allowed)
        dd = _official_arguments(args.get("ddconfig") or {}, "VQVAE ddconfig",
                                 {"ch_mult": (1, 1, 2, 2, 4), "num_res_blocks": 2, "using_sa": True,
                                  "using_mid_sa": True, "in_channels": 3}, {"dropout"}, {"ch", "z_channels"})
        _require(dd, "VQVAE ddconfig", "in_channels", 3)
        for name in ("ch", "z_channels"):
            if name in dd and dd[name] != args[name]:
                raise ValueError(f"VQVAE {name}={args[name]!r} and its ddconfig {name}={dd[name]!r} differ")
        return cls(vocab_size=args["vocab_size"], z_channels=args["z_channels"], ch=args["ch"],
                   ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"], using_sa=dd["using_sa"],
                   using_mid_sa=dd["using_mid_sa"], quant_resi=args["quant_resi"],
                   share_quant_resi=args["share_quant_resi"])

    @property
    def upsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@attrs.frozen
class VARPreset:
    """A named model: its configs, the pixel size and where the official files live."""

    name: str
    var: VARConfig
    vqvae: VQVAEConfig
    resolution: int
    hub_file: Optional[str]  # None: random weights only (tiny)
    # Trained tiny weights shipped in the package: adapters/tiny_weights/<packaged>/{var,vqvae}.safetensors
    packaged: Optional[str] = None


def _official(depth: int, resolution: int, shared_aln: bool) -> VARPreset:
    return VARPreset(name=f"var-d{depth}", var=VARConfig.official(depth, VAR_PATCH_NUMS[resolution], shared_aln),
                     vqvae=VQVAEConfig(), resolution=resolution, hub_file=f"var_d{depth}.pth")


# The trained tiny model (issue 17; ``adapters/tiny/train.py``): 18 classes (6 colours x 3 shapes of
# ``adapters/tiny/scenes.py``), a 512-entry codebook of 16-d vectors and a stride-2 VQVAE, so the
# official 256^2 patch list (1..16) decodes to 32x32 pixels.
TRAINED_TINY_VAR = VARConfig(depth=4, embed_dim=64, num_heads=4, patch_nums=VAR_PATCH_NUMS[256], vocab_size=512,
                             cvae=16, num_classes=18)
TRAINED_TINY_VQVAE = VQVAEConfig(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                                 using_sa=False, using_mid_sa=False)

PRESETS: dict[str, VARPreset] = {
    **{f"var-d{d}": _official(d, 256, False) for d in (16, 20, 24, 30)},
    "var-d36": _official(36, 512, True),  # README: "-s means saln=1"; 512 patch list
    # Trained on procedural scenes (adapters/tiny/train.py): 18 classes, 32x32 pixels.
    "var-tiny": VARPreset(name="var-tiny", var=TRAINED_TINY_VAR, vqvae=TRAINED_TINY_VQVAE, resolution=32,
                          hub_file=None, packaged="var-tiny"),
    # Seeded random weights: every path runs, nothing is learned (parity and golden-style tests).
    "var-tiny-random": VARPreset(
        name="var-tiny-random",
        var=VARConfig(depth=4, embed_dim=256, num_heads=4, patch_nums=VAR_PATCH_NUMS[256]),
        vqvae=VQVAEConfig(ch=32), resolution=256, hub_file=None),
}
