"""Calibration support in the core: the generic ``AttentionStatsCollector`` (attention statistics
per layer, scale and head; see ``kvpolicy.attention_stats``).

ScaleKV's calibration (Attention Selectivity Index, drafter ranking, allocation, the released
budget-file format) is policy code and lives in ``policies.scalekv``; importing one of its old
names from here fails with the new place.
"""

from __future__ import annotations

from .attention_stats import AttentionStatsCollector, Measure

__all__ = ["AttentionStatsCollector", "Measure"]

_MOVED = {
    **{name: "policies.scalekv.allocation" for name in (
        "DRAFTER", "REFINER", "ALLOCATIONS", "compression_start", "decision_scale", "decision_scales",
        "default_refiner_floor", "window_refiner_floor", "default_refiner_schedule", "allocate", "check_drafters")},
    **{name: "policies.scalekv.budget_file" for name in ("BudgetFile", "plan_to_budget_file", "read_json")},
    **{name: "policies.scalekv.calibration" for name in ("OPERATORS", "CalibrationResult")},
}


def __getattr__(name: str):
    if name in _MOVED:
        raise ImportError(f"kvpolicy.calibration.{name} moved to {_MOVED[name]} (ScaleKV's calibration is policy "
                             f"code; the core holds no policy-specific code): use `from {_MOVED[name]} import {name}`")
    raise AttributeError(f"module 'kvpolicy.calibration' has no attribute {name!r}")
