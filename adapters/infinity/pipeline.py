"""The user-facing Infinity model: text encoder + transformer + BSQ-VAE decoder, and its loader.

``load_infinity(name, weights=..., vae_weights=..., text_encoder=..., device=..., dtype=...)`` builds
a preset from the official files (hub or local) or with seeded random weights (``'random'``;
``infinity-tiny`` loads its shipped trained files, ``infinity-tiny-random`` is random). ``InfinityModel.generate`` runs the official generation
loop (``generate.py``) with any registered cache policy and returns ``adapters.base.GenerationOutput``.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from adapters.base import BatchResult, GenerationOutput, GenerationSetup, NextScaleModel, resolve_policy
from adapters.families import ModelGeometry
from kvpolicy import KVCache, ScaleSchedule
from kvpolicy.kept import kept_tokens_cache

from .bsq_vae import VAE_FILE, BSQVAEConfig, BSQVAEDecoder, images_to_uint8, load_bsq_vae
from .config import PRESETS, InfinityConfig, InfinityPreset
from .generate import LoopResult, _check_sampling, run_generation, uses_guidance
from .hub import check_text_encoder, resolve_vae, resolve_weights
from .schedule import INFINITY_PN_SCALES, INFINITY_RESOLUTION_PN, INFINITY_TEMPLATES, infinity_template
from adapters.checkpoint_io import check_checkpoint_file, load_safetensors_file
from adapters.dtypes import parse_dtype

from .model import InfinityTransformer
from .text import TextEncoder, load_text_encoder, random_text_encoder, trained_text_encoder
from .weights import TRANSFORMER_FILE, load_transformer_weights, random_init



class InfinityModel(NextScaleModel):
    """Infinity text-to-image generation with a pluggable KV-cache policy (``generate`` is the shared
    template, ``adapters.base.NextScaleModel``)."""

    def __init__(self, transformer: InfinityTransformer, vae: Optional[BSQVAEDecoder] = None,
                 text_encoder: Optional[TextEncoder] = None, *, name: str = "infinity", default_resolution: int = 1024):
        super().__init__()
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.name, self.default_resolution = name, default_resolution
        c = transformer.config
        if vae is not None and (vae.config.codebook_dim != c.codebook_dim or vae.config.spatial_patchify != c.spatial_patchify):
            raise ValueError(f"VAE (codebook_dim {vae.config.codebook_dim}, patchify {vae.config.spatial_patchify}) does "
                             f"not fit the transformer (codebook_dim {c.codebook_dim}, patchify {c.spatial_patchify})")
        if text_encoder is not None and text_encoder.width != c.text_channels:
            raise ValueError(f"text encoder width {text_encoder.width} != transformer text_channels {c.text_channels}")

    @property
    def config(self):
        return self.transformer.config

    @property
    def num_layers(self) -> int:
        return self.config.depth

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_official(cls, model_config, state_dict, *, vae_config=None, vae_state_dict=None, text_encoder=None,
                      token_bits: Optional[int] = None, name: str = "infinity", default_resolution: int = 1024,
                      device=None, dtype: Optional[torch.dtype] = None,
                      key_dtype: Optional[torch.dtype | str] = torch.float32) -> "InfinityModel":
        """One call from the official ``Infinity(**model_config)`` keyword arguments and its state dict
        (or checkpoint path), loaded strictly: what ``InfinityConfig.from_official``,
        ``InfinityTransformer``, ``load_transformer_weights`` and ``InfinityModel(...)`` do in turn.

        ``vae_config``: the BSQ-VAE's fields in any form ``BSQVAEConfig.from_official`` reads (an
        Infinity ``vae_config``, the ``AutoEncoder`` arguments, a decoder config); ``token_bits``
        defaults to its ``codebook_dim`` (the official constructor reads it from the VAE object), so one
        of the two is needed. ``vae_state_dict`` (laid out by ``vae_config``, or without it as read from
        the weights) adds the decoder ``generate`` needs; without it the model has none (teacher-forced
        logits and ``generate_from_features`` need no decoder); ``text_encoder``: a ``TextEncoder``, a hub
        name or folder, or None (then pass T5 features to ``teacher_forced_logits`` /
        ``generate_from_features``). ``dtype``, ``key_dtype``: as ``load_infinity``."""
        vae_fields = None if vae_config is None else BSQVAEConfig.from_official(vae_config)
        if token_bits is None:
            if vae_fields is None:
                raise ValueError("token_bits is needed without vae_config: the official constructor reads the bits "
                                 "per token (the VAE's codebook_dim) from the VAE")
            token_bits = vae_fields.codebook_dim
        if text_encoder is not None and not isinstance(text_encoder, (TextEncoder, str, os.PathLike)):
            raise TypeError(f"text_encoder must be a TextEncoder, a hub name or folder, or None, got "
                            f"{type(text_encoder).__name__}")
        device = torch.device(device if device is not None else "cpu")
        config = InfinityConfig.from_official(model_config, token_bits=token_bits)
        with torch.device(device):
            transformer = InfinityTransformer(config)
        load_transformer_weights(transformer, state_dict)
        transformer.eval().requires_grad_(False)
        transformer.key_dtype = None if key_dtype is None else parse_dtype(key_dtype)
        if dtype is not None and parse_dtype(dtype) != torch.float32:
            transformer.set_block_dtype(parse_dtype(dtype))
        vae = None if vae_state_dict is None else load_bsq_vae(vae_state_dict, vae_fields, device=device)
        encoder = text_encoder
        if isinstance(text_encoder, (str, os.PathLike)):
            encoder = load_text_encoder(os.fspath(text_encoder))
        if encoder is not None:
            encoder = encoder.to(device)
        return cls(transformer, vae, encoder, name=name, default_resolution=default_resolution)

    # -- geometry ---------------------------------------------------------------------------------
    def schedule(self, resolution=None, aspect_ratio: float = 1.0) -> tuple[ScaleSchedule, tuple, str]:
        """(schedule, RoPE template, pn name) for a resolution (pn name or 256/512/768/1024)."""
        resolution = self.default_resolution if resolution is None else resolution
        if isinstance(resolution, bool) or not isinstance(resolution, (int, str)):
            raise ValueError(f"resolution must be a pn name {list(INFINITY_PN_SCALES)} or one of "
                             f"{sorted(INFINITY_RESOLUTION_PN)}, got {resolution!r}")
        pn = INFINITY_RESOLUTION_PN.get(resolution, resolution) if isinstance(resolution, int) else resolution
        if pn not in INFINITY_PN_SCALES:
            raise ValueError(f"resolution {resolution!r} is not one of {sorted(INFINITY_RESOLUTION_PN)} or "
                             f"{list(INFINITY_PN_SCALES)}")
        if isinstance(aspect_ratio, bool) or not isinstance(aspect_ratio, (int, float)) or not aspect_ratio > 0:
            raise ValueError(f"aspect_ratio (h/w) must be a positive number, got {aspect_ratio!r}")
        template = INFINITY_TEMPLATES[infinity_template(float(aspect_ratio))]
        return ScaleSchedule(template[: INFINITY_PN_SCALES[pn]]), template, pn

    def geometry(self, resolution=None, aspect_ratio: float = 1.0) -> ModelGeometry:
        c = self.config
        return ModelGeometry(name=self.name, family="infinity", num_layers=c.depth, num_heads=c.num_heads,
                             head_dim=c.head_dim, schedule=self.schedule(resolution, aspect_ratio)[0],
                             key_cache_dtype="float32")

    # -- generation -------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        if self.text_encoder is None:
            raise RuntimeError(f"{self.name} has no text encoder; pass text features to generate_from_features")
        return self.text_encoder(prompts)

    @torch.no_grad()
    def generate_from_features(self, features: Sequence[torch.Tensor], *, schedule: ScaleSchedule,
                               template: Sequence[tuple[int, int]], policy=None, seed: int | torch.Generator = 0,
                               cfg: float | Sequence[float] = 3.0, tau: float | Sequence[float] = 1.0,
                               top_k: int = 900, top_p: float = 0.97, forced_bits=None, keep_logits: bool = False,
                               stats=None, progress=None, cache: Optional[KVCache] = None,
                               on_compress=None) -> LoopResult:
        """The generation loop on given T5 features (one (tokens, text_channels) tensor per prompt).

        Used by ``generate`` and by parity tests (``forced_bits`` = teacher forcing). ``cache``: a
        fresh ``KVCache`` (or subclass) for this model and schedule, instead of one built from ``policy``.
        ``on_compress``: see ``generate`` (not with ``cache=``: build a ``kvpolicy.KeptTokensCache``)."""
        generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
        if cache is None:
            cache = kept_tokens_cache(self.config.depth, schedule, policy, on_compress)
        elif on_compress is not None:
            raise ValueError("pass on_compress= or your own cache=, not both (a kvpolicy.KeptTokensCache takes "
                             "on_compress=)")
        elif policy is not None or cache.schedule != schedule or cache.num_layers != self.config.depth:
            raise ValueError("pass either policy= or a cache built for this model's depth and this schedule")
        ctx = self.transformer.prepare_text(features, guidance=uses_guidance(cfg))
        return run_generation(self.transformer, ctx, schedule=schedule, template=template, cache=cache,
                              generator=generator, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p,
                              compute_dtype=self.transformer.block_dtype, forced_bits=forced_bits,
                              keep_logits=keep_logits, stats=stats, progress=progress)

    @torch.no_grad()
    def teacher_forced_logits(self, prompts, bits: Sequence[torch.Tensor], *, cfg: float | Sequence[float] = 3.0,
                              tau: float | Sequence[float] = 1.0, aspect_ratio: Optional[float] = None, policy=None,
                              budget=None, on_compress=None) -> list[torch.Tensor]:
        """The official teacher-forced pass: per scale, the logits (N, h*w*token_bits, 2) float32 on the
        CPU (divided by tau, guidance-mixed) with ``bits`` fed forward instead of samples.

        ``prompts``: strings (encoded with the model's text encoder) or T5 features, one (tokens,
        text_channels) tensor per prompt. ``bits``: per scale (N, h, w, token_bits) 0/1 tensors, e.g. a
        generation's ``tokens``; the schedule is read from their shapes and the RoPE template is the
        one they are a prefix of (``aspect_ratio`` h/w names it when several templates share the
        prefix). ``cfg``/``tau``: one number or one per scale. ``policy``/``budget``: compress the cache
        as ``generate`` does, ``on_compress`` reports what it kept. The logits do not depend on a seed
        or on top-k/top-p (sampling only)."""
        if isinstance(prompts, (str, torch.Tensor)):
            prompts = [prompts]
        prompts = list(prompts)
        texts = bool(prompts) and all(isinstance(p, str) for p in prompts)
        if not texts and not (prompts and all(isinstance(p, torch.Tensor) and p.dim() == 2 for p in prompts)):
            raise ValueError("prompts must be strings or T5 features (one (tokens, text_channels) tensor per prompt), "
                             f"not empty and not mixed; got {[type(p).__name__ for p in prompts]}")
        schedule, template = self._forced_schedule(bits, len(prompts), aspect_ratio)
        _check_sampling(cfg, tau, 0, 0.0, schedule.num_scales)  # before the text encoder runs
        features = self.encode(prompts) if texts else prompts
        result = self.generate_from_features(features, schedule=schedule, template=template,
                                             policy=resolve_policy(policy, budget), cfg=cfg, tau=tau,
                                             forced_bits=bits, keep_logits=True, on_compress=on_compress)
        return result.logits

    def _forced_schedule(self, bits, count: int, aspect_ratio) -> tuple[ScaleSchedule, tuple]:
        """(schedule, RoPE template) of teacher-forced bits, after checking their shapes and values."""
        if isinstance(bits, torch.Tensor) or not isinstance(bits, Sequence) or not bits:
            raise ValueError("bits must be a non-empty list of per-scale (N, h, w, token_bits) tensors")
        token_bits = self.config.token_bits
        for si, b in enumerate(bits):
            if not isinstance(b, torch.Tensor) or b.dim() != 4 or b.shape[0] != count or b.shape[3] != token_bits:
                raise ValueError(f"bits of scale {si} must be a ({count}, h, w, {token_bits}) tensor (one row per "
                                 f"prompt, {token_bits} bits per token), got {getattr(b, 'shape', type(b).__name__)}")
            if b.numel() and not bool(((b == 0) | (b == 1)).all()):
                raise ValueError(f"bits of scale {si} hold values other than 0 and 1")
        shapes = [(int(b.shape[1]), int(b.shape[2])) for b in bits]
        matching = [r for r, t in INFINITY_TEMPLATES.items() if list(t[: len(shapes)]) == shapes]
        if aspect_ratio is not None:
            if isinstance(aspect_ratio, bool) or not isinstance(aspect_ratio, (int, float)) or not aspect_ratio > 0:
                raise ValueError(f"aspect_ratio (h/w) must be a positive number, got {aspect_ratio!r}")
            key = infinity_template(float(aspect_ratio))
            if key not in matching:
                raise ValueError(f"the bits' scale shapes {shapes} do not follow the h/w {key:g} template "
                                 f"{list(INFINITY_TEMPLATES[key][: len(shapes)])}")
        elif len(matching) == 1:
            key = matching[0]
        elif not matching:
            raise ValueError(f"the bits' scale shapes {shapes} are not a prefix of any Infinity template "
                             f"(h/w {', '.join(f'{r:g}' for r in INFINITY_TEMPLATES)})")
        else:  # the RoPE positions depend on the whole template, so the choice changes the logits
            raise ValueError(f"the bits' scale shapes {shapes} start the templates of h/w "
                             f"{', '.join(f'{r:g}' for r in matching)}; pass aspect_ratio= to pick one")
        return ScaleSchedule(shapes), INFINITY_TEMPLATES[key]

    @torch.no_grad()
    def generate(self, prompts: Sequence[str] | str, *, policy=None, budget=None, seed: int = 0,
                 cfg: float | Sequence[float] = 3.0, tau: float | Sequence[float] = 1.0, top_k: int = 900,
                 top_p: float = 0.97, resolution=None, aspect_ratio: float = 1.0,
                 batch_size: Optional[int] = None, dtype: Optional[torch.dtype] = None, stats=None,
                 progress: Optional[bool] = None, on_compress=None) -> GenerationOutput:
        """Generate one image per prompt. Images are (N, H, W, 3) uint8 RGB; tokens are the bits per
        scale (N, h, w, token_bits) uint8; the cache report counts KV bytes per scale and the peak.

        Seeds, batches (the random generator runs on across batches; the report is the first batch's
        with per-scale seconds summed), the policy and the report: ``adapters.base.NextScaleModel``.
        ``dtype`` (float32 / bfloat16 / float16) recasts the blocks' linear layers in place when it
        differs from their current dtype; ``stats`` receives every self-attention's conditional-row
        queries and keys (``observe``, see ``adapters.attention``). ``cfg`` and ``tau`` take one number
        or a list of one per scale (the official loop's ``cfg_list`` / ``tau_list``; a wrong length
        fails before any work). ``on_compress``: called with a ``kvpolicy.KeptTokens`` record (the global
        positions every (row, head) of a layer holds) after each layer's compression step at each scale.
        """
        return self.run_generation(prompts, policy=policy, budget=budget, seed=seed, batch_size=batch_size, dtype=dtype,
                                   stats=stats, progress=progress, resolution=resolution, aspect_ratio=aspect_ratio,
                                   sampling={"cfg": cfg, "tau": tau, "top_k": top_k, "top_p": top_p},
                                   on_compress=on_compress)

    # -- the template's model-specific steps --------------------------------------------------------
    def check_conditions(self, prompts) -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        return prompts

    def describe_conditions(self, prompts: list) -> dict:
        return {"num_prompts": len(prompts)}

    def setup(self, *, resolution, aspect_ratio, dtype, sampling: dict) -> GenerationSetup:
        if self.vae is None:
            raise RuntimeError(f"{self.name} has no VAE decoder; load it with vae_weights=")
        schedule, template, pn = self.schedule(resolution, aspect_ratio)
        _check_sampling(sampling["cfg"], sampling["tau"], sampling["top_k"], sampling["top_p"], schedule.num_scales)
        sampling = {k: list(v) if isinstance(v, tuple) else v for k, v in sampling.items()}  # JSON-ready config
        if dtype is not None and parse_dtype(dtype) != self.transformer.block_dtype:
            self.transformer.set_block_dtype(parse_dtype(dtype))
        return GenerationSetup(
            schedule=schedule, compute_dtype=self.transformer.block_dtype, sampling=dict(sampling),
            rows_per_condition=2 if uses_guidance(sampling["cfg"]) else 1, details={"template": template},
            config={"resolution": pn, "aspect_ratio": aspect_ratio, "schedule": [list(s) for s in schedule.shapes],
                    "key_dtype": str(self.transformer.key_dtype or self.transformer.block_dtype).replace("torch.", "")})

    def generate_batch(self, prompts, setup, *, cache, generator, stats, on_scale, cfg, tau, top_k, top_p):
        def scales(indices):
            for si in indices:
                yield si
                on_scale()

        result = self.generate_from_features(self.encode(prompts), schedule=setup.schedule,
                                             template=setup.details["template"], cache=cache, seed=generator, cfg=cfg,
                                             tau=tau, top_k=top_k, top_p=top_p, stats=stats, progress=scales)
        report = cache.report()
        report.scale_seconds = list(result.scale_seconds)
        cache.reset()  # free the K/V before decoding, as the official loop clears its caches
        decoded = self.vae.decode(result.summed_codes.to(self.vae.conv_in.conv.weight.dtype))
        return BatchResult(images=images_to_uint8(decoded.float()).cpu(), tokens=result.bits, report=report,
                           scale_seconds=list(result.scale_seconds))


def _random_vae(preset: InfinityPreset, seed: int, device) -> BSQVAEDecoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = BSQVAEDecoder(preset.vae())
    return vae.eval().requires_grad_(False).to(device)


def _read_safetensors(path) -> dict:
    return load_safetensors_file(path, VAE_FILE)


def load_infinity(name: str, *, weights: Optional[str | os.PathLike] = None, vae_weights=None, text_encoder=None,
                  device: Optional[str | torch.device] = None, dtype: Optional[torch.dtype] = None,
                  seed: int = 0, key_dtype: Optional[torch.dtype | str] = torch.float32,
                  official_kv_dtypes: Optional[bool] = None) -> InfinityModel:
    """Build a preset. weights / vae_weights: a local path, None (the preset's hub file; the shipped
    trained files for ``infinity-tiny``, random for ``infinity-tiny-random``) or ``'random'``. text_encoder: a hub name or folder (default google/flan-t5-xl),
    a ``TextEncoder``, or ``'random'`` (a small random T5 with the byte tokenizer). dtype: the blocks'
    compute dtype (float32 default; bfloat16 on GPU), embeddings, head and VAE stay float32.
    key_dtype: the dtype of the cached keys. float32 (default) is the official layout: Infinity
    normalises q and k in float32 and caches that K next to V in the compute dtype, so a bf16 run holds
    6 bytes per channel (ScaleKV's Table 1 memory). None caches K in the compute dtype (a bf16 key
    cache: a third fewer bytes, not the official numerics). official_kv_dtypes: the earlier switch,
    True = float32 keys, False = compute-dtype keys; it overrides key_dtype when given."""
    if name not in PRESETS:
        raise ValueError(f"unknown Infinity preset {name!r}; known: {sorted(PRESETS)}")
    preset = PRESETS[name]
    device = torch.device(device if device is not None else "cpu")
    dtype = parse_dtype(torch.float32 if dtype is None else dtype)
    if official_kv_dtypes is not None:
        key_dtype = torch.float32 if official_kv_dtypes else None
    key_dtype = None if key_dtype is None else parse_dtype(key_dtype)
    random_weights = weights == "random" or (weights is None and preset.random_only)
    random_vae = vae_weights == "random" or (vae_weights is None and preset.random_only)
    packaged_text = None
    if preset.packaged is not None:  # trained tiny weights shipped in the package
        from adapters.tiny_weights import packaged_file

        weights = packaged_file(preset.packaged, "transformer.safetensors") if weights is None else weights
        vae_weights = packaged_file(preset.packaged, "vae.safetensors") if vae_weights is None else vae_weights
        if text_encoder is None:
            packaged_text = packaged_file(preset.packaged, "text_encoder.safetensors")
    # Resolve every file before reading any, so an offline error comes before minutes of loading.
    weights_path = None if random_weights else resolve_weights(weights, preset)
    vae_path = None if random_vae else resolve_vae(vae_weights, preset)
    if not (text_encoder is None and preset.text_encoder is None):
        check_text_encoder(text_encoder, preset)
    if weights_path is not None and weights_path.is_file():  # a damaged VAE fails before the transformer loads
        check_checkpoint_file(weights_path, TRANSFORMER_FILE)
    if vae_path is not None and vae_path.is_file():
        check_checkpoint_file(vae_path, VAE_FILE)

    c = preset.model
    with torch.device(device):
        transformer = InfinityTransformer(c)
    if random_weights:
        random_init(transformer, seed)
    else:
        load_transformer_weights(transformer, weights_path)
    transformer.eval().requires_grad_(False)
    transformer.key_dtype = key_dtype
    if dtype != torch.float32:
        transformer.set_block_dtype(dtype)
    if random_vae:
        vae = _random_vae(preset, seed + 1, device)
    else:
        vae = load_bsq_vae(_read_safetensors(vae_path) if vae_path.suffix == ".safetensors" else vae_path,
                           preset.vae(), device=device)

    if isinstance(text_encoder, TextEncoder):
        encoder = text_encoder
    elif packaged_text is not None:
        encoder = trained_text_encoder(packaged_text, c.text_channels, max_length=c.text_maxlen)
    elif text_encoder == "random" or (text_encoder is None and preset.text_encoder is None):
        encoder = random_text_encoder(c.text_channels, seed=seed + 2, max_length=min(c.text_maxlen, 512))
    else:
        encoder = load_text_encoder(text_encoder or preset.text_encoder)
    encoder = encoder.to(device)
    return InfinityModel(transformer, vae, encoder, name=name, default_resolution=preset.default_resolution)
