"""The model-family registry: one record per family, found like policies are.

A family (Infinity, VAR, or a user's model) is one package and one registration. Its
``ModelFamily`` record says everything the harness needs without naming the family anywhere else:
how images are conditioned (text prompts or class labels), which presets exist and their geometry
(depth, heads, head dim, and the scale schedule for a resolution) so memory can be planned without
weights, how a preset is loaded, which weight files the loader takes, and the conditions to use
for calibration and benchmarks when the user gives none.

Families are discovered through the ``kvpolicy.models`` entry-point group (the built-in ones are
declared there too, in pyproject.toml): each entry point names a module that calls
``register_family`` on import, or a ``ModelFamily`` object. A user's file can also call
``register_family`` itself and be loaded with ``kvpolicy --plugin FILE``.
"""

from __future__ import annotations

import difflib
import re
import warnings
from importlib import metadata
from typing import Any, Callable, Optional, Sequence

import attrs

from kvpolicy import ScaleSchedule

from .validators import positive_int

ENTRY_POINT_GROUP = "kvpolicy.models"
CONDITION_KINDS = ("prompt", "label")  # text-to-image, class-conditional
_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")


def _check_name(instance, attribute, value) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{type(instance).__name__}.{attribute.name} {value!r} must be lowercase letters, digits, "
                         "'-', '_' or '.' starting with a letter")


@attrs.frozen
class ModelGeometry:
    """What memory planning needs: depth, heads, head dim, the schedule and CFG."""

    name: str
    family: str
    num_layers: int
    num_heads: int
    head_dim: int
    schedule: ScaleSchedule
    cfg: bool = True
    # dtype the official code caches keys in, whatever the compute dtype (None: the compute dtype).
    # Infinity normalises q and k in float32 and caches that K next to bf16 V (reference §9).
    key_cache_dtype: Optional[str] = None

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


@attrs.frozen
class Preset:
    """A named model of a family. ``resolution``: the size it generates by default (the family's
    ``schedule`` turns it into scales). ``runnable``: the family can load it (geometry-only presets
    serve ``kvpolicy plan``). ``tiny``: sized for a CPU (tests, smoke runs; trained or random weights)."""

    name: str = attrs.field(validator=_check_name)
    num_layers: int = attrs.field(validator=positive_int)
    num_heads: int = attrs.field(validator=positive_int)
    head_dim: int = attrs.field(validator=positive_int)
    resolution: Any = None
    runnable: bool = True
    tiny: bool = False


def _check_kind(instance, attribute, value) -> None:
    if value not in CONDITION_KINDS:
        raise ValueError(f"ModelFamily.conditioning must be one of {CONDITION_KINDS}, got {value!r}")


def _presets(value) -> dict:
    items = value.values() if isinstance(value, dict) else value
    out = {}
    for preset in items:
        if not isinstance(preset, Preset):
            raise TypeError(f"ModelFamily.presets holds Preset records, got {preset!r}")
        out[preset.name] = preset
    return out


@attrs.define
class ModelFamily:
    """One model family.

    conditioning: "prompt" (``generate`` takes a list of strings) or "label" (a list of class
    indices 0..num_classes-1). schedule(preset, resolution, aspect_ratio) -> ScaleSchedule: the
    scales generated at a resolution (None: the preset's own); raise ValueError naming the allowed
    values. load(preset_name, **kwargs) -> model: kwargs are ``device``, ``dtype`` and the names in
    ``weight_options`` (each a path, ``"random"``, or absent for the default files). The model's
    ``generate(conditions, *, policy, seed, batch_size, progress, stats, resolution, aspect_ratio)``
    returns ``adapters.base.GenerationOutput`` (``adapters.base.NextScaleModel`` is the template).
    calibration_conditions / evaluation_conditions: the defaults when the user gives none (None:
    the harness's shipped prompts, or labels 0-9 / 0-3). benchmark_presets: what ``bench-gpu``
    measures by default.
    """

    name: str = attrs.field(validator=_check_name)
    conditioning: str = attrs.field(validator=_check_kind)
    schedule: Callable[..., ScaleSchedule]
    load: Optional[Callable[..., Any]] = None
    presets: dict = attrs.field(factory=dict, converter=_presets)
    description: str = ""
    num_classes: Optional[int] = None
    weight_options: tuple = ("weights", "vae_weights")
    calibration_conditions: Optional[tuple] = attrs.field(default=None, converter=attrs.converters.optional(tuple))
    evaluation_conditions: Optional[tuple] = attrs.field(default=None, converter=attrs.converters.optional(tuple))
    benchmark_presets: tuple = attrs.field(default=(), converter=tuple)
    resolutions: str = ""  # what --resolution accepts, for messages and `kvpolicy list --models`
    key_cache_dtype: Optional[str] = None  # the official key-cache dtype, if not the compute dtype ("float32")

    def __attrs_post_init__(self):
        if self.conditioning == "label" and (isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int)
                                             or self.num_classes < 1):
            raise ValueError(f"family {self.name!r} is class-conditional: give num_classes (a positive int), "
                             f"got {self.num_classes!r}")
        unknown = [p for p in self.benchmark_presets if p not in self.presets]
        if unknown:
            raise ValueError(f"family {self.name!r}: benchmark_presets {unknown} are not among its presets")

    def geometry(self, preset: str, resolution=None, aspect_ratio: float = 1.0) -> ModelGeometry:
        p = self.presets[preset]
        schedule = self.schedule(p, resolution, aspect_ratio)
        if not isinstance(schedule, ScaleSchedule):
            raise TypeError(f"family {self.name!r}: schedule() returned {type(schedule).__name__}, not a ScaleSchedule")
        return ModelGeometry(name=p.name, family=self.name, num_layers=p.num_layers, num_heads=p.num_heads,
                             head_dim=p.head_dim, schedule=schedule, key_cache_dtype=self.key_cache_dtype)

    def add_preset(self, preset: Preset) -> None:
        owner = _PRESET_OWNER.get(preset.name)
        if owner is not None and owner != self.name:
            raise ValueError(f"model {preset.name!r} is already a preset of family {owner!r}")
        self.presets[preset.name] = preset
        _PRESET_OWNER[preset.name] = self.name


