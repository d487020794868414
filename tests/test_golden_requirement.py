"""Parity tests need ../shared/golden: a user's checkout without it skips them, CI (.ci/run sets
KVPOLICY_REQUIRE_GOLDEN=1) fails instead of passing with zero parity checks (issue 16, item 14)."""

from __future__ import annotations

import pytest

from conftest import REQUIRE_GOLDEN, require_golden


def test_missing_golden_skips_in_a_users_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv(REQUIRE_GOLDEN, raising=False)
    with pytest.raises(pytest.skip.Exception, match="golden vectors not found at"):
        require_golden(tmp_path / "shared" / "golden")


@pytest.mark.parametrize("value", ["", "0"])
def test_switch_off_values_still_skip(monkeypatch, tmp_path, value):
    monkeypatch.setenv(REQUIRE_GOLDEN, value)
    with pytest.raises(pytest.skip.Exception):
        require_golden(tmp_path / "absent.pt")


def test_missing_golden_fails_when_ci_requires_it(monkeypatch, tmp_path):
    monkeypatch.setenv(REQUIRE_GOLDEN, "1")
    with pytest.raises(pytest.fail.Exception, match=r"absent\.pt .*KVPOLICY_REQUIRE_GOLDEN=1 \(set by \.ci/run\)"):
        require_golden(tmp_path / "absent.pt")


def test_present_golden_is_returned_either_way(monkeypatch, tmp_path):
    monkeypatch.setenv(REQUIRE_GOLDEN, "1")
    assert require_golden(tmp_path) == tmp_path


# .ci/run exporting the switch for its pytest run: tests/test_setup_script.py::test_ci_run_sets_up_with_the_script_then_runs_pytest_requiring_golden
