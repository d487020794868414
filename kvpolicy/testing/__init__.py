"""The public test kit for cache policies: ``check_policy`` and its parts.

``check_policy("mine", examples=25)`` drives a registered policy (or a Policy object) through
whole generations with the real ``KVCache`` on hypothesis-drawn cases (schedules, budgets,
geometries with CFG rows, grouped query heads and dtypes, the policy's declared option values)
and checks every invariant in ``INVARIANTS``; a failure raises ``PolicyCheckError`` naming the
invariant, the policy and hypothesis' minimal failing case. ``kvpolicy check NAME`` prints the
same results as a table.

Hypothesis is an optional extra (``pip install 'kvpolicy[testing]'``): importing this module works
without it, and so do the case-level checks (``check_case`` on a printed ``Case``, ``drive``);
``check_policy``, ``run_checks`` and ``strategies`` need it and say so.

A policy declares what the kit relies on: ``promised_positions(ctx)`` (positions it always keeps
when it evicts), ``check_options`` (options that make it run on small geometries) and
``check_option_values`` (values to draw for each option).
"""

from __future__ import annotations

from .checks import (PlanCase, PolicySpec, Refused, check_bad_options, check_case, check_config, check_plan,
                     plan_kept_lengths)
from .driver import Blocked, Checker, Trace, drive
from .inputs import Case, Inputs, make_inputs
from .invariants import INVARIANTS, InvariantViolation, violation_class

__all__ = [
    "INVARIANTS", "InvariantViolation", "violation_class", "Case", "Inputs", "make_inputs", "Trace", "drive",
    "Checker", "Blocked", "PolicySpec", "PlanCase", "Refused", "check_case", "check_plan", "check_config",
    "check_bad_options", "plan_kept_lengths", "check_policy", "run_checks", "CheckReport", "PolicyCheckError",
    "strategies",
]


def __getattr__(name):
    # The hypothesis-backed parts load on first use, with a clear message when hypothesis is missing.
    if name in ("check_policy", "run_checks", "CheckReport", "PolicyCheckError", "InvariantResult"):
        from . import runner

        if name in ("check_policy", "run_checks"):
            runner.require_hypothesis()
        return getattr(runner, name)
    if name == "strategies":
        from .runner import require_hypothesis

        require_hypothesis()
        import importlib

        return importlib.import_module(f"{__name__}.strategies")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
