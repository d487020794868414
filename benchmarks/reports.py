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

import attrs

MIB = 2 ** 20
REFERENCE = "reference"
FIDELITY_PLOT, MEMORY_PLOT, LATENCY_PLOT = "fidelity_vs_budget.png", "memory_vs_budget.png", "latency_vs_budget.png"


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


# What the columns that are not metrics mean; metric columns are defined by their registration
# (``Metric.definition``), so every column of summary.md is defined under the table.
COLUMN_DEFINITIONS = {
    "policy": "the cache policy; 'full (reference)' keeps every token and is what every other row is compared with",
    "budget": "the budget as given on the command line (a percentage of N_ref, or a token count)",
    "tokens/layer": "the budget in cached tokens per layer, on average over layers (a percentage is of N_ref, the "
                    "longest cache the last scale reads: every token but the last scale's)",
    "KV MiB (last read)": "counted key and value bytes per image (both CFG rows, all layers) held after the "
                          "second-to-last scale: the cache the last scale reads (the memory of Table 1 of arXiv 2505.19602)",
    "KV MiB peak": "the largest counted key and value bytes per image at any moment, including one layer's "
                   "current token map before it is compressed",
    "s/image": "median wall seconds per image of the whole generate call (text encoder, transformer and VAE "
               "decode) over the timed repeats",
    "speed-up": "the reference's s/image divided by this configuration's, both measured in this run",
}


def column_definitions() -> list[str]:
    """One Markdown line per column of the summary table, in the table's order."""
    from .metric_registry import registered_metrics

    definitions = dict(COLUMN_DEFINITIONS)
    definitions.update({m.column: m.column_definition() for m in registered_metrics()})
    return [f"- **{c}**: {definitions[c]}" for c in summary_columns()]


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
        "Columns:",
        "",
        *column_definitions(),
        "",
    ]
    if metrics:
        text += ["Metrics:", ""] + [f"- {m}" for m in metrics] + [""]
    if notes:
        text += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    text += [f"Plots: `{FIDELITY_PLOT}` (fidelity against budget, one line per policy, the form of Fig. 7a "
             f"of arXiv 2505.19602), `{MEMORY_PLOT}` (KV MiB the last scale reads against budget), `{LATENCY_PLOT}` (s/image "
             f"against budget); images side by side, each condition a row, with the difference to the full-cache "
             f"image (x {DIFF_GAIN}) under each: `contact_sheet.png`; every row: `results.jsonl`.", ""]
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


def plot_against_budget(path: Path, summary: Sequence[dict], *, key: str, ylabel: str, title: str,
                        logy: bool = False) -> None:
    """``key`` of every configuration against its budget in tokens per layer, one line per policy,
    the full-cache reference as a dashed horizontal line. At one budget every configuration of a
    policy family holds about the same bytes, so per-scale curves of every configuration coincide;
    against the budget, what differs between policies is what shows."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    reference = next((s for s in summary if s["policy"] == REFERENCE), None)
    policies = [s for s in summary if s["policy"] != REFERENCE]
    markers = "osD^v<>ph*"
    for k, name in enumerate(dict.fromkeys(s["policy"] for s in policies)):
        pts = sorted((s["budget_tokens"], s[key]) for s in policies if s["policy"] == name
                     and s["budget_tokens"] is not None and s.get(key) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[k % len(markers)], label=name)
    if reference is not None and reference.get(key) is not None:
        ax.axhline(reference[key], color="black", linestyle="--", linewidth=1.2, label="full cache")
    ax.set_xlabel("budget (tokens per layer)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(out: Path, summary: Sequence[dict]) -> list[str]:
    """Fidelity, memory and latency against budget; returns the file names written."""
    plot_fidelity_vs_budget(Path(out) / FIDELITY_PLOT, summary)
    plot_against_budget(Path(out) / MEMORY_PLOT, summary, key="kv_mib_last_read", logy=True,
                        ylabel="KV MiB per image the last scale reads (log)", title="memory against budget")
    plot_against_budget(Path(out) / LATENCY_PLOT, summary, key="seconds_per_image", title="latency against budget",
                        ylabel="seconds per image (median, whole generate call)")
    return [FIDELITY_PLOT, MEMORY_PLOT, LATENCY_PLOT]


# -- contact sheet ----------------------------------------------------------------------------------

THUMB = 128
LABEL_H = 16
PAD = 4
ROW_LABEL_W = 160  # left margin holding each row's condition (prompt or class label)
DIFF_GAIN = 4  # |image - reference| x 4: differences of a few levels become visible at thumbnail size
CHAR_W, LINE_H = 6, 12  # Pillow's default font, for wrapping the row labels


@attrs.frozen
class SheetLayout:
    """Where everything sits on a contact sheet (pixels, top-left corners).

    One band per condition: its label in the left margin, the images in a row (reference first),
    and under every other image its difference map to the reference. Width = ROW_LABEL_W + cols *
    (thumb + PAD) + PAD; height = LABEL_H + rows * (2 * thumb + 2 * PAD) + PAD."""

    rows: int
    cols: int
    thumb: int = THUMB

    @property
    def band(self) -> int:
        return 2 * self.thumb + 2 * PAD

    @property
    def size(self) -> tuple[int, int]:
        return ROW_LABEL_W + self.cols * (self.thumb + PAD) + PAD, LABEL_H + self.rows * self.band + PAD

    def column_x(self, col: int) -> int:
        return ROW_LABEL_W + PAD + col * (self.thumb + PAD)

    def image_at(self, row: int, col: int) -> tuple[int, int]:
        return self.column_x(col), LABEL_H + PAD + row * self.band

    def difference_at(self, row: int, col: int) -> tuple[int, int]:
        x, y = self.image_at(row, col)
        return x, y + self.thumb + PAD

    def row_label_box(self, row: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the margin beside the row's images."""
        y = LABEL_H + PAD + row * self.band
        return PAD, y, ROW_LABEL_W - PAD, y + self.thumb


