"""compare and calibrate under torchrun (torch.distributed, gloo on CPU) on the embedded infinity-tiny.

The torchrun tests launch ``python -m torch.distributed.run --nproc_per_node=2`` for real and check
the one property that matters: the rows (images, metrics) and the calibration are those of one
process, also after a rank is killed mid-run and the command is run again."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters import load_model
from benchmarks import distributed, reports
from benchmarks.cli import main
from in_process_compare import CountingModel, compare_counting

REPO = Path(__file__).resolve().parents[1]
PROMPTS = "a red cube on a table\na lighthouse at sunset\n"
# what may differ between two runs of the same job: when and how fast it ran
TIMING_FIELDS = {"seconds_per_image", "seconds_per_call_repeats", "scale_seconds_per_image", "finished_at",
                 "device_peak_bytes"}
COMPARE_ARGS = ["--model", "infinity-tiny", "--policies", "streamingllm,scalekv", "--budgets", "40%", "--no-progress",
                "--no-learned-metrics"]


@pytest.fixture(scope="module")
def infinity_tiny():
    return load_model("infinity-tiny")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist")
    (path / "prompts.txt").write_text(PROMPTS)
    return path


@pytest.fixture(scope="module")
def single_run(workdir, infinity_tiny):
    """The same comparison in this one process (no torchrun): the reference for every other run."""
    out = workdir / "single"
    _compare_in_process(workdir, out, infinity_tiny)
    return out


def _compare_in_process(workdir: Path, out: Path, model) -> CountingModel:
    _, counting = compare_counting([*COMPARE_ARGS, "--prompts", str(workdir / "prompts.txt"), "--out", str(out)], model)
    return counting


def _torchrun(argv, nproc=2, env=None, timeout=300, program=("-m", "benchmarks.cli")) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                 "MASTER_PORT", distributed.TEST_EXIT_ENV)}
    environ.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *program, *argv]
    return subprocess.run(command, cwd=REPO, env=environ, capture_output=True, text=True, timeout=timeout)


def _rows(path: Path) -> dict:
    return {r["key"]: r for r in reports.read_rows(path)}


def _without_timing(rows: dict) -> dict:
    return {key: {k: v for k, v in row.items() if k not in TIMING_FIELDS} for key, row in rows.items()}


def _assert_same_run(out: Path, single: Path) -> None:
    lines = (out / "results.jsonl").read_text().splitlines()
    keys = [json.loads(line)["key"] for line in lines if line.strip()]
    assert len(keys) == len(set(keys)), "duplicate rows in the merged results.jsonl"
    mine, reference = _rows(out / "results.jsonl"), _rows(single / "results.jsonl")
    assert len(reference) == 2 * (1 + 2)  # 2 prompts x (reference + 2 policies x 1 budget)
    assert _without_timing(mine) == _without_timing(reference)
    for row in reference.values():  # the very same pixels
        assert (out / row["image"]).read_bytes() == (single / row["image"]).read_bytes()
    assert json.loads((out / "calibration.json").read_text()) == json.loads((single / "calibration.json").read_text())
    assert not (out / distributed.SHARD_DIR).exists()  # merged and cleaned up
    assert (out / "summary.md").is_file() and (out / "set_metrics.json").is_file()


def test_torchrun_compare_equals_one_process_after_a_rank_is_killed(workdir, single_run):
    out = workdir / "torchrun"
    argv = ["compare", *COMPARE_ARGS, "--prompts", str(workdir / "prompts.txt"), "--out", str(out)]
    # rank 1 dies right after writing the rows of its first job; torchrun then stops rank 0
    crashed = _torchrun(argv, env={distributed.TEST_EXIT_ENV: "1:1"})
    assert crashed.returncode != 0, crashed.stderr[-3000:]
    assert re.search(rf"exitcode\s*:\s*{distributed.TEST_EXIT_STATUS}\b", crashed.stderr), crashed.stderr[-3000:]
    survivors = {}
    for shard in distributed.shard_files(out):
        survivors.update(_rows(shard))
    survivors.update(_rows(out / "results.jsonl"))
    rank1 = _rows(distributed.shard_path(out, 1))
    assert len(rank1) == 1 and next(iter(rank1.values()))["policy"] == "reference"  # its first job, intact
    assert len(survivors) < 6

    finished = _torchrun(argv)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "| scalekv |" in finished.stdout and "resuming:" in finished.stderr
    _assert_same_run(out, single_run)
    merged = _rows(out / "results.jsonl")
    for key, row in survivors.items():  # rows written before the crash were kept, not redone
        assert merged[key]["finished_at"] == row["finished_at"]


def test_resume_across_a_change_of_process_count(workdir, single_run, infinity_tiny):
    """Rows left in the shards of a 3-rank run that died (one torn line) are merged by a plain
    one-process run, which generates only what is missing."""
    out = workdir / "resumed"
    single_rows = reports.read_rows(single_run / "results.jsonl")
    shutil_copy(single_run, out, ("images", "reference_tokens"), ("run.json", "calibration.json"))
    reference_rows = [r for r in single_rows if r["policy"] == "reference"]
    done = reference_rows + [next(r for r in single_rows if r["policy"] == "scalekv")]
    reports.append_rows(out / "results.jsonl", done[:1])
    distributed.shard_path(out, 0).parent.mkdir()
    reports.append_rows(distributed.shard_path(out, 2), done[1:])
    reports.append_rows(distributed.shard_path(out, 0), done[:1])  # already merged: must not repeat
    with open(distributed.shard_path(out, 0), "a") as f:
        f.write('{"key": "torn')  # a rank killed while writing
    counting = _compare_in_process(workdir, out, infinity_tiny)
    assert counting.calls == 1 + (6 - len(done))  # untimed first call + the missing jobs only
    _assert_same_run(out, single_run)


def shutil_copy(src: Path, dst: Path, folders, files) -> None:
    import shutil

    dst.mkdir()
    for name in folders:
        shutil.copytree(src / name, dst / name)
    for name in files:
        shutil.copy(src / name, dst / name)


def test_torchrun_calibrate_equals_one_process(workdir, capsys):
    prompts = workdir / "calibration.txt"
    prompts.write_text("a red cube\na dog on grass\na lighthouse at sunset\n")  # 3 chunks on 2 ranks: uneven
    argv = ["calibrate", "--model", "infinity-tiny", "--prompts", str(prompts), "--budget", "40%"]
    assert main([*argv, "--out", str(workdir / "single.json")]) == 0
    capsys.readouterr()
    # through the console script, as the README shows: torchrun … $(which kvpolicy) calibrate …
    script = Path(sys.executable).parent / "kvpolicy"
    program = (str(script),) if script.is_file() else ("-m", "benchmarks.cli")
    run = _torchrun([*argv, "--out", str(workdir / "sharded.json")], program=program)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("calibrated infinity-tiny on 3 condition(s) on 2 process(es)") == 1  # rank 0 reports
    single = json.loads((workdir / "single.json").read_text())
    assert single["calls"] > 0
    assert json.loads((workdir / "sharded.json").read_text()) == single  # bit-identical statistics


LEAVE_GROUP_WORKER = """
import json, os, sys
from benchmarks import distributed

