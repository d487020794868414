"""results.jsonl handling, aggregation into the summary table, plots and the contact sheet."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from benchmarks import reports


def _row(key, config_id, policy, budget, seconds, psnr=None, ssim=None, identical=None, lpips=None, tokens=None,
         kv=1000, scale_seconds=(0.1, 0.2)):
    return {"key": key, "config_id": config_id, "policy": policy, "budget": budget, "budget_tokens": tokens,
            "kv_bytes_last_read": kv, "kv_bytes_final": kv * 2, "peak_kv_bytes": kv * 3, "device_peak_bytes": None,
            "kv_bytes_per_scale": [kv // 2, kv], "scale_seconds_per_image": list(scale_seconds),
            "seconds_per_image": seconds, "psnr": psnr, "ssim": ssim, "lpips": lpips,
            "identical_to_reference": identical, "token_agreement_mean": None if policy == "reference" else 0.9}


ROWS = [
    _row("a", "R", "reference", None, 2.0, kv=2 ** 20),
    _row("b", "R", "reference", None, 4.0, kv=2 ** 20),
    _row("c", "S", "snapkv", "10%", 1.0, psnr=20.0, ssim=0.5, identical=False, tokens=65, kv=2 ** 19),
    _row("d", "S", "snapkv", "10%", 3.0, psnr=30.0, ssim=0.7, identical=False, tokens=65, kv=2 ** 19, lpips=0.2),
    _row("e", "F", "full", None, 3.0, psnr=None, ssim=1.0, identical=True, kv=2 ** 20),
]


def test_jsonl_survives_an_interrupted_line(tmp_path):
    path = tmp_path / "results.jsonl"
    reports.append_rows(path, ROWS[:2])
    with open(path, "a") as f:
        f.write('{"key": "half-writ')  # interrupted mid-row
    reports.append_rows(path, ROWS[2:3])
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and lines[2] == '{"key": "half-writ'
    assert [r["key"] for r in reports.read_rows(path)] == ["a", "b", "c"]
    with pytest.raises(ValueError):  # NaN/inf never reach the file
        reports.append_rows(path, [{"key": "x", "psnr": math.inf}])


def test_summary_aggregates_medians_speedups_and_identity():
    summary = {s["config_id"]: s for s in reports.summarize(ROWS, {"S": {"fid": 4.5}})}
    ref, snap, full = summary["R"], summary["S"], summary["F"]
    assert ref["seconds_per_image"] == 3.0 and ref["speedup"] == 1.0 and ref["psnr"] is None
    assert snap["seconds_per_image"] == 2.0 and snap["speedup"] == 1.5
    assert snap["psnr"] == 25.0 and snap["ssim"] == pytest.approx(0.6) and snap["fid"] == 4.5
    assert snap["lpips"] is None  # one image lacks LPIPS: no partial mean
    assert snap["kv_mib_last_read"] == 0.5 and snap["kv_mib_peak"] == 1.5 and snap["images"] == 2
    assert full["psnr"] == math.inf and full["ssim"] == 1.0
    table = reports.summary_table(list(summary.values())).splitlines()
    assert table[0].startswith("| policy | budget | tokens/layer | KV MiB (last read)")
    assert table[2].startswith("| full (reference) | – | – | 1.000 | 3.000 | – |")
    assert "| snapkv | 10% | 65 | 0.500 | 1.500 | 4.50 | – | 25.00 | 0.6000 | 0.9000 | 2.000 | 1.50× |" in table
    assert "| full | – | – | 1.000 | 3.000 | – | – | inf | 1.0000 |" in "\n".join(table)


def test_plots_are_decodable_pngs(tmp_path):
    summary = reports.summarize(ROWS)
    names = reports.write_plots(tmp_path, summary)
    assert names == ["fidelity_vs_budget.png", "memory_vs_budget.png", "latency_vs_budget.png"]
    for name in names:
        with Image.open(tmp_path / name) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] >= 500


def test_against_budget_plots_one_line_per_policy_and_the_reference(tmp_path, monkeypatch):
    rows = ROWS[:4] + [_row("f", "T", "snapkv", "20%", 1.0, psnr=35.0, ssim=0.8, identical=False, tokens=130, kv=2 ** 20)]
    summary = reports.summarize(rows)
    plt = reports._pyplot()
    drawn = {}
    monkeypatch.setattr(plt, "close", lambda fig: drawn.setdefault("fig", fig))
    reports.plot_against_budget(tmp_path / "m.png", summary, key="kv_mib_last_read", ylabel="MiB", title="t", logy=True)
    ax = drawn["fig"].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"snapkv", "full cache"}
    assert list(lines["snapkv"].get_xdata()) == [65, 130] and list(lines["snapkv"].get_ydata()) == [0.5, 1.0]
    assert list(lines["full cache"].get_ydata()) == [1.0, 1.0]  # the reference as a horizontal line
    assert ax.get_yscale() == "log"


def _sheet(path):
    return np.array(Image.open(path).convert("RGB")).astype(int)


def test_contact_sheet_layout_and_missing_cells(tmp_path):
    red = tmp_path / "red.png"
    Image.fromarray(np.full((40, 40, 3), (255, 0, 0), dtype=np.uint8)).save(red)
    layout = reports.contact_sheet(tmp_path / "sheet.png", [[red, None], [None, red]], ["full", "snapkv 10%"], thumb=32)
    sheet = _sheet(tmp_path / "sheet.png")
    band = 2 * 32 + 2 * reports.PAD
    assert layout.size == (reports.ROW_LABEL_W + 2 * (32 + reports.PAD) + reports.PAD,
                           reports.LABEL_H + 2 * band + reports.PAD)
    assert sheet.shape == (layout.size[1], layout.size[0], 3)
    cell = lambda r, c: tuple(sheet[layout.image_at(r, c)[1] + 16, layout.image_at(r, c)[0] + 16])
    assert cell(0, 0) == (255, 0, 0) and cell(1, 1) == (255, 0, 0)
    assert cell(0, 1) == (200, 200, 200) and cell(1, 0) == (200, 200, 200)
    # row 1's image has no reference beside it: no difference map, the cell under it stays white
    x, y = layout.difference_at(1, 1)
    assert (sheet[y:y + 32, x:x + 32] == 255).all()


def test_contact_sheet_has_one_label_per_row(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(grey)
    grid = [[grey, grey]] * 3
    labels = ["0: a red cube on a wooden table, studio light", "", "2: class 207"]
    layout = reports.contact_sheet(tmp_path / "sheet.png", grid, ["full", "snapkv 10%"], thumb=48, row_labels=labels)
    sheet = _sheet(tmp_path / "sheet.png")
    ink = []
    for r in range(3):
        left, top, right, bottom = layout.row_label_box(r)
        margin = sheet[top:bottom, left:right]
        ink.append(int((margin.max(axis=2) < 128).sum()))  # dark text on white
    assert ink[0] > 0 and ink[2] > 0 and ink[1] == 0  # each row's own label, in its own margin
    assert ink[0] > ink[2]  # the long prompt wraps onto more lines
    with pytest.raises(ValueError, match="2 row labels for 3 rows"):
        reports.contact_sheet(tmp_path / "bad.png", grid, ["full", "snapkv 10%"], row_labels=labels[:2])


def test_contact_sheet_shows_an_amplified_difference_under_each_image(tmp_path):
    ref = np.full((40, 40, 3), 100, dtype=np.uint8)
    changed = ref.copy()
    changed[:, 20:] += 10  # right half differs by 10 levels: 40 after the x4 gain
    paths = []
    for name, array in (("ref", ref), ("same", ref), ("changed", changed)):
        Image.fromarray(array).save(tmp_path / f"{name}.png")
        paths.append(tmp_path / f"{name}.png")
    layout = reports.contact_sheet(tmp_path / "sheet.png", [paths], ["full", "a", "b"], thumb=40, row_labels=["0: p"])
    sheet = _sheet(tmp_path / "sheet.png")
    region = lambda c, dx0, dx1: sheet[layout.difference_at(0, c)[1] + 5:layout.difference_at(0, c)[1] + 35,
                                       layout.difference_at(0, c)[0] + dx0:layout.difference_at(0, c)[0] + dx1]
    assert reports.DIFF_GAIN == 4
    assert (region(1, 5, 35) == 0).all()  # identical: black
    assert (region(2, 25, 35) == 40).all() and (region(2, 5, 15) == 0).all()
    assert (region(0, 5, 35) == 255).all()  # nothing under the reference itself


def test_difference_map_keeps_a_thin_difference_visible_in_a_thumbnail():
    ref = np.zeros((256, 256, 3), dtype=np.uint8)
    changed = ref.copy()
    changed[:, 100] = 30  # one column of pixels, 30 levels off
    diff = np.array(reports.difference_map(Image.fromarray(changed), Image.fromarray(ref), size=32))
    assert diff.shape == (32, 32)
    assert diff.max() == 30 * reports.DIFF_GAIN  # averaging over 8x8 blocks would leave 15
    assert (diff[:, 100 // 8] == 120).all() and diff[:, :10].max() == 0


def test_wrap_label_cuts_long_labels_with_an_ellipsis():
    assert reports.wrap_label("a b", 10, 3) == ["a b"]
    lines = reports.wrap_label("word " * 40, 12, 3)
    assert len(lines) == 3 and lines[-1].endswith("…") and all(len(line) <= 12 for line in lines)


def test_summary_md_defines_every_column(tmp_path):
    from benchmarks.metric_registry import PER_IMAGE, Metric, register_metric, unregister_metric

    register_metric(Metric(name="sharpness", per=PER_IMAGE, column="sharp↑", compute=lambda b, c: [None] * len(b.images)))
    try:
        path = tmp_path / "summary.md"
        settings = {"model": "m", "conditions": ["a"], "seeds": [0], "device": "cpu", "dtype": "fp32",
                    "batch_size": 1, "repeats": 1, "warmup": 0}
        reports.write_summary(path, reports.summarize(ROWS), settings=settings)
        text = path.read_text()
    finally:
        unregister_metric("sharpness")
    header = next(line for line in text.splitlines() if line.startswith("| policy"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert "token agr.↑" in columns and "sharp↑" in columns
    defined = [line for line in text.splitlines() if line.startswith("- **")]
    assert [line.split("**")[1] for line in defined] == columns  # every column, in the table's order
    assert "- **token agr.↑**: token agreement: the fraction of sampled tokens" in text
    assert "- **sharp↑**: the registered metric 'sharpness' against the full-cache image, mean over images" in text
    assert "`memory_vs_budget.png`" in text and "`latency_vs_budget.png`" in text
