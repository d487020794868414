"""Fidelity metrics register here: adding a metric to ``kvpolicy compare`` is one registration.

A ``Metric`` says what it measures per image or per set, how a configuration's per-image values are
aggregated, its summary column and number format, and one line for summary.md naming its
implementation. ``compare`` computes every registered per-image metric for each policy image (the
value lands in the row under ``metric.row_field``), every set metric between the full-cache set and
each configuration's set (``set_metrics.json``), and the summary shows one column per metric, in
registration order. The built-in metrics (PSNR, SSIM, LPIPS, FID, token agreement) are registered
by ``benchmarks.metrics`` the same way; third-party metrics register from a ``--plugin`` file or
through the entry-point group ``kvpolicy.metrics`` (loaded on first use, like policies).

Per-image ``compute(batch, context)`` gets a ``ImageBatch`` (the policy's uint8 images, the
full-cache images of the same conditions and seeds, and both token lists) and returns one value
(float or None) per image. Set ``compute(pair, context)`` gets a ``SetPair`` (keys of the images both
sets hold, and loaders for them) and returns one value or None. ``context`` is the run's
``MetricContext``: lazily built learned backends, options, and ``reasons`` (why a metric is absent,
written once to summary.md).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Optional, Sequence, Union

import attrs

from .metrics import DEFAULT_FID_MODE, DEFAULT_SSIM_CONVENTION, LearnedMetrics, check_fid_mode, check_ssim_convention

PER_IMAGE = "image"
PER_SET = "set"


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    """Mean over every image, or None when any image lacks a value (no silent partial means)."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals and len(vals) == len(values) else None


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals and len(vals) == len(values) else None


AGGREGATIONS: dict[str, Callable[[Sequence[Optional[float]]], Optional[float]]] = {"mean": _mean, "median": _median}


def _check_name(instance, attribute, value):
    if not value or not value.replace("_", "").isalnum() or not value[0].isalpha():
        raise ValueError(f"metric {attribute.name} {value!r} must be an identifier (letters, digits, '_')")


def _check_format(instance, attribute, value):
    try:
        format(1.5, value)
    except (ValueError, TypeError):
        raise ValueError(f"metric {instance.name!r}: column format {value!r} is not a float format spec "
                         "(e.g. '.3f')") from None


def _check_aggregate(instance, attribute, value):
    if not callable(value) and value not in AGGREGATIONS:
        raise ValueError(f"metric {instance.name!r}: aggregate {value!r} is not one of {', '.join(AGGREGATIONS)} "
                         "or a function of the per-image values")


@attrs.frozen
class Metric:
    """One fidelity metric. ``per`` is "image" or "set"; ``aggregate`` ("mean", "median" or a
    function of the list of per-image values) applies to per-image metrics; ``identical_value`` is
    what an image identical to the reference scores when the row stores None for it (PSNR: +inf,
    which JSON cannot hold); ``describe`` is the summary.md line (a string, or a function of the
    context, e.g. to name weight files); ``definition`` says what the column means (listed under
    summary.md's table)."""

    name: str = attrs.field(validator=_check_name)
    per: str = attrs.field(validator=attrs.validators.in_((PER_IMAGE, PER_SET)))
    compute: Callable = attrs.field(validator=attrs.validators.is_callable())
    column: str = attrs.field(validator=attrs.validators.instance_of(str))
    fmt: str = attrs.field(default=".4f", validator=_check_format)
    aggregate: Union[str, Callable] = attrs.field(default="mean", validator=_check_aggregate)
    describe: Union[str, Callable, None] = None
    row_field: Optional[str] = None  # where per-image values go in a row (default: the name)
    identical_value: Optional[float] = None
    plot: bool = True  # drawn in fidelity_vs_budget.png (per-image metrics)
    definition: Optional[str] = None  # what the summary column means, written under the table

    def column_definition(self) -> str:
        """The column's definition for summary.md: ``definition``, else a static ``describe``, else
        what the registration says (so no column is left undefined)."""
        if self.definition:
            return self.definition
        if isinstance(self.describe, str):
            return self.describe
        if self.per == PER_SET:
            return f"the registered set metric {self.name!r}, between the full-cache set and this configuration's"
        how = self.aggregate if isinstance(self.aggregate, str) else "aggregate"
        return f"the registered metric {self.name!r} against the full-cache image, {how} over images"

    @property
    def field(self) -> str:
        return self.row_field or self.name

    def aggregate_values(self, values: Sequence[Optional[float]]) -> Optional[float]:
        fn = AGGREGATIONS[self.aggregate] if isinstance(self.aggregate, str) else self.aggregate
        return fn(list(values))

    def summarize_rows(self, rows: Sequence[dict]) -> Optional[float]:
        """The configuration's value from its rows (per-image metrics)."""
        values = []
        for r in rows:
            value = r.get(self.field)
            if value is None and self.identical_value is not None and r.get("identical_to_reference"):
                value = self.identical_value
            values.append(value)
        return self.aggregate_values(values)

    def description(self, context) -> Optional[str]:
        return self.describe(context) if callable(self.describe) else self.describe

    def format_value(self, value) -> str:
        if value is None:
            return "–"
        if isinstance(value, float) and math.isinf(value):
            return "inf"
        return format(value, self.fmt)


