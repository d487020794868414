"""The README's custom-policy example: it runs as documented, registers, and passes the matrix and the kit."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

import kvpolicy
from kvpolicy.testing import check_policy
from test_policy_matrix import SCHEDULES, budget_cases, matrix_case

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Register a custom policy"


def readme_blocks() -> tuple[str, str]:
    """(the section's python block, the output block that follows it)."""
    text = README.read_text()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(code) == 1, f"the section must hold exactly one python block, found {len(code)}"
    output = re.findall(r"Output:\s*\n```\n(.*?)```", section, flags=re.S)
    assert len(output) == 1, "the python block must be followed by its 'Output:' block"
    return code[0], output[0]


@pytest.fixture(scope="module")
def custom_policy_name() -> str:
    code, expected = readme_blocks()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_custom_policy"})
    assert printed.getvalue() == expected, "the README's documented output is not what the example prints"
    match = re.search(r'@register_policy\("([a-z0-9_]+)"\)', code)
    assert match, "the example must register a policy with @register_policy(\"name\")"
    return match.group(1)


def test_readme_example_registers_a_policy(custom_policy_name):
    assert custom_policy_name in kvpolicy.list_policies()
    assert kvpolicy.list_policies()[custom_policy_name] == "Keep a seeded random subset of the cache (a sanity baseline)."


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
def test_custom_policy_passes_the_matrix(custom_policy_name, schedule_name):
    schedule = SCHEDULES[schedule_name]
    for budget in budget_cases(schedule):
        matrix_case(custom_policy_name, schedule, budget, seed=7)


def test_custom_policy_passes_the_kit(custom_policy_name):
    assert check_policy(custom_policy_name, examples=10).passed


def test_custom_policy_appears_in_kvpolicy_list(custom_policy_name, capsys):
    from benchmarks.cli import main

    assert main(["list"]) == 0
    assert re.search(rf"^{custom_policy_name}\s+Keep a seeded random subset", capsys.readouterr().out, re.M)


USER_FILE = '''
import attrs, torch
from kvpolicy import Policy, Selection, register_policy


@register_policy("user_file_newest")
@attrs.define(kw_only=True)
class NewestOnly(Policy):
    """Keep the newest tokens (a user's file)."""

    def select(self, keys, values, ctx):
        kept = torch.arange(ctx.length - ctx.capacity, ctx.length, device=keys.device)
        return Selection(kept.expand(*keys.shape[:2], -1).clone(), ctx.state)
'''


def test_policy_in_a_user_file_reaches_the_command_line(tmp_path):
    """`kvpolicy --plugin FILE` and KVPOLICY_PLUGINS make a fresh process know a user's policy."""
    import os
    import subprocess
    import sys

    user_file = tmp_path / "my_policy.py"
    user_file.write_text(USER_FILE)
    env = {**os.environ, "KVPOLICY_PLUGINS": ""}
    listed = subprocess.run([sys.executable, "-m", "benchmarks.cli", "--plugin", str(user_file), "list"],
                            capture_output=True, text=True, env=env, check=True).stdout
    assert re.search(r"^user_file_newest\s+Keep the newest tokens \(a user's file\)\.$", listed, re.M)
    env["KVPOLICY_PLUGINS"] = str(user_file)
    planned = subprocess.run([sys.executable, "-m", "benchmarks.cli", "plan", "--model", "var-d16", "--policy",
                              "user_file_newest", "--budget", "42"], capture_output=True, text=True, env=env, check=True).stdout
    assert "ratio 0.099057 (budget 42/424 = 0.099057)" in planned
    missing = subprocess.run([sys.executable, "-m", "benchmarks.cli", "list", "--plugin", str(tmp_path / "absent.py")],
                             capture_output=True, text=True, env={**env, "KVPOLICY_PLUGINS": ""})
    assert missing.returncode == 2 and "absent.py' does not exist" in missing.stderr
