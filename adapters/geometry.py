"""Model geometries without weights: depth, heads, head dim and the scale schedule of every preset.

The records live in the model-family registry (``adapters.families``): each family registers its
presets and how a resolution becomes a schedule, so ``kvpolicy plan`` needs no weights and no
model code. The family-specific tables that used to be here moved into the families' packages;
the old names still resolve (below) so existing imports keep working.
"""

from __future__ import annotations

import importlib

from .families import ModelGeometry, geometry_names, get_geometry, register_geometry

__all__ = ["ModelGeometry", "geometry_names", "get_geometry", "register_geometry"]

# Names that moved into a family package: name -> module now holding it.
_MOVED = {
    **{name: "adapters.infinity.schedule" for name in ("INFINITY_TEMPLATES", "INFINITY_PN_SCALES",
                                                          "INFINITY_RESOLUTION_PN", "infinity_template",
                                                          "infinity_schedule")},
    "VAR_PATCH_NUMS": "adapters.var.schedule",
}


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
