"""The public test kit (kvpolicy.testing, `kvpolicy check`): every invariant catches a policy
that breaks it (with hypothesis' minimal case), correct policies pass, and the command works on a
user's file."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys

import attrs
import pytest
import torch

import kvpolicy
from kvpolicy import CapacityPlan, Policy, Selection, Tokens, register_policy
from kvpolicy.testing import (INVARIANTS, Case, PolicyCheckError, check_case, check_config, check_policy, run_checks,
                              violation_class)


@contextlib.contextmanager
def registered(name: str, cls: type):
    """Register a broken policy only while a test checks it (the matrix must never see it)."""
    from kvpolicy import registry

    register_policy(name)(cls)
    try:
        yield name
    finally:
        registry._REGISTRY.pop(name, None)


def recent(ctx, count):
    return torch.arange(ctx.length - count, ctx.length)


def expand(kept, keys):
    return kept.to(keys.device).expand(*keys.shape[:2], -1).clone()


# -- one deliberately broken policy per invariant ----------------------------------------------------
@attrs.define(kw_only=True)
class KeepsOneTooMany(Policy):
    """Keeps capacity + 1 tokens."""

    def select(self, keys, values, ctx):
        return Selection(expand(recent(ctx, min(ctx.length, ctx.capacity + 1)), keys), ctx.state)


@attrs.define(kw_only=True)
class EvictsEarly(Policy):
    """Always drops the oldest token (select is called at every step: stateful)."""

    stateful = True

    def select(self, keys, values, ctx):
        count = min(ctx.capacity, ctx.length) if ctx.capacity is not None else ctx.length
        return Selection(expand(recent(ctx, max(1, min(count, ctx.length - 1))), keys), ctx.state)


@attrs.define(kw_only=True)
class Descending(Policy):
    """Returns the right tokens in descending order."""

    def select(self, keys, values, ctx):
        return Selection(expand(recent(ctx, ctx.capacity).flip(0), keys), ctx.state)


@attrs.define(kw_only=True)
class BrokenPromise(Policy):
    """Promises the first token but keeps the newest ones."""

    def promised_positions(self, ctx):
        return torch.tensor([0])

    def select(self, keys, values, ctx):
        return Selection(expand(recent(ctx, ctx.capacity), keys), ctx.state)


@attrs.define(kw_only=True)
class Unseeded(Policy):
    """A random subset from the global RNG (not reproducible)."""

    def select(self, keys, values, ctx):
        return Selection(expand(torch.randperm(ctx.length)[: ctx.capacity].sort().values, keys), ctx.state)


@attrs.define(kw_only=True)
class CouplesRows(Policy):
    """Scores summed over the batch: rows influence each other."""

    def select(self, keys, values, ctx):
        scores = keys.float()[..., 0].sum(dim=(0, 1))
        return Selection(expand(scores.topk(ctx.capacity).indices.sort().values, keys), ctx.state)


@attrs.define(kw_only=True)
class InPlace(Policy):
    """Normalises the cached keys in place while scoring them."""

    def select(self, keys, values, ctx):
        keys.mul_(2)
        return Selection(expand(recent(ctx, ctx.capacity), keys), ctx.state)


@attrs.define(kw_only=True)
class OverBudget(Policy):
    """Plans twice the budget in every layer."""

    def make_plan(self, schedule, num_layers, budget_tokens):
        return CapacityPlan(capacities=[[2 * budget_tokens] * num_layers] * schedule.num_scales,
                            budget_tokens=budget_tokens, policy=self.name)

    def select(self, keys, values, ctx):
        return Selection(expand(recent(ctx, ctx.capacity), keys), ctx.state)


@attrs.define(kw_only=True)
class RefusesLarge(Policy):
    """Refuses budgets of more than 30 tokens."""

    def make_plan(self, schedule, num_layers, budget_tokens):
        if budget_tokens > 30:
            raise ValueError(f"budget {budget_tokens} is too large")
        return super().make_plan(schedule, num_layers, budget_tokens)

    def select(self, keys, values, ctx):
        return Selection(expand(recent(ctx, ctx.capacity), keys), ctx.state)


@attrs.define(kw_only=True)
class LossyConfig(Policy):
    """Its option's converter doubles the value, so from_config(to_config()) differs."""

    factor: float = attrs.field(default=1.0, converter=lambda v: 2 * v)

    def select(self, keys, values, ctx):
        return Selection(expand(recent(ctx, ctx.capacity), keys), ctx.state)


