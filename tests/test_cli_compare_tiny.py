"""The kvpolicy command on the real embedded models (infinity-tiny-random, var-tiny-random), CPU, small runs:
compare end to end with resume and reproducibility, calibrate -> compare/generate with the
calibration, generate, and bench-gpu's CPU dry run and its refusal without CUDA."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from adapters import geometry, load_model
from benchmarks import reports
from benchmarks.cli import main
from in_process_compare import compare_counting


@pytest.fixture(scope="module")
def infinity_tiny():
    return load_model("infinity-tiny-random")


def _compare(tmp_path, model, out="run", *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube on a table\na lighthouse at sunset\n")
    return compare_counting(["--model", "infinity-tiny-random", "--prompts", str(prompts), "--policies",
                             "streamingllm,snapkv", "--budgets", "20%,40%", "--out", str(tmp_path / out),
                             "--no-progress", "--no-learned-metrics", *extra], model)


def test_infinity_tiny_compare_end_to_end_resume_and_reproducibility(tmp_path, infinity_tiny):
    result, counting = _compare(tmp_path, infinity_tiny)
    out = tmp_path / "run"
    assert counting.calls == 1 + 2 * 5  # warm-up + 2 prompts x (reference + 2 policies x 2 budgets)
    rows = reports.read_rows(out / "results.jsonl")
    assert len(rows) == 10
    schedule = geometry.get_geometry("infinity-tiny-random").schedule
    by = {(r["prompt"], r["policy"], r["budget"]): r for r in rows}
    for (prompt, policy, budget), r in by.items():
        assert Image.open(out / r["image"]).size == (256, 256)
        assert len(r["kv_bytes_per_scale"]) == schedule.num_scales
        if policy == "reference":
            continue
        ref = by[(prompt, "reference", None)]
        tokens = round({"20%": 0.2, "40%": 0.4}[budget] * schedule.reference_length)
        assert r["budget_tokens"] == tokens
        assert r["kept_lengths_last_read"] == [tokens] * len(r["kept_lengths_last_read"])
        # compact cache: bytes scale exactly with kept tokens
        assert r["kv_bytes_last_read"] * schedule.reference_length == ref["kv_bytes_last_read"] * tokens
        assert r["full_kv_bytes_per_scale"] == ref["kv_bytes_per_scale"]
        assert 5 < r["psnr"] < 60 and 0 < r["ssim"] < 1
        agreement = r["token_agreement_per_scale"]
        uncompressed = [s for s, n in enumerate(schedule.cumulative) if n <= tokens]
        assert all(agreement[s] == 1.0 for s in uncompressed)  # identical until the first eviction
        assert min(agreement) < 1.0
    summary = {s["label"]: s for s in result["summary"]}
    for policy in ("streamingllm", "snapkv"):  # a larger budget is closer to the full cache
        assert summary[f"{policy}@40%"]["psnr"] > summary[f"{policy}@20%"]["psnr"]
    text = (out / "summary.md").read_text()
    assert text.count("| streamingllm |") == 2 and text.count("| snapkv |") == 2
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size == reports.SheetLayout(rows=2, cols=5).size

    # interruption: lose the last 4 rows; the rerun generates exactly those
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:-4]) + "\n")
    result2, counting2 = _compare(tmp_path, infinity_tiny)
    assert counting2.calls == 1 + 4
    fid = lambda res: sorted((s["label"], s["psnr"], s["ssim"], s["token_agreement"]) for s in res["summary"])
    assert fid(result2) == fid(result)
    # the same command into a fresh folder gives the same fidelity numbers
    result3, _ = _compare(tmp_path, infinity_tiny, "again")
    assert fid(result3) == fid(result)


def test_var_tiny_calibrate_then_compare_and_generate_with_scalekv(tmp_path, capsys):
    calib = tmp_path / "calib.json"
    code = main(["calibrate", "--model", "var-tiny-random", "--labels", "1,2", "--out", str(calib), "--budget", "30%",
                 "--policy", "scalekv", "--num-drafters", "3"])
    out = capsys.readouterr().out
    assert code == 0 and "3 in all" in out
    data = json.loads(calib.read_text())
    assert data["kind"] == "scalekv-calibration" and data["num_layers"] == geometry.get_geometry("var-tiny-random").num_layers
    code = main(["compare", "--model", "var-tiny-random", "--labels", "5", "--policies", "scalekv", "--budgets", "30%",
                 "--calibration", str(calib), "--out", str(tmp_path / "cmp"), "--no-progress"])
    assert code == 0
    rows = reports.read_rows(tmp_path / "cmp" / "results.jsonl")
    scalekv = next(r for r in rows if r["policy"] == "scalekv")
    assert scalekv["label"] == 5 and scalekv["policy_config"]["calibration"]["current_ratio"] == data["current_ratio"]
    capsys.readouterr()
    code = main(["generate", "--model", "var-tiny-random", "--policy", "scalekv", "--budget", "30%", "--calibration",
                 str(calib), "--label", "3", "--out", str(tmp_path / "img.png")])
    out = capsys.readouterr().out
    assert code == 0 and Image.open(tmp_path / "img.png").size[0] == 256
    assert "peak (incl. one layer's current map" in out and "scalekv" in out


def test_compare_calibrates_amskv_on_infinity_tiny_first(tmp_path, capsys):
    """AMS-KV's layer split comes from a calibration: compare makes one (as for ScaleKV), hands it
    to amskv and says so in the summary's notes."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube on a table\n")
    out = tmp_path / "run"
    code = main(["compare", "--model", "infinity-tiny-random", "--prompts", str(prompts), "--policies", "amskv",
                 "--budgets", "20%", "--out", str(out), "--no-progress", "--no-learned-metrics"])
    assert code == 0, capsys.readouterr().err
    assert "- amskv: the plan comes from calibrating this model" in (out / "summary.md").read_text()
    amskv = next(r for r in reports.read_rows(out / "results.jsonl") if r["policy"] == "amskv")
    assert amskv["policy_config"]["calibration"] == str((out / "calibration.json").absolute())
    assert "amskv/key_similarity" in json.loads((out / "calibration.json").read_text())["means"]