def gloo_threads():
    names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
    return sorted(name for name in names if "gloo" in name)

dist = distributed.setup("cpu")
from adapters import load_model
load_model("infinity-tiny")  # as the commands do after joining (it imports transformers)
joined = gloo_threads()
dist.close()
left = gloo_threads()
with open(os.path.join(sys.argv[1], f"rank{dist.rank}.json"), "w") as report:  # one stdout holds both ranks
    json.dump({"joined": joined, "left": left}, report)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the threads from /proc (Linux)")
def test_leaving_the_group_after_loading_a_model_stops_gloo(workdir):
    """A rank that loaded a model and left the group holds no gloo thread any more: a process group
    kept alive past destroy_process_group (transformers' imports pinned it) ran its gloo threads into
    interpreter exit and aborted a rank now and then ("terminate called without an active exception")."""
    worker = workdir / "leave_group.py"
    worker.write_text(LEAVE_GROUP_WORKER)
    out = workdir / "leave_group"
    out.mkdir()
    run = _torchrun([str(out)], program=(str(worker),), timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["rank0.json", "rank1.json"]
    for report in (json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)):
        assert report["joined"], report  # the group's threads are there to be stopped (the check sees them)
        assert report["left"] == [], report


def test_an_error_on_rank_0_stops_every_rank_with_its_message(workdir):
    """Rank 0 prepares the output alone; the others must fail with its message, not wait forever."""
    blocker = workdir / "a-file"
    blocker.write_text("not a folder")
    run = _torchrun(["calibrate", "--model", "infinity-tiny", "--out", str(blocker / "calib.json")], timeout=120)
    assert run.returncode != 0
    # Both ranks write to one stderr pipe, so one rank's message can land before the other's newline:
    # count the messages, not the lines.
    message = "kvpolicy calibrate: error: output folder"
    assert run.stderr.count(message) == 2, run.stderr[-3000:]
    assert run.stderr.count("exists and is not a folder") == 2, run.stderr[-3000:]


