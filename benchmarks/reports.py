"""Result files of ``kvpolicy compare``: results.jsonl, summary.md, plots and a contact sheet.

``results.jsonl`` holds one row per image x configuration (the full-cache reference rows have
``policy == "reference"``). Everything else is derived from it, so a resumed run rewrites the
summary, plots and contact sheet from all finished rows.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Iterable, Optional, Sequence

MIB = 2 ** 20
REFERENCE = "reference"


# -- results.jsonl ----------------------------------------------------------------------------------

def append_rows(path: Path, rows: Iterable[dict]) -> None:
    """Append rows, one atomic line each (see ``results_io.append_jsonl``)."""
    from .results_io import append_jsonl

    append_jsonl(Path(path), rows)


def read_rows(path: Path) -> list[dict]:
    """All complete rows with a ``key``; a line cut short by an interruption is not a row."""
    from .results_io import read_jsonl

    return [row for row in read_jsonl(Path(path)) if "key" in row]


# -- aggregation ------------------------------------------------------------------------------------

def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals and len(vals) == len(values) else None


def _median(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def config_label(row: dict) -> str:
    return REFERENCE if row["policy"] == REFERENCE else f"{row['policy']}@{row['budget'] or '-'}"


def summarize(rows: Sequence[dict], set_metrics: dict | None = None) -> list[dict]:
    """One entry per configuration, reference first, then in order of first appearance."""
    from .metric_registry import PER_SET, registered_metrics  # lazily: reports is imported by light commands

    set_metrics = set_metrics or {}
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["config_id"], []).append(row)
    ref_rows = [r for r in rows if r["policy"] == REFERENCE]
    ref_latency = _median([r["seconds_per_image"] for r in ref_rows])
    out = []
    for config_id, group in sorted(groups.items(), key=lambda kv: kv[1][0]["policy"] != REFERENCE):
        first = group[0]
        latency = _median([r["seconds_per_image"] for r in group])
        device_peaks = [r.get("device_peak_bytes") for r in group]
        out.append({
            "config_id": config_id, "label": config_label(first), "policy": first["policy"],
            "budget": first["budget"], "budget_tokens": first["budget_tokens"], "images": len(group),
            "kv_mib_last_read": _mean([r["kv_bytes_last_read"] / MIB for r in group]),
            "kv_mib_final": _mean([r["kv_bytes_final"] / MIB for r in group]),
            "kv_mib_peak": _mean([r["peak_kv_bytes"] / MIB for r in group]),
            "device_peak_mib": None if any(p is None for p in device_peaks) else max(device_peaks) / MIB,
            # every registered metric under its name: per-image ones aggregated over the rows, set ones
            # (FID) from set_metrics; None for the reference, which is what they compare against
            **{m.name: None if first["policy"] == REFERENCE else
               (set_metrics.get(config_id, {}).get(m.name) if m.per == PER_SET else m.summarize_rows(group))
               for m in registered_metrics()},
            "seconds_per_image": latency,
            "speedup": (ref_latency / latency) if ref_latency and latency else None,
        })
    return out


def _fmt(value, spec: str, none: str = "–") -> str:
    if value is None:
        return none
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


HEAD_COLUMNS = ("policy", "budget", "tokens/layer", "KV MiB (last read)", "KV MiB peak")
TAIL_COLUMNS = ("s/image", "speed-up")


def summary_columns() -> tuple[str, ...]:
    """The table's header: the configuration and its memory, one column per registered metric (in
    registration order: FID, LPIPS, PSNR, SSIM, token agreement, then any added), then latency."""
    from .metric_registry import registered_metrics

    return HEAD_COLUMNS + tuple(m.column for m in registered_metrics()) + TAIL_COLUMNS


def summary_table(summary: Sequence[dict]) -> str:
    """Markdown table like ScaleKV's Table 1 (per image; KV bytes count both CFG rows)."""
    from .metric_registry import registered_metrics

    metrics = registered_metrics()
    columns = summary_columns()
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for s in summary:
        cells = [
            "full (reference)" if s["policy"] == REFERENCE else s["policy"], s["budget"] or "–",
            _fmt(s["budget_tokens"], "d"), _fmt(s["kv_mib_last_read"], ".3f"), _fmt(s["kv_mib_peak"], ".3f"),
            *[m.format_value(s.get(m.name)) for m in metrics],
            _fmt(s["seconds_per_image"], ".3f"), _fmt(s["speedup"], ".2f") + "×",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(path: Path, summary: Sequence[dict], *, settings: dict, notes: Sequence[str] = (),
                  metrics: Sequence[str] = ()) -> None:
    """``metrics``: one line per metric naming its implementation, mode and versions (and warnings)."""
    conds = settings.get("conditions", [])
    text = [
        f"# kvpolicy compare: {settings['model']}",
        "",
        f"{len(conds)} condition(s) x {len(settings.get('seeds', []))} seed(s), device {settings['device']}, "
        f"dtype {settings['dtype']}, batch size {settings['batch_size']}, {settings['repeats']} timed repeat(s) "
        f"after {settings['warmup']} warm-up call(s) per configuration"
        + (f", {settings['threads']} CPU thread(s)" if settings.get("threads") else "") + "."
        + (f" Command: `{settings['command']}`" if settings.get("command") else ""),
        "Fidelity is measured against the full-cache image of the same condition and seed (the protocol of arXiv 2505.19602 §6.1). "
        "KV MiB are counted bytes per image (both CFG rows, all layers): the cache the last scale reads and the "
        "peak including one layer's uncompressed current map. Latency is the median seconds per image; "
        "speed-up is the reference's median latency divided by the configuration's, measured in this run.",
        "",
        summary_table(summary),
        "",
    ]
    if metrics:
        text += ["Metrics:", ""] + [f"- {m}" for m in metrics] + [""]
    if notes:
        text += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    text += ["Plots: `fidelity_vs_budget.png`, `kv_bytes_per_scale.png`, `latency_per_scale.png`; "
             "images side by side: `contact_sheet.png`; every row: `results.jsonl`.", ""]
    Path(path).write_text("\n".join(text), encoding="utf-8")


# -- plots ------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_fidelity_vs_budget(path: Path, summary: Sequence[dict]) -> None:
    """Every plotted per-image metric that was measured (PSNR, SSIM, LPIPS, ...) against tokens per
    layer, one line per policy."""
    plt = _pyplot()
    from .metric_registry import PER_IMAGE, registered_metrics

    # registered per-image metrics drawn (plot=True) that have a value somewhere
    metrics = [(m.name, m.column) for m in registered_metrics(PER_IMAGE)
               if m.plot and any(s.get(m.name) is not None for s in summary)] or [("psnr", "PSNR↑")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    policies = [s for s in summary if s["policy"] != REFERENCE]
    for ax, (key, title) in zip(axes[0], metrics):
        for name in dict.fromkeys(s["policy"] for s in policies):
            pts = sorted((s["budget_tokens"], s[key]) for s in policies if s["policy"] == name
                         and s["budget_tokens"] is not None and s[key] is not None and math.isfinite(s[key]))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("budget (tokens per layer)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _per_scale_means(rows: Sequence[dict], field: str) -> list[float]:
    columns = list(zip(*[r[field] for r in rows]))
    return [sum(c) / len(c) for c in columns]


def plot_per_scale(path: Path, rows: Sequence[dict], *, field: str, ylabel: str, scale_by: float = 1.0,
                   logy: bool = False, full_field: Optional[str] = None) -> None:
    """Mean per-scale curve of ``field`` for every configuration."""
    plt = _pyplot()
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["config_id"], []).append(row)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    # colour = policy, line style = budget, so every configuration stays distinguishable
    policies = list(dict.fromkeys(g[0]["policy"] for g in groups.values() if g[0]["policy"] != REFERENCE))
    budgets = list(dict.fromkeys(g[0]["budget"] for g in groups.values() if g[0]["policy"] != REFERENCE))
    cmap = plt.get_cmap("tab10" if len(policies) <= 10 else "tab20")
    dashes = ["-", "--", ":", "-."]
    for config_id, group in sorted(groups.items(), key=lambda kv: kv[1][0]["policy"] != REFERENCE):
        values = [v / scale_by for v in _per_scale_means(group, field)]
        first = group[0]
        if first["policy"] == REFERENCE:
            style = dict(color="black", linewidth=2.2)
        else:
            style = dict(color=cmap(policies.index(first["policy"]) % cmap.N),
                         linestyle=dashes[budgets.index(first["budget"]) % len(dashes)])
        ax.plot(range(len(values)), values, marker=".", label=config_label(first), **style)
    ax.set_xlabel("scale")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- contact sheet ----------------------------------------------------------------------------------

THUMB = 128
LABEL_H = 16
PAD = 4


def contact_sheet(path: Path, grid: Sequence[Sequence[Optional[Path]]], column_labels: Sequence[str],
                  thumb: int = THUMB) -> tuple[int, int]:
    """Images side by side: one row per condition, one column per configuration (reference first).

    Size: width = cols * (thumb + PAD) + PAD, height = LABEL_H + rows * (thumb + PAD) + PAD.
    A missing image leaves a grey cell. Returns (width, height)."""
    from PIL import Image, ImageDraw

    rows, cols = len(grid), len(column_labels)
    width, height = cols * (thumb + PAD) + PAD, LABEL_H + rows * (thumb + PAD) + PAD
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(column_labels):
        x = PAD + c * (thumb + PAD)
        draw.text((x, 2), label[: thumb // 6], fill="black")
    for r, row in enumerate(grid):
        for c, image_path in enumerate(row):
            x, y = PAD + c * (thumb + PAD), LABEL_H + PAD + r * (thumb + PAD)
            if image_path is not None and Path(image_path).is_file():
                with Image.open(image_path) as im:
                    sheet.paste(im.convert("RGB").resize((thumb, thumb), Image.BICUBIC), (x, y))
            else:
                draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=(200, 200, 200))
    sheet.save(path)
    return width, height
