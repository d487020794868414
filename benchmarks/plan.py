"""``kvpolicy plan``: per-scale KV memory of a model geometry under a policy, without weights.

Uses the model-family registry (depth, heads, head dim, schedule) and ``kvpolicy.simulate`` (the same
cache code a real generation uses), so the bytes are counted, not estimated.
"""

from __future__ import annotations

from typing import Optional

import torch

import kvpolicy
from adapters.families import ModelGeometry, get_geometry
from .policy_spec import (build_policy, check_budget, parse_policy_options, plan_now, planning_stand_in,
                          policies_to_calibrate)

MIB = 2 ** 20


def resolve_geometry(model: str, resolution=None, aspect_ratio: float = 1.0) -> ModelGeometry:
    """Geometry of a registered preset (the family registry; no weights are read)."""
    return get_geometry(model, resolution, aspect_ratio)


def parse_resolution(text):
    if text is None:
        return None
    text = str(text).strip()
    return int(text) if text.isdigit() else text


def _role_summary(plan, scale: int) -> str:
    """'12 drafters x 1234, 20 refiners x 300' for a scale of a plan with roles."""
    if plan is None or plan.roles is None:
        return ""
    if all(r is None for r in plan.roles[scale]):
        return "no roles (nothing to compress yet)" if all(c is None for c in plan.capacities[scale]) else ""
    groups: dict[str, list] = {}
    for role, cap in zip(plan.roles[scale], plan.capacities[scale]):
        groups.setdefault(role or "-", []).append(cap)
    parts = []
    for role in sorted(groups):
        caps = groups[role]
        if all(c is None for c in caps):
            desc = "unlimited"
        else:
            values = sorted({c for c in caps if c is not None})
            desc = str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"
            if any(c is None for c in caps):
                desc += "/unlimited"
        parts.append(f"{len(caps)} {role}{'s' if len(caps) != 1 else ''} x {desc}")
    return ", ".join(parts)


