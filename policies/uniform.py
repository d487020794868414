"""Uniform: ScaleKV's token selection with the same capacity in every layer (the ablation baseline).

Isolates what ScaleKV's drafter/refiner budgets add: every layer keeps B tokens once its cache
exceeds B (the same trigger as ScaleKV, reference/scalekv.md §3.5), chosen exactly as ScaleKV
chooses them (``kvpolicy.scoring.observation_window_select``): the 4 × 4 patch-centre window of
the current map plus the top (B − 16) tokens by the window queries' pooled scores. ``mode``,
``window_size``, ``kernel_size`` and ``pooling`` mean what they mean for ``scalekv``:
"attention" (default: real queries, softmax, average pooling) or "reference" (raw queries, raw
logits, max pooling, as the released code).
"""

from __future__ import annotations

from typing import Optional

import attrs

from kvpolicy import Policy, Selection, register_policy, scoring

MODES = ("attention", "reference")
_POOLING = {"max": "max", "maxpool": "max", "avg": "avg", "avgpool": "avg", "mean": "avg"}


def _pooling(value):
    if value is None:
        return None
    if value not in _POOLING:
        raise ValueError(f"pooling must be 'max' or 'avg' (or 'maxpool'/'avgpool'), got {value!r}")
    return _POOLING[value]


def _positive(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an int >= 1, got {value!r}")


@register_policy("uniform")
@attrs.define(kw_only=True)
class Uniform(Policy):
    """ScaleKV's selection with one capacity for every layer (no drafters or refiners)."""

    mode: str = attrs.field(default="attention", validator=attrs.validators.in_(MODES))
    window_size: int = attrs.field(default=16, validator=_positive)
    kernel_size: int = attrs.field(default=5, validator=_positive)
    pooling: Optional[str] = attrs.field(default=None, converter=_pooling)

    def __attrs_post_init__(self):
        scoring.observation_window_positions(1, 1, self.window_size)  # perfect-square check
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-length pooling), got {self.kernel_size}")

    @property
    def needs_queries(self) -> bool:
        return self.mode == "attention"

    @property
    def needs_raw_queries(self) -> bool:
        return self.mode == "reference"

    def make_plan(self, schedule, num_layers, budget_tokens):
        if budget_tokens < self.window_size:
            raise ValueError(f"uniform: budget {budget_tokens} tokens per layer is below window_size={self.window_size}; "
                             "the observation window alone would overflow it (raise the budget or lower window_size)")
        return super().make_plan(schedule, num_layers, budget_tokens)

    def select(self, keys, values, ctx):
        if ctx.capacity is None or ctx.length <= ctx.capacity:
            return Selection(None, ctx.state)
        pooling = self.pooling or ("max" if self.mode == "reference" else "avg")
        return Selection(scoring.observation_window_select(keys, ctx, raw=self.mode == "reference",
                                                           window_size=self.window_size,
                                                           kernel_size=self.kernel_size, pooling=pooling), ctx.state)