@attrs.define(kw_only=True)
class Unvalidated(Policy):
    """An int option without a validator."""

    seed: int = 0

    def select(self, keys, values, ctx):
        return Selection(expand(recent(ctx, ctx.capacity), keys), ctx.state)


@attrs.define(kw_only=True)
class Float32Only(Policy):
    """Crashes on half-precision caches."""

    def select(self, keys, values, ctx):
        if keys.dtype != torch.float32:
            raise RuntimeError(f"cannot score {keys.dtype}")
        return Selection(expand(recent(ctx, ctx.capacity), keys), ctx.state)


BROKEN = [
    (KeepsOneTooMany, "capacity", r"kept \d+ tokens, capacity \d+"),
    (EvictsEarly, "no_early_eviction", r"fits capacity"),
    (Descending, "indices", r"not unique and ascending"),
    (BrokenPromise, "promises", r"promised position 0 .* was evicted"),
    (Unseeded, "determinism", r"second run on the same inputs differs"),
    (CouplesRows, "rows_alone", r"alone differs"),
    (InPlace, "bit_exact", r"not the generated keys"),
    (OverBudget, "budget", r"> budget"),
    (RefusesLarge, "full_budget", r"refused budget"),
    (LossyConfig, "config", r"not an equal policy"),
    (Unvalidated, "bad_options", r"seed='not-a-number'.*accepted silently"),
    (Float32Only, "completes", r"RuntimeError: cannot score torch\.(bfloat16|float16)"),
]


@pytest.mark.parametrize("cls,invariant,detail", BROKEN, ids=[b[1] for b in BROKEN])
def test_each_invariant_catches_a_policy_that_breaks_it(cls, invariant, detail):
    name = "kit_broken_" + invariant
    with registered(name, cls), pytest.raises(PolicyCheckError) as info:
        check_policy(name, examples=15, invariants=[invariant])
    message = str(info.value)
    assert message.startswith(f"policy {name!r} breaks 1 invariant(s) of kvpolicy.testing")
    assert f"\n{invariant}: {INVARIANTS[invariant]}\n" in message
    assert re.search(detail, message), message
    failure = info.value.report.results[invariant]
    assert failure.status == "FAIL" and isinstance(failure.violation, violation_class(invariant))
    # The printed minimal case is Python that reproduces the failure (a nondeterministic policy
    # only may pass a replay by chance).
    case = failure.violation.case
    if isinstance(case, Case):
        assert eval(repr(case), {"Case": Case, "Tokens": Tokens, "Ratio": kvpolicy.Ratio}) == case
        if invariant != "determinism":
            with registered(name, cls), pytest.raises(violation_class(invariant)):
                check = check_config if invariant == "config" else check_case
                check(name, case, enabled={invariant}, ignored=set(INVARIANTS) - {invariant})


def test_no_stale_state_catches_state_hidden_in_the_policy():
    @attrs.define(kw_only=True)
    class CountsGenerations(Policy):
        """Keeps the newest tokens in its first generation, the oldest afterwards."""

        _generations: list = attrs.field(factory=list, init=False, eq=False, repr=False)

        def select(self, keys, values, ctx):
            if ctx.scale == ctx.schedule.num_scales - 1 and ctx.layer == ctx.num_layers - 1:
                self._generations.append(1)  # the last call of a generation
            old = len(self._generations) > 1
            kept = torch.arange(ctx.capacity) if old else recent(ctx, ctx.capacity)
            return Selection(expand(kept, keys), ctx.state)

    with registered("kit_counts_generations", CountsGenerations), \
            pytest.raises(PolicyCheckError, match=r"no_stale_state: .*\n.*minimal failing case: Case\("):
        check_policy("kit_counts_generations", examples=15, invariants=["no_stale_state"])


