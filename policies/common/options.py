"""Options shared by the window selectors (validators for pooling, kernels, window sizes) and the
check that a capacity plan leaves room for an observation window."""

from __future__ import annotations

from kvpolicy import CapacityPlan
from kvpolicy.validators import check_choice, check_positive_int

PATCH_WINDOW_MODES = ("attention", "reference")
_POOLING = {"max": "max", "maxpool": "max", "avg": "avg", "avgpool": "avg", "mean": "avg"}


def _label(instance) -> str:
    return instance.name or type(instance).__name__


def check_odd_kernel(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"{_label(instance)} {attribute.name} must be an odd int >= 1 (1 = no pooling; odd keeps "
                         f"the pooled length), got {value!r}")


def pooling_option(value):
    """'max'/'avg' (and the aliases 'maxpool', 'avgpool', 'mean'); None = the mode's default."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in _POOLING:
        raise ValueError(f"pooling must be 'max' or 'avg' (or 'maxpool'/'avgpool'/'mean'), got {value!r}")
    return _POOLING[value]


def check_pooling_name(instance, attribute, value):
    if value not in ("max", "avg"):
        raise ValueError(f"{_label(instance)} pooling must be 'max' or 'avg', got {value!r}")


def check_square_window(instance, attribute, value):
    check_positive_int(instance, attribute, value)
    root = int(value ** 0.5 + 0.5)
    if root * root != value:
        raise ValueError(f"{_label(instance)} window_size must be a perfect square (the centres of a √w × √w grid "
                         f"of patches: 4, 9, 16, ...), got {value!r}")


def check_window_fits(plan: CapacityPlan, schedule, window, name: str, window_size: int) -> CapacityPlan:
    """Every capacity that can evict must hold the observation window (``window(scale)`` tokens).

    Nothing is clipped: a plan that breaks this is refused. A smaller ``window_size`` w' gives the
    window min(w', window(scale)), so the largest w' that fits this plan is the smallest of the
    refused capacities; the message names it."""
    refused = []
    for scale, row in enumerate(plan.capacities):
        for layer, layer_capacity in enumerate(row):
            heads = plan.head_capacity(scale, layer)
            for head, capacity in enumerate((layer_capacity,) if heads is None else heads):
                if capacity is None or capacity >= schedule.cumulative_length(scale) or capacity >= window(scale):
                    continue
                refused.append((scale, layer, None if heads is None else head, capacity))
    if not refused:
        return plan
    scale, layer, head, capacity = refused[0]
    where = f"scale {scale}, layer {layer}" + ("" if head is None else f", head {head}")
    raise ValueError(
        f"{name}: capacity {capacity} at {where} is smaller than that scale's observation window "
        f"({window(scale)} tokens, window_size={window_size} capped by the map) and windows are never clipped; "
        f"budgets of at least {window_size} tokens always fit, or choose window_size <= "
        f"{min(c for *_, c in refused)} (the smallest capacity here that is below its window)")


def mask_padding(scores, valid, pooling: str):
    """Scores at padding positions of a ragged view, set to what 'same' pooling pads with (-inf for
    max, 0 for avg with the padding counted), so every (row, head) pools as if it were alone."""
    return scores.masked_fill(~valid, float("-inf") if pooling == "max" else 0.0)
