"""Policies as allocation x selection, composed from parts.

A policy answers two questions: how many tokens each (scale, layer[, head]) may keep (the
*allocation*: ``make_plan``) and which ones (the *selector*: ``select``, or ``score`` and
``forced_positions`` for a ``ScoredPolicy``). A *part* is an attrs class deriving from ``Policy``
that answers one of them; parts are declared with ``@attrs.define(kw_only=True, slots=False)`` so
that several can be combined (slotted attrs classes cannot share a subclass). ``compose`` makes
and registers the policy in one line::

    compose("scalekv_snapkv", ScaleKVAllocation, RecentWindowSelector)

Earlier parts win where two define the same method (Python's method order), so a *wrapper* part
placed first changes a selector without knowing it. The head-adaptive wrapper is the example: a
part with ``head_adaptive = True`` that overrides ``ScoredPolicy.head_budgets`` redistributes a
layer's H x capacity across its heads by score (AdaKV) over any scored selector::

    compose("adakv_snapkv", AdaptiveHeads, UniformAllocation, RecentWindowSelector)

Allocations end ``make_plan`` with ``self.check_plan(plan, schedule)`` so that the selector can
refuse a plan it cannot serve (a capacity below its observation window). The options of every
part become the policy's options (``get_policy(name, **options)``, ``to_config``).
"""

from __future__ import annotations

import inspect
from typing import Optional

import attrs

from .policy import Policy
from .registry import register_policy


def _class_name(name: str) -> str:
    return "".join(word.capitalize() for word in name.split("_")) or "Composed"


def compose(name: str, *parts: type, description: Optional[str] = None, class_name: Optional[str] = None,
            **class_attributes) -> type:
    """Build the policy class whose bases are ``parts`` (first wins), register it as ``name``, return it.
    ``class_attributes`` set class-level declarations on it (``check_options``, ``check_option_values``)."""
    if not parts:
        raise ValueError(f"compose({name!r}) needs at least one part (an allocation and/or a selector)")
    for part in parts:
        if not (isinstance(part, type) and issubclass(part, Policy)):
            raise TypeError(f"compose({name!r}): parts are Policy subclasses (allocations, selectors), not {part!r}")
        if not attrs.has(part):
            raise TypeError(f"compose({name!r}): part {part.__qualname__} is not an attrs class; declare it with "
                            "@attrs.define(kw_only=True, slots=False)")
        if "__slots__" in part.__dict__ and part.__dict__["__slots__"] and part is not Policy:
            slotted = [p for p in parts if "__slots__" in p.__dict__ and p.__dict__["__slots__"]]
            if len(slotted) > 1:
                raise TypeError(f"compose({name!r}): parts {[p.__qualname__ for p in slotted]} are slotted attrs classes "
                                "and cannot be combined; declare parts with @attrs.define(kw_only=True, slots=False)")
    frame = inspect.currentframe().f_back
    module = frame.f_globals.get("__name__", __name__) if frame is not None else __name__
    doc = description or f"{' x '.join(p.__name__ for p in parts)}"
    unknown = sorted(k for k in class_attributes if not hasattr(Policy, k) or isinstance(getattr(Policy, k), property)
                     or k in {f.name for f in attrs.fields(Policy)})
    if unknown:
        raise TypeError(f"compose({name!r}): {unknown} are not class-level declarations of a Policy (options belong to "
                        "the parts as attrs fields)")
    cls = type(class_name or _class_name(name), tuple(parts),
               {"__doc__": doc, "__module__": module, **class_attributes})
    return register_policy(name, description=description)(attrs.define(kw_only=True)(cls))
