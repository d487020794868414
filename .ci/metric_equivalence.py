"""Our fidelity metrics against the paper's libraries, on the same images and the same networks.

Runs in the environment built by .ci/metric_libraries_env.sh (torch + torchvision, torchmetrics with
its image extra, clean-fid, lpips, scipy), never in the project's own one. Nothing is downloaded:
random backbones are put where the libraries look for their weights, so both sides run the same
networks:
- torchvision's AlexNet (random) at $TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth, the file
  torchmetrics, lpips and we all load; the LPIPS linear layers are the real ones shipped inside
  torchmetrics (and lpips), which we find there too;
- an Inception-v3 (torchvision's architecture, random weights, batch-norm statistics set on random
  inputs so activations stay O(1)) wrapped with the interface of clean-fid's TorchScript file
  (``layers`` plus a resizing ``forward``), saved as a TorchScript file; we load it through
  KVPOLICY_FID_INCEPTION and clean-fid through its own ``InceptionV3W`` wrapper, handed to
  ``fid.compute_fid(dir_a, dir_b, custom_feat_extractor=...)`` (clean-fid would otherwise look for
  the file in /tmp, which this check must not overwrite).

Checked (tolerances in TOLERANCES), the per-image metrics on the images' top-left CROP pixels:
LPIPS per image vs torchmetrics (and the lpips package), PSNR per image and averaged vs
torchmetrics, SSIM in the torchmetrics convention vs torchmetrics; on the whole images, FID in
clean and legacy_tensorflow modes vs clean-fid's compute_fid on the same two image folders, and the
Fréchet distance alone vs clean-fid's on full-rank features (more images than dimensions).
Exit status 0 when every check passes, 1 otherwise; ``--json PATH`` also writes the measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CROP = 192  # pixels of the images' top-left corner used for the per-image metrics

TOLERANCES = {
    "lpips_abs": 1e-6,
    # torchmetrics turns ln into log10 with 10 / log(tensor(10.0)), a float32 constant 4.5e-8 (relative)
    # off: 1.1e-6 dB at 25 dB. Ours uses the exact constant, so the bound is relative and above that.
    "psnr_rel": 1e-7,
    "ssim_abs": 1e-6,
    "fid_rel": 1e-4,
    "frechet_full_rank_rel": 1e-9,
}


def log(msg: str) -> None:
    print(msg, flush=True)


def make_images(folder: Path, count: int, size: int, seed: int, reference=None):
    """``count`` smooth random RGB images (a coarse field upsampled, plus fine noise) saved as PNG;
    with ``reference``, a perturbed copy of it (noise, a shifted block, a contrast change)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if reference is None:
        coarse = torch.rand(count, 3, 12, 12, generator=g)
        x = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        x = x + 0.05 * torch.randn(count, 3, size, size, generator=g)
    else:
        x = reference.permute(0, 3, 1, 2).to(torch.float64) / 255
        x = x + 0.04 * torch.randn(x.shape, generator=g, dtype=torch.float64)
        q = size // 4
        x[:, :, q:2 * q, q:2 * q] = x[:, :, q + 7:2 * q + 7, q + 5:2 * q + 5].clone()
        x = 0.5 + (x - 0.5) * torch.linspace(0.8, 1.1, count, dtype=torch.float64).view(-1, 1, 1, 1)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    for i, image in enumerate(images):
        Image.fromarray(image.numpy()).save(folder / f"{i:03d}.png")
    # read back exactly as both sides will
    return torch.stack([torch.from_numpy(np.array(Image.open(folder / f"{i:03d}.png").convert("RGB")))
                        for i in range(count)])