@pytest.mark.parametrize("device, local_rank, expected", [("cuda", 3, "cuda:3"), ("cpu", 3, "cpu")])
def test_each_rank_runs_on_its_local_device(device, local_rank, expected):
    rank = distributed.Distributed(rank=7, world_size=8, local_rank=local_rank, backend="gloo")
    assert rank.local_device(device) == expected
    assert distributed.SINGLE.local_device("cuda") == "cuda"  # one process: torch's current device, as before


# -- without launching torchrun -------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shares_cover_every_item_once(world):
    items = list(range(11))
    shares = [distributed.Distributed(rank=r, world_size=world, backend="gloo").share(items) for r in range(world)]
    assert sorted(x for share in shares for x in share) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


TORCHRUN_ENV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}


@pytest.mark.parametrize("device, backend, environ, message", [
    ("cpu", "nccl", TORCHRUN_ENV, "--dist-backend nccl needs --device cuda"),
    ("cpu", "gloo", {}, "applies to runs started by torchrun"),
    ("cuda:1", None, TORCHRUN_ENV, "every rank uses its own GPU, cuda:LOCAL_RANK; give --device cuda"),
    ("cpu", None, {**TORCHRUN_ENV, "RANK": "2"}, "need 0 <= RANK < WORLD_SIZE"),
    ("cpu", None, {**TORCHRUN_ENV, "WORLD_SIZE": "two"}, "WORLD_SIZE='two' must be an integer"),
    ("cpu", None, {**TORCHRUN_ENV, distributed.TEST_EXIT_ENV: "1"}, "must be RANK:N"),
])
def test_setup_refuses_bad_combinations_before_connecting(device, backend, environ, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        distributed.setup(device, backend, environ=environ)


def test_single_process_setup_needs_no_process_group():
    assert distributed.setup("cpu", "auto", environ={}) is distributed.SINGLE
    assert distributed.choose_backend("auto", "cpu") == "gloo"


def test_dist_backend_without_torchrun_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    code = main(["compare", "--model", "infinity-tiny", "--dist-backend", "gloo", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "applies to runs started by torchrun" in err and err.count("\n") == 1


# -- collectors split over processes ----------------------------------------------------------------

def _observe_chunk(collector, generator, scales=3):
    for scale in range(scales):
        n = 4 * (scale + 1)
        length = 2 * n + scale
        queries = torch.randn(2, 4, n, 8, generator=generator)
        keys = torch.randn(2, 2, length, 8, generator=generator)
        for layer in range(2):
            collector.observe(layer, scale, queries, keys, current_start=length - n)


def test_merged_collectors_equal_one_collector_and_their_state_round_trips():
    from policies.scalekv.calibration import ScaleKVStatsCollector

    def make():
        return ScaleKVStatsCollector(2, 3, top_k=2, max_queries=5, seed=1)

    one, chunks = make(), [make(), make(), make()]
    for index, chunk in enumerate(chunks):
        _observe_chunk(one, torch.Generator().manual_seed(index))
        _observe_chunk(chunk, torch.Generator().manual_seed(index))
    # one chunk per "rank" (SINGLE does no communication; the torchrun test covers the all-reduce)
    merged = distributed.reduce_collectors(dict(enumerate(chunks)), len(chunks), make)
    expected, got = one.state_dict(), merged.state_dict()
    assert sorted(expected) == sorted(got) and expected["calls"] == got["calls"] == 18
    assert all(torch.equal(expected[k], got[k]) for k in expected if k != "calls")
    assert merged.result().to_dict() == one.result().to_dict()
    copy = make()
    copy.load_state_dict(one.state_dict())
    assert copy.result().to_dict() == one.result().to_dict() and copy.num_heads == one.num_heads == 2


def test_collectors_of_other_configurations_do_not_merge():
    from policies.scalekv.calibration import ScaleKVStatsCollector

    with pytest.raises(ValueError, match="cannot merge collectors"):
        ScaleKVStatsCollector(2, 3, top_k=2).merge(ScaleKVStatsCollector(2, 3, top_k=3))
    with pytest.raises(ValueError, match="unknown entry 'bogus'"):
        ScaleKVStatsCollector(2, 3).load_state_dict({"bogus": torch.zeros(2, 3, 1), "calls": 0})
