"""``uniform``: ScaleKV's selection with one capacity in every layer."""

import pytest
import torch
import torch.nn.functional as F

from adapters.geometry import infinity_schedule
from kvpolicy import ScaleSchedule, compress, get_policy, list_policies, simulate

SCHEDULE = ScaleSchedule([1, 2, 4, 6, 8, 12])


def test_registered_with_scalekv():
    names = list_policies()
    assert "uniform" in names and "scalekv" in names


def test_plan_is_the_budget_in_every_layer():
    plan = get_policy("uniform", budget="10%").plan(infinity_schedule(1024), 32)
    assert plan.budget_tokens == 643
    assert all(set(row) == {643} for row in plan.capacities)
    kept = plan.kept_lengths()
    assert kept[6] == [521] * 32 and all(row == [643] * 32 for row in kept[7:])
    assert plan.roles is None


@pytest.mark.parametrize("mode", ["attention", "reference"])
def test_same_tokens_as_scalekv_at_the_same_capacity(mode):
    g = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(2, 2, 265, 8, generator=g), dim=-1)
    values = torch.randn(2, 2, 265, 8, generator=g)
    queries = torch.randn(2, 4, 144, 8, generator=g)
    uniform = get_policy("uniform", budget=50, mode=mode)
    assert uniform.needs_queries == (mode == "attention") and uniform.needs_raw_queries == (mode == "reference")
    scalekv = get_policy("scalekv", budget=50, mode=mode, drafters=[])  # no drafters: every layer gets 50
    key = "queries" if mode == "attention" else "raw_queries"
    a = compress(uniform, keys, values, schedule=SCHEDULE, scale=5, layer=1, num_layers=3, **{key: queries})
    b = compress(scalekv, keys, values, schedule=SCHEDULE, scale=5, layer=1, num_layers=3, **{key: queries})
    assert a.capacity == b.capacity == 50
    assert torch.equal(a.indices, b.indices)


def test_simulated_lengths():
    report = simulate(get_policy("uniform", budget=40), schedule=SCHEDULE, num_layers=3, num_heads=2, head_dim=8)
    assert report.kept_lengths == [[1] * 3, [5] * 3, [21] * 3, [40] * 3, [40] * 3, [40] * 3]


def test_bad_options():
    with pytest.raises(ValueError, match="window_size=16"):
        get_policy("uniform", budget=10).plan(SCHEDULE, 2)
    with pytest.raises(ValueError, match="pooling"):
        get_policy("uniform", budget=40, pooling="median")
    with pytest.raises(ValueError, match="perfect square"):
        get_policy("uniform", budget=40, window_size=12)
    with pytest.raises(ValueError, match="mode"):
        get_policy("uniform", budget=40, mode="paper")