@attrs.frozen
class ImageBatch:
    """Per-image metric inputs: (N, H, W, 3) uint8 policy images and the matching full-cache images;
    tokens per scale (each (N, ...)) for both."""

    images: Any
    references: Any
    tokens: Optional[Sequence[Any]] = None
    reference_tokens: Optional[Sequence[Any]] = None


@attrs.frozen
class SetPair:
    """Set metric inputs: ``keys`` of the images both sets hold (sorted), ``load(keys)`` and
    ``load_reference(keys)`` give (n, H, W, 3) uint8 images; ``cache`` is a dict shared by every
    configuration of the run for this metric (e.g. the reference set's features)."""

    keys: Sequence[Any]
    load: Callable
    load_reference: Callable
    cache: dict = attrs.field(factory=dict)


class MetricContext:
    """What metrics share during one run: the lazily built learned backends (LPIPS, FID), the
    options (FID mode, SSIM convention), the set sizes seen, and ``reasons`` why a metric is absent
    (written once to summary.md)."""

    def __init__(self, *, learned_metrics: bool = True, fid_mode: str = DEFAULT_FID_MODE,
                 ssim_convention: str = DEFAULT_SSIM_CONVENTION):
        self.fid_mode = check_fid_mode(fid_mode)
        self.ssim_convention = check_ssim_convention(ssim_convention)
        self.learned = LearnedMetrics(enabled=learned_metrics, fid_mode=fid_mode)
        self.set_sizes: list[int] = []

    @property
    def reasons(self) -> dict[str, str]:
        return self.learned.reasons

    def note(self, key: str, reason: str) -> None:
        """Keep the first reason given under ``key``."""
        self.learned.reasons.setdefault(key, reason)


def image_values(context: MetricContext, batch: ImageBatch) -> dict[str, list]:
    """Every registered per-image metric on ``batch``: {row field: one value per image}. A value a
    row cannot hold (inf, nan) is stored as None; ``identical_value`` restores +inf for identical
    images when the configuration is summarised."""
    n = len(batch.images)
    out = {}
    for metric in registered_metrics(PER_IMAGE):
        values = list(metric.compute(batch, context))
        if len(values) != n:
            raise RuntimeError(f"metric {metric.name!r} returned {len(values)} values for {n} images")
        out[metric.field] = [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]
    return out


def set_values(context: MetricContext, pairs: dict, caches: dict) -> dict[str, dict]:
    """Every registered set metric for each configuration: ``pairs`` maps a configuration id to its
    ``SetPair`` (without cache); returns {config id: {metric name: value or None}}."""
    out: dict[str, dict] = {cid: {} for cid in pairs}
    for metric in registered_metrics(PER_SET):
        cache = caches.setdefault(metric.name, {})
        for cid, pair in pairs.items():
            out[cid][metric.name] = metric.compute(attrs.evolve(pair, cache=cache), context)
    return out


_REGISTRY: dict[str, Metric] = {}
_ENTRY_POINTS_LOADED = False
_BUILTINS_LOADED = False
ENTRY_POINT_GROUP = "kvpolicy.metrics"
BUILTIN_MODULE = "benchmarks.builtin_metrics"


def register_metric(metric: Metric, *, replace: bool = False) -> Metric:
    """Register ``metric``; a second metric of the same name needs ``replace=True``."""
    _load_builtins()  # the built-ins keep the first columns even when a plugin registers first
    if not isinstance(metric, Metric):
        raise TypeError(f"register_metric takes a Metric, got {type(metric).__name__}")
    if metric.name in _REGISTRY and not replace and _REGISTRY[metric.name] != metric:
        raise ValueError(f"a metric named {metric.name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[metric.name] = metric
    return metric


def unregister_metric(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        import importlib

        importlib.import_module(BUILTIN_MODULE)  # registers FID, LPIPS, PSNR, SSIM, token agreement


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    _load_builtins()
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def registered_metrics(per: Optional[str] = None) -> list[Metric]:
    """Registered metrics in registration order (built-ins first), optionally of one kind."""
    _load_entry_points()
    return [m for m in _REGISTRY.values() if per is None or m.per == per]


def get_metric(name: str) -> Metric:
    _load_entry_points()
    if name not in _REGISTRY:
        raise ValueError(f"unknown metric {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]
