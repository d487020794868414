"""``run_checks`` / ``check_policy``: every invariant on hypothesis-drawn cases, shrunk on failure."""

from __future__ import annotations

from typing import Optional

import attrs

from .checks import (PolicySpec, Refused, check_bad_options, check_case, check_config, check_plan)
from .driver import Blocked
from .invariants import INVARIANTS, InvariantViolation, check_invariant_names

GENERATION = tuple(n for n in INVARIANTS if n not in ("config", "bad_options"))
PLAN = ("completes", "capacity", "budget")


def require_hypothesis():
    try:
        import hypothesis
    except ImportError:
        raise ImportError("kvpolicy.testing needs hypothesis to draw and shrink cases: "
                          "pip install 'kvpolicy[testing]' (or pip install hypothesis)") from None
    return hypothesis


@attrs.define
class InvariantResult:
    name: str
    status: str = "pass"  # pass | FAIL | not exercised | not checked | skipped
    cases: set = attrs.field(factory=set)
    violation: Optional[InvariantViolation] = None
    note: str = ""

    @property
    def description(self) -> str:
        return INVARIANTS[self.name]


@attrs.define
class CheckReport:
    """Per-invariant results of ``run_checks`` for one policy."""

    policy: str
    examples: int
    results: dict  # name -> InvariantResult, in table order

    @property
    def failures(self) -> list[InvariantResult]:
        return [r for r in self.results.values() if r.status == "FAIL"]

    @property
    def passed(self) -> bool:
        return not self.failures

    def table(self) -> str:
        width = max(len(n) for n in self.results)
        lines = [f"kvpolicy check: policy {self.policy!r}, {self.examples} examples per property",
                 f"{'invariant':<{width}}  {'result':<13} {'cases':>5}  what must hold"]
        for r in self.results.values():
            count = str(len(r.cases)) if r.status == "pass" else ""
            lines.append(f"{r.name:<{width}}  {r.status:<13} {count:>5}  {r.description}")
            if r.violation is not None:
                if r.violation.case is not None:
                    lines.append(f"    minimal failing case: {r.violation.case!r}")
                lines.append(f"    {r.violation.detail}")
            elif r.note:
                lines.append(f"    {r.note}")
        failed = self.failures
        lines.append(f"{len(failed)} of {sum(r.status != 'skipped' for r in self.results.values())} invariants "
                     f"failed: {', '.join(r.name for r in failed)}" if failed else "all invariants hold")
        return "\n".join(lines)

    def failure_message(self) -> str:
        failed = self.failures
        lines = [f"policy {self.policy!r} breaks {len(failed)} invariant(s) of kvpolicy.testing "
                 f"({self.examples} examples per property, minimal cases after shrinking):"]
        for r in failed:
            lines.append(f"{r.name}: {r.description}")
            if r.violation is not None:
                if r.violation.case is not None:
                    lines.append(f"  minimal failing case: {r.violation.case!r}")
                lines.append(f"  {r.violation.detail}")
            else:
                lines.append(f"  {r.note}")
        return "\n".join(lines)


class PolicyCheckError(AssertionError):
    """A policy broke invariants; ``report`` has every result, the message the minimal cases."""

    def __init__(self, report: CheckReport):
        self.report = report
        super().__init__(report.failure_message())


def _violations(exc: BaseException) -> list:
    if isinstance(exc, BaseExceptionGroup):
        out = []
        for inner in exc.exceptions:
            out += _violations(inner)
        return out
    return [exc]


def _run(hypothesis, strategy, body, examples: int) -> list:
    """Run ``body`` on ``examples`` drawn cases; the (shrunk) exceptions hypothesis reports."""
    from hypothesis import HealthCheck, Verbosity, given, settings

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=False,
              suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet, report_multiple_bugs=True)
    @given(strategy)
    def property_(case):
        body(case)

    try:
        property_()
    except hypothesis.errors.Unsatisfiable as exc:
        return [exc]
    except BaseException as exc:  # noqa: B036 - we sort hypothesis' report, KeyboardInterrupt passes
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return _violations(exc)
    return []


