"""The CI step "metric equivalence" (.ci/metric_equivalence.sh): skips with a message where its
environment cannot be built, and passes on the comparison's exit status where it can. The
comparison itself needs torchmetrics/clean-fid/lpips and runs only in that step."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP = ROOT / ".ci" / "metric_equivalence.sh"


def _run(tmp_path: Path, python3_body: str, **env_extra) -> subprocess.CompletedProcess:
    """Run the step with a fake ``python3`` first on PATH (what builds the environment)."""
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("#!/bin/sh\n" + python3_body)
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "KVPOLICY_SKIP_METRIC_EQUIVALENCE"}
    env.update(PATH=f"{fake.parent}:{env['PATH']}", KVPOLICY_METRIC_ENV=str(tmp_path / "env"), TMPDIR=str(tmp_path),
               **env_extra)
    return subprocess.run(["bash", str(STEP)], capture_output=True, text=True, env=env, timeout=60)


def test_skips_with_a_message_when_the_environment_cannot_be_built(tmp_path):
    done = _run(tmp_path, "echo 'pip: no matching distribution for torch==2.14.1' >&2\nexit 1\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("SKIPPED metric equivalence: could not build the libraries' environment")
    assert str(tmp_path / "env") in done.stdout and "torch==2.14.1" in done.stdout


# `python3 -m venv DIR` makes DIR/bin/python, a stand-in whose exit status is the comparison's
VENV_MAKER = """if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  printf '#!/bin/sh\\ncase "$*" in *metric_equivalence.py*) echo "compared"; exit %s;; esac\\nexit 0\\n' "$CHECK_STATUS" > "$3/bin/python"
  chmod +x "$3/bin/python"
fi
exit 0
"""


def test_runs_the_comparison_and_fails_ci_when_it_fails(tmp_path):
    done = _run(tmp_path, VENV_MAKER, CHECK_STATUS="1")
    assert done.returncode == 1 and "compared" in done.stdout and "took" in done.stdout
    again = _run(tmp_path, "exit 1\n", CHECK_STATUS="0")  # complete environment: reused, python3 not needed
    assert again.returncode == 1 and "compared" in again.stdout


def test_passes_when_the_comparison_passes_and_can_be_skipped_on_purpose(tmp_path):
    assert _run(tmp_path, VENV_MAKER, CHECK_STATUS="0").returncode == 0
    skipped = _run(tmp_path, "exit 1\n", KVPOLICY_SKIP_METRIC_EQUIVALENCE="1")
    assert skipped.returncode == 0 and "KVPOLICY_SKIP_METRIC_EQUIVALENCE is set" in skipped.stdout


def test_ci_runs_the_step_after_the_test_suite():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    pytest_line = next(i for i, l in enumerate(lines) if "-m pytest" in l and not l.startswith("#"))
    step_line = next(i for i, l in enumerate(lines) if l.strip() == "bash .ci/metric_equivalence.sh")
    assert step_line > pytest_line
