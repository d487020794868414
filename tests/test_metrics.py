"""PSNR/SSIM against known values and independent formulations; LPIPS/FID backends and skip path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks import metrics
from benchmarks.metrics import LPIPS, LearnedMetrics, frechet_distance, psnr, ssim, token_agreement
from metric_weight_files import write_random_lpips_files


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


def test_learned_metrics_skip_with_a_clear_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPOLICY_LPIPS_DIR", str(tmp_path))
    monkeypatch.setenv("KVPOLICY_FID_INCEPTION", str(tmp_path / "missing.pt"))
    monkeypatch.setattr(metrics, "_torch_hub_checkpoints", lambda: tmp_path / "hub")
    monkeypatch.setattr(metrics, "_lpips_package_dir", lambda: tmp_path / "no-lpips")
    m = LearnedMetrics()
    a = _images(3)
    assert m.lpips(a, a) == [None, None]
    assert m.fid(a, a) is None
    assert metrics.ALEXNET_FILE in m.reasons["lpips"] and "KVPOLICY_LPIPS_DIR" in m.reasons["lpips"]
    assert metrics.INCEPTION_FILE in m.reasons["fid"] and "KVPOLICY_FID_INCEPTION" in m.reasons["fid"]


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
    class Features(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            pooled = torch.nn.functional.adaptive_avg_pool2d(x, 2)
            return pooled.flatten(1) / 255.0

    path = tmp_path / metrics.INCEPTION_FILE
    torch.jit.script(Features()).save(str(path))
    monkeypatch.setenv("KVPOLICY_FID_INCEPTION", str(path))
    m = LearnedMetrics()
    a, b = _images(6, n=6), _images(7, n=6)
    assert m.fid(a, a) == pytest.approx(0.0, abs=1e-9)
    assert m.fid(a, b) > 0
    assert m.fid(a[:1], b[:1]) is None and "at least 2" in m.reasons["fid_small"]