def run_checks(policy, *, examples: int = 25, options: Optional[dict] = None, option_values: Optional[dict] = None,
               invariants=None) -> CheckReport:
    """Check every invariant of ``policy`` (a registered name, a Policy class or object).

    ``options`` are fixed options (for a name they extend the class's ``check_options``);
    ``option_values`` the values to draw per option (default: the class's
    ``check_option_values``; none for a policy object, which is checked as configured).
    ``examples`` is hypothesis' ``max_examples`` per property. Returns a ``CheckReport``.
    """
    hypothesis = require_hypothesis()
    from hypothesis import reject

    from . import strategies

    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"examples must be an int >= 1, got {examples!r}")
    from ..policy import Policy

    spec = PolicySpec.of(policy, options)
    if option_values is None:
        option_values = {} if isinstance(policy, Policy) else dict(getattr(spec.cls, "check_option_values", {}))
    for name in option_values:
        if name in (options or {}):
            option_values = {k: v for k, v in option_values.items() if k != name}  # a fixed option wins
    selected = check_invariant_names(invariants)
    results = {name: InvariantResult(name, status="pass" if name in selected else "skipped") for name in INVARIANTS}
    refusals: list = []

    def record(found: list, group: tuple) -> set:
        new = set()
        for exc in found:
            if isinstance(exc, InvariantViolation):
                result = results[exc.invariant]
                if result.status != "FAIL":
                    result.status, result.violation = "FAIL", exc
                    new.add(exc.invariant)
            elif isinstance(exc, hypothesis.errors.Unsatisfiable):
                if not any(r.cases for n, r in results.items() if n in group):
                    result = results["completes"]
                    last = f"; the last refusal: {refusals[-1]}" if refusals else ""
                    result.status = "FAIL"
                    result.note = f"the policy refused every drawn case{last}"
                    new.add("completes")
            else:
                raise exc
        return new

    ignored = set(INVARIANTS) - set(selected)

    def body_for(check, enabled):
        def body(case):
            try:
                exercised = check(spec, case, enabled=enabled, ignored=ignored)
            except Refused as exc:
                refusals.append(str(exc))
                reject()
            except Blocked:
                reject()
            for name in exercised:
                if name in results:
                    results[name].cases.add(repr(case))
        return body

    enabled = set(selected) & set(GENERATION)
    for _ in range(len(GENERATION)):
        if not enabled:
            break
        found = _run(hypothesis, strategies.cases(spec.cls, option_values), body_for(check_case, enabled), examples)
        new = record(found, GENERATION)
        if not new:
            break
        enabled -= new  # look again for the invariants the failures masked
    enabled = (set(selected) & set(PLAN)) - {n for n, r in results.items() if r.status == "FAIL"}
    if enabled:
        record(_run(hypothesis, strategies.plan_cases(spec.cls, option_values), body_for(check_plan, enabled),
                    examples), PLAN)
    if "config" in selected:
        record(_run(hypothesis, strategies.cases(spec.cls, option_values), body_for(check_config, {"config"}),
                    min(examples, 10)), ("config",))
    if "bad_options" in selected:
        try:
            results["bad_options"].cases.update(["probes"] if check_bad_options(spec) else [])
        except InvariantViolation as exc:
            record([exc], ("bad_options",))
    for name, result in results.items():
        if result.status == "pass" and not result.cases:
            masked = [r.name for r in results.values() if r.status == "FAIL"]
            result.status = "not checked" if masked else "not exercised"
            result.note = (f"no passing case reached it (failing first: {', '.join(masked)})" if masked else
                           "no drawn case exercised it" + (" (the policy promises no positions)"
                                                            if name == "promises" else ""))
    return CheckReport(spec.name, examples, results)


def check_policy(policy, *, examples: int = 25, options: Optional[dict] = None,
                 option_values: Optional[dict] = None, invariants=None) -> CheckReport:
    """``run_checks`` and raise ``PolicyCheckError`` naming each broken invariant, the policy and
    hypothesis' minimal failing case; returns the report when every invariant holds."""
    report = run_checks(policy, examples=examples, options=options, option_values=option_values,
                        invariants=invariants)
    if not report.passed:
        raise PolicyCheckError(report)
    return report
