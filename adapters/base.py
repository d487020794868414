"""What every model adapter shares: the ``generate`` template (``NextScaleModel``), its output and
argument checks. The model registry lives in ``adapters.families``."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Optional

import attrs
import torch

from kvpolicy import CacheReport, KVCache, Policy, ScaleSchedule, get_policy
from kvpolicy.kept import kept_tokens_cache

from .families import list_models, load_model, register_model  # noqa: F401  (their old home)
from .validators import int_argument, seed_argument


@attrs.define
class GenerationOutput:
    """What ``generate`` returns.

    images: (N, H, W, 3) uint8 RGB on CPU. tokens: per scale, the sampled discrete outputs
    (Infinity: bits (N, h, w, d) uint8; VAR: indices (N, h*w) int64). cache_report: counted KV bytes
    (per scale, peak) and per-scale seconds. seconds: wall time of the whole call. config: the exact
    settings (policy config, seed, cfg, …) for result files.
    """

    images: torch.Tensor
    tokens: list[torch.Tensor]
    cache_report: CacheReport
    seconds: float
    config: dict = attrs.field(factory=dict)


class ScaleTimer:
    """Seconds per scale of one generation, timed by the adapter (the cache only counts bytes).
    ``synchronize`` (e.g. the model's own ``torch.cuda.synchronize``) runs before each reading."""

    def __init__(self, num_scales: int):
        self.seconds = [0.0] * num_scales
        self._started: Optional[float] = None

    def start(self, scale: int, synchronize=None) -> None:
        if synchronize is not None:
            synchronize()
        self._started = time.perf_counter()

    def stop(self, scale: int, synchronize=None) -> None:
        if synchronize is not None:
            synchronize()
        if self._started is not None:
            self.seconds[scale] += time.perf_counter() - self._started
            self._started = None


def resolve_policy(policy: Policy | str | None, budget=None) -> Optional[Policy]:
    """``policy`` may be a Policy, a registered name or None (full cache, no policy overhead)."""
    if policy is None:
        if budget is not None:
            raise ValueError("budget= was given without policy=; name a policy, e.g. policy='scalekv'")
        return None
    if isinstance(policy, Policy):
        return policy.with_budget(budget) if budget is not None else policy
    return get_policy(policy, **({} if budget is None else {"budget": budget}))


def check_batch_size(batch_size, count: int) -> int:
    """``batch_size`` (None: all ``count`` conditions in one batch) as a positive int."""
    return count if batch_size is None else int_argument("batch_size", batch_size, low=1)


@attrs.define
class BatchResult:
    """What one batch of a generation gives the template: images (b, H, W, 3) uint8 on the CPU,
    per-scale tokens on the CPU, and numbers to sum over batches into the cache report's extra."""

    images: torch.Tensor
    tokens: list
    extra: dict = attrs.field(factory=dict)
    report: Optional[CacheReport] = None  # taken early by a step that frees the cache before decoding
    scale_seconds: list = attrs.field(factory=list)  # timed by the family's loop (the cache counts bytes only)


@attrs.define
class GenerationSetup:
    """The per-call choices a family's model makes once: the schedule it generates, the compute
    dtype, and anything else its batch step needs (``details``) and reports (``config``)."""

    schedule: ScaleSchedule
    compute_dtype: torch.dtype
    sampling: dict = attrs.field(factory=dict)  # the checked sampling options, as generate_batch gets them
    rows_per_condition: int = 2  # conditional + unconditional (CFG)
    context: Callable[[], Any] = contextlib.nullcontext  # makes the context entered around every batch
    details: dict = attrs.field(factory=dict)
    config: dict = attrs.field(factory=dict)


class NextScaleModel(torch.nn.Module):
    """The ``generate`` template every adapter shares: seeds, batching, policy resolution, one cache
    per batch, progress and the cache report are done here once; a family implements only its
    model-specific steps:

    - ``check_conditions(conditions) -> list`` (prompts, labels, …; a clear error for bad ones);
    - ``setup(resolution, aspect_ratio, dtype, sampling) -> GenerationSetup`` (schedule, precision);
    - ``generate_batch(conditions, setup, *, cache, generator, stats, on_scale, **sampling) ->
      BatchResult`` (the next-scale loop on one batch, with ``cache`` holding every layer's K/V and
      ``on_scale()`` called after each scale);
    - ``num_layers`` (self-attention layers) and ``name``.

    One CPU ``torch.Generator`` seeded once per call runs on across batches, so with
    ``batch_size`` smaller than the number of conditions samples depend on the batch composition (as
    in the official loops). The report is the first (largest) batch's, its per-scale seconds summed
    over batches; its ``extra`` says ``batch_size``, ``num_batches`` and ``rows_per_batch``.
    """

    name: str = "model"

    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        first = next(self.parameters(), None)
        return torch.device("cpu") if first is None else first.device

    def check_conditions(self, conditions) -> list:
        raise NotImplementedError

    def describe_conditions(self, conditions: list) -> dict:
        """What the output's config records about the conditions."""
        return {"num_conditions": len(conditions)}

    def setup(self, *, resolution, aspect_ratio, dtype, sampling: dict) -> GenerationSetup:
        raise NotImplementedError

    def generate_batch(self, conditions: list, setup: GenerationSetup, *, cache: KVCache, generator: torch.Generator,
                       stats, on_scale: Callable[[], None], **sampling) -> BatchResult:
        raise NotImplementedError

    def run_generation(self, conditions, *, policy=None, budget=None, seed: int = 0, batch_size=None, dtype=None,
                       stats=None, progress=None, resolution=None, aspect_ratio: float = 1.0,
                       sampling: Optional[dict] = None, on_compress=None) -> GenerationOutput:
        """The template behind each family's ``generate`` (which documents its sampling options).
        ``on_compress``: called with a ``kvpolicy.KeptTokens`` record (the global positions each
        (row, head) holds) after every layer's compression step at every scale of every batch."""
        started = time.perf_counter()
        sampling = dict(sampling or {})
        conditions = self.check_conditions(conditions)
        seed = seed_argument(seed)
        batch_size = check_batch_size(batch_size, len(conditions))
        resolved = resolve_policy(policy, budget)
        if on_compress is not None and not callable(on_compress):
            raise TypeError(f"on_compress must be a callable taking a kvpolicy.KeptTokens record, got {on_compress!r}")
        setup = self.setup(resolution=resolution, aspect_ratio=aspect_ratio, dtype=dtype, sampling=sampling)
        if progress is None:
            progress = sys.stderr.isatty()
        from tqdm.auto import tqdm

        batches = [conditions[i:i + batch_size] for i in range(0, len(conditions), batch_size)]
        bar = tqdm(total=len(batches) * setup.schedule.num_scales, desc=f"{self.name} scales", unit="scale",
                   disable=not progress, leave=False)
        generator = torch.Generator().manual_seed(seed)
        images, tokens, reports, extra = [], [], [], {}
        with bar:
            for index, batch in enumerate(batches):
                cache = kept_tokens_cache(self.num_layers, setup.schedule, resolved, on_compress, batch=index)
                with setup.context():
                    result = self.generate_batch(batch, setup, cache=cache, generator=generator, stats=stats,
                                                 on_scale=lambda: bar.update(1), **setup.sampling)
                reports.append(result.report if result.report is not None else cache.report())
                reports[-1].scale_seconds = list(result.scale_seconds)
                cache.reset()
                images.append(result.images)
                tokens.append(result.tokens)
                for key, value in result.extra.items():
                    extra[key] = extra.get(key, 0) + value
        report = reports[0]  # the first batch is the largest: its bytes are the peak
        report.scale_seconds = [sum(r.scale_seconds[s] for r in reports) for s in range(len(report.scale_seconds))]
        report.extra.update({"batch_size": batch_size, "num_batches": len(batches),
                             "rows_per_batch": setup.rows_per_condition * len(batches[0]),
                             "dtype": _dtype_name(setup.compute_dtype), **extra})
        config = {"model": self.name, **self.describe_conditions(conditions),
                  "policy": None if resolved is None else resolved.to_config(), "seed": seed,
                  "batch_size": batch_size, **setup.sampling,
                  "dtype": _dtype_name(setup.compute_dtype), "device": str(self.device), **setup.config}
        return GenerationOutput(images=torch.cat(images), tokens=[torch.cat(t) for t in zip(*tokens)],
                                cache_report=report, seconds=time.perf_counter() - started, config=config)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
