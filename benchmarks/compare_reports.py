"""``kvpolicy compare``'s reports from the rows written so far: the summary table, set metrics
(FID between the reference set and each configuration's), plots and the contact sheet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import reports
from .jobs import Config, requested_keys
from .outputs import load_png


def requested_rows(settings, configs: Sequence[Config], results: Path) -> list[dict]:
    """The rows of this run's (condition, seed, configuration) keys, once each."""
    wanted = requested_keys(settings, configs)
    rows, seen = [], set()
    for row in reports.read_rows(results):
        if row["key"] in wanted and row["key"] not in seen:
            seen.add(row["key"])
            rows.append(row)
    return rows


def set_metrics(metrics, out: Path, configs: Sequence[Config], rows: Sequence[dict], batch: int = 32) -> dict:
    """FID between the full-cache set and each configuration's set (None with a reason if absent).

    Features are extracted from the saved PNGs in batches (a COCO-sized run never holds every
    image in memory), the reference set's once."""
    result = {}
    by_config: dict[str, dict] = {}
    for r in rows:
        by_config.setdefault(r["config_id"], {})[(r["condition_index"], r["seed"])] = r
    ref = by_config.get(configs[0].config_id, {})
    ref_features: dict = {}

    def features(entries: dict, keys, cache: Optional[dict] = None):
        todo = [k for k in keys if cache is None or k not in cache]
        found = {} if cache is None else cache
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            f = metrics.features(torch.stack([load_png(out / entries[k]["image"]) for k in chunk]))
            if f is None:
                return None
            found.update(zip(chunk, f))
        return torch.stack([found[k] for k in keys])

    for config in configs[1:]:
        mine = by_config.get(config.config_id, {})
        common = sorted(set(mine) & set(ref))
        fid = None
        if len(common) >= 2 and metrics.enabled:
            ref_f = features(ref, common, ref_features)
            if ref_f is not None:
                fid = metrics.fid_from_features(features(mine, common), ref_f)
        elif common and metrics.enabled:
            metrics.reasons.setdefault("fid_small", "FID needs at least 2 images per set")
        result[config.config_id] = {"label": reports.config_label(mine[common[0]]) if common else config.slug,
                                    "fid": fid, "images": len(common),
                                    "reason": None if fid is not None else metrics.reasons.get("fid") or
                                    metrics.reasons.get("fid_small")}
    return result


def write_reports(settings, configs: Sequence[Config], *, out: Path, results: Path, metrics,
                  image_path: Callable[[Config, int, int], Path], notes: Sequence[str] = ()) -> dict:
    rows = requested_rows(settings, configs, results)
    sets = set_metrics(metrics, out, configs, rows)
    summary = reports.summarize(rows, sets)
    # Table 1 layout: reference, then budgets from largest to smallest, policies in --policies order
    order = {name: i for i, name in enumerate(settings.policies)}
    summary.sort(key=lambda e: (e["policy"] != reports.REFERENCE, -(e["budget_tokens"] or 10 ** 9),
                                order.get(e["policy"], len(order))))
    notes = list(notes) + list(metrics.reasons.values())
    reports.write_summary(out / "summary.md", summary, settings=settings.as_dict(), notes=notes)
    (out / "set_metrics.json").write_text(json.dumps(sets, indent=1))
    reports.plot_fidelity_vs_budget(out / "fidelity_vs_budget.png", summary)
    reports.plot_per_scale(out / "kv_bytes_per_scale.png", rows, field="kv_bytes_per_scale",
                           ylabel="KV MiB per image after the scale (log)", scale_by=reports.MIB, logy=True)
    if all(r["scale_seconds_per_image"] for r in rows):
        reports.plot_per_scale(out / "latency_per_scale.png", rows, field="scale_seconds_per_image",
                               ylabel="seconds per image (median over repeats)")
    contact_sheet(settings, configs, out, image_path)
    return {"rows": rows, "summary": summary, "set_metrics": sets}


def contact_sheet(settings, configs: Sequence[Config], out: Path, image_path, max_rows: int = 8) -> None:
    seed = settings.seeds[0]
    indices = list(range(min(max_rows, len(settings.conditions))))
    grid = [[image_path(c, i, seed) for c in configs] for i in indices]
    labels = ["full" if c.is_reference else f"{c.policy_name} {c.budget or ''}".strip() for c in configs]
    reports.contact_sheet(out / "contact_sheet.png", grid, labels)
