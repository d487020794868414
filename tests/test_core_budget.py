"""Budget types and parsing: Ratio of N_ref (round half up), Tokens, and every kind of bad input."""

import math

import pytest

from kvpolicy import Ratio, ScaleSchedule, Tokens, parse_budget
from kvpolicy.budget import budget_to_json

INFINITY_1024 = ScaleSchedule([1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64])
VAR_256 = ScaleSchedule([1, 2, 3, 4, 5, 6, 8, 10, 13, 16])


def test_ratio_is_a_fraction_of_the_reference_length():
    assert INFINITY_1024.reference_length == 6425
    assert Ratio(0.1).tokens(INFINITY_1024) == 643  # 642.5 rounds half up
    assert Ratio(0.04).tokens(INFINITY_1024) == 257
    assert Ratio(0.2).tokens(INFINITY_1024) == 1285
    assert Ratio(1.0).tokens(INFINITY_1024) == 6425
    assert Ratio(0.1).tokens(VAR_256) == 42  # 42.4
    assert Ratio(0.5 / 424).tokens(VAR_256) == 1  # 0.5 token rounds up
    with pytest.raises(ValueError, match=r"budget 0.01% of N_ref = 424 tokens is 0.0424 tokens per layer, which "
                                         r"rounds to 0; use a ratio >= 0.00118 or Tokens\(1\)"):
        Ratio(0.0001).tokens(VAR_256)  # never lifted silently to 1 token
    # The paper's 4/10/20 % settings are token counts.
    assert [Tokens(n).tokens(INFINITY_1024) for n in (265, 650, 1300)] == [265, 650, 1300]


@pytest.mark.parametrize("value,expected", [
    ("10%", Ratio(0.1)), (" 25 % ", Ratio(0.25)), ("100%", Ratio(1.0)), ("0.5%", Ratio(0.005)),
    (0.1, Ratio(0.1)), ("0.1", Ratio(0.1)), (1.0, Ratio(1.0)),
    (650, Tokens(650)), ("650", Tokens(650)), ("+7", Tokens(7)), (1, Tokens(1)),
    (Ratio(0.3), Ratio(0.3)), (Tokens(9), Tokens(9)),
])
def test_parse_budget(value, expected):
    assert parse_budget(value) == expected


@pytest.mark.parametrize("value,error,pattern", [
    (0, ValueError, r"Tokens must be >= 1 token per layer, got 0"),
    (-650, ValueError, r"Tokens must be >= 1 token per layer, got -650"),
    ("-650", ValueError, r"budget '-650' is not understood"),
    ("0", ValueError, r"budget '0' is not understood"),
    ("0%", ValueError, r"budget '0%' is not understood: use a percentage in \(0%, 100%\]"),
    ("101%", ValueError, r"budget '101%' is not understood"),
    ("-5%", ValueError, r"budget '-5%'"),
    ("nan%", ValueError, r"budget 'nan%'"),
    ("nan", ValueError, r"budget 'nan'"),
    ("inf", ValueError, r"budget 'inf'"),
    ("abc", ValueError, r"budget 'abc' is not understood"),
    ("", ValueError, r"budget '' is not understood"),
    ("10 tokens", ValueError, r"budget '10 tokens'"),
    (1.5, ValueError, r"budget 1\.5: a float budget is a fraction in \(0, 1\]"),
    (0.0, ValueError, r"budget 0\.0: a float budget"),
    (-0.1, ValueError, r"budget -0\.1"),
    (math.nan, ValueError, r"budget nan"),
    (math.inf, ValueError, r"budget inf"),
    (True, TypeError, r"budget True is not a budget"),
    (None, TypeError, r"budget None is not a budget"),
    ([10], TypeError, r"budget \[10\] \(list\) is not a budget"),
    ({"tokens": 5}, TypeError, r"\(dict\) is not a budget"),
])
def test_bad_budgets(value, error, pattern):
    with pytest.raises(error, match=pattern):
        parse_budget(value)


@pytest.mark.parametrize("make,error,pattern", [
    (lambda: Ratio(0), ValueError, r"Ratio must be in \(0, 1\].*got 0\.0"),
    (lambda: Ratio(1.1), ValueError, r"Ratio must be in \(0, 1\].*got 1\.1"),
    (lambda: Ratio(-0.2), ValueError, r"got -0\.2"),
    (lambda: Ratio(math.nan), ValueError, r"got nan"),
    (lambda: Ratio("0.1"), TypeError, r"Ratio needs a real number in \(0, 1\], got '0\.1' \(str\)"),
    (lambda: Ratio(True), TypeError, r"got True \(bool\)"),
    (lambda: Tokens(0), ValueError, r"Tokens must be >= 1 token per layer, got 0"),
    (lambda: Tokens(-3), ValueError, r"got -3"),
    (lambda: Tokens(1.5), TypeError, r"Tokens needs a whole number >= 1, got 1\.5 \(float\)"),
    (lambda: Tokens("650"), TypeError, r"got '650' \(str\)"),
    (lambda: Tokens(False), TypeError, r"got False \(bool\)"),
])
def test_bad_budget_types(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


def test_str_and_json_round_trip():
    assert str(Ratio(0.1)) == "10%" and str(Tokens(650)) == "650"
    for budget in (Ratio(0.1), Ratio(0.04), Tokens(650)):
        assert parse_budget(budget_to_json(budget)) == budget
    assert budget_to_json(None) is None
    assert parse_budget(str(Ratio(0.25))) == Ratio(0.25)
