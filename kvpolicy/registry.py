"""Registry of policy classes by name, with entry-point discovery.

Built-in policies and third-party packages register the same way: a module listed in the
``kvpolicy.policies`` entry-point group is imported on the first lookup, and its classes register
themselves with ``@register_policy``. So ``get_policy("snapkv")`` works without importing the
``policies`` package, and this core imports nothing above it.
"""

from __future__ import annotations

import difflib
import re
import warnings
from importlib import metadata

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the registry is below the base class: Policy.from_config looks names up here
    from .policy import Policy

ENTRY_POINT_GROUP = "kvpolicy.policies"
_REGISTRY: dict[str, type[Policy]] = {}
_entry_points_loaded = False
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_policy(name: str, *, description: str | None = None):
    """Class decorator: ``@register_policy("mine")`` makes ``get_policy("mine")`` build the class."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"policy name {name!r} must be lowercase letters, digits and '_' starting with a letter")

    def decorate(cls):
        if not _is_policy_class(cls):
            raise TypeError(f"@register_policy({name!r}) decorates Policy subclasses, not {cls!r}")
        if "__attrs_attrs__" not in cls.__dict__:
            # attrs builds a new class: registered before it, the name would build the bare class.
            raise TypeError(f"@register_policy({name!r}) got {cls.__qualname__}, which is not an attrs class yet: put "
                            f"@register_policy({name!r}) above @attrs.define(kw_only=True) (attrs must run first)")
        existing = _REGISTRY.get(name)
        if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"policy name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        doc = (cls.__doc__ or "").strip().splitlines()
        cls.description = description or (doc[0].strip() if doc else name)
        _REGISTRY[name] = cls
        return cls

    return decorate


def _is_policy_class(cls) -> bool:
    """A subclass of ``kvpolicy.Policy``, recognised by the base class's identity in its MRO (this
    module sits below ``kvpolicy.policy``, which looks names up here)."""
    return isinstance(cls, type) and any(base.__module__ == __package__ + ".policy" and base.__qualname__ == "Policy"
                                         for base in cls.__mro__)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plug-in must not hide the others
            warnings.warn(f"kvpolicy: could not load policy plug-in {ep.name!r} ({ep.value}): {exc}", stacklevel=2)


def policy_class(name: str) -> type[Policy]:
    if name not in _REGISTRY:
        _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = sorted(_REGISTRY)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ValueError(f"unknown policy {name!r}{hint} Known policies: {', '.join(known) or '(none)'}") from None


def get_policy(name: str | Policy, **options) -> Policy:
    """Build a registered policy: ``get_policy("snapkv", budget="10%", window_size=32)``."""
    if not isinstance(name, str) and _is_policy_class(type(name)):
        return name.with_budget(options.pop("budget")) if set(options) == {"budget"} else (
            name if not options else _reject_options(name))
    cls = policy_class(name)
    try:
        return cls(**options)
    except TypeError:
        import attrs

        allowed = sorted(f.alias or f.name for f in attrs.fields(cls) if f.init)
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"policy {name!r} has no option(s) {unknown}; its options are {allowed}") from None
        raise


def _reject_options(policy: Policy):
    raise TypeError(f"options other than budget cannot be applied to an existing policy {policy!r}; "
                    "build a new one with get_policy(name, **options)")


def list_policies() -> dict[str, str]:
    """Registered policy names with their one-line descriptions, sorted by name."""
    _load_entry_points()
    return {name: _REGISTRY[name].description for name in sorted(_REGISTRY)}
