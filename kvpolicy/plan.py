"""Capacity plans: how many tokens each layer may keep after each scale."""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Optional, Sequence

import attrs


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _freeze_grid(rows) -> tuple[tuple[Optional[int], ...], ...]:
    # Plans come from JSON too: a non-integer capacity is an error, never truncated.
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__") or any(
            isinstance(row, (str, bytes)) or not hasattr(row, "__iter__") for row in rows):
        raise ValueError(f"capacities must be a [scale][layer] table of token counts or None, got {rows!r}"[:200])
    for s, row in enumerate(rows):
        for l, cap in enumerate(row):
            if cap is not None and not _whole(cap):
                raise ValueError(f"capacity at scale {s}, layer {l} is {cap!r}; capacities are whole numbers >= 1 or None")
    return tuple(tuple(None if c is None else int(c) for c in row) for row in rows)


def _freeze_cumulative(values):
    values = tuple(values)
    if not all(_whole(v) for v in values):
        raise ValueError(f"cumulative must list whole token counts, got {list(values)!r}"[:200])
    return tuple(int(v) for v in values)


def _check_budget_tokens(instance, attribute, value):
    if value is not None and (not _whole(value) or value < 1):
        raise ValueError(f"budget_tokens must be a whole number >= 1 or None, got {value!r}")


def _freeze_heads(rows):
    """[scale][layer] -> None or a tuple of per-head token counts (whole numbers >= 0)."""
    if rows is None:
        return None
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__") or any(
            isinstance(row, (str, bytes)) or not hasattr(row, "__iter__") for row in rows):
        raise ValueError(f"head_capacities must be a [scale][layer] table of None or per-head token counts, got {rows!r}"[:200])
    out = []
    for s, row in enumerate(rows):
        frozen = []
        for l, heads in enumerate(row):
            if heads is None:
                frozen.append(None)
                continue
            if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
                raise ValueError(f"head capacities at scale {s}, layer {l} must be None or a list of per-head token "
                                 f"counts, got {heads!r}")
            heads = tuple(heads)
            if not heads or not all(_whole(h) and h >= 0 for h in heads):
                raise ValueError(f"head capacities at scale {s}, layer {l} are {list(heads)!r}; each head's capacity "
                                 "is a whole number >= 0 (0: the head keeps no history)")
            frozen.append(tuple(int(h) for h in heads))
        out.append(tuple(frozen))
    return tuple(out)


def _freeze_roles(rows):
    if rows is None:
        return None
    return tuple(tuple(None if r is None else str(r) for r in row) for row in rows)


