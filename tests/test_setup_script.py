"""scripts/setup (the README's install step and .ci/run's) installs a CPU torch where there is no
GPU and a CUDA torch where there is one, before the project, so pip never pulls CUDA wheels onto
a CPU-only machine (issue 16, item 1). The decisions are tested here; no install is run."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup():
    loader = importlib.machinery.SourceFileLoader("kvpolicy_setup_script", str(ROOT / "scripts" / "setup"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _torch_commands(commands):
    return [c for c in commands if any(a.startswith("torch==") for a in c)]


def test_cpu_machine_without_torch_gets_the_cpu_build_first(setup):
    commands = setup.plan_commands("py", kind=setup.torch_kind("auto", gpu=False), installed=None, test=True)
    assert commands[0] == ["py", "-m", "pip", "install", "torch==2.13.0", "--index-url",
                           "https://download.pytorch.org/whl/cpu"]
    assert commands[1] == ["py", "-m", "pip", "install", "-e", f"{ROOT}[test]"]
    assert len(commands) == 2


def test_gpu_machine_gets_the_cuda_build(setup):
    commands = setup.plan_commands("py", kind=setup.torch_kind("auto", gpu=True), installed=None, test=False)
    assert commands == [["py", "-m", "pip", "install", "torch==2.13.0"], ["py", "-m", "pip", "install", "-e", str(ROOT)]]


@pytest.mark.parametrize("installed, gpu, reinstall", [
    (("2.13.0+cpu", None), False, False),     # the right build is kept
    (("2.13.0+cu128", "12.8"), True, False),
    (("2.13.0+cu128", "12.8"), False, False),  # a CUDA build also runs on a CPU machine: no 2 GB re-download
    (("2.13.0+cpu", None), True, True),       # a GPU machine with a CPU build gets the CUDA one
    (("2.5.1+cpu", None), False, True),       # another version is replaced by the tested one
    (None, False, True),
])
def test_an_installed_torch_is_kept_only_when_it_fits(setup, installed, gpu, reinstall):
    commands = setup.plan_commands("py", kind=setup.torch_kind("auto", gpu), installed=installed, test=True)
    assert bool(_torch_commands(commands)) == reinstall
    assert commands[-1][-2:] == ["-e", f"{ROOT}[test]"]


def test_explicit_choice_overrides_detection(setup):
    assert setup.torch_kind("cpu", gpu=True) == "cpu" and setup.torch_kind("cuda", gpu=False) == "cuda"
    with pytest.raises(ValueError, match="torch build 'rocm' is not one of auto, cpu, cuda"):
        setup.torch_kind("rocm", gpu=False)


def test_gpu_detection_follows_nvidia_smi(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert setup.gpu_visible() is False  # no nvidia-smi at all
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1)'\n")
    smi.chmod(0o755)
    assert setup.gpu_visible() is True
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2\nexit 9\n")
    assert setup.gpu_visible() is False


def test_dry_run_prints_the_plan_and_installs_nothing(tmp_path):
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}  # no nvidia-smi in tmp_path; real python
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "setup"), "--test", "--dry-run", "--torch", "cpu"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "setup: torch 2.13.0 cpu build (--torch cpu)" in done.stdout
    assert f"-m pip install -e {ROOT}[test]" in done.stdout


def _fake_python(tmp_path: Path) -> Path:
    """A `python3` that records its arguments and KVPOLICY_REQUIRE_GOLDEN instead of running."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "python3"
    fake.write_text(f'#!/bin/sh\necho "$* | REQUIRE_GOLDEN=${{KVPOLICY_REQUIRE_GOLDEN:-unset}}" >> {log}\n')
    fake.chmod(0o755)
    return log


def test_ci_run_sets_up_with_the_script_then_runs_pytest_requiring_golden(tmp_path):
    log = _fake_python(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "KVPOLICY_REQUIRE_GOLDEN"}
    env["PATH"] = f"{tmp_path}:{env['PATH']}"
    env["KVPOLICY_SKIP_METRIC_EQUIVALENCE"] = "1"  # its own step, tested in test_metrics_ci_step.py
    done = subprocess.run(["bash", str(ROOT / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert calls == ["scripts/setup --test | REQUIRE_GOLDEN=unset", "-m pytest | REQUIRE_GOLDEN=1"]
    assert "SKIPPED metric equivalence: KVPOLICY_SKIP_METRIC_EQUIVALENCE is set" in done.stdout


def test_readme_gives_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    assert "python3 scripts/setup && kvpolicy compare" in readme
    assert "python3 scripts/setup --test && python3 -m pytest" in readme
    assert "pip install -e '.[test]'" not in readme.split("## Plan memory")[0]