def plan_memory(model: str, policy_name: str, budget, *, resolution=None, aspect_ratio: float = 1.0,
                batch: int = 1, dtype: torch.dtype = torch.bfloat16, cfg: bool = True,
                budget_file: Optional[str] = None, calibration=None, options=None,
                key_dtype: Optional[torch.dtype] = None, progress: bool = False) -> dict:
    """Simulate full cache and the policy on a geometry; return a JSON-friendly dict.

    ``dtype`` is the value (compute) dtype; ``key_dtype`` defaults to the family's official key
    cache (Infinity: float32 keys next to bf16 values, 6 bytes per channel, as ScaleKV's Table 1
    counts; VAR: the value dtype). ``progress``: a bar over the simulated (scale, layer) steps (on a
    terminal; large geometries take seconds)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    g = resolve_geometry(model, resolution, aspect_ratio)
    official_keys = key_dtype is None
    if key_dtype is None:
        key_dtype = getattr(torch, g.key_cache_dtype) if g.key_cache_dtype else dtype
    schedule = g.schedule
    parsed = None if budget is None else check_budget(budget, schedule, model)
    note = None
    extra = parse_policy_options(options, [policy_name]).get(policy_name, {})
    if policies_to_calibrate([policy_name], {policy_name: extra}, budget_file=budget_file, calibration=calibration):
        # planning needs no weights: a calibrated policy plans with the stand-in it declares
        stand_in, note = planning_stand_in(policy_name, schedule, g.num_layers, parsed, g.num_heads)
        policy = build_policy(policy_name, parsed, options={**stand_in, **extra})
    else:
        policy = build_policy(policy_name, parsed, budget_file=budget_file, calibration=calibration, options=extra)
    plan = plan_now(policy_name, policy, schedule, g.num_layers)  # a refused plan fails before simulating
    common = dict(schedule=schedule, num_layers=g.num_layers, num_heads=g.num_heads, head_dim=g.head_dim,
                  batch=batch, cfg=cfg, dtype=dtype, key_dtype=key_dtype)
    from .progress import progress_bar

    with progress_bar(schedule.num_scales * g.num_layers, f"plan {model} {policy_name}", unit="layer",
                      enabled=progress) as bar:
        report = kvpolicy.simulate(policy, **common, progress=bar.update)
    last_read = max(0, schedule.num_scales - 2)
    budget_tokens = plan.budget_tokens
    return {
        "model": model, "family": g.family, "resolution": resolution, "aspect_ratio": aspect_ratio,
        "schedule": [list(s) for s in schedule.shapes], "reference_length": schedule.reference_length,
        "num_layers": g.num_layers, "num_heads": g.num_heads, "head_dim": g.head_dim,
        "batch": batch, "cfg": cfg, "rows": batch * (2 if cfg else 1), "dtype": str(dtype).replace("torch.", ""),
        "key_dtype": str(key_dtype).replace("torch.", ""), "key_dtype_is_official": official_keys and g.key_cache_dtype is not None,
        "policy": policy.to_config(), "budget": None if parsed is None else str(parsed), "budget_tokens": budget_tokens,
        "kv_bytes": report.kv_bytes, "full_kv_bytes": report.full_kv_bytes,
        "kept_lengths": report.kept_lengths, "capacities": report.capacities,
        "roles": None if plan.roles is None else [list(r) for r in plan.roles],
        "role_summary": [_role_summary(plan, s) for s in range(schedule.num_scales)] if plan.roles is not None else None,
        "peak_kv_bytes": report.peak_kv_bytes, "full_peak_kv_bytes": report.full_peak_kv_bytes,
        "last_read_scale": last_read, "note": note,
        "last_read_ratio": report.kv_bytes[last_read] / report.full_kv_bytes[last_read],
        # Head-wise policies: [scale][layer] per-head kept lengths (max over rows), and the plan's
        # [scale][layer] per-head capacities (None where a layer is layer-wise); None otherwise.
        "head_kept_lengths": [[list(h) for h in row] for row in report.head_kept_lengths] if report.head_wise else None,
        "mean_kept_lengths": report.mean_kept_lengths if report.head_wise else None,
        "head_capacities": report.head_capacities,
        "head_table": plan.head_table() if plan.head_wise else None,
    }


def _dtype_text(d: dict) -> str:
    key, value = d.get("key_dtype", d["dtype"]), d["dtype"]
    if key == value:
        return value
    official = " (the official layout; --key-dtype bf16 for a bf16 key cache)" if d.get("key_dtype_is_official") else ""
    return f"K {key} + V {value}{official}"


def format_plan(d: dict, per_head: bool = False) -> str:
    """The human-readable table for ``kvpolicy plan`` (``per_head``: each head's kept tokens too)."""
    shapes = d["schedule"]
    res = d["resolution"] if d["resolution"] is not None else "default"
    lines = [
        f"{d['model']} ({d['family']}) at {res}, aspect {d['aspect_ratio']:g}: {len(shapes)} scales, "
        f"{d['num_layers']} layers x {d['num_heads']} heads x {d['head_dim']} dims, "
        f"batch {d['batch']} ({d['rows']} rows{' with CFG' if d['cfg'] else ''}), {_dtype_text(d)}",
        f"policy {d['policy']['name']}, budget {d['budget'] or 'from the policy configuration'}"
        + (f" = {d['budget_tokens']} tokens per layer on average (N_ref = {d['reference_length']})"
           if d["budget_tokens"] is not None else " (no limit)"),
        "",
    ]
    with_roles = d["role_summary"] is not None
    header = f"{'scale':>5} {'map':>7} {'cum':>6} {'full MiB':>11} {'policy MiB':>11} {'ratio':>8} {'kept/layer':>10}"
    lines.append(header + ("  capacities by role" if with_roles else ""))
    for s, (h, w) in enumerate(shapes):
        full, mine = d["full_kv_bytes"][s], d["kv_bytes"][s]
        kept = d["mean_kept_lengths"][s] if d.get("mean_kept_lengths") else d["kept_lengths"][s]
        cum = sum(hh * ww for hh, ww in shapes[: s + 1])
        row = (f"{s:>5} {f'{h}x{w}':>7} {cum:>6} {full / MIB:>11.2f} {mine / MIB:>11.2f} {mine / full:>8.4f} "
               f"{sum(kept) / len(kept):>10.1f}")
        if with_roles:
            row += "  " + d["role_summary"][s]
        lines.append(row)
    s = d["last_read_scale"]
    full, mine = d["full_kv_bytes"][s], d["kv_bytes"][s]
    lines.append("")
    lines.append(f"cache the last scale reads (after scale {s}): full {full / MIB:.2f} MiB, "
                 f"{d['policy']['name']} {mine / MIB:.2f} MiB, ratio {d['last_read_ratio']:.6f}"
                 + (f" (budget {d['budget_tokens']}/{d['reference_length']} = "
                    f"{d['budget_tokens'] / d['reference_length']:.6f})" if d["budget_tokens"] is not None else ""))
    lines.append(f"peak (incl. one layer's current map before compression): full {d['full_peak_kv_bytes'] / MIB:.2f} MiB, "
                 f"{d['policy']['name']} {d['peak_kv_bytes'] / MIB:.2f} MiB, "
                 f"ratio {d['peak_kv_bytes'] / d['full_peak_kv_bytes']:.4f}")
    if per_head:
        lines.append("")
        if not d.get("head_kept_lengths"):
            lines.append("per head: every head of a layer keeps the same tokens (a layer-wise policy)")
        else:
            heads = len(d["head_kept_lengths"][0][0])
            lines.append(f"kept tokens per head after each scale (mean over layers; {heads} heads):")
            lines.append(f"{'scale':>5}  " + " ".join(f"{'h' + str(i):>6}" for i in range(heads)))
            for s_, row in enumerate(d["head_kept_lengths"]):
                means = [sum(layer[i] for layer in row) / len(row) for i in range(heads)]
                lines.append(f"{s_:>5}  " + " ".join(f"{m:>6.1f}" for m in means))
            if d.get("head_table"):
                lines.append("")
                lines.append("per-head capacities of the plan:")
                lines.append(d["head_table"])
    if d.get("note"):
        lines.append("note: " + d["note"])
    return "\n".join(lines)
