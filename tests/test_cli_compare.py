"""`kvpolicy compare` end to end: every output file's content, resume, reproducibility, bad arguments.

The harness logic (jobs, resume, reports) is exercised on a small deterministic next-scale model
built here on the shared cached-attention path (fast, and its generate calls are counted); the
same command then runs on the real embedded ``infinity-tiny-random`` in test_cli_compare_tiny.py.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import kvpolicy
from adapters import geometry
from adapters.attention import cached_self_attention
from adapters.base import GenerationOutput, ScaleTimer
from benchmarks import compare as compare_mod
from benchmarks import reports
from benchmarks.cli import build_parser, main
from metric_weight_files import write_inception_file, write_random_lpips_files

FAKE = "infinity-fake-harness"
geometry.register_geometry(FAKE, "infinity", 2, 2, 8, 256)  # Infinity 256^2 schedule: 7 scales up to 16x16


class ToyNextScaleModel:
    """A deterministic toy next-scale generator: per scale, a state map is embedded, attends over
    the cached history of every layer (with the policy compressing the cache), and is classified
    into one of 8 tokens; the last map's tokens become a 32x32 image. Policies change the image."""

    def __init__(self, name=FAKE, width=16, classes=8):
        g = geometry.get_geometry(name)
        self.schedule, self.layers, self.heads, self.head_dim = g.schedule, g.num_layers, g.num_heads, g.head_dim
        gen = torch.Generator().manual_seed(1234)
        inner = self.heads * self.head_dim
        self.w_qkv = [torch.randn(width, 3 * inner, generator=gen) / width ** 0.5 for _ in range(self.layers)]
        self.w_out = torch.randn(inner, classes, generator=gen) / inner ** 0.5
        self.embed = torch.randn(classes, width, generator=gen)
        self.palette = torch.randint(0, 256, (classes, 3), generator=gen, dtype=torch.uint8)
        self.width, self.classes = width, classes
        self.calls = []

    def generate(self, conditions, *, policy=None, budget=None, seed=0, batch_size=None, stats=None, progress=None, **kw):
        from adapters.base import resolve_policy

        self.calls.append((tuple(conditions), None if policy is None else policy.to_config(), seed))
        policy = resolve_policy(policy, budget)
        cache = kvpolicy.KVCache(self.layers, self.schedule, policy)
        timer = ScaleTimer(self.schedule.num_scales)
        rows = len(conditions)
        cond_seed = [sum(map(ord, str(c))) for c in conditions]
        gen = torch.Generator().manual_seed(seed)
        state = torch.stack([torch.randn(self.width, generator=torch.Generator().manual_seed(s)) for s in cond_seed])[:, None, None, :]
        tokens = []
        for scale, (h, w) in enumerate(self.schedule.shapes):
            timer.start(scale)
            x = F.interpolate(state.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False)
            x = x.permute(0, 2, 3, 1).reshape(rows, h * w, self.width) + 0.3 * torch.randn(rows, h * w, self.width, generator=gen)
            for layer in range(self.layers):
                q, k, v = (x @ self.w_qkv[layer]).split(self.heads * self.head_dim, dim=-1)
                q, k, v = (t.reshape(rows, h * w, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
                out = cached_self_attention(cache, layer, scale, 4 * F.normalize(q, dim=-1), F.normalize(k, dim=-1), v,
                                            raw_queries=q, stats=stats)
                x = x + out.transpose(1, 2).reshape(rows, h * w, -1)[..., : self.width]
            logits = out.transpose(1, 2).reshape(rows, h * w, -1) @ self.w_out
            tok = logits.argmax(-1)
            tokens.append(tok)
            state = self.embed[tok].reshape(rows, h, w, self.width)
            timer.stop(scale)
        h, w = self.schedule.shapes[-1]
        img = self.palette[tokens[-1]].reshape(rows, h, w, 3)
        img = img.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
        report = cache.report()
        report.scale_seconds = list(timer.seconds)
        return GenerationOutput(images=img, tokens=tokens, cache_report=report, seconds=0.0,
                                config={"seed": seed, "policy": None if policy is None else policy.to_config()})


def _args(tmp_path, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red cube\n\na blue sphere on grass\n")
    return build_parser().parse_args(["compare", "--model", FAKE, "--prompts", str(prompts), "--policies",
                                      "sliding_window,snapkv", "--budgets", "20%,150", "--out",
                                      str(tmp_path / "run"), "--no-progress", "--no-learned-metrics", *extra])


def _run(args, model=None):
    settings = compare_mod.settings_from_args(args)
    comparison = compare_mod.Comparison(settings, model=model or ToyNextScaleModel(), log=lambda m: None)
    return comparison, comparison.run()


def test_compare_writes_every_file_with_consistent_content(tmp_path, monkeypatch):
    args = _args(tmp_path, "--warmup", "1", "--repeats", "2")
    sheets, draw_sheet = [], reports.contact_sheet

    def recording_sheet(*a, **k):
        sheets.append((a, k, draw_sheet(*a, **k)))
        return sheets[-1][-1]

    monkeypatch.setattr(reports, "contact_sheet", recording_sheet)
    comparison, result = _run(args)
    out = tmp_path / "run"
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    # 2 prompts x (reference + 2 policies x 2 budgets)
    assert len(rows) == 2 * 5 and len({r["key"] for r in rows}) == 10
    # calls: 1 global warm-up, per configuration 1 warm-up, per prompt and configuration 2 timed repeats
    assert comparison.generate_calls == 1 + 5 * 1 + 10 * 2
    refs = {r["prompt"]: r for r in rows if r["policy"] == "reference"}
    assert set(refs) == {"a red cube", "a blue sphere on grass"}
    schedule = geometry.get_geometry(FAKE).schedule
    n_ref = schedule.reference_length
    for r in rows:
        assert r["versions"]["torch"] == torch.__version__ and r["versions"]["kvpolicy"] == kvpolicy.__version__
        import transformers

        assert r["versions"]["transformers"] == transformers.__version__  # builds Infinity's T5 encoder
        assert r["versions"]["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
        assert r["settings"] == {"device": "cpu", "dtype": "fp32", "batch_size": 1, "threads": 1, "repeats": 2, "warmup": 1,
                                 "resolution": None, "aspect_ratio": 1.0}
        assert len(r["seconds_per_call_repeats"]) == 2 and r["seconds_per_image"] > 0
        assert len(r["kv_bytes_per_scale"]) == schedule.num_scales == len(r["scale_seconds_per_image"])
        assert r["kv_bytes_final"] == r["kv_bytes_per_scale"][-1]
        assert r["kv_bytes_last_read"] == r["kv_bytes_per_scale"][-2]
        assert r["device_peak_bytes"] is None  # CPU
        img = Image.open(out / r["image"])
        assert img.size == (32, 32)
        if r["policy"] == "reference":
            assert r["psnr"] is None and r["kv_bytes_per_scale"] == r["full_kv_bytes_per_scale"]
            continue
        ref = refs[r["prompt"]]
        assert r["full_kv_bytes_per_scale"] == ref["kv_bytes_per_scale"]
        tokens = {"20%": round(0.2 * n_ref), "150": 150}[r["budget"]]
        assert r["budget_tokens"] == tokens and r["policy_config"]["name"] == r["policy"]
        # 2 layers x 2 heads x 8 dims x fp32 x K and V, one row: bytes per kept token per layer = 128
        assert r["kv_bytes_last_read"] == tokens * 2 * 128
        assert r["kept_lengths_last_read"] == [tokens, tokens]
        assert r["peak_kv_bytes"] < r["full_peak_kv_bytes"]
        assert -1 <= r["ssim"] <= 1 and r["lpips"] is None
        assert r["identical_to_reference"] in (True, False)
        if not r["identical_to_reference"]:
            assert math.isfinite(r["psnr"])
        per_scale = r["token_agreement_per_scale"]
        assert len(per_scale) == schedule.num_scales and per_scale[:3] == [1.0, 1.0, 1.0]  # nothing evicted early
        assert r["token_agreement_mean"] == pytest.approx(sum(per_scale) / len(per_scale))
        # the recorded PSNR/SSIM are those of the saved PNGs
        from benchmarks.metrics import ssim
        mine = torch.from_numpy(np.array(Image.open(out / r["image"]).convert("RGB")))
        theirs = torch.from_numpy(np.array(Image.open(out / ref["image"]).convert("RGB")))
        assert ssim(mine, theirs)[0] == pytest.approx(r["ssim"], abs=1e-12)

    summary_md = (out / "summary.md").read_text()
    table = [l for l in summary_md.splitlines() if l.startswith("| ") and "policy" not in l]
    assert len(table) == 5 and table[0].startswith("| full (reference) |")
    by_label = {s["label"]: s for s in result["summary"]}
    for policy in ("sliding_window", "snapkv"):
        for budget in ("20%", "150"):
            s = by_label[f"{policy}@{budget}"]
            group = [r for r in rows if r["policy"] == policy and r["budget"] == budget]
            assert s["images"] == 2
            assert s["ssim"] == pytest.approx(sum(r["ssim"] for r in group) / 2)
            line = next(l for l in table if l.startswith(f"| {policy} | {budget} |"))
            assert f"{s['ssim']:.4f}" in line and f"{s['kv_mib_last_read']:.3f}" in line
            assert s["fid"] is None and "–" in line
    assert "disabled" in summary_md  # the reason LPIPS/FID are absent is written down
    for plot in ("fidelity_vs_budget.png", "memory_vs_budget.png", "latency_vs_budget.png"):
        with Image.open(out / plot) as im:
            im.load()
            assert im.size[0] > 300 and im.size[1] > 200
    with Image.open(out / "contact_sheet.png") as sheet:
        # 2 rows (prompts) x 5 columns (reference + 4 configurations), 128 px thumbnails
        assert sheet.size == reports.SheetLayout(rows=2, cols=5).size
        pixels = np.array(sheet.convert("RGB")).astype(int)
    (_, grid, _), kwargs, layout = sheets[-1]
    assert kwargs["row_labels"] == ["0: a red cube", "1: a blue sphere on grass"]  # the prompts label the rows
    for r, row in enumerate(grid):
        reference = np.array(Image.open(row[0]).convert("RGB")).astype(int)
        for c, path in enumerate(row[1:], start=1):
            x, y = layout.difference_at(r, c)
            shown = pixels[y:y + reports.THUMB, x:x + reports.THUMB]
            same = np.array_equal(np.array(Image.open(path).convert("RGB")).astype(int), reference)
            assert (shown.max() == 0) == same  # black exactly where the image equals the full-cache one
    assert any(not r["identical_to_reference"] for r in rows if r["policy"] != "reference")
    set_metrics = json.loads((out / "set_metrics.json").read_text())
    assert len(set_metrics) == 4 and all(v["fid"] is None and v["images"] == 2 for v in set_metrics.values())


def test_resume_recomputes_only_missing_rows_and_fidelity_is_reproducible(tmp_path):
    args = _args(tmp_path, "--warmup", "0")
    first, result = _run(args)
    out = tmp_path / "run"
    lines = (out / "results.jsonl").read_text().splitlines()
    assert first.generate_calls == 1 + 10
    # Simulate an interruption: the last two rows never got written, the one before was cut mid-line.
    (out / "results.jsonl").write_text("\n".join(lines[:-3]) + "\n" + lines[-3][: len(lines[-3]) // 2])
    kept = [json.loads(l) for l in lines[:-3]]
    model = ToyNextScaleModel()
    second, result2 = _run(args, model)
    assert second.generate_calls == 1 + 3  # warm-up + exactly the three lost rows, nothing finished is redone
    all_lines = (out / "results.jsonl").read_text().splitlines()
    # the cut line is moved aside (with a warning), the results file holds complete rows only
    assert (out / "results.jsonl.torn").read_text() == lines[-3][: len(lines[-3]) // 2] + "\n"
    assert len(all_lines) == len(lines) and all(json.loads(l)["key"] for l in all_lines)
    new_rows = [json.loads(l) for l in all_lines[len(kept):]]
    assert len(new_rows) == 3
    lost = {json.loads(l)["key"] for l in lines[-2:]}
    assert lost <= {r["key"] for r in new_rows}
    for r in kept:  # untouched
        assert r["finished_at"] in (out / "results.jsonl").read_text()
    # Same fidelity numbers as the uninterrupted run, and a third run computes nothing.
    def fidelity(res):
        return {s["label"]: (s["psnr"], s["ssim"], s["token_agreement"], s["kv_mib_last_read"]) for s in res["summary"]}
    assert fidelity(result2) == fidelity(result)
    third, result3 = _run(args)
    assert third.generate_calls == 0 and fidelity(result3) == fidelity(result)


def test_same_command_twice_gives_same_fidelity(tmp_path):
    _, a = _run(_args(tmp_path, "--warmup", "0"))
    args_b = _args(tmp_path, "--warmup", "0")
    args_b.out = str(tmp_path / "run2")
    _, b = _run(args_b)
    strip = lambda res: [(s["label"], s["psnr"], s["ssim"], s["token_agreement"]) for s in res["summary"]]
    assert strip(a) == strip(b)
    ra = sorted((r["key"], r["psnr"], r["ssim"]) for r in a["rows"])
    rb = sorted((r["key"], r["psnr"], r["ssim"]) for r in b["rows"])
    assert ra == rb


def test_resume_with_other_settings_is_refused(tmp_path):
    _run(_args(tmp_path, "--warmup", "0", "--limit", "1"))
    with pytest.raises(ValueError, match="other settings"):
        _run(_args(tmp_path, "--warmup", "0", "--limit", "1", "--batch-size", "2"))


@pytest.mark.parametrize("extra, message", [
    (["--policies", "snapkvv"], "unknown policy 'snapkvv'; did you mean 'snapkv'"),
    (["--budgets", "120%"], "120%"),
    (["--budgets", "0"], "budget"),
    (["--budgets", "100000"], "out of range"),
    (["--prompts", "/nonexistent/prompts.txt"], "does not exist"),
    (["--labels", "1,2"], "text-to-image model: use --prompts, not --labels"),
    (["--seeds", "a"], "--seeds"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--calibration", "x.json"], "scalekv"),
])
def test_bad_arguments_fail_clearly(tmp_path, capsys, extra, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    argv = ["compare", "--model", FAKE, "--policies", "snapkv", "--budgets", "10%", "--out", str(tmp_path / "o"),
            "--no-progress"]
    if "--prompts" not in extra and "--labels" not in extra:
        argv += ["--prompts", str(prompts)]
    code = main(argv + extra)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kvpolicy compare: error:") and message in err
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_unwritable_output_folder_fails_clearly(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    for out in (blocker, blocker / "sub"):
        code = main(["compare", "--model", FAKE, "--policies", "snapkv", "--budgets", "10%", "--prompts", str(prompts),
                     "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and str(out) in err and ("not a folder" in err or "not writable" in err)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root ignores permissions
            code = main(["compare", "--model", FAKE, "--policies", "snapkv", "--budgets", "10%", "--prompts",
                         str(prompts), "--out", str(ro / "x"), "--no-progress"])
            assert code == 2 and "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_learned_metrics_are_recorded_when_their_weights_exist(tmp_path, monkeypatch):
    """With local LPIPS/FID weight files (random here) every row gets an LPIPS value and every
    configuration a set-level FID, and the summary shows them."""
    from benchmarks import metrics

    write_random_lpips_files(tmp_path)
    write_inception_file(tmp_path / metrics.INCEPTION_FILE)
    monkeypatch.setenv("KVPOLICY_LPIPS_DIR", str(tmp_path))
    monkeypatch.setenv("KVPOLICY_FID_INCEPTION", str(tmp_path / metrics.INCEPTION_FILE))
    args = _args(tmp_path, "--warmup", "0")
    args.no_learned_metrics = False
    _, result = _run(args)
    rows = [r for r in result["rows"] if r["policy"] != "reference"]
    assert rows and all(r["lpips"] is not None and r["lpips"] >= 0 for r in rows)
    assert any(r["lpips"] > 0 for r in rows if not r["identical_to_reference"])
    for s in result["summary"][1:]:
        assert s["fid"] is not None and s["fid"] >= -1e-9 and s["lpips"] is not None
    text = (tmp_path / "run" / "summary.md").read_text()
    line = next(l for l in text.splitlines() if l.startswith("| snapkv | 20% |"))
    s = next(s for s in result["summary"] if s["label"] == "snapkv@20%")
    assert f"{s['fid']:.2f}" in line and f"{s['lpips']:.3f}" in line
    # summary.md names the implementations, the FID mode (clean by default), the weight files, and warns
    # that 2 images per set are far from the paper's 5,000
    assert "FID ('clean')" in text and "PIL bicubic" in text and metrics.INCEPTION_FILE in text
    assert "LPIPS: v0.1, AlexNet" in text and metrics.ALEXNET_FILE in text and "SSIM ('valid')" in text
    assert f"torch {torch.__version__}" in text and "WARNING: FID here compares sets of 2 image(s)" in text
    set_metrics = json.loads((tmp_path / "run" / "set_metrics.json").read_text())
    assert all(v["fid_mode"] == "clean" for v in set_metrics.values())


def test_legacy_fid_mode_and_torchmetrics_ssim_are_options(tmp_path, monkeypatch):
    """--fid-mode legacy_tensorflow changes FID (other preprocessing) and says so; --ssim torchmetrics
    records torchmetrics' convention in the rows and the summary, and a run cannot mix conventions."""
    from benchmarks import metrics

    write_inception_file(tmp_path / metrics.INCEPTION_FILE)
    monkeypatch.setenv("KVPOLICY_FID_INCEPTION", str(tmp_path / metrics.INCEPTION_FILE))
    monkeypatch.setenv("KVPOLICY_LPIPS_DIR", str(tmp_path / "no-lpips"))
    runs = {}
    for name, extra in (("clean", []), ("legacy", ["--fid-mode", "legacy_tensorflow", "--ssim", "torchmetrics"])):
        args = _args(tmp_path, "--warmup", "0", "--policies", "snapkv", "--budgets", "20%", *extra)
        args.no_learned_metrics, args.out = False, str(tmp_path / name)
        runs[name] = _run(args)[1]
        runs[name]["text"] = (tmp_path / name / "summary.md").read_text()
    assert "FID ('legacy_tensorflow')" in runs["legacy"]["text"] and "SSIM ('torchmetrics')" in runs["legacy"]["text"]
    fid = {k: r["summary"][1]["fid"] for k, r in runs.items()}
    assert fid["clean"] is not None and fid["legacy"] is not None and fid["clean"] != pytest.approx(fid["legacy"])
    rows = {k: [r for r in res["rows"] if r["policy"] != "reference"] for k, res in runs.items()}
    for clean_row, legacy_row in zip(rows["clean"], rows["legacy"]):
        from benchmarks.metrics import ssim

        mine = torch.from_numpy(np.array(Image.open(tmp_path / "legacy" / legacy_row["image"]).convert("RGB")))
        ref = [r for r in runs["legacy"]["rows"] if r["policy"] == "reference" and r["prompt"] == legacy_row["prompt"]][0]
        theirs = torch.from_numpy(np.array(Image.open(tmp_path / "legacy" / ref["image"]).convert("RGB")))
        assert legacy_row["ssim"] == pytest.approx(ssim(mine, theirs, convention="torchmetrics")[0], abs=1e-12)
    args = _args(tmp_path, "--warmup", "0", "--policies", "snapkv", "--budgets", "20%")
    args.out = str(tmp_path / "legacy")
    with pytest.raises(ValueError, match="other settings"):
        _run(args)


def test_policy_options_are_part_of_the_configuration(tmp_path):
    args = _args(tmp_path, "--warmup", "0", "--limit", "1", "--option", "snapkv.window_size=8",
                 "--option", 'snapkv.pooling="avg"')
    _, result = _run(args)
    configs = {r["policy"]: r["policy_config"] for r in result["rows"] if r["policy"] != "reference"}
    assert configs["snapkv"]["window_size"] == 8 and configs["snapkv"]["pooling"] == "avg"
    assert "window_size" not in configs["sliding_window"]
    # a different option is a different configuration: new rows, the old ones stay
    args2 = _args(tmp_path, "--warmup", "0", "--limit", "1", "--option", "snapkv.window_size=4")
    _, result2 = _run(args2)
    keys = {r["key"] for r in reports.read_rows(tmp_path / "run" / "results.jsonl")}
    assert len(keys) == 1 + 4 + 2  # reference + 4 configs + 2 new snapkv rows


def test_a_registered_metric_appears_in_rows_summary_and_set_metrics(tmp_path):
    """Adding a metric is one registration: a toy per-image metric (mean absolute pixel difference)
    and a toy set metric (the gap between the sets' mean brightness) show up in every policy row, in
    the summary (aggregated, formatted, described) and in set_metrics.json, with no other change."""
    from benchmarks.metric_registry import Metric, register_metric, unregister_metric

    def mean_abs_diff(batch, context):
        diff = (batch.images.to(torch.float64) - batch.references.to(torch.float64)).abs()
        return [float(d.mean()) for d in diff]

    def brightness_gap(pair, context):
        context.set_sizes  # the context is the run's; a set metric may read options or note reasons
        return float(pair.load(pair.keys).double().mean() - pair.load_reference(pair.keys).double().mean())

    register_metric(Metric(name="toy_mad", per="image", compute=mean_abs_diff, column="MAD↓", fmt=".3f",
                           aggregate="median", describe="MAD: mean absolute difference of 8-bit values."))
    register_metric(Metric(name="toy_gap", per="set", compute=brightness_gap, column="gap", fmt=".2f",
                           describe=lambda context: f"gap: set brightness difference (FID mode {context.fid_mode})."))
    try:
        _, result = _run(_args(tmp_path, "--warmup", "0"))
    finally:
        unregister_metric("toy_mad")
        unregister_metric("toy_gap")
    out = tmp_path / "run"
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    refs = {r["prompt"]: r for r in rows if r["policy"] == "reference"}
    load = lambda r: torch.from_numpy(np.array(Image.open(out / r["image"]).convert("RGB"))).to(torch.float64)
    for r in rows:
        if r["policy"] == "reference":
            assert r["toy_mad"] is None
            continue
        assert r["toy_mad"] == pytest.approx(float((load(r) - load(refs[r["prompt"]])).abs().mean()), abs=1e-12)
    text = (out / "summary.md").read_text()
    header = next(l for l in text.splitlines() if l.startswith("| policy |"))
    assert header.endswith("| token agr.↑ | MAD↓ | gap | s/image | speed-up |")
    set_metrics = json.loads((out / "set_metrics.json").read_text())
    for s in result["summary"][1:]:
        group = [r for r in rows if r["config_id"] == s["config_id"]]
        assert s["toy_mad"] == pytest.approx(float(np.median([r["toy_mad"] for r in group])))
        mine = torch.stack([load(r) for r in sorted(group, key=lambda r: r["condition_index"])])
        theirs = torch.stack([load(refs[r["prompt"]]) for r in sorted(group, key=lambda r: r["condition_index"])])
        assert s["toy_gap"] == pytest.approx(float(mine.mean() - theirs.mean()), abs=1e-9)
        assert set_metrics[s["config_id"]]["toy_gap"] == s["toy_gap"]
        line = next(l for l in text.splitlines() if l.startswith(f"| {s['policy']} | {s['budget']} |"))
        assert f"| {s['toy_mad']:.3f} | {s['toy_gap']:.2f} |" in line
    assert "- MAD: mean absolute difference of 8-bit values." in text and "- gap: set brightness difference (FID mode clean)." in text
    # unregistered again: a new run has no such column
    _, again = _run(_args(tmp_path, "--warmup", "0", "--limit", "1"))
    assert "toy_mad" not in again["summary"][0]


def test_default_output_is_a_stable_named_folder_under_kvpolicy_runs(tmp_path, monkeypatch):
    """Without --out, compare writes kvpolicy-runs/compare-MODEL/ (it wrote ./kvpolicy-compare into
    the working tree) and the same command run again resumes there: nothing is generated twice."""
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\n")
    argv = ["compare", "--model", FAKE, "--prompts", str(prompts), "--policies", "snapkv", "--budgets", "20%",
            "--warmup", "0", "--no-progress", "--no-learned-metrics"]
    first, result = _run(build_parser().parse_args(argv))
    out = tmp_path / "kvpolicy-runs" / f"compare-{FAKE}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kvpolicy-runs", "p.txt"]
    assert len((out / "results.jsonl").read_text().splitlines()) == 2 and (out / "summary.md").is_file()
    second, _ = _run(build_parser().parse_args(argv))
    assert first.generate_calls > 0 and second.generate_calls == 0


def test_the_calibration_note_names_only_flags_the_calibrated_policies_take():
    from benchmarks.compare import calibration_note

    alone = calibration_note(["amskv"])  # amskv takes a calibration, no plan file
    assert "--calibration FILE" in alone and "--budget-file" not in alone
    mixed = calibration_note(["scalekv", "amskv"])
    assert mixed.startswith("scalekv, amskv: ") and "--budget-file FILE also sets the plan of scalekv." in mixed
