"""Hypothesis strategies for policy cases (needs ``pip install 'kvpolicy[testing]'``).

- ``schedules()``: square VAR-style and non-square Infinity-style tables, random small schedules,
  and short prefixes (down to one scale);
- ``budgets(schedule)``: ``Tokens`` and ``Ratio`` budgets including the edges (1 token, the
  smallest ratio worth one token, just below / at / above the full length, 100 %);
- ``geometries()``: layers, batch with and without CFG rows, key/value heads, grouped query heads,
  head dims, dtypes, seeds, tied scores;
- ``policy_options(cls)``: the values a policy declares in ``check_option_values``;
- ``cases(cls)``: all of these together as a ``Case``; ``plan_cases(cls)``: plans on real model
  geometries (up to Infinity 1024^2 with 48 layers), no tensors.
"""

from __future__ import annotations

from typing import Optional

from hypothesis import strategies as st

from ..budget import Ratio, Tokens
from ..schedule import ScaleSchedule
from .inputs import Case

# Small real schedules: VAR 256^2 patch numbers (square), Infinity's 256^2 prefix (1:1) and two
# non-square Infinity templates (h/w = 1.5 and 0.5), each cut to 7 scales.
VAR_256 = ScaleSchedule([1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
INFINITY_256 = ScaleSchedule([1, 2, 4, 6, 8, 12, 16])
INFINITY_3_2 = ScaleSchedule([(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14)])
INFINITY_1_2 = ScaleSchedule([(1, 1), (2, 2), (2, 4), (3, 6), (5, 10), (8, 16), (11, 22)])
SMALL_SCHEDULES = (VAR_256, INFINITY_256, INFINITY_3_2, INFINITY_1_2)

# Real model geometries for plans only: Infinity 1024^2 (1:1 and 1:2 templates), VAR 512^2 and 256^2.
INFINITY_1024 = ScaleSchedule([1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64])
INFINITY_1024_1_2 = ScaleSchedule([(1, 1), (2, 2), (2, 4), (3, 6), (5, 10), (8, 16), (11, 22), (15, 30), (19, 38),
                                   (23, 46), (30, 60), (37, 74), (45, 90)])
VAR_512 = ScaleSchedule([1, 2, 3, 4, 6, 9, 13, 18, 24, 32])
LARGE_SCHEDULES = (INFINITY_1024, INFINITY_1024_1_2, VAR_512, VAR_256)

DTYPES = ("float32", "bfloat16", "float16")


@st.composite
def random_schedules(draw, max_side: int = 6, max_scales: int = 6) -> ScaleSchedule:
    shapes = draw(st.lists(st.tuples(st.integers(1, max_side), st.integers(1, max_side)), min_size=1,
                           max_size=max_scales))
    return ScaleSchedule(shapes)


@st.composite
def schedules(draw, tables=SMALL_SCHEDULES) -> ScaleSchedule:
    """Real (square and non-square) small tables or random ones; whole or a short prefix."""
    # Random schedules first and prefixes before whole ones, so that failures shrink to few small maps.
    base = draw(st.one_of(random_schedules(), st.sampled_from(tables)))
    # Any prefix down to one scale (budgets are drawn for the prefix, so short ones evict too);
    # failures shrink to the fewest scales that still fail.
    return base.prefix(draw(st.integers(1, base.num_scales)))


@st.composite
def budgets(draw, schedule: ScaleSchedule):
    """Budgets at and around the edges: 1 token, below / at / above the full length, ratios."""
    total, reference = schedule.total, schedule.reference_length
    smallest_ratio = min(1.0, (0.5 + 1e-6) / reference)  # the smallest ratio that is one token
    ratios = [r for r in (0.01, 0.04, 0.1, 0.2, 0.5, 0.9) if r * reference >= 0.5]
    # About a quarter of the draws cover every token (no eviction allowed); the rest evict.
    return draw(st.one_of(
        st.integers(1, max(1, total - 1)).map(Tokens),
        st.integers(max(1, total // 8), max(1, total - 1)).map(Tokens),
        st.sampled_from([Tokens(1), Tokens(max(1, total - 1)), Tokens(total)]),
        st.sampled_from([Ratio(1.0), Ratio(smallest_ratio)] + [Ratio(r) for r in ratios]),
        st.integers(total, total + 50).map(Tokens),
    ))


@st.composite
def geometries(draw) -> dict:
    """Keyword arguments of ``Case`` for the tensors: layers, rows, heads, GQA, dims, dtype, seed."""
    return dict(num_layers=draw(st.integers(1, 3)), batch=draw(st.integers(1, 2)), cfg=draw(st.booleans()),
                heads=draw(st.integers(1, 3)), query_group=draw(st.sampled_from([1, 1, 2, 3])),
                head_dim=draw(st.sampled_from([4, 8])), dtype=draw(st.sampled_from(DTYPES)),
                seed=draw(st.integers(0, 10_000)), tied=draw(st.integers(0, 9)) == 9)


def policy_options(cls, values: Optional[dict] = None):
    """One value per option the policy declares in ``check_option_values`` (or ``values``)."""
    values = dict(getattr(cls, "check_option_values", {}) if values is None else values)
    return st.fixed_dictionaries({name: st.sampled_from(list(choices)) for name, choices in sorted(values.items())})


@st.composite
def cases(draw, cls, option_values: Optional[dict] = None) -> Case:
    schedule = draw(schedules())
    budget = draw(budgets(schedule)) if cls.requires_budget else None
    options = draw(policy_options(cls, option_values))
    return Case(schedule=schedule, budget=budget, options=options, **draw(geometries()))


@st.composite
def plan_cases(draw, cls, option_values: Optional[dict] = None):
    from .checks import PlanCase

    schedule = draw(st.one_of(st.sampled_from(LARGE_SCHEDULES), schedules()))
    budget = draw(st.one_of(st.integers(1, 12_000).map(Tokens), budgets(schedule))) if cls.requires_budget else None
    return PlanCase(schedule=schedule, num_layers=draw(st.integers(1, 48)), budget=budget,
                    options=draw(policy_options(cls, option_values)))
