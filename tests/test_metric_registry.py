"""The metric registry: validation, order, aggregation, and the values compare stores."""

from __future__ import annotations

import math
import os

import pytest
import torch

from benchmarks import metric_registry as reg
from benchmarks.metric_registry import ImageBatch, Metric, MetricContext, register_metric, unregister_metric


def _const(value):
    return lambda batch, context: [value] * len(batch.images)


def test_built_in_metrics_are_registered_in_column_order():
    names = [m.name for m in reg.registered_metrics()]
    assert names[:5] == ["fid", "lpips", "psnr", "ssim", "token_agreement"]
    assert [m.name for m in reg.registered_metrics(reg.PER_SET)][0] == "fid"
    assert reg.get_metric("token_agreement").field == "token_agreement_mean"
    with pytest.raises(ValueError, match="unknown metric 'nope'; registered: fid, lpips"):
        reg.get_metric("nope")


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "has space"}, "must be an identifier"),
    ({"per": "pixel"}, "'per' must be in"),
    ({"fmt": "x"}, "column format 'x' is not a float format spec"),
    ({"aggregate": "max"}, "aggregate 'max' is not one of mean, median"),
    ({"compute": 3}, "must be callable"),
])
def test_bad_metric_definitions_fail_at_construction(kwargs, message):
    base = dict(name="toy", per="image", compute=_const(1.0), column="toy")
    with pytest.raises((ValueError, TypeError), match=message):
        Metric(**{**base, **kwargs})


def test_registration_refuses_a_second_metric_of_the_same_name():
    toy = Metric(name="toy_dup", per="image", compute=_const(1.0), column="toy")
    register_metric(toy)
    try:
        register_metric(toy)  # the same definition again is harmless (a module imported twice)
        with pytest.raises(ValueError, match="already registered; pass replace=True"):
            register_metric(Metric(name="toy_dup", per="image", compute=_const(2.0), column="other"))
        register_metric(Metric(name="toy_dup", per="image", compute=_const(2.0), column="other"), replace=True)
        assert reg.get_metric("toy_dup").column == "other"
    finally:
        unregister_metric("toy_dup")
    with pytest.raises(TypeError, match="takes a Metric"):
        register_metric({"name": "x"})


def test_aggregation_and_identical_images():
    psnr = reg.get_metric("psnr")
    rows = [{"psnr": 20.0, "identical_to_reference": False}, {"psnr": None, "identical_to_reference": True}]
    assert psnr.summarize_rows(rows) == math.inf and psnr.format_value(math.inf) == "inf"
    ssim = reg.get_metric("ssim")
    assert ssim.summarize_rows([{"ssim": 0.5}, {"ssim": 0.7}]) == pytest.approx(0.6)
    assert ssim.summarize_rows([{"ssim": 0.5}, {"ssim": None}]) is None  # never a mean over part of the images
    median = Metric(name="m", per="image", compute=_const(1.0), column="m", aggregate="median")
    assert median.summarize_rows([{"m": 1.0}, {"m": 5.0}, {"m": 2.0}]) == 2.0
    worst = Metric(name="w", per="image", compute=_const(1.0), column="w", aggregate=min, fmt=".1f")
    assert worst.summarize_rows([{"w": 3.0}, {"w": 1.5}]) == 1.5 and worst.format_value(1.5) == "1.5"
    assert worst.format_value(None) == "–"


def test_image_values_computes_every_registered_metric():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 16, 16, 3), generator=g, dtype=torch.uint8)
    refs = images.clone()
    refs[1, :4] = 0
    tokens = [torch.tensor([[1, 2], [3, 4]])]
    ref_tokens = [torch.tensor([[1, 2], [3, 0]])]
    register_metric(Metric(name="toy_count", per="image", column="n", compute=_const(7)))
    try:
        values = reg.image_values(MetricContext(learned_metrics=False), ImageBatch(images, refs, tokens, ref_tokens))
    finally:
        unregister_metric("toy_count")
    assert values["psnr"][0] is None and math.isfinite(values["psnr"][1])  # identical image: inf -> None
    assert values["ssim"][0] == pytest.approx(1.0) and values["lpips"] == [None, None]
    assert values["token_agreement_mean"] == [1.0, 0.5] and values["toy_count"] == [7.0, 7.0]
    register_metric(Metric(name="toy_short", per="image", column="n", compute=lambda b, c: [1.0]))
    try:
        with pytest.raises(RuntimeError, match="'toy_short' returned 1 values for 2 images"):
            reg.image_values(MetricContext(learned_metrics=False), ImageBatch(images, refs))
    finally:
        unregister_metric("toy_short")


def test_a_plugin_file_registers_a_metric_after_the_built_ins(tmp_path):
    """`--plugin my_metric.py` (or KVPOLICY_PLUGINS) may run before anything imported the built-ins;
    they still keep the first columns, the plugin's metric comes after them."""
    import subprocess
    import sys
    from pathlib import Path

    plugin = tmp_path / "my_metric.py"
    plugin.write_text(
        "from benchmarks.metric_registry import Metric, register_metric\n"
        "register_metric(Metric(name='mad', per='image', column='MAD', compute=lambda b, c: [0.0] * len(b.images)))\n")
    code = ("from benchmarks.cli import load_plugins\n"
            f"load_plugins([{str(plugin)!r}])\n"
            "from benchmarks.reports import summary_columns\n"
            "from benchmarks.metric_registry import registered_metrics\n"
            "print(','.join(m.name for m in registered_metrics()))\n"
            "print(summary_columns()[-3])\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr
    names, column = done.stdout.split()
    assert names.split(",")[:5] == ["fid", "lpips", "psnr", "ssim", "token_agreement"] and names.endswith(",mad")
    assert column == "MAD"


def test_an_installed_package_registers_a_metric_through_the_entry_point_group(tmp_path):
    """A third-party package declaring ``[kvpolicy.metrics]`` in its metadata is imported on the first
    lookup, without --plugin: a real dist-info on the path, discovered by importlib.metadata."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "kvp_extra_metric.py").write_text(
        "from benchmarks.metric_registry import Metric, register_metric\n"
        "register_metric(Metric(name='mean_gap', per='image', column='gap',\n"
        "                       compute=lambda b, c: [0.0] * len(b.images)))\n")
    dist = tmp_path / "kvp_extra_metric-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvp-extra-metric\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{reg.ENTRY_POINT_GROUP}]\nmean_gap = kvp_extra_metric\n")
    code = ("from benchmarks.metric_registry import get_metric, registered_metrics\n"
            "print(get_metric('mean_gap').column)\n"
            "print(','.join(m.name for m in registered_metrics()))\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    column, names = done.stdout.split()
    assert column == "gap"
    assert names.split(",")[:5] == ["fid", "lpips", "psnr", "ssim", "token_agreement"] and names.endswith(",mean_gap")
    # Without the package on the path the name is unknown (the registration came from the entry point).
    bare = subprocess.run([sys.executable, "-c", "from benchmarks.metric_registry import get_metric; get_metric('mean_gap')"],
                          capture_output=True, text=True, cwd=root, timeout=120)
    assert bare.returncode != 0 and "unknown metric 'mean_gap'" in bare.stderr
