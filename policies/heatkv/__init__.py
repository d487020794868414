"""HeatKV (Cederlund, Berg, Isaksson, Acar, Zhou, Giselsson, "HeatKV: Head-tuned KV-cache
Compression for Visual Autoregressive Modeling", arXiv 2605.14877; code arm-research/heatkv @
96dc288, read for facts): a static schedule that drops whole earlier scales from single heads, the
(head, scale) pairs with the least attention on calibration prompts first.

Per (scale, layer, head) this policy allocates: the tokens of every scale that head still holds
(the ``protected_scales`` coarsest scales always; an earlier scale j until the schedule drops it
for that head), so capacities differ per head and the cache stores them ragged. Selection is free
at run time: the kept positions follow from the schedule alone (no scores, no queries), the cache
only gathers them. The rules, the S-CAS score and every deviation are in ``schedule.py``.

Sources of the schedule (exactly one):

- ``calibration=``: the statistics of ``kvpolicy calibrate`` (attention mass of each scale's
  queries on every earlier scale, per layer and head), from which S-CAS and the removal orders are
  computed for this model;
- ``schedule_file=``: a saved schedule (``HeatSchedule.save``, or ``export_plan_file``), reused as
  is ("calibrate once, reuse"), or ``"infinity-2b"`` / ``"infinity-8b"``: the authors' released
  S-CAS orders for Infinity at 1024² (shipped data, ``released/SOURCE.md``).

``protected_scales`` (default 3, the released setting) applies to a calibration; a saved schedule
carries its own. Without a source the policy refuses to plan. ``stand_in_heads=H`` asks for a
placeholder ranking (every head equal, ties by head then layer) over H heads per layer: its totals
per scale are exact, because the number of dropped (head, scale) pairs depends on the budget only,
not on which heads they are; ``kvpolicy plan`` uses it for a model that was never calibrated and
says so. Options: ``calibration`` / ``schedule_file`` / ``stand_in_heads``, ``protected_scales``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import attrs
import torch

from kvpolicy import Policy, Selection, register_policy
from policies.common.calibrated import SharedCalibration
from kvpolicy.validators import check_int_at_least

from .schedule import (HeatSchedule, orders_from_scas, prune_count, scas_from_means, source_mass_measure,
                       source_mass_name)

__all__ = ["HeatKV", "HeatSchedule", "orders_from_scas", "prune_count", "scas_from_means", "source_mass_measure",
           "source_mass_name"]


# Released S-CAS orders (arm-research/heatkv @ 96dc288, see released/SOURCE.md): short name ->
# (file, layers, heads); Infinity's 13-scale 1024^2 schedule, 3 protected scales.
RELEASED = {"infinity-2b": ("infinity-2b-orders.json", 32, 16), "infinity-8b": ("infinity-8b-orders.json", 40, 28)}


def _path(value):
    if value is None or str(value) in RELEASED:
        return None if value is None else str(value)
    return str(Path(value).expanduser().absolute())


def load_schedule_file(value: str) -> HeatSchedule:
    """A saved schedule (``HeatSchedule.save``) or a released ranking by short name."""
    if value in RELEASED:
        import json

        name, layers, heads = RELEASED[value]
        orders = json.loads((Path(__file__).parent / "released" / name).read_text())
        return HeatSchedule.from_released_orders(orders, num_layers=layers, num_heads=heads, num_scales=13,
                                                 protected_scales=3, source=f"{value}, released HeatKV orders")
    return HeatSchedule.load(value)


def _calibration(value):
    if value is None or not isinstance(value, Path):
        return value
    return str(value.expanduser().absolute())


def schedule_from_statistics(stats, schedule, protected_scales: int) -> HeatSchedule:
    """S-CAS orders from calibration statistics (``heatkv/source_mass/{j}`` per layer, scale, head)."""
    means = {}
    for j in range(schedule.num_scales - 1):
        name = source_mass_name(j)
        if name not in stats.names:
            raise ValueError(f"the calibration has no {name!r} statistics (it was made before heatkv was registered "
                             "or on another schedule); run kvpolicy calibrate again")
        means[j] = stats.head_means(name).tolist()  # [layer][target scale][head]
    scas = scas_from_means(means, schedule.num_scales, protected_scales)
    return HeatSchedule.from_scas(scas, num_scales=schedule.num_scales, protected_scales=protected_scales,
                                  source=getattr(stats, "source", ""))


def stand_in_schedule(schedule, num_layers: int, num_heads: int, protected_scales: int) -> HeatSchedule:
    """Every head ranked equally (ties by head, then layer): the counts per scale of a real schedule."""
    scas = [[[0.0] * schedule.num_scales for _ in range(num_heads)] for _ in range(num_layers)]
    return HeatSchedule.from_scas(scas, num_scales=schedule.num_scales, protected_scales=protected_scales,
                                  source="stand-in: no calibration (head choice is a placeholder)")


@register_policy("heatkv")
@attrs.define(kw_only=True)
class HeatKV(SharedCalibration, Policy):
    """Static per-(head, scale) schedule from calibrated cumulative attention (S-CAS)."""

    needs_calibration = True
    calibration_option = "calibration"
    plan_file_option = "schedule_file"
    plan_sources = ("stand_in_heads",)

    calibration: Any = attrs.field(default=None, converter=_calibration)
    schedule_file: Optional[str] = attrs.field(default=None, converter=_path)
    protected_scales: int = attrs.field(default=3, validator=check_int_at_least(1))
    # no calibration: a placeholder ranking over this many heads per layer (memory planning, tests)
    stand_in_heads: Optional[int] = attrs.field(default=None, validator=attrs.validators.optional(check_int_at_least(1)))
    _heat: dict = attrs.field(factory=dict, init=False, repr=False, eq=False)

    # kvpolicy check: the placeholder ranking over the checked heads (the option set to the head count)
    check_options = {"stand_in_heads": 2, "protected_scales": 1}
    check_option_values = {"protected_scales": (1, 2, 3)}
    check_heads_option = "stand_in_heads"

    def __attrs_post_init__(self):
        sources = [n for n in ("calibration", "schedule_file", "stand_in_heads") if getattr(self, n) is not None]
        if len(sources) > 1:
            raise ValueError("heatkv takes one schedule source: calibration= (kvpolicy calibrate), schedule_file= "
                             f"(a saved HeatKV schedule) or stand_in_heads= (a placeholder ranking), got {sources}")
        if self.schedule_file is not None:
            self._heat["file"] = load_schedule_file(self.schedule_file)

    @classmethod
    def calibration_measures(cls, schedule):
        return [source_mass_measure(schedule)]

    def heat_schedule(self, schedule, num_layers: int) -> HeatSchedule:
        """The removal orders for this geometry (loaded, calibrated or the planning stand-in)."""
        if "file" in self._heat:
            heat = self._heat["file"]
        else:
            key = (schedule, num_layers)
            heat = self._heat.get(key)
            if heat is None:
                if self.calibration is None:
                    if self.stand_in_heads is None:
                        raise ValueError("heatkv needs its schedule: calibration=FILE (from `kvpolicy calibrate`), "
                                         "schedule_file=FILE (a saved HeatKV schedule, or 'infinity-2b'/'infinity-8b': "
                                         "the released orders), or stand_in_heads=H (a placeholder ranking, for "
                                         "memory planning only)")
                    heat = stand_in_schedule(schedule, num_layers, self.stand_in_heads, self.protected_scales)
                else:
                    from kvpolicy.attention_stats import load_statistics

                    stats = load_statistics(self.calibration)
                    stats.check_geometry(num_layers, schedule.num_scales, self.name)
                    heat = schedule_from_statistics(stats, schedule, self.protected_scales)
                self._heat[key] = heat
        heat.check_schedule(schedule, num_layers)
        return heat

    def make_plan(self, schedule, num_layers, budget_tokens):
        return self.heat_schedule(schedule, num_layers).plan(schedule, budget_tokens, policy=self.name)

    def select(self, keys, values, ctx):
        heat = self.heat_schedule(ctx.schedule, ctx.num_layers)
        if keys.shape[1] != heat.num_heads:
            raise ValueError(f"heatkv schedule has {heat.num_heads} heads per layer, the cache {keys.shape[1]}")
        budget = self.plan(ctx.schedule, ctx.num_layers).budget_tokens
        rows = heat.kept_positions(ctx.schedule, budget, ctx.scale, ctx.layer)
        if rows is None:
            return Selection(None, ctx.state)
        held = heat.held_lengths(ctx.schedule, budget, ctx.scale, ctx.layer)
        if ctx.lengths is not None:
            holds = [list(row) for row in ctx.host_lengths] if ctx.host_lengths is not None else ctx.lengths.tolist()
            if holds != [list(held)] * keys.shape[0]:
                raise RuntimeError(f"heatkv: the cache holds {holds} tokens per head at scale {ctx.scale}, "
                                   f"layer {ctx.layer}; the schedule says {held}")
        return ragged_selection(rows, held, ctx.length, keys.shape[0], keys.device, ctx.state)

    @classmethod
    def describe_calibration(cls, calibration, schedule, budget_tokens):
        heat = cls(calibration=calibration).heat_schedule(schedule, calibration.num_layers)
        counts = heat.removal_counts(schedule, budget_tokens)
        dropping = [f"{t}: {x}" for t, x in enumerate(counts[:-1]) if x]
        return [f"heatkv: S-CAS ranks {heat.num_layers} x {heat.num_heads} heads per source scale "
                f"{heat.protected_scales}..{schedule.num_scales - 2}; at {budget_tokens} tokens the heads dropping each "
                f"source scale after scale t: {', '.join(dropping) or 'none'}"]

    @classmethod
    def resolve_plan_file(cls, value) -> str:
        """An existing saved schedule as given; otherwise a released ranking by short name."""
        text = str(value)
        if text in RELEASED:
            return text
        if not Path(text).expanduser().is_file():
            raise FileNotFoundError(f"heatkv schedule file {text!r} does not exist and is not a released ranking "
                                    f"(shipped: {', '.join(RELEASED)})")
        return str(Path(text).expanduser())

    def export_plan_file(self, schedule, num_layers, path):
        """The saved schedule (reads back with ``schedule_file=``)."""
        self.heat_schedule(schedule, num_layers).save(path)

    @classmethod
    def planning_stand_in(cls, schedule, num_layers, budget, num_heads: Optional[int] = None):
        note = ("no --calibration or schedule file: which heads drop which scale is a placeholder (every head ranked "
                "equally); the per-scale totals are exact (they depend on the budget only). Use --calibration "
                "(kvpolicy calibrate) for the model's real per-head capacities.")
        return {"stand_in_heads": num_heads or 16}, note


def ragged_selection(rows: list[list[int]], held: list[int], length: int, batch: int, device, state) -> Selection:
    """Per-head kept positions in each head's own cache (the same for every batch row) -> indices
    in the left-padded view the policy sees (a head holding ``held[h]`` of ``length`` positions
    starts at ``length - held[h]``), padded with 0, plus lengths."""
    width = max(1, max(len(r) for r in rows))
    indices = torch.zeros(batch, len(rows), width, dtype=torch.long, device=device)
    for h, r in enumerate(rows):
        if r:
            indices[:, h, :len(r)] = torch.tensor(r, dtype=torch.long, device=device) + (length - held[h])
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device).expand(batch, -1).clone()
    return Selection(indices, state, lengths=lengths)
