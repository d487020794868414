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
    reports.plot_fidelity_vs_budget(tmp_path / "f.png", summary)
    reports.plot_per_scale(tmp_path / "k.png", ROWS, field="kv_bytes_per_scale", ylabel="MiB", scale_by=2 ** 20, logy=True)
    reports.plot_per_scale(tmp_path / "l.png", ROWS, field="scale_seconds_per_image", ylabel="s")
    for name in ("f.png", "k.png", "l.png"):
        with Image.open(tmp_path / name) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] >= 500


def test_contact_sheet_layout_and_missing_cells(tmp_path):
    red = tmp_path / "red.png"
    Image.fromarray(np.full((40, 40, 3), (255, 0, 0), dtype=np.uint8)).save(red)
    size = reports.contact_sheet(tmp_path / "sheet.png", [[red, None], [None, red]], ["full", "snapkv 10%"], thumb=32)
    sheet = np.array(Image.open(tmp_path / "sheet.png").convert("RGB"))
    assert size == (2 * (32 + reports.PAD) + reports.PAD, reports.LABEL_H + 2 * (32 + reports.PAD) + reports.PAD)
    assert sheet.shape == (size[1], size[0], 3)
    top = reports.LABEL_H + reports.PAD
    cell = lambda r, c: sheet[top + r * (32 + reports.PAD) + 16, reports.PAD + c * (32 + reports.PAD) + 16]
    assert tuple(cell(0, 0)) == (255, 0, 0) and tuple(cell(1, 1)) == (255, 0, 0)
    assert tuple(cell(0, 1)) == (200, 200, 200) and tuple(cell(1, 0)) == (200, 200, 200)
