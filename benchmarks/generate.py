"""``kvpolicy generate``: one generate call with a policy; writes PNGs and prints the cache report."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .conditions import single_conditions
from .outputs import save_png
from .model_args import check_device, cpu_threads, default_dtype, key_dtype_kwargs, set_threads, weights_kwargs
from .plan import parse_resolution, resolve_geometry
from .progress import note
from .policy_spec import (build_policy, check_budget, check_seed, parse_dtype, parse_policy_options, plan_now,
                          policies_to_calibrate)


def output_paths(out: str, n: int) -> list[Path]:
    """``image.png`` for one image, ``image_0.png``, ``image_1.png``, … for a batch."""
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {out!r} must name a .png file")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(n)]


def default_out(model: str) -> Path:
    """``kvpolicy-runs/generate-<model>-<time>/image.png``: a new folder per run, never the working tree."""
    from .outputs import fresh_run_dir

    return fresh_run_dir(f"generate-{model}") / "image.png"


def generate_command(args) -> int:
    conditions = single_conditions(args.model, prompt=args.prompt, label=args.label)
    check_seed(args.seed)
    if args.budget is not None and args.policy is None:
        raise ValueError("--budget needs --policy NAME (`kvpolicy list` names them)")
    resolution = parse_resolution(args.resolution)
    geometry = resolve_geometry(args.model, resolution, args.aspect_ratio)
    device = check_device(args.device)
    weights = weights_kwargs(args, args.model)
    threads = cpu_threads(args.threads, device)
    budget = None if args.budget is None else check_budget(args.budget, geometry.schedule, args.model)
    from .outputs import check_new_file

    out_path = Path(args.out) if args.out is not None else default_out(args.model)
    if args.out is not None and not out_path.parent.is_dir():
        raise ValueError(f"folder {str(out_path.parent)!r} for --out does not exist")
    paths = output_paths(str(out_path), len(conditions))
    for p in paths:  # an existing image is never replaced without --overwrite; the folder must take files
        check_new_file(p, "--out", overwrite=args.overwrite)
    if args.option and args.policy is None:
        raise ValueError("--option needs --policy")
    extra = parse_policy_options(args.option, [args.policy]).get(args.policy, {}) if args.policy else {}
    if args.policy is None and (args.budget_file or args.calibration):
        raise ValueError("--budget-file/--calibration configure a policy: give --policy")
    from .calibrate import auto_calibrate, check_before_calibration

    calibrate_first = bool(args.policy) and bool(policies_to_calibrate(
        [args.policy], {args.policy: extra}, budget_file=args.budget_file, calibration=args.calibration))
    policy = None
    if calibrate_first:
        check_before_calibration(args.policy, budget, geometry, extra)
    elif args.policy is not None:
        policy = build_policy(args.policy, budget, budget_file=args.budget_file, calibration=args.calibration,
                              options=extra)
        plan_now(args.policy, policy, geometry.schedule, geometry.num_layers)  # a bad budget fails before the model loads
    dtype = default_dtype(device, args.dtype)
    weights.update(key_dtype_kwargs(args.key_dtype, geometry, dtype))
    set_threads(threads)
    from adapters import load_model

    model = load_model(args.model, device=device, dtype=parse_dtype(dtype), **weights)
    if calibrate_first:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        calibration = auto_calibrate(model, args.model, [args.policy], out_path.with_suffix(".calibration.json"),
                                     resolution=resolution, aspect_ratio=args.aspect_ratio,
                                     log=note)
        policy = build_policy(args.policy, budget, calibration=calibration, options=extra)
        plan_now(args.policy, policy, geometry.schedule, geometry.num_layers)
    kwargs = {}
    if resolution is not None:
        kwargs["resolution"] = resolution
    if args.aspect_ratio != 1.0:
        kwargs["aspect_ratio"] = args.aspect_ratio
    started = time.perf_counter()
    out = model.generate(list(conditions), policy=policy, seed=args.seed, batch_size=len(conditions), **kwargs)
    elapsed = time.perf_counter() - started
    paths[0].parent.mkdir(parents=True, exist_ok=True)
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