def random_inception_layers(seed: int):
    """torchvision's Inception-v3 trunk (up to the 2048-d average pool), random weights."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
             "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
             "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"]
    layers = torch.nn.Sequential(*[getattr(net, n) for n in names])
    # Random convolutions blow activations up by ~1e10 over 90 layers; batch-norm statistics taken on
    # random inputs bring them back to O(1), like a trained network's.
    for m in layers.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    layers.train()
    with torch.no_grad():
        layers(torch.rand(6, 3, 299, 299, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
    return layers.eval()


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10, help="images per set (default 10)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512: clean mode "
                        "then downsamples to 299, as for the paper's 1024^2 images)")
    parser.add_argument("--json", default=None, help="also write the measurements here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="kvp-metric-equivalence-"))
    os.environ["TORCH_HOME"] = str(work / "torch")  # the libraries' weight cache: only our random files
    os.environ.pop("KVPOLICY_LPIPS_DIR", None)
    sys.path[:0] = [str(REPO), str(REPO / "tests")]

    import importlib.metadata as md

    import numpy as np
    import torch
    import torchvision
    from cleanfid import fid as cleanfid_fid
    from cleanfid.inception_torchscript import InceptionV3W
    from torchmetrics.image import (LearnedPerceptualImagePatchSimilarity, PeakSignalNoiseRatio,
                                    StructuralSimilarityIndexMeasure)

    from benchmarks import metrics as ours
    from metric_weight_files import InceptionStandIn

    versions = {name: md.version(name) for name in ("torch", "torchvision", "torchmetrics", "clean-fid", "lpips",
                                                    "scipy", "numpy", "pillow")}
    log("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    # -- networks where the libraries look ---------------------------------------------------------
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), checkpoints / ours.ALEXNET_FILE)
    inception_dir = work / "inception"
    inception_dir.mkdir()
    inception_path = inception_dir / ours.INCEPTION_FILE
    torch.jit.script(InceptionStandIn(random_inception_layers(1)).eval()).save(str(inception_path))
    os.environ["KVPOLICY_FID_INCEPTION"] = str(inception_path)

    full_dir, policy_dir = work / "full", work / "policy"
    full = make_images(full_dir, args.images, args.size, seed=2)
    policy = make_images(policy_dir, args.images, args.size, seed=3, reference=full)
    log(f"{args.images} images per set, {args.size}x{args.size}, in {work} (setup {time.perf_counter() - started:.1f} s)")

    results: dict = {"versions": versions, "images_per_set": args.images, "size": args.size, "tolerances": TOLERANCES}
    failures: list[str] = []

    def check(name: str, value: float, tolerance: float, detail: str = "") -> None:
        ok = value <= tolerance
        results[name] = value
        log(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.3g} (tolerance {tolerance:g}){' ' + detail if detail else ''}")
        if not ok:
            failures.append(name)

    to_unit = lambda u8: u8.permute(0, 3, 1, 2).to(torch.float64) / 255  # noqa: E731
    # Per-image metrics do not depend on the size; a crop keeps float64 SSIM and three LPIPS networks fast.
    crop = min(args.size, CROP)
    policy_crop, full_crop = policy[:, :crop, :crop].contiguous(), full[:, :crop, :crop].contiguous()

    # -- LPIPS ---------------------------------------------------------------------------------
    t = time.perf_counter()
    learned = ours.LearnedMetrics()
    mine = learned.lpips(policy_crop, full_crop)
    if learned.reasons:
        raise RuntimeError(f"our LPIPS did not run: {learned.reasons}")
    lin_source = learned.sources()["LPIPS linear layers"]
    if "torchmetrics" not in lin_source:
        raise RuntimeError(f"our LPIPS linear layers came from {lin_source}, expected torchmetrics' copy")
    tm_lpips = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).eval()
    theirs = []
    for j in range(args.images):
        tm_lpips.reset()
        theirs.append(float(tm_lpips(to_unit(policy_crop[j:j + 1]).float(), to_unit(full_crop[j:j + 1]).float())))
    tm_lpips.reset()
    tm_mean = float(tm_lpips(to_unit(policy_crop).float(), to_unit(full_crop).float()))  # the paper's batch mean
    check("lpips_max_abs_diff_vs_torchmetrics", max(abs(a - b) for a, b in zip(mine, theirs)), TOLERANCES["lpips_abs"],
          f"(values {min(theirs):.4f}..{max(theirs):.4f}; mean ours {sum(mine) / len(mine):.6f}, torchmetrics {tm_mean:.6f})")
    check("lpips_mean_abs_diff_vs_torchmetrics", abs(sum(mine) / len(mine) - tm_mean), TOLERANCES["lpips_abs"])
    try:
        import lpips as lpips_pkg

        net = lpips_pkg.LPIPS(net="alex", version="0.1", verbose=False).eval()
        with torch.no_grad():
            orig = net(to_unit(policy_crop).float(), to_unit(full_crop).float(), normalize=True).flatten().tolist()
        check("lpips_max_abs_diff_vs_lpips_package", max(abs(a - b) for a, b in zip(mine, orig)), TOLERANCES["lpips_abs"])
    except Exception as exc:  # an informative extra: torchmetrics is the paper's implementation
        log(f"note: the lpips package did not run here ({type(exc).__name__}: {exc}); torchmetrics was checked")
    log(f"  LPIPS {time.perf_counter() - t:.1f} s")

    # -- PSNR and SSIM -------------------------------------------------------------------------
    t = time.perf_counter()
    psnr_mine = ours.psnr(policy_crop, full_crop)
    tm_psnr = PeakSignalNoiseRatio(data_range=(0.0, 1.0), dim=(1, 2, 3), reduction="none")
    psnr_theirs = tm_psnr(to_unit(policy_crop), to_unit(full_crop)).flatten().tolist()
    check("psnr_max_rel_diff_vs_torchmetrics", max(rel(a, b) for a, b in zip(psnr_mine, psnr_theirs)),
          TOLERANCES["psnr_rel"], f"(values {min(psnr_theirs):.3f}..{max(psnr_theirs):.3f} dB; largest difference "
          f"{max(abs(a - b) for a, b in zip(psnr_mine, psnr_theirs)):.2g} dB)")
    tm_psnr_mean = float(PeakSignalNoiseRatio(data_range=(0.0, 1.0), dim=(1, 2, 3))(to_unit(policy_crop), to_unit(full_crop)))
    check("psnr_mean_rel_diff_vs_torchmetrics", rel(sum(psnr_mine) / len(psnr_mine), tm_psnr_mean), TOLERANCES["psnr_rel"])
    ssim_mine = ours.ssim(policy_crop, full_crop, convention="torchmetrics")
    ssim_theirs = StructuralSimilarityIndexMeasure(data_range=1.0, reduction="none")(to_unit(policy_crop), to_unit(full_crop))
    ssim_theirs = ssim_theirs.flatten().tolist()
    check("ssim_torchmetrics_convention_max_abs_diff", max(abs(a - b) for a, b in zip(ssim_mine, ssim_theirs)),
          TOLERANCES["ssim_abs"], f"(values {min(ssim_theirs):.4f}..{max(ssim_theirs):.4f})")
    valid = ours.ssim(policy_crop, full_crop, convention="valid")
    results["ssim_valid_convention_max_abs_diff_info"] = max(abs(a - b) for a, b in zip(valid, ssim_theirs))
    log(f"info: the 'valid' SSIM convention differs from torchmetrics' by up to "
        f"{results['ssim_valid_convention_max_abs_diff_info']:.2g} here ({crop}x{crop})")
    log(f"  PSNR/SSIM {time.perf_counter() - t:.1f} s")

    # -- FID -------------------------------------------------------------------------------------
    for mode in ("clean", "legacy_tensorflow"):
        t = time.perf_counter()
        learned = ours.LearnedMetrics(fid_mode=mode)
        f_full, f_policy = learned.features(full), learned.features(policy)
        if f_full is None:
            raise RuntimeError(f"our FID did not run: {learned.reasons}")
        fid_mine = learned.fid_from_features(f_policy, f_full)
        wrapper = InceptionV3W(str(inception_dir), download=False, resize_inside=mode == "legacy_tensorflow").eval()
        seen = []

        def extractor(x, wrapper=wrapper, seen=seen):
            features = wrapper(x)
            seen.append(features.detach().clone())
            return features

        fid_theirs = float(cleanfid_fid.compute_fid(str(full_dir), str(policy_dir), mode=mode, custom_feat_extractor=extractor,
                                                    device=torch.device("cpu"), num_workers=0, batch_size=args.images,
                                                    verbose=False, use_dataparallel=False))
        their_features = torch.cat(seen)
        feature_diff = float((torch.cat([f_full, f_policy]).float() - their_features).abs().max())
        scale = float(their_features.abs().max())
        results[f"fid_{mode}"] = {"ours": fid_mine, "clean_fid": fid_theirs, "max_feature_abs_diff": feature_diff,
                                  "max_feature_abs": scale}
        if feature_diff == 0:
            where = "features bit-identical, so the difference is the Fréchet step's (sqrtm vs eigenvalues)"
        else:  # the Fréchet step alone on our features tells the two sources apart
            frechet_theirs = float(cleanfid_fid.fid_from_feats(f_policy.float().numpy(), f_full.float().numpy()))
            where = (f"features differ by up to {feature_diff:.2g} of {scale:.3g}; the Fréchet step alone "
                     f"differs by {rel(ours.frechet_distance(f_full, f_policy), frechet_theirs):.2g}")
        check(f"fid_{mode}_rel_diff_vs_clean_fid", rel(fid_mine, fid_theirs), TOLERANCES["fid_rel"],
              f"(ours {fid_mine:.6f}, clean-fid {fid_theirs:.6f}; {where})")
        log(f"  FID {mode} {time.perf_counter() - t:.1f} s")
    clean, legacy = results["fid_clean"]["ours"], results["fid_legacy_tensorflow"]["ours"]
    log(f"info: on these images and network, clean vs legacy_tensorflow FID: {clean:.4f} vs {legacy:.4f} "
        f"({100 * (clean - legacy) / legacy:+.1f} %)")

    # -- the Fréchet distance at full rank ---------------------------------------------------------
    t = time.perf_counter()
    g = torch.Generator().manual_seed(4)
    n, d = 2304, 2048
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    a = (torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing).float()
    b = (torch.randn(n, d, generator=g, dtype=torch.float64) @ (mixing * 1.1) + 0.05).float()
    fr_mine = ours.frechet_distance(a, b)
    fr_theirs = float(cleanfid_fid.fid_from_feats(a.numpy(), b.numpy()))
    check("frechet_full_rank_rel_diff_vs_clean_fid", rel(fr_mine, fr_theirs), TOLERANCES["frechet_full_rank_rel"],
          f"({n} x {d} features per set: ours {fr_mine:.9f}, clean-fid {fr_theirs:.9f})")
    log(f"  Fréchet full rank {time.perf_counter() - t:.1f} s")

    results["seconds"] = time.perf_counter() - started
    results["failures"] = failures
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    log(f"metric equivalence: {'FAILED ' + ', '.join(failures) if failures else 'all checks passed'} "
        f"in {results['seconds']:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
