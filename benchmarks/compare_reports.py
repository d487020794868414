"""``kvpolicy compare``'s reports from the rows written so far: the summary table, set metrics
(FID between the reference set and each configuration's), plots and the contact sheet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import metric_registry, reports
from .builtin_metrics import describe_implementations
from .jobs import Config, requested_keys
from .metric_registry import SetPair
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


def set_metrics(metrics, out: Path, configs: Sequence[Config], rows: Sequence[dict]) -> dict:
    """Every registered set metric (FID) between the full-cache set and each configuration's set,
    on the (condition, seed) pairs both hold; a metric reads the saved PNGs when it needs them (FID
    in batches, the reference set's features once). None where a metric cannot run (reason noted)."""
    by_config: dict[str, dict] = {}
    for r in rows:
        by_config.setdefault(r["config_id"], {})[(r["condition_index"], r["seed"])] = r
    ref = by_config.get(configs[0].config_id, {})

    def loader(entries: dict):
        return lambda keys: torch.stack([load_png(out / entries[k]["image"]) for k in keys])

    pairs, labels = {}, {}
    for config in configs[1:]:
        mine = by_config.get(config.config_id, {})
        common = sorted(set(mine) & set(ref))
        pairs[config.config_id] = SetPair(keys=common, load=loader(mine), load_reference=loader(ref))
        labels[config.config_id] = reports.config_label(mine[common[0]]) if common else config.slug
    values = metric_registry.set_values(metrics, pairs, caches={})
    result = {}
    for config_id, pair in pairs.items():
        entry = {"label": labels[config_id], "images": len(pair.keys), **values[config_id]}
        if "fid" in entry:
            entry["fid_mode"] = metrics.fid_mode
            entry["reason"] = None if entry["fid"] is not None else (
                metrics.reasons.get("fid") or metrics.reasons.get("fid_small"))
        result[config_id] = entry
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
    notes = list(dict.fromkeys(list(notes) + list(metrics.reasons.values())))
    # one line per registered metric: implementation, mode, weight files, versions (and warnings)
    lines = [describe_implementations(metrics)] + [
        line for line in (m.description(metrics) for m in metric_registry.registered_metrics()) if line]
    reports.write_summary(out / "summary.md", summary, settings=settings.as_dict(), notes=notes, metrics=lines)
    (out / "set_metrics.json").write_text(json.dumps(sets, indent=1))
    # against budget, one line per policy: per-scale curves of every configuration coincided at equal
    # budgets and showed per-scale CPU noise without the text encoder's and VAE's time
    reports.write_plots(out, summary)
    contact_sheet(settings, configs, out, image_path)
    return {"rows": rows, "summary": summary, "set_metrics": sets}


def contact_sheet(settings, configs: Sequence[Config], out: Path, image_path, max_rows: int = 8) -> None:
    """The first seed's images of the first ``max_rows`` conditions, a row each, labelled with the
    condition, every configuration's image beside the full-cache one with the difference under it."""
    seed = settings.seeds[0]
    indices = list(range(min(max_rows, len(settings.conditions))))
    grid = [[image_path(c, i, seed) for c in configs] for i in indices]
    labels = ["full" if c.is_reference else f"{c.policy_name} {c.budget or ''}".strip() for c in configs]
    reports.contact_sheet(out / "contact_sheet.png", grid, labels,
                          row_labels=[condition_label(settings, i) for i in indices])


def condition_label(settings, index: int) -> str:
    """A contact-sheet row's label: the condition's index and the prompt, or 'class N'."""
    condition = settings.conditions[index]
    return f"{index}: class {condition}" if settings.condition_kind == "label" else f"{index}: {condition}"
