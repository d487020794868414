"""`kvpolicy generate` from a newcomer's point of view: the key-cache layout it runs with (issue 16,
item 13), where its files go (item 3) and checks that come before any work (item 6)."""

from __future__ import annotations

import pytest

from benchmarks.cli import main


def test_generate_bf16_key_cache_is_an_explicit_option(tmp_path, capsys, monkeypatch):
    import adapters

    seen = {}
    real = adapters.load_model

    def spy(name, **kwargs):
        seen.update(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(adapters, "load_model", spy)
    assert main(["generate", "--model", "infinity-tiny", "--prompt", "a red cube", "--key-dtype", "bf16",
                 "--dtype", "bf16", "--out", str(tmp_path / "a.png")]) == 0
    assert str(seen["key_dtype"]) == "torch.bfloat16"


def test_var_refuses_a_key_dtype_other_than_its_compute_dtype_before_loading(tmp_path, capsys, monkeypatch):
    import adapters

    monkeypatch.setattr(adapters, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(["generate", "--model", "var-tiny", "--label", "1", "--key-dtype", "bf16", "--out",
                 str(tmp_path / "a.png")])
    assert code == 2
    assert capsys.readouterr().err == ("kvpolicy generate: error: --key-dtype bf16: var-tiny caches keys in its "
                                       "compute dtype (fp32); use --dtype bf16 instead\n")
    assert not list(tmp_path.iterdir())


def _generate(*extra):
    return main(["generate", "--model", "var-tiny", "--label", "1", "--threads", "1", *extra])


def test_default_output_is_a_fresh_named_folder_per_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _generate() == 0 and _generate() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["kvpolicy-runs"]  # nothing lands in the working tree
    runs = sorted((tmp_path / "kvpolicy-runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("generate-var-tiny-") for r in runs)
    assert all([p.name for p in r.iterdir()] == ["image.png"] for r in runs)
    assert f"wrote {runs[-1].relative_to(tmp_path) / 'image.png'}" in capsys.readouterr().out


def test_an_existing_output_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import adapters

    target = tmp_path / "cube.png"
    target.write_bytes(b"precious")
    monkeypatch.setattr(adapters, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert _generate("--out", str(target)) == 2
    assert capsys.readouterr().err == (f"kvpolicy generate: error: --out {str(target)!r} already exists; choose "
                                       "another name or pass --overwrite\n")
    assert target.read_bytes() == b"precious"


def test_overwrite_replaces_an_existing_image(tmp_path):
    target = tmp_path / "cube.png"
    target.write_bytes(b"old")
    assert _generate("--out", str(target), "--overwrite") == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_gpu_dry_run_never_writes_into_the_tracked_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    assert main(["bench-gpu", "--dry-run", "--models", "var-tiny", "--policies", "sliding_window", "--batches", "1",
                 "--max-batch", "1"]) == 0
    assert not any((tmp_path / "benchmarks" / "results").iterdir())
    (run,) = (tmp_path / "kvpolicy-runs").iterdir()
    assert run.name.startswith("bench-gpu-dryrun-")
    assert sorted(p.suffix for p in run.iterdir()) == [".json", ".md"]


# -- item 6: outputs and budgets are checked before any work ----------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    import adapters

    monkeypatch.setattr(adapters, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def test_generate_to_an_unwritable_place_fails_before_generating(no_loading, capsys):
    assert _generate("--out", "/proc/x.png") == 2
    err = capsys.readouterr().err
    assert err.startswith("kvpolicy generate: error: --out: '/proc' is not writable (") and err.count("\n") == 1


def test_bench_gpu_to_an_unwritable_place_fails_before_benchmarking(monkeypatch, capsys):
    from benchmarks import bench_gpu

    monkeypatch.setattr(bench_gpu.Bench, "load", lambda self, name: pytest.fail("a model was loaded"))
    assert main(["bench-gpu", "--dry-run", "--models", "var-tiny", "--out", "/proc/x"]) == 2
    assert capsys.readouterr().err.startswith("kvpolicy bench-gpu: error: --out: '/proc' is not writable (")


def test_scalekv_budget_below_its_window_fails_before_calibrating(tmp_path, no_loading, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--model", "infinity-tiny", "--prompt", "a", "--policy", "scalekv", "--budget", "5",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvpolicy generate: error: scalekv: capacity 5 at scale 2, layer 0 is smaller than that "
                          "scale's observation window (16 tokens")
    assert not list(tmp_path.iterdir())  # no calibration file left behind


def test_scalekv_without_budget_or_roles_fails_before_calibrating(tmp_path, no_loading, capsys):
    assert main(["generate", "--model", "infinity-tiny", "--prompt", "a", "--policy", "scalekv",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "scalekv needs --budget" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_compare_scalekv_budget_below_its_window_fails_before_writing(tmp_path, no_loading, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", "infinity-tiny", "--policies", "scalekv", "--budgets", "5",
                 "--out", str(out)]) == 2
    assert "scalekv: capacity 5 at scale 2" in capsys.readouterr().err
    assert not out.exists()


def test_calibrate_export_to_an_unwritable_place_fails_before_calibrating(tmp_path, no_loading, capsys):
    assert main(["calibrate", "--model", "var-tiny", "--out", str(tmp_path / "c.json"), "--budget", "50%",
                 "--policy", "scalekv", "--export-budget", "/proc/b.json"]) == 2
    assert capsys.readouterr().err.startswith("kvpolicy calibrate: error: --export-budget: '/proc' is not writable")