def test_the_minimal_case_is_shrunk():
    with registered("kit_keeps_one_too_many", KeepsOneTooMany), pytest.raises(PolicyCheckError) as info:
        check_policy("kit_keeps_one_too_many", examples=10)
    case = info.value.report.results["capacity"].violation.case
    # Shrunk to the smallest geometry: one scale of two tokens, one layer, row and head, 1 token.
    assert (case.num_layers, case.rows, case.heads, case.query_group, case.budget) == (1, 1, 1, 1, Tokens(1))
    assert case.schedule.total == 2 and case.dtype == "float32" and not case.tied
    assert info.value.report.results["capacity"].violation.detail == \
        "scale 0, layer 0: row 0, head 0: kept 2 tokens, capacity 1 (cache length 2)"


def test_bytes_invariant_catches_miscounted_bytes(monkeypatch):
    counted = kvpolicy.LayerCache.nbytes.fget  # what every layer reports to the cache's byte ledger
    monkeypatch.setattr(kvpolicy.LayerCache, "nbytes", property(lambda self: counted(self) // 2 * 2 + 2))
    with pytest.raises(violation_class("bytes"), match="the cache counts"):
        check_case("sliding_window", Case(schedule=[1, 2, 3], budget=Tokens(4)))


def test_correct_policies_pass_and_exercise_the_invariants():
    report = check_policy("streamingllm", examples=10)
    assert report.passed
    for name in ("capacity", "promises", "no_early_eviction", "rows_alone", "full_budget", "budget"):
        assert report.results[name].status == "pass" and report.results[name].cases, name


def test_a_policy_object_is_checked_as_configured():
    report = check_policy(kvpolicy.get_policy("streamingllm", budget=10, num_sinks=1), examples=5,
                          invariants=["config", "promises"])
    assert report.passed


def test_bad_arguments_raise_clearly():
    with pytest.raises(ValueError, match=r"unknown invariant\(s\) \['capacty'\]"):
        run_checks("full", invariants=["capacty"])
    with pytest.raises(ValueError, match="examples must be an int >= 1, got 0"):
        run_checks("full", examples=0)
    with pytest.raises(ValueError, match="unknown policy 'slidng_window'; did you mean 'sliding_window'"):
        run_checks("slidng_window")


# -- `kvpolicy check` ---------------------------------------------------------------------------------
USER_FILE = '''
import attrs, torch
from kvpolicy import Policy, Selection, register_policy


@register_policy("user_newest")
@attrs.define(kw_only=True)
class Newest(Policy):
    """Keep the newest tokens, and always the first one."""

    def promised_positions(self, ctx):
        return torch.tensor([0])

    def select(self, keys, values, ctx):
        kept = torch.cat([torch.tensor([0]), torch.arange(ctx.length - ctx.capacity + 1, ctx.length)])
        return Selection(kept[: ctx.capacity].expand(*keys.shape[:2], -1).clone(), ctx.state)


@register_policy("user_too_many")
@attrs.define(kw_only=True)
class TooMany(Policy):
    """Keep capacity + 1 tokens (broken)."""

    def select(self, keys, values, ctx):
        kept = torch.arange(ctx.length - ctx.capacity - 1, ctx.length)
        return Selection(kept.expand(*keys.shape[:2], -1).clone(), ctx.state)
'''


def run_cli(*args, env=None):
    env = {**os.environ, "KVPOLICY_PLUGINS": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "benchmarks.cli", *args], capture_output=True, text=True, env=env)


def test_kvpolicy_check_on_a_users_file(tmp_path):
    user_file = tmp_path / "my_policies.py"
    user_file.write_text(USER_FILE)
    good = run_cli("check", "user_newest", "--plugin", str(user_file), "--examples", "8")
    assert good.returncode == 0, good.stderr + good.stdout
    assert re.search(r"^capacity\s+pass\s+\d+\s+kept <= capacity per \(scale, layer, row, head\)$", good.stdout, re.M)
    assert re.search(r"^promises\s+pass\s+\d+", good.stdout, re.M)
    assert good.stdout.rstrip().endswith("all invariants hold")
    bad = run_cli("check", "user_too_many", "--plugin", str(user_file), "--examples", "8")
    assert bad.returncode == 1, bad.stderr
    assert re.search(r"^capacity\s+FAIL\s+kept <= capacity", bad.stdout, re.M)
    assert "    minimal failing case: Case(schedule=" in bad.stdout
    assert "num_layers=1, batch=1, cfg=False, heads=1" in bad.stdout
    kept, capacity = map(int, re.search(r"^    scale \d+, layer 0: row 0, head 0: kept (\d+) tokens, capacity (\d+) ",
                                        bad.stdout, re.M).groups())
    assert kept == capacity + 1
    assert bad.stdout.rstrip().endswith("invariants failed: capacity")


def test_kvpolicy_check_errors(capsys, monkeypatch):
    from benchmarks.cli import main

    assert main(["check", "no_such_policy"]) == 2
    assert "unknown policy 'no_such_policy'" in capsys.readouterr().err
    assert main(["check", "full", "--examples", "0"]) == 2
    assert "--examples must be >= 1, got 0" in capsys.readouterr().err
    assert main(["check", "full", "--invariants", "capacty"]) == 2
    assert "unknown invariant(s) ['capacty']" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    assert main(["check", "full"]) == 2
    assert "kvpolicy check: error: kvpolicy.testing needs hypothesis" in capsys.readouterr().err


def test_the_kit_imports_without_hypothesis():
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "import kvpolicy.testing as kit\n"
            "kit.check_case('sliding_window', kit.Case(schedule=[1, 2], budget=2))  # works without hypothesis\n"
            "try:\n    kit.check_policy('full')\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("kvpolicy.testing needs hypothesis to draw and shrink cases: "
                           "pip install 'kvpolicy[testing]' (or pip install hypothesis)")


