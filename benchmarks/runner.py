"""``kvpolicy compare``'s timed runner: one job's generate calls, synchronised and measured.

Each job runs ``repeats`` times; the first output is kept (every repeat uses the same seed, so the
outputs are equal), the wall times, the per-scale seconds (median over repeats) and, on CUDA, the
allocator's peak are returned. Warm-up calls are untimed.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Optional, Sequence

import attrs
import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@attrs.define
class TimedOutput:
    output: Any  # the model's GenerationOutput of the first repeat
    seconds: list  # wall time of every repeat
    scale_seconds: list  # per scale, median over repeats ([] when the model does not time scales)
    device_peak: Optional[int]  # CUDA allocator peak over the repeats (None off CUDA)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)


@attrs.define
class TimedRunner:
    """Runs generate calls of one model with the run's resolution settings, counting them."""

    model: Any
    device: str = "cpu"
    repeats: int = 1
    resolution: Any = None
    aspect_ratio: float = 1.0
    calls: int = 0

    def generate(self, conditions: Sequence, policy, seed: int):
        kwargs = {}
        if self.resolution is not None:
            kwargs["resolution"] = self.resolution
        if self.aspect_ratio != 1.0:
            kwargs["aspect_ratio"] = self.aspect_ratio
        self.calls += 1
        return self.model.generate(list(conditions), policy=policy, seed=seed, batch_size=len(conditions),
                                   progress=False, **kwargs)

    def timed(self, conditions: Sequence, policy, seed: int) -> TimedOutput:
        cuda = self.device.startswith("cuda")
        outputs, seconds, peaks = [], [], []
        for _ in range(self.repeats):
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            synchronize(self.device)
            start = time.perf_counter()
            out = self.generate(conditions, policy, seed)
            synchronize(self.device)
            seconds.append(time.perf_counter() - start)
            if cuda:
                peaks.append(torch.cuda.max_memory_allocated(self.device))
            outputs.append(out)
        per_scale = [statistics.median(col) for col in zip(*[o.cache_report.scale_seconds for o in outputs])] \
            if outputs[0].cache_report.scale_seconds else []
        return TimedOutput(outputs[0], seconds, per_scale, max(peaks) if peaks else None)
