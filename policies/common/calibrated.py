"""The shared calibration, for policies whose plan derives from a model's attention statistics.

One ``kvpolicy calibrate`` run records, in one ``kvpolicy.AttentionStatsCollector``, the measures
every registered policy declares (``Policy.calibration_measures``); its ``statistics()`` file is
what each of them reads through its ``calibration`` option. ``SharedCalibration`` gives a policy
the two hooks the harness calls (``calibration_collector`` and ``calibration_result``) so that all
calibrated policies hand it the same collector, whichever is asked first.
"""

from __future__ import annotations

from kvpolicy.attention_stats import shared_collector


class SharedCalibration:
    """Mixin (place before the policy base): the shared collector and its statistics as the result."""

    @classmethod
    def calibration_collector(cls, num_layers: int, num_scales: int, *, seed: int = 0, schedule=None, **options):
        if options:
            raise ValueError(f"policy {cls.name!r} takes no calibration option(s) {sorted(options)}")
        return shared_collector(num_layers, num_scales, schedule, seed=seed)

    @classmethod
    def calibration_result(cls, collector, *, source: str, schedule=None, budget_tokens=None, **options):
        if options:
            raise ValueError(f"policy {cls.name!r} takes no calibration option(s) {sorted(options)}")
        return collector.statistics(source=source)
