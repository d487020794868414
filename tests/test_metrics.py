"""PSNR/SSIM against known values and independent formulations; LPIPS/FID backends and skip path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import metrics
from benchmarks.metrics import LPIPS, LearnedMetrics, frechet_distance, psnr, ssim, token_agreement
from metric_weight_files import InceptionStandIn, small_inception_layers, write_inception_file, write_random_lpips_files


def _images(seed, n=2, h=24, w=20):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)


def test_identical_images_give_inf_psnr_and_unit_ssim():
    a = _images(0)
    assert psnr(a, a) == [math.inf, math.inf]
    assert ssim(a, a) == pytest.approx([1.0, 1.0], abs=1e-12)


def test_psnr_hand_computed():
    a = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 0, 0] = 255  # one of 48 values off by the full range: MSE = 1/48
    assert psnr(b, a)[0] == pytest.approx(10 * math.log10(48))
    c = torch.full((1, 4, 4, 3), 51, dtype=torch.uint8)  # every value off by 0.2: MSE 0.04 -> 13.9794 dB
    assert psnr(c, a)[0] == pytest.approx(13.979400086720377)


def _numpy_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Direct windowed SSIM: loop over every 11x11 window position with a 2-D Gaussian weight."""
    coords = np.arange(11) - 5
    g1 = np.exp(-(coords ** 2) / (2 * 1.5 ** 2))
    win = np.outer(g1, g1)
    win /= win.sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for ch in range(x.shape[2]):
        a, b = x[:, :, ch], y[:, :, ch]
        for i in range(a.shape[0] - 10):
            for j in range(a.shape[1] - 10):
                pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
                ma, mb = (win * pa).sum(), (win * pb).sum()
                va = (win * (pa - ma) ** 2).sum()
                vb = (win * (pb - mb) ** 2).sum()
                cov = (win * (pa - ma) * (pb - mb)).sum()
                values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_matches_a_direct_numpy_reference():
    a = _images(1, n=1)
    # a correlated distortion, so SSIM is neither ~0 nor ~1
    noise = torch.randint(-40, 41, a.shape, generator=torch.Generator().manual_seed(2))
    b = (a.to(torch.int32) // 2 + 60 + noise).clamp(0, 255).to(torch.uint8)
    expected = _numpy_ssim(a[0].numpy() / 255.0, b[0].numpy() / 255.0)
    got = ssim(b, a)[0]
    assert got == pytest.approx(expected, abs=1e-10)
    assert 0.05 < got < 0.95
    assert ssim(a, b)[0] == pytest.approx(got, abs=1e-12)  # symmetric


def _numpy_ssim_reflect(x: np.ndarray, y: np.ndarray) -> float:
    """torchmetrics' convention written directly: reflect-pad 5 px, one 11x11 window per pixel,
    variances clamped at 0, the mean over every pixel and channel."""
    coords = np.arange(11) - 5
    g1 = np.exp(-(coords ** 2) / (2 * 1.5 ** 2))
    win = np.outer(g1, g1) / np.outer(g1, g1).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for ch in range(x.shape[2]):
        a, b = np.pad(x[:, :, ch], 5, mode="reflect"), np.pad(y[:, :, ch], 5, mode="reflect")
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
                ma, mb = (win * pa).sum(), (win * pb).sum()
                va = max((win * pa * pa).sum() - ma ** 2, 0.0)
                vb = max((win * pb * pb).sum() - mb ** 2, 0.0)
                cov = (win * pa * pb).sum() - ma * mb
                values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_torchmetrics_convention_matches_a_direct_reference():
    a = _images(1, n=1, h=18, w=15)
    noise = torch.randint(-40, 41, a.shape, generator=torch.Generator().manual_seed(2))
    b = (a.to(torch.int32) // 2 + 60 + noise).clamp(0, 255).to(torch.uint8)
    expected = _numpy_ssim_reflect(b[0].numpy() / 255.0, a[0].numpy() / 255.0)
    got = ssim(b, a, convention="torchmetrics")[0]
    assert got == pytest.approx(expected, abs=1e-10)
    assert abs(got - ssim(b, a)[0]) > 1e-3  # the conventions differ on small images
    assert ssim(a, a, convention="torchmetrics") == pytest.approx([1.0], abs=1e-12)
    with pytest.raises(ValueError, match="at least 6x6"):
        ssim(_images(0, h=5, w=8), _images(0, h=5, w=8), convention="torchmetrics")


def test_metrics_reject_bad_inputs():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(_images(0, h=24), _images(0, h=20))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(_images(0, h=8, w=8), _images(0, h=8, w=8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        psnr(torch.full((1, 4, 4, 3), 2.0), torch.zeros(1, 4, 4, 3))


def test_token_agreement_per_scale():
    ref = [torch.zeros(2, 1, dtype=torch.long), torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])]
    mine = [torch.zeros(2, 1, dtype=torch.long), torch.tensor([[1, 2, 0, 0], [1, 2, 3, 4]])]
    assert token_agreement(mine, ref) == [[1.0, 0.5], [1.0, 1.0]]


def _no_weights_anywhere(tmp_path, monkeypatch):
    """No weight file anywhere the libraries keep them, and no metric library installed."""
    monkeypatch.delenv("KVPOLICY_LPIPS_DIR", raising=False)
    monkeypatch.delenv("KVPOLICY_FID_INCEPTION", raising=False)
    monkeypatch.setattr(metrics, "_torch_hub_checkpoints", lambda: tmp_path / "hub")
    monkeypatch.setattr(metrics, "_package_dir", lambda name: None)
    monkeypatch.setattr(metrics, "_cleanfid_folder", lambda: tmp_path / "cleanfid-cache")


def test_learned_metrics_skip_with_a_one_line_reason_saying_how(tmp_path, monkeypatch):
    _no_weights_anywhere(tmp_path, monkeypatch)
    m = LearnedMetrics()
    a = _images(3)
    assert m.lpips(a, a) == [None, None]
    assert m.fid(a, a) is None
    for name, files in (("lpips", (metrics.ALEXNET_FILE, metrics.LPIPS_LIN_FILE)), ("fid", (metrics.INCEPTION_FILE,))):
        reason = m.reasons[name]
        assert "\n" not in reason and "pip install 'kvpolicy[metrics]'" in reason
        assert all(f in reason for f in files) and str(tmp_path / "hub") in reason
    assert "KVPOLICY_LPIPS_DIR" in m.reasons["lpips"]
    assert "KVPOLICY_FID_INCEPTION" in m.reasons["fid"] and str(tmp_path / "cleanfid-cache") in m.reasons["fid"]


def test_weights_come_from_the_libraries_caches_and_downloads(tmp_path, monkeypatch):
    """With the metrics extra installed, a missing AlexNet comes through torch's hub download (what
    torchvision calls) into the hub cache, the LPIPS layers from torchmetrics' package folder, and the
    Inception through clean-fid's own download into clean-fid's folder."""
    import sys
    import types

    _no_weights_anywhere(tmp_path, monkeypatch)
    tm = tmp_path / "site" / "torchmetrics"
    (tm / "functional" / "image" / "lpips_models").mkdir(parents=True)
    staged = tmp_path / "staged"
    staged.mkdir()
    write_random_lpips_files(staged)
    (staged / metrics.LPIPS_LIN_FILE).rename(tm / "functional" / "image" / "lpips_models" / metrics.LPIPS_LIN_FILE)
    monkeypatch.setattr(metrics, "_package_dir", lambda name: {"torchmetrics": tm, "cleanfid": tmp_path / "cf"}.get(name))
    calls = []

    def hub_download(url, progress=True, check_hash=False):
        calls.append(url)
        (tmp_path / "hub").mkdir(exist_ok=True)
        (staged / metrics.ALEXNET_FILE).rename(tmp_path / "hub" / metrics.ALEXNET_FILE)

    def cleanfid_download(fpath):
        calls.append(fpath)
        write_inception_file(Path(fpath) / metrics.INCEPTION_FILE)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", hub_download)
    helper = types.ModuleType("cleanfid.downloads_helper")
    helper.check_download_inception = cleanfid_download
    monkeypatch.setitem(sys.modules, "cleanfid", types.ModuleType("cleanfid"))
    monkeypatch.setitem(sys.modules, "cleanfid.downloads_helper", helper)
    (tmp_path / "cleanfid-cache").mkdir()
    m = LearnedMetrics()
    a, b = _images(8, n=3, h=40, w=40), _images(9, n=3, h=40, w=40)
    assert all(v > 0 for v in m.lpips(a, b)) and m.fid(a, b) > 0
    assert calls == [metrics.ALEXNET_URL, str(tmp_path / "cleanfid-cache")]
    sources = m.sources()
    assert str(tmp_path / "hub" / metrics.ALEXNET_FILE) in sources["LPIPS alexnet"]
    assert str(tm) in sources["LPIPS linear layers"] and "sha256" in sources["FID Inception"]
    assert not m.reasons


def test_a_failed_download_says_how_to_work_offline(tmp_path, monkeypatch):
    _no_weights_anywhere(tmp_path, monkeypatch)
    monkeypatch.setattr(metrics, "_may_download", lambda library: True)

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    m = LearnedMetrics()
    assert m.lpips(_images(1), _images(2)) == [None, None]
    assert "downloading" in m.reasons["lpips"] and "Name or service not known" in m.reasons["lpips"]
    assert "KVPOLICY_LPIPS_DIR" in m.reasons["lpips"] and "\n" not in m.reasons["lpips"]


def test_lpips_network_from_local_weight_files(tmp_path, monkeypatch):
    """The loader reads torchvision/LPIPS key names; identical images score 0, others > 0."""
    alex, lin = write_random_lpips_files(tmp_path)
    monkeypatch.setenv("KVPOLICY_LPIPS_DIR", str(tmp_path))
    m = LearnedMetrics()
    a, b = _images(4, h=64, w=64), _images(5, h=64, w=64)
    assert m.lpips(a, a) == pytest.approx([0.0, 0.0], abs=1e-7)
    d = m.lpips(a, b)
    assert all(v > 0 for v in d) and m.lpips(b, a) == pytest.approx(d, rel=1e-5)
    net = LPIPS.from_local_files()
    assert torch.equal(net.trunk.convs[2].weight, alex["features.6.weight"])
    assert torch.equal(net.lins[4].weight, lin["lin4.model.1.weight"])


def test_frechet_distance_matches_an_eigenvalue_formulation():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 5, generator=g, dtype=torch.float64)
    b = torch.randn(50, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64) + 0.5
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    # tr(sqrtm(ca cb)) = sum of square roots of the (real, positive) eigenvalues of ca cb
    trace_sqrt = np.sqrt(np.linalg.eigvals(ca @ cb).real.clip(min=0)).sum()
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * trace_sqrt
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fid_backend_through_a_torchscript_file(tmp_path, monkeypatch):
    path = write_inception_file(tmp_path / metrics.INCEPTION_FILE)
    monkeypatch.setenv("KVPOLICY_FID_INCEPTION", str(path))
    for mode in metrics.FID_MODES:
        m = LearnedMetrics(fid_mode=mode)
        a, b = _images(6, n=6, h=40, w=40), _images(7, n=6, h=40, w=40)
        assert m.fid(a, a) == pytest.approx(0.0, abs=1e-6)
        assert m.fid(a, b) > 0
        assert m.fid(a[:1], b[:1]) is None and "at least 2" in m.reasons["fid_small"]
        assert m.features(a).shape == (6, 64)


def test_clean_and_legacy_fid_features_follow_clean_fid():
    """clean: PIL bicubic per channel in float mode, then (x - 128) / 128 into ``layers``; legacy:
    uint8 values into the module, which resizes bilinearly itself. At 299x299 nothing is resized, so
    both modes must give the same features; below, they must differ (that difference is the point)."""
    module = torch.jit.script(InceptionStandIn(small_inception_layers()).eval())
    clean = metrics.InceptionFeatures(module, "clean")
    legacy = metrics.InceptionFeatures(module, "legacy_tensorflow")
    at_size = _images(10, n=2, h=299, w=299)
    assert torch.equal(clean(at_size), legacy(at_size))
    small = _images(11, n=2, h=64, w=48)
    resized = metrics.clean_resize(small)
    with torch.no_grad():
        expected = module.layers((resized - 128) / 128).flatten(1)
    assert torch.equal(clean(small), expected)
    assert (clean(small) - legacy(small)).abs().max() > 1e-3
    with pytest.raises(TypeError, match="uint8"):
        clean(small.float() / 255)
    with pytest.raises(ValueError, match="layers"):
        metrics.InceptionFeatures(torch.nn.Identity(), "clean")


def _bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of an antialiased bicubic resize (Keys, a = -0.5; the support
    widens with the shrink factor; pixel centres at i + 0.5), written from the filter's definition."""
    def keys(x):
        x, a = abs(x), -0.5
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0

    scale = size_in / size_out
    stretch = max(scale, 1.0)
    m = np.zeros((size_out, size_in))
    for i in range(size_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - 2 * stretch + 0.5), 0), min(int(centre + 2 * stretch + 0.5), size_in)
        w = np.array([keys((k - centre + 0.5) / stretch) for k in range(lo, hi)])
        m[i, lo:hi] = w / w.sum()
    return m


