"""Test cases and the synthetic tensors a checked generation runs on.

A ``Case`` is everything one checked generation needs: the schedule, the budget, the policy's
options and the geometry (layers, batch with or without CFG rows, key/value heads, grouped query
heads, head dim, dtype, seed). Its ``repr`` is Python that rebuilds it, so a failing case printed
by ``check_policy`` can be pasted into ``check_case``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import attrs
import torch
import torch.nn.functional as F

from ..budget import Budget, Ratio, Tokens, parse_budget
from ..schedule import ScaleSchedule

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _schedule(value) -> ScaleSchedule:
    return value if isinstance(value, ScaleSchedule) else ScaleSchedule(value)


def _budget(value) -> Optional[Budget]:
    return None if value is None else parse_budget(value)


def _dtype_name(value) -> str:
    if isinstance(value, torch.dtype):
        value = str(value).replace("torch.", "")
    if value not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {value!r}")
    return value


def _positive(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Case {attribute.name} must be an int >= 1, got {value!r}")


@attrs.frozen(repr=False)
class Case:
    """One checked generation: schedule, budget, policy options and geometry."""

    schedule: ScaleSchedule = attrs.field(converter=_schedule)
    budget: Optional[Budget] = attrs.field(default=None, converter=_budget)
    options: dict = attrs.field(factory=dict, converter=dict)
    num_layers: int = attrs.field(default=2, validator=_positive)
    batch: int = attrs.field(default=1, validator=_positive)
    cfg: bool = True
    heads: int = attrs.field(default=2, validator=_positive)  # key/value heads
    query_group: int = attrs.field(default=1, validator=_positive)  # query heads per key/value head (GQA)
    head_dim: int = attrs.field(default=8, validator=_positive)
    dtype: str = attrs.field(default="float32", converter=_dtype_name)
    seed: int = 0
    tied: bool = False  # every key and query identical: every score ties

    @property
    def rows(self) -> int:
        """Batch rows: conditional and unconditional rows per image with CFG."""
        return self.batch * (2 if self.cfg else 1)

    @property
    def budget_tokens(self) -> Optional[int]:
        return None if self.budget is None else self.budget.tokens(self.schedule)

    def inputs(self, seed: Optional[int] = None) -> "Inputs":
        return make_inputs(self.schedule, num_layers=self.num_layers, rows=self.rows, heads=self.heads,
                           head_dim=self.head_dim, seed=self.seed if seed is None else seed,
                           dtype=DTYPES[self.dtype], query_group=self.query_group, independent_queries=True,
                           tied=self.tied)

    def __repr__(self) -> str:
        budget = None if self.budget is None else (
            f"Tokens({self.budget.count})" if isinstance(self.budget, Tokens) else f"Ratio({self.budget.fraction!r})")
        shapes = [tuple(s) for s in self.schedule.shapes]
        return (f"Case(schedule={shapes}, budget={budget}, options={self.options!r}, num_layers={self.num_layers}, "
                f"batch={self.batch}, cfg={self.cfg}, heads={self.heads}, query_group={self.query_group}, "
                f"head_dim={self.head_dim}, dtype={self.dtype!r}, seed={self.seed}, tied={self.tied})")


@attrs.frozen
class Inputs:
    """Synthetic per-(scale, layer) tensors: unit keys (cosine attention), values, queries, raw queries."""

    schedule: ScaleSchedule
    num_layers: int
    tensors: dict  # (scale, layer) -> (keys, values, queries, raw_queries); keys (R, H, n, D), queries (R, Hq, n, D)

    @property
    def rows(self) -> int:
        return self.tensors[(0, 0)][0].shape[0]

    @property
    def heads(self) -> int:
        return self.tensors[(0, 0)][0].shape[1]

    def row(self, r: int) -> "Inputs":
        """The same generation with only row ``r`` (a batch of one)."""
        return Inputs(self.schedule, self.num_layers,
                      {key: tuple(t[r:r + 1].clone() for t in value) for key, value in self.tensors.items()})


def make_inputs(schedule: ScaleSchedule, *, num_layers: int = 3, rows: int = 4, heads: int = 2, head_dim: int = 8,
                seed: int = 0, dtype=torch.float32, query_scale: float = 6.0, query_group: int = 1,
                independent_queries: bool = False, tied: bool = False) -> Inputs:
    """Seeded synthetic tensors for every (scale, layer), drawn in float32 on the CPU (bit-reproducible).

    ``query_group`` > 1 gives grouped-query attention (query heads = ``query_group`` x key/value
    heads): each key/value head's queries repeated (identical queries per group, which must select
    like plain multi-head attention) or, with ``independent_queries``, drawn independently.
    ``tied`` makes every key and query identical, so every score ties.
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    q_heads = heads * query_group if independent_queries else heads
    tensors = {}
    for scale in range(schedule.num_scales):
        n = schedule.tokens(scale)
        for layer in range(num_layers):
            keys = F.normalize(randn(rows, heads, n, head_dim), dim=-1)
            values = randn(rows, heads, n, head_dim)
            queries = query_scale * F.normalize(randn(rows, q_heads, n, head_dim), dim=-1)
            raw = randn(rows, q_heads, n, head_dim)
            if tied:
                keys = torch.full_like(keys, 1 / math.sqrt(head_dim))
                queries, raw = torch.ones_like(queries), torch.ones_like(raw)
            if query_group > 1 and not independent_queries:
                queries, raw = (t.repeat_interleave(query_group, dim=1) for t in (queries, raw))
            tensors[(scale, layer)] = tuple(t.to(dtype) for t in (keys, values, queries, raw))
    return Inputs(schedule, num_layers, tensors)