def test_every_builtin_policy_passes_kvpolicy_check(capsys):
    from importlib import metadata

    from benchmarks.cli import main

    builtin = sorted(ep.name for ep in metadata.entry_points(group=kvpolicy.ENTRY_POINT_GROUP))
    assert {"full", "sliding_window", "streamingllm", "h2o", "snapkv", "pyramidkv", "uniform", "scalekv"} <= set(builtin)
    for name in builtin:
        code = main(["check", name, "--examples", "5"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert out.rstrip().endswith("all invariants hold")


# -- the README's "Test your policy" example, run as documented -------------------------------------
def readme_test_section():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "## Test your policy" in text
    section = text.split("## Test your policy", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", section, flags=re.S | re.M)
    code = [body for lang, body in blocks if lang == "python"]
    outputs = [body for lang, body in blocks if not lang]
    assert len(code) == 1 and len(outputs) == 2, "one python file, then its two outputs"
    return code[0], outputs


def test_readme_test_your_policy_example(tmp_path):
    code, (script_output, check_output) = readme_test_section()
    assert 'class OneTooMany' in code and "ctx.capacity - 1" in code  # the deliberately broken one
    user_file = tmp_path / "my_policies.py"
    user_file.write_text(code)
    env = {**os.environ, "KVPOLICY_PLUGINS": ""}
    script = subprocess.run([sys.executable, str(user_file)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert script.returncode == 0, script.stderr
    assert script.stdout == script_output
    check = subprocess.run([sys.executable, "-m", "benchmarks.cli", "check", "one_too_many", "--plugin",
                            str(user_file)], capture_output=True, text=True, env=env)
    assert check.returncode == 1, check.stderr
    # The "cases" column counts the distinct passing cases hypothesis explored, which moves with
    # any change to the strategies or the code under test; everything else must print as shown.
    def without_counts(text):
        # the count's width moves too (8 vs 18 shifts the column), so the padding before it goes as well
        return re.sub(r"^(\w+ +pass) +\d+ ", r"\1 N ", text, flags=re.M)

    assert without_counts(check.stdout) == without_counts(check_output)


def test_promises_may_be_per_head():
    @attrs.define(kw_only=True)
    class NewestPromisingPerHead(Policy):
        """Keeps the newest tokens; promises the newest to head 0 and, wrongly, the oldest to head 1."""

        def promised_positions(self, ctx):
            return torch.tensor([[ctx.length - 1, -1], [ctx.length - 1, 0]])  # (H, P), -1 = no promise

        def select(self, keys, values, ctx):
            return Selection(expand(recent(ctx, ctx.capacity), keys), ctx.state)

    with registered("kit_per_head_promise", NewestPromisingPerHead):
        with pytest.raises(violation_class("promises"), match=r"scale 1, layer 0: row 0, head 1: promised position 0 \(of \[4, 0\]\)"):
            check_case("kit_per_head_promise", Case(schedule=[1, 2, 3], budget=3, heads=2, cfg=False))