def test_generate_infinity_tiny_writes_images_and_prints_the_report(tmp_path, capsys):
    code = main(["generate", "--model", "infinity-tiny-random", "--policy", "sliding_window", "--budget", "10%", "--prompt",
                 "a red cube", "--prompt", "a blue ball", "--out", str(tmp_path / "x.png")])
    out = capsys.readouterr().out
    assert code == 0
    for i in (0, 1):
        assert Image.open(tmp_path / f"x_{i}.png").size == (256, 256)
    last = [l for l in out.splitlines() if l.strip().startswith("6 ")][0].split()
    assert last[1] == "16x16" and float(last[3]) == 27.0  # 10% of 265 tokens


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "infinity-tiny-random", "--label", "3"], "use --prompt"),
    (["generate", "--model", "var-tiny-random", "--prompt", "x"], "use --label"),
    (["generate", "--model", "infinity-tiny-random", "--prompt", "x", "--out", "/nonexistent/dir/x.png"], "does not exist"),
    (["generate", "--model", "infinity-tiny-random", "--prompt", "x", "--budget", "10%"], "--budget needs --policy"),
    (["compare", "--model", "var-tiny-random", "--prompts", "p.txt"], "class-conditional model: use --labels"),
    (["compare", "--model", "var-tiny-random", "--labels", "1,2,1", "--out", "z"], "--labels repeat 1: every condition"),
    (["compare", "--model", "var-tiny-random", "--labels", "0-3,2", "--out", "z"], "--labels repeat 2"),
    (["compare", "--prompts", "/", "--out", "z"], "is a folder"),
    (["compare", "--model", "var-tiny-random", "--labels", "1000"], "out of range"),
    (["calibrate", "--model", "infinity-tiny-random", "--labels", "1", "--out", "c.json"], "use --prompts, not --labels"),
    (["calibrate", "--model", "var-tiny-random", "--out", "c.json", "--num-drafters", "2"], "needs --budget"),
    (["calibrate", "--model", "var-tiny-random", "--out", "c.json", "--budget", "30%", "--num-drafters", "2"],
     "takes no calibration option(s) ['num_drafters']; choose the policies it is for with --policy NAME"),
])
def test_model_command_errors(tmp_path, capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err


def test_bench_gpu_refuses_without_cuda_and_dry_runs_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["bench-gpu", "--out", str(tmp_path)])
    assert code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
    code = main(["bench-gpu", "--dry-run", "--models", "var-tiny-random", "--policies", "snapkv,scalekv", "--batches", "1",
                 "--max-batch", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(next(tmp_path.glob("bench_gpu_dryrun_*.json")).read_text())
    assert [(r["policy"], r["batch"]) for r in data["rows"]] == [("full", 1), ("snapkv", 1), ("scalekv", 1)]
    full = data["rows"][0]
    for r in data["rows"]:
        assert r["kv_ratio"] == pytest.approx(r["kv_peak_bytes"] / full["kv_peak_bytes"])
        assert r["speedup"] == pytest.approx(full["seconds_per_image"] / r["seconds_per_image"])
    assert data["rows"][1]["kv_ratio"] < 1
    assert [(m["policy"], m["largest_batch"], m["out_of_memory_above"]) for m in data["largest_batches"]] == \
        [("full", 2, False), ("scalekv", 2, False)]
    assert "| var-tiny-random | scalekv | ≥ 2 (cap) |" in out
    assert next(tmp_path.glob("bench_gpu_dryrun_*.md")).read_text().count("| var-tiny-random |") == 5


def test_compare_refuses_a_window_above_the_budget_up_front_and_says_how_to_set_it(tmp_path, capsys):
    """infinity-tiny's 10 % is 27 tokens, below SnapKV's default 32-token window: refused before
    any model work (windows are never clipped), naming the option that fits and its flag."""
    out = tmp_path / "run"
    code = main(["compare", "--policies", "scalekv,adakv,head_aware,heatkv,amskv,snapkv", "--budgets", "10%,20%",
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "adakv: capacity 27" in err and "window_size <= 27" in err and "--option adakv.window_size=VALUE" in err
    assert not out.exists() or not any(out.iterdir())
