"""bench-gpu on a batch that does not fit: the out-of-memory configuration becomes a table row and
the run goes on (a GPU-only path, exercised on the CPU dry run with a model that raises CUDA's
out-of-memory error above batch 1 for the full cache)."""

from __future__ import annotations

import json

import torch

from benchmarks import bench_gpu
from benchmarks.cli import main


class OutOfMemoryAboveBatchOne:
    """A real model whose full-cache calls fail like CUDA does when the batch exceeds 1."""

    def __init__(self, model):
        self.model, self.failed = model, 0

    def generate(self, conditions, *, policy=None, batch_size=None, **kwargs):
        if policy is None and len(conditions) > 1:
            self.failed += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.model.generate(conditions, policy=policy, batch_size=batch_size, **kwargs)


def test_out_of_memory_is_a_row_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    real_load = bench_gpu.Bench.load
    monkeypatch.setattr(bench_gpu.Bench, "load", lambda self, name: OutOfMemoryAboveBatchOne(real_load(self, name)))
    code = main(["bench-gpu", "--dry-run", "--models", "var-tiny-random", "--policies", "h2o", "--batches", "1,2",
                 "--max-batch", "4", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(next(tmp_path.glob("bench_gpu_dryrun_*.json")).read_text())
    rows = {(r["policy"], r["batch"]): r for r in data["rows"]}
    assert [k for k in rows] == [("full", 1), ("h2o", 1), ("full", 2), ("h2o", 2)]
    assert rows[("full", 2)]["out_of_memory"] and rows[("full", 2)]["seconds_per_image"] is None
    assert not rows[("h2o", 2)]["out_of_memory"] and rows[("h2o", 2)]["seconds_per_image"] > 0
    # no reference at batch 2: the ratios there are unknown, not invented
    assert rows[("h2o", 2)]["speedup"] is None and rows[("h2o", 2)]["kv_ratio"] is None
    assert rows[("h2o", 1)]["speedup"] > 0 and rows[("h2o", 1)]["kv_ratio"] < 1
    assert data["largest_batches"] == [{"model": "var-tiny-random", "policy": "full", "largest_batch": 1,
                                        "out_of_memory_above": True, "cap": 4}]
    assert "| var-tiny-random | 2 | full | – | out of memory |" in captured.out
    assert "| var-tiny-random | full | 1 |" in captured.out
