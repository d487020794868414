"""``kvpolicy generate``: one generate call with a policy; writes PNGs and prints the cache report."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .compare import model_family, save_png
from .model_args import check_device, cpu_threads, default_dtype, set_threads, weights_kwargs
from .plan import parse_resolution, resolve_geometry
from .policy_spec import build_policy, check_budget, parse_dtype, parse_policy_options


def output_paths(out: str, n: int) -> list[Path]:
    """``image.png`` for one image, ``image_0.png``, ``image_1.png``, … for a batch."""
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {out!r} must name a .png file")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(n)]


def auto_calibrate(model, model_name: str, path: Path, *, resolution=None, aspect_ratio: float = 1.0) -> Path:
    """scalekv without --calibration/--budget-file: calibrate on the shipped conditions (as the paper
    does before evaluating) and keep the result next to the image; an existing file is reused."""
    if path.is_file():
        print(f"scalekv: using the calibration in {path}", file=sys.stderr)
        return path
    from .calibrate import calibration_conditions, calibration_source, run_calibration

    conditions = calibration_conditions(model_name)
    print(f"scalekv: no --calibration or --budget-file given; calibrating {model_name} on {len(conditions)} "
          f"shipped calibration conditions -> {path}", file=sys.stderr)
    collector, geometry = run_calibration(model, model_name, conditions, resolution=resolution, aspect_ratio=aspect_ratio)
    collector.result(source=calibration_source(model_name, geometry)).save(path)
    return path


def generate_command(args) -> int:
    family = model_family(args.model)
    if args.label is not None and family != "var":
        raise ValueError(f"{args.model} is a text-to-image model: use --prompt, not --label")
    if args.prompt is not None and family == "var":
        raise ValueError(f"{args.model} is class-conditional: use --label N, not --prompt")
    conditions = args.prompt if args.prompt is not None else args.label
    if args.budget is not None and args.policy is None:
        raise ValueError("--budget needs --policy (e.g. --policy scalekv --budget 10%)")
    resolution = parse_resolution(args.resolution)
    geometry = resolve_geometry(args.model, resolution, args.aspect_ratio)
    device = check_device(args.device)
    weights = weights_kwargs(args, args.model)
    threads = cpu_threads(args.threads, device)
    budget = None if args.budget is None else check_budget(args.budget, geometry.schedule, args.model)
    paths = output_paths(args.out, len(conditions))
    for p in paths:
        if not p.parent.is_dir():
            raise ValueError(f"folder {str(p.parent)!r} for --out does not exist")
    if args.option and args.policy is None:
        raise ValueError("--option needs --policy")
    extra = parse_policy_options(args.option, [args.policy]).get(args.policy, {}) if args.policy else {}
    auto_calibration = (args.policy == "scalekv" and not args.budget_file and not args.calibration
                        and "drafters" not in extra)
    policy = None
    if args.policy is not None and not auto_calibration:
        policy = build_policy(args.policy, budget, budget_file=args.budget_file, calibration=args.calibration,
                              options=extra)
        policy.plan(geometry.schedule, geometry.num_layers)  # a bad budget fails before the model loads
    elif args.budget_file or args.calibration:
        raise ValueError("--budget-file/--calibration need --policy scalekv")
    dtype = default_dtype(device, args.dtype)
    set_threads(threads)
    from adapters import load_model

    model = load_model(args.model, device=device, dtype=parse_dtype(dtype), **weights)
    if auto_calibration:
        calibration = auto_calibrate(model, args.model, Path(args.out).with_suffix(".calibration.json"),
                                     resolution=resolution, aspect_ratio=args.aspect_ratio)
        policy = build_policy("scalekv", budget, calibration=calibration, options=extra)
        policy.plan(geometry.schedule, geometry.num_layers)
    kwargs = {}
    if resolution is not None:
        kwargs["resolution"] = resolution
    if args.aspect_ratio != 1.0:
        kwargs["aspect_ratio"] = args.aspect_ratio
    started = time.perf_counter()
    out = model.generate(list(conditions), policy=policy, seed=args.seed, batch_size=len(conditions), **kwargs)
    elapsed = time.perf_counter() - started
    for image, path in zip(out.images, paths):
        save_png(image, path)
    report = out.cache_report
    print(f"{args.model}, policy {policy if policy is not None else 'full cache'}, seed {args.seed}, "
          f"{len(conditions)} image(s) in {elapsed:.2f} s ({device}, {dtype}"
          + (f", {torch.get_num_threads()} CPU thread(s))" if torch.device(device).type == "cpu" else ")"))
    print(report.table())
    if report.scale_seconds:
        print("seconds per scale: " + " ".join(f"{t:.3f}" for t in report.scale_seconds))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