def test_clean_resize_is_an_antialiased_float_bicubic_resize():
    image = _images(12, n=1, h=512, w=400)
    out = metrics.clean_resize(image)
    assert out.shape == (1, 3, 299, 299) and out.dtype == torch.float32
    rows, cols = _bicubic_matrix(512, 299), _bicubic_matrix(400, 299)
    for c in range(3):
        expected = np.clip(rows @ image[0, :, :, c].numpy().astype(np.float64) @ cols.T, 0, 255)
        assert np.abs(out[0, c].numpy() - expected).max() < 2e-3
    assert not torch.equal(out, out.round())  # no quantisation after resizing
    flat = torch.full((1, 30, 20, 3), 77, dtype=torch.uint8)
    assert torch.allclose(metrics.clean_resize(flat), torch.full((1, 3, 299, 299), 77.0), atol=1e-4)
    at_size = _images(13, n=1, h=299, w=299)
    assert torch.equal(metrics.clean_resize(at_size), at_size.permute(0, 3, 1, 2).float())
    with pytest.raises(ValueError, match="uint8"):
        metrics.clean_resize(image.float())


def test_unknown_modes_and_conventions_are_refused():
    with pytest.raises(ValueError, match="'legacy' is not one of clean, legacy_tensorflow"):
        LearnedMetrics(fid_mode="legacy")
    with pytest.raises(ValueError, match="'matlab' is not one of valid, torchmetrics"):
        ssim(_images(0), _images(1), convention="matlab")