_FAMILIES: dict[str, ModelFamily] = {}
_PRESET_OWNER: dict[str, str] = {}
_LOADERS: dict[str, Callable[..., Any]] = {}  # register_model(): a loader without a family record
_entry_points_loaded = False


def register_family(family: ModelFamily) -> ModelFamily:
    """Make a family and its presets known (``kvpolicy list --models``, plan, generate, compare, …).
    Registering the same family again (a module imported twice) replaces it."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register_family takes a ModelFamily, got {family!r}")
    for preset in family.presets:
        owner = _PRESET_OWNER.get(preset)
        if owner is not None and owner != family.name:
            raise ValueError(f"family {family.name!r}: model {preset!r} is already a preset of family {owner!r}")
    previous = _FAMILIES.get(family.name)
    if previous is not None:  # keep presets added later (register_geometry, tests) on a re-registration
        for name, preset in previous.presets.items():
            family.presets.setdefault(name, preset)
    _FAMILIES[family.name] = family
    for preset in family.presets:
        _PRESET_OWNER[preset] = family.name
    return family


def _builtin_family_modules() -> list[str]:
    """``adapters.<package>.family`` for every adapter package that has one. The built-in families
    are declared as entry points too; this finds them where the installed metadata predates them
    (a source checkout installed before a family was added)."""
    import pkgutil
    from pathlib import Path

    here = Path(__file__).resolve().parent  # the adapters package (not imported here: it imports this module)
    return [f"{__package__}.{m.name}.family" for m in pkgutil.iter_modules([str(here)])
            if m.ispkg and (here / m.name / "family.py").is_file()]


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    import importlib

    for module in _builtin_family_modules():
        importlib.import_module(module)  # part of this package: a failure here is a real error
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as exc:  # a broken plug-in must not hide the others
            warnings.warn(f"kvpolicy: could not load model family plug-in {ep.name!r} ({ep.value}): {exc}",
                          stacklevel=2)
            continue
        if isinstance(loaded, ModelFamily):
            register_family(loaded)


def list_families() -> dict[str, ModelFamily]:
    _load_entry_points()
    return dict(sorted(_FAMILIES.items()))


def get_family(name: str) -> ModelFamily:
    families = list_families()
    if name not in families:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(families) or '(none)'}")
    return families[name]


def _unknown_model(name: str, known: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown model {name!r}{hint} Known models: {', '.join(sorted(known))}")


def family_of(model: str) -> ModelFamily:
    """The family a preset belongs to; an unknown name fails with the closest known one."""
    _load_entry_points()
    owner = _PRESET_OWNER.get(model)
    if owner is None:
        raise _unknown_model(model, list(_PRESET_OWNER))
    return _FAMILIES[owner]


def preset(model: str) -> Preset:
    return family_of(model).presets[model]


def geometry_names() -> list[str]:
    _load_entry_points()
    return sorted(_PRESET_OWNER)


def get_geometry(model: str, resolution=None, aspect_ratio: float = 1.0) -> ModelGeometry:
    """Geometry of a preset at a resolution (None: the preset's own), without loading weights."""
    return family_of(model).geometry(model, resolution, aspect_ratio)


def register_geometry(name: str, family: str, num_layers: int, num_heads: int, head_dim: int, resolution=None) -> None:
    """Add a geometry-only preset to a registered family (``kvpolicy plan`` then knows it)."""
    get_family(family).add_preset(Preset(name, num_layers, num_heads, head_dim, resolution, runnable=False))


def register_model(name: str, loader: Callable[..., Any]) -> None:
    """Register ``loader(**kwargs) -> model`` under a name without a family record (kept for
    existing users: such a model can be loaded, but not planned or conditioned by the harness;
    register a ``ModelFamily`` for that)."""
    _LOADERS[name] = loader


def list_models() -> list[str]:
    """Names ``load_model`` accepts."""
    _load_entry_points()
    runnable = {name for family in _FAMILIES.values() if family.load is not None
                for name, p in family.presets.items() if p.runnable}
    return sorted(runnable | set(_LOADERS))


def load_model(name: str, **kwargs):
    """Build a model by preset name: ``load_model("infinity-tiny")``, ``load_model("infinity-2b",
    weights="/path/or/hub", device="cuda", dtype=torch.bfloat16)``."""
    if name in _LOADERS:
        return _LOADERS[name](**kwargs)
    _load_entry_points()
    owner = _PRESET_OWNER.get(name)
    if owner is None or _FAMILIES[owner].load is None or not _FAMILIES[owner].presets[name].runnable:
        raise _unknown_model(name, list_models())
    return _FAMILIES[owner].load(name, **kwargs)