@attrs.frozen
class CapacityPlan:
    """``capacities[scale][layer]``: tokens the layer may keep after that scale's step, or None.

    ``None`` means no limit (the layer keeps everything). ``roles`` optionally names each entry
    (ScaleKV's "drafter"/"refiner"). ``budget_tokens`` is the per-layer average the plan was made
    for (None for the full cache).

    Head-wise plans: ``head_capacities[scale][layer]`` is None (every head may keep
    ``capacities[scale][layer]`` tokens) or a tuple of H per-head capacities, each a whole number
    >= 0 (a head with 0 keeps no history; it still attends over the next map). For a head-wise
    entry ``capacities[scale][layer]`` is the layer's per-head average budget (an int, never None)
    and the heads' sum may not exceed H times it. Every head-wise entry lists the same H.
    """

    capacities: tuple[tuple[Optional[int], ...], ...] = attrs.field(converter=_freeze_grid)
    budget_tokens: Optional[int] = attrs.field(default=None, validator=_check_budget_tokens)
    policy: str = ""
    roles: Optional[tuple[tuple[Optional[str], ...], ...]] = attrs.field(default=None, converter=_freeze_roles)
    cumulative: Optional[tuple[int, ...]] = attrs.field(default=None, converter=attrs.converters.optional(_freeze_cumulative))
    head_capacities: Optional[tuple[tuple[Optional[tuple[int, ...]], ...], ...]] = attrs.field(default=None, converter=_freeze_heads)

    def __attrs_post_init__(self):
        if not self.capacities:
            raise ValueError("a CapacityPlan needs at least one scale")
        widths = {len(row) for row in self.capacities}
        if len(widths) != 1 or 0 in widths:
            raise ValueError(f"every scale of a CapacityPlan must list the same number (>= 1) of layers, got {sorted(widths)}")
        for s, row in enumerate(self.capacities):
            for l, cap in enumerate(row):
                if cap is not None and cap < 1:
                    raise ValueError(f"capacity at scale {s}, layer {l} is {cap}; capacities are >= 1 or None")
        if self.roles is not None and [len(r) for r in self.roles] != [len(r) for r in self.capacities]:
            raise ValueError("roles must have the same [scale][layer] shape as capacities")
        if self.cumulative is not None and len(self.cumulative) != len(self.capacities):
            raise ValueError("cumulative must list one length per scale")
        if self.head_capacities is not None:
            self._check_heads()

    def _check_heads(self) -> None:
        if [len(r) for r in self.head_capacities] != [len(r) for r in self.capacities]:
            raise ValueError("head_capacities must have the same [scale][layer] shape as capacities")
        widths = set()
        for s, row in enumerate(self.head_capacities):
            for l, heads in enumerate(row):
                if heads is None:
                    continue
                widths.add(len(heads))
                cap = self.capacities[s][l]
                if cap is None:
                    raise ValueError(f"scale {s}, layer {l} has head capacities {list(heads)} but no layer capacity; a "
                                     "head-wise entry needs the layer's per-head average budget in capacities")
                if sum(heads) > len(heads) * cap:
                    raise ValueError(f"head capacities at scale {s}, layer {l} sum to {sum(heads)}, more than "
                                     f"{len(heads)} heads x the layer's average budget {cap} = {len(heads) * cap}")
        if len(widths) > 1:
            raise ValueError(f"head-wise entries list different numbers of heads {sorted(widths)}")
        if not widths:  # no head-wise entry: the plan is layer-wise
            object.__setattr__(self, "head_capacities", None)

    @property
    def num_scales(self) -> int:
        return len(self.capacities)

    @property
    def num_layers(self) -> int:
        return len(self.capacities[0])

    def capacity(self, scale: int, layer: int) -> Optional[int]:
        if not 0 <= scale < self.num_scales:
            raise IndexError(f"scale {scale} out of range 0..{self.num_scales - 1}")
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        return self.capacities[scale][layer]

    @property
    def head_wise(self) -> bool:
        return self.head_capacities is not None

    @property
    def num_heads(self) -> Optional[int]:
        """H of the head-wise entries (None for a layer-wise plan)."""
        if self.head_capacities is None:
            return None
        return next(len(h) for row in self.head_capacities for h in row if h is not None)

    def head_capacity(self, scale: int, layer: int) -> Optional[tuple[int, ...]]:
        """The per-head capacities at (scale, layer), or None when every head has ``capacity(scale, layer)``."""
        self.capacity(scale, layer)  # range checks
        return None if self.head_capacities is None else self.head_capacities[scale][layer]

    def head_kept_lengths(self, cumulative: Sequence[int] | None = None, num_heads: int | None = None) -> list[list[tuple[int, ...]]]:
        """Tokens each head of each layer holds after each scale: [scale][layer] -> (H,) tuple.

        Follows the cache: after scale s a head holds min(its capacity, kept after s-1 + new tokens).
        ``num_heads`` defaults to the plan's head-wise H (1 for a layer-wise plan).
        """
        cumulative = tuple(cumulative) if cumulative is not None else self.cumulative
        if cumulative is None:
            raise ValueError("kept_lengths needs the schedule's cumulative lengths")
        heads = num_heads or self.num_heads or 1
        kept = [[0] * heads for _ in range(self.num_layers)]
        out, prev_total = [], 0
        for s, total in enumerate(cumulative):
            new = total - prev_total
            prev_total = total
            row = []
            for l in range(self.num_layers):
                cap = self.capacities[s][l]
                per_head = self.head_capacities[s][l] if self.head_capacities is not None else None
                for h in range(heads):
                    limit = cap if per_head is None else per_head[h]
                    length = kept[l][h] + new
                    kept[l][h] = length if limit is None else min(length, limit)
                row.append(tuple(kept[l]))
            out.append(row)
        return out

    def kept_lengths(self, cumulative: Sequence[int] | None = None) -> list[list[int]]:
        """Tokens each layer holds after each scale, given the uncompressed lengths per scale
        (head-wise layers: their longest head; ``head_kept_lengths`` has every head).

        Follows the cache: after scale s a layer holds min(capacity, kept after s-1 + new tokens).
        """
        return [[max(h) for h in row] for row in self.head_kept_lengths(cumulative)]

    def mean_kept_lengths(self, cumulative: Sequence[int] | None = None) -> list[list[float]]:
        """[scale][layer] tokens held per head on average (equals ``kept_lengths`` for layer-wise plans)."""
        return [[sum(h) / len(h) for h in row] for row in self.head_kept_lengths(cumulative)]

    def mean_capacity(self, scale: int) -> Optional[float]:
        row = self.capacities[scale]
        if any(c is None for c in row):
            return None
        return sum(row) / len(row)

    def compressed_scales(self) -> list[int]:
        """Scales at which some layer's capacity is below the uncompressed length."""
        if self.cumulative is None:
            return [s for s, row in enumerate(self.capacities) if any(c is not None for c in row)]
        lengths = self.head_kept_lengths()
        return [s for s, row in enumerate(lengths) if any(k < self.cumulative[s] for heads in row for k in heads)]

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {
            "policy": self.policy,
            "budget_tokens": self.budget_tokens,
            "cumulative": None if self.cumulative is None else list(self.cumulative),
            "capacities": [list(row) for row in self.capacities],
            "roles": None if self.roles is None else [list(r) for r in self.roles],
        }
        if self.head_capacities is not None:  # layer-wise plans keep their JSON unchanged
            data["head_capacities"] = [[None if h is None else list(h) for h in row] for row in self.head_capacities]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CapacityPlan":
        unknown = set(data) - {"policy", "budget_tokens", "cumulative", "capacities", "roles", "head_capacities"}
        if unknown:
            raise ValueError(f"unknown CapacityPlan fields {sorted(unknown)}")
        if "capacities" not in data:
            raise ValueError("a CapacityPlan JSON needs a 'capacities' [scale][layer] list")
        return cls(capacities=data["capacities"], budget_tokens=data.get("budget_tokens"),
                   policy=data.get("policy", ""), roles=data.get("roles"), cumulative=data.get("cumulative"),
                   head_capacities=data.get("head_capacities"))

    def to_json(self, path: str | Path | None = None, **kwargs) -> str:
        text = json.dumps(self.to_dict(), **kwargs)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "CapacityPlan":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        lines = [f"CapacityPlan(policy={self.policy or '?'}, budget_tokens={self.budget_tokens}, "
                 f"{self.num_scales} scales x {self.num_layers} layers)"]
        kept = self.mean_kept_lengths() if self.cumulative is not None else None
        for s, row in enumerate(self.capacities):
            caps = sorted({c for c in row if c is not None})
            if not caps:
                desc = "unlimited"
            elif len(caps) == 1 and None not in row:
                desc = f"{caps[0]} every layer"
            else:
                desc = f"min {caps[0]} max {caps[-1]}"
                mean = self.mean_capacity(s)
                if mean is not None:
                    desc += f" mean {mean:.1f}"
            if self.roles is not None:
                names = [r for r in self.roles[s] if r]
                if names:
                    counts = {n: names.count(n) for n in sorted(set(names))}
                    desc += " (" + ", ".join(f"{v} {k}s" for k, v in counts.items()) + ")"
            if self.head_capacities is not None:
                wise = sum(h is not None for h in self.head_capacities[s])
                if wise:
                    desc += f" [head-wise in {wise} layer{'s' if wise != 1 else ''}]"
            prefix = f"  scale {s:2d}"
            if kept is not None:
                prefix += f" len {self.cumulative[s]:6d} kept mean {sum(kept[s]) / len(kept[s]):8.1f}"
            lines.append(f"{prefix}: {desc}")
        return "\n".join(lines)

    def head_table(self) -> str:
        """The per-head capacities, one line per head-wise (scale, layer) (``kvpolicy plan --per-head``)."""
        if self.head_capacities is None:
            return "no head-wise capacities: every head of a layer has the layer's capacity"
        kept = self.head_kept_lengths() if self.cumulative is not None else None
        lines = [f"{'scale':>5} {'layer':>5} {'mean':>8}  per-head capacities" + ("  (kept after the scale)" if kept else "")]
        for s, row in enumerate(self.head_capacities):
            for l, heads in enumerate(row):
                if heads is None:
                    continue
                line = f"{s:>5} {l:>5} {sum(heads) / len(heads):>8.1f}  {' '.join(str(h) for h in heads)}"
                if kept is not None:
                    line += f"  ({' '.join(str(k) for k in kept[s][l])})"
                lines.append(line)
        return "\n".join(lines)