def difference_map(image, reference, size: Optional[int] = None):
    """|image - reference| per pixel (max over RGB) x DIFF_GAIN, clipped to 255, as a greyscale PIL
    image: black where identical. The reference is resized to the image's size if they differ.
    With ``size``, the map is shrunk to size x size by a max filter then nearest sampling, so a
    difference one pixel wide stays visible in a thumbnail (averaging would fade it)."""
    import numpy as np
    from PIL import Image, ImageFilter

    a = np.asarray(image.convert("RGB"), dtype=np.int16)
    b = np.asarray(reference.convert("RGB").resize(image.size, Image.BICUBIC), dtype=np.int16)
    diff = Image.fromarray(np.clip(np.abs(a - b).max(axis=2) * DIFF_GAIN, 0, 255).astype(np.uint8), mode="L")
    if size is not None:
        factor = max(diff.size) // size
        if factor > 1:
            diff = diff.filter(ImageFilter.MaxFilter(2 * (factor // 2) + 1))
        diff = diff.resize((size, size), Image.NEAREST)
    return diff


def wrap_label(text: str, width: int, max_lines: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters; past ``max_lines`` the last line ends in '…'."""
    import textwrap

    lines = textwrap.wrap(str(text), width=width, break_long_words=True) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 1] + "…"
    return lines


def contact_sheet(path: Path, grid: Sequence[Sequence[Optional[Path]]], column_labels: Sequence[str],
                  thumb: int = THUMB, row_labels: Optional[Sequence[str]] = None) -> SheetLayout:
    """Images side by side: one band per condition (``row_labels``, drawn in the left margin), one
    column per configuration, the full-cache reference first; under every other image, its
    amplified difference to the reference of the same row (``difference_map``). A missing image
    leaves a grey cell (and no difference map). Returns the layout."""
    from PIL import Image, ImageDraw

    rows, cols = len(grid), len(column_labels)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    layout = SheetLayout(rows=rows, cols=cols, thumb=thumb)
    sheet = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(column_labels):
        draw.text((layout.column_x(c), 2), label[: thumb // CHAR_W], fill="black")
    for r, row in enumerate(grid):
        left, top, right, bottom = layout.row_label_box(r)
        label = row_labels[r] if row_labels is not None else ""
        for k, line in enumerate(wrap_label(label, (right - left) // CHAR_W, (bottom - top) // LINE_H)):
            draw.text((left, top + k * LINE_H), line, fill="black")
        draw.text((left, layout.difference_at(r, 0)[1]), f"|difference to full| x {DIFF_GAIN}", fill=(90, 90, 90))
        reference = None
        for c, image_path in enumerate(row):
            x, y = layout.image_at(r, c)
            if image_path is None or not Path(image_path).is_file():
                draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=(200, 200, 200))
                continue
            with Image.open(image_path) as im:
                image = im.convert("RGB")
            sheet.paste(image.resize((thumb, thumb), Image.BICUBIC), (x, y))
            if c == 0:
                reference = image
            elif reference is not None:
                dx, dy = layout.difference_at(r, c)
                sheet.paste(difference_map(image, reference, size=thumb).convert("RGB"), (dx, dy))
                # a frame in the padding: a map that is all white (differs everywhere) stays visible
                draw.rectangle([dx - 1, dy - 1, dx + thumb, dy + thumb], outline=(160, 160, 160))
    sheet.save(path)
    return layout
