"""Long steps report progress (plan's simulation, calibration's conditions, bench-gpu's
measurements), bars show on a terminal only, and notes print above a bar, not into its line
(issue 16, item 11)."""

from __future__ import annotations

import io
import re
import sys

import pytest

import kvpolicy
from benchmarks import progress
from benchmarks.cli import main


class Terminal(io.StringIO):
    def isatty(self):
        return True


def attach_terminal(monkeypatch) -> Terminal:
    """stderr becomes a terminal that shows every redraw (called in the test body: pytest re-installs
    its capture after fixtures)."""
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setattr(progress, "DELAY_S", 0)
    monkeypatch.setattr(progress, "MININTERVAL_S", 0)
    return screen


def screen_lines(text: str) -> list[str]:
    """What a terminal keeps: a carriage return starts the line over."""
    return [part for part in re.split(r"[\r\n]", text) if part.strip()]


class RecordedBar:
    """Stands in for ``progress.progress_bar``: records what a command reports."""

    made: list["RecordedBar"] = []

    def __init__(self, total, desc, *, unit="it", enabled=True):
        self.total, self.desc, self.unit, self.enabled, self.done, self.postfixes = total, desc, unit, enabled, 0, []
        RecordedBar.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.done += n

    def set_postfix_str(self, text):
        self.postfixes.append(text)


@pytest.fixture
def recorded(monkeypatch):
    RecordedBar.made = []
    monkeypatch.setattr(progress, "progress_bar", RecordedBar)
    return RecordedBar.made


def test_simulate_reports_every_scale_and_layer():
    schedule = kvpolicy.ScaleSchedule([(1, 1), (2, 2), (3, 3)])
    steps = []
    kvpolicy.simulate(kvpolicy.get_policy("sliding_window", budget=4), schedule=schedule, num_layers=5, num_heads=2,
                      head_dim=8, progress=steps.append)
    assert steps == [1] * 15


def test_plan_reports_its_simulation_steps(recorded, capsys):
    assert main(["plan", "--model", "var-d16", "--policy", "snapkv", "--budget", "50%"]) == 0
    (bar,) = recorded
    assert bar.total == bar.done == 10 * 16 and bar.enabled and bar.unit == "layer"  # 10 scales x 16 layers
    assert main(["plan", "--model", "var-d16", "--policy", "snapkv", "--budget", "50%", "--no-progress"]) == 0
    assert not recorded[-1].enabled


def test_plan_draws_its_bar_on_a_terminal_and_keeps_the_table_on_stdout(monkeypatch, capsys):
    terminal = attach_terminal(monkeypatch)
    assert main(["plan", "--model", "var-d16", "--policy", "snapkv", "--budget", "50%"]) == 0
    states = [line for line in screen_lines(terminal.getvalue()) if line.startswith("plan var-d16 snapkv")]
    assert states and "160/160" in states[-1]
    assert "kept/layer" in capsys.readouterr().out and "kept/layer" not in terminal.getvalue()


def test_no_bar_outside_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progress, "DELAY_S", 0)
    assert main(["plan", "--model", "var-d16", "--policy", "snapkv", "--budget", "50%"]) == 0
    assert capsys.readouterr().err == ""  # logs and pipes get no bar


def test_calibration_reports_each_condition(recorded):
    from benchmarks.calibrate import run_calibration

    class Model:  # a generation per chunk of conditions; the bar counts conditions
        def __init__(self):
            self.chunks = []

        def generate(self, chunk, **kwargs):
            self.chunks.append(chunk)
            assert recorded[-1].done == sum(map(len, self.chunks[:-1]))  # reported after each chunk

    model = Model()
    run_calibration(model, "var-tiny-random", [1, 2, 3], batch_size=2)
    (bar,) = recorded
    assert model.chunks == [[1, 2], [3]]
    assert bar.total == bar.done == 3 and bar.unit == "condition" and bar.enabled
    model.chunks = []
    run_calibration(model, "var-tiny-random", [1], condition_bar=False)
    assert not recorded[-1].enabled


def test_bench_gpu_notes_print_above_its_bar(monkeypatch, tmp_path):
    terminal = attach_terminal(monkeypatch)
    assert main(["bench-gpu", "--dry-run", "--models", "var-tiny-random", "--policies", "sliding_window", "--batches",
                 "1", "--max-batch", "1", "--out", str(tmp_path)]) == 0
    lines = screen_lines(terminal.getvalue())
    # every measurement's result is a whole line of its own
    assert any(line.startswith("var-tiny-random batch 1 full: ") and line.endswith("s/image") for line in lines)
    assert any(line.startswith("var-tiny-random batch 1 sliding_window: ") and line.endswith("s/image") for line in lines)
    # full and sliding_window at batch 1, one largest-batch search (full; sliding_window is not in the paper's claim)
    assert any(line.startswith("bench-gpu") and "3/3" in line for line in lines)


def test_a_note_during_a_bar_gets_its_own_line(monkeypatch):
    terminal = attach_terminal(monkeypatch)
    with progress.progress_bar(10, "work", unit="step") as bar:
        bar.update(3)
        progress.note("note: LPIPS weights are absent")
        bar.update(7)
    lines = screen_lines(terminal.getvalue())
    assert "note: LPIPS weights are absent" in lines  # a whole line, not glued to the bar
    assert any(line.startswith("work") and "3/10" in line for line in lines)
    assert not any("note:" in line and "work" in line for line in lines)


def test_compare_logs_through_note(tmp_path):
    from benchmarks.compare import Comparison
    from benchmarks.compare_settings import CompareSettings

    settings = CompareSettings(model="var-tiny-random", policies=[], budgets=[], conditions=[1], condition_kind="label",
                               seeds=[0], out=tmp_path)
    assert Comparison(settings).log is progress.note  # above compare's job bar, never into its line
