"""``kvpolicy calibrate``: a calibration run on a real model, for the policies that need one.

Runs full-cache generations with the calibrated policies' statistics collector passed as ``stats=``
(the adapter feeds it every layer's queries and keys at every scale, conditional rows only), turns
the statistics into the calibration result and saves it as JSON. ``compare`` and ``generate`` take
it back with ``--calibration FILE``. Which policies are calibrated, what they collect and what a
result means are the policies' own declarations (``kvpolicy.capabilities``); the command names
none of them. The shipped calibration prompts are 10, as ScaleKV calibrated on 10 generated
prompts (shared/reference/scalekv.md §2.3).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import kvpolicy

from .conditions import calibration_conditions
from .model_args import check_device, cpu_threads, default_dtype, set_threads, weights_kwargs
from .outputs import prepare_output
from .plan import parse_resolution, resolve_geometry
from .policy_spec import (calibrated_policies, check_budget, check_seed, parse_dtype,  # noqa: F401
                          policies_to_calibrate, split_list)


def calibration_source(model_name: str, geometry) -> str:
    """What a calibration was made on, saved in its JSON and quoted when it does not fit a model."""
    return f"{model_name}, {geometry.num_layers} layers, schedule {geometry.schedule}"


def make_collector(policies: Sequence[str], num_layers: int, num_scales: int, *, seed: int = 0, schedule=None,
                   **options):
    """One statistics collector that serves every policy in ``policies`` (they must share its kind).
    Policies on the shared calibration all hand the same kind: one collector recording every
    registered policy's measures (``kvpolicy.attention_stats.shared_collector``), which needs the
    model's ``schedule``."""
    if not policies:
        raise ValueError("no policy to calibrate: none of the chosen policies declares needs_calibration")
    kinds: dict[type, tuple[list, object]] = {}
    for name in policies:
        collector = kvpolicy.policy_class(name).calibration_collector(num_layers, num_scales, seed=seed,
                                                                      schedule=schedule, **options)
        kinds.setdefault(type(collector), ([], collector))[0].append(name)
    if len(kinds) > 1:
        groups = "; ".join(f"{', '.join(names)}: {kind.__name__}" for kind, (names, _) in kinds.items())
        raise ValueError(f"these policies record different calibration statistics ({groups}); calibrate them "
                         "one at a time with --policy NAME")
    return next(iter(kinds.values()))[1]


def run_calibration(model, model_name: str, conditions, *, policies: Optional[Sequence[str]] = None, seed: int = 0,
                    top_k=None, batch_size: int = 1, resolution=None, aspect_ratio: float = 1.0,
                    progress: bool = False, dist=None, condition_bar: bool = True):
    """Feed every condition through ``model.generate(stats=collector)``; return the collector and the
    geometry. ``policies``: the ones to calibrate for (default: every calibrated policy).

    Conditions go in chunks of ``batch_size`` (chunk starting at condition i: seed + i), one
    collector per chunk, merged in chunk order. Under torchrun (``dist``) each rank runs its share
    of the chunks and the statistics are all-reduced: every rank gets the same collector as one
    process would (``distributed.reduce_collectors``).

    ``condition_bar``: a bar over this process's conditions (on rank 0, on a terminal; each one is a
    whole generation: seconds on a CPU); ``progress``: the model's own per-scale bar as well."""
    from .distributed import SINGLE, reduce_collectors

    dist = dist or SINGLE
    geometry = resolve_geometry(model_name, resolution, aspect_ratio)
    options = {} if top_k is None else {"top_k": top_k}
    chosen = list(policies) if policies is not None else calibrated_policies()

    def make():
        return make_collector(chosen, geometry.num_layers, geometry.schedule.num_scales, seed=seed,
                              schedule=geometry.schedule, **options)

    make()  # a policy that cannot be calibrated, or a bad option, fails before any generation
    kwargs = {}
    if resolution is not None:
        kwargs["resolution"] = resolution
    if aspect_ratio != 1.0:
        kwargs["aspect_ratio"] = aspect_ratio
    from .progress import progress_bar

    starts = list(range(0, len(conditions), batch_size))
    collectors = {}
    mine = list(dist.share(range(len(starts))))
    total = sum(len(conditions[starts[i]:starts[i] + batch_size]) for i in mine)
    with progress_bar(total, f"calibrate {model_name}", unit="condition",
                      enabled=condition_bar and dist.is_main) as bar:
        for index in mine:
            start = starts[index]
            chunk = list(conditions[start:start + batch_size])
            collectors[index] = make()
            model.generate(chunk, policy=None, seed=seed + start, batch_size=len(chunk), stats=collectors[index],
                           progress=progress, **kwargs)
            bar.update(len(chunk))
    return reduce_collectors(collectors, len(starts), make, dist), geometry


def check_before_calibration(name: str, budget, geometry, options: Optional[dict] = None) -> None:
    """Build and plan a policy that waits for its calibration with its planning stand-in, so a bad
    budget or option fails before the model is calibrated (a policy without a stand-in is built
    once its calibration exists)."""
    from .policy_spec import build_policy, plan_now, planning_stand_in

    try:
        stand_in, _ = planning_stand_in(name, geometry.schedule, geometry.num_layers, budget, geometry.num_heads)
    except NotImplementedError:
        return
    plan_now(name, build_policy(name, budget, options={**(options or {}), **stand_in}), geometry.schedule,
             geometry.num_layers)


def auto_calibrate(model, model_name: str, policies: Sequence[str], path: Path, *, resolution=None,
                   aspect_ratio: float = 1.0, log=None, dist=None) -> Path:
    """Policies that need a calibration and got none: calibrate on the model's default calibration
    conditions first (as ScaleKV does before evaluating) and keep the result at ``path``; an
    existing file is reused (a resumed run). Under torchrun every rank calibrates its share and
    holds the reduced result; rank 0 writes it."""
    from .distributed import SINGLE
    from .progress import note

    dist = dist or SINGLE
    log = log or note
    names = ", ".join(policies)
    if dist.on_main(path.is_file):  # every rank decides as rank 0 saw it
        if dist.is_main:
            log(f"{names}: using the calibration in {path}")
        return path
    conditions = calibration_conditions(model_name)
    if dist.is_main:
        log(f"{names}: no --calibration or --budget-file given; calibrating {model_name} on {len(conditions)} "
            f"shipped calibration conditions -> {path}")
    collector, geometry = run_calibration(model, model_name, conditions, policies=policies, resolution=resolution,
                                          aspect_ratio=aspect_ratio, dist=dist)
    result = kvpolicy.policy_class(policies[0]).calibration_result(
        collector, source=calibration_source(model_name, geometry), schedule=geometry.schedule)
    dist.on_main(lambda: result.save(path))
    return path


def calibrate_command(args) -> int:
    policies = calibrated_policies() if args.policy is None else split_list(args.policy, "--policy")
    for name in policies:
        if not kvpolicy.capabilities(name).needs_calibration:
            raise ValueError(f"--policy {name!r} is not calibrated; the calibrated policies are "
                             f"{', '.join(calibrated_policies()) or '(none registered)'}")
    check_seed(args.seed)
    conditions = calibration_conditions(args.model, args.prompts, args.labels)
    resolution = parse_resolution(args.resolution)
    geometry = resolve_geometry(args.model, resolution, args.aspect_ratio)
    device = check_device(args.device)
    weights = weights_kwargs(args, args.model)
    threads = cpu_threads(args.threads, device)
    budget = budget_tokens = None
    if args.budget is not None:
        budget = check_budget(args.budget, geometry.schedule, args.model)
        budget_tokens = budget.tokens(geometry.schedule)
    if args.export_budget and budget_tokens is None:
        raise ValueError("--export-budget needs --budget (the budget the exported file is for), e.g. --budget 10%")
    result_options = {} if args.num_drafters is None else {"num_drafters": args.num_drafters}
    if args.num_drafters is not None and budget_tokens is None:
        raise ValueError("--num-drafters needs --budget: the number of drafters is counted over the scales "
                         "that budget compresses")
    classes = [kvpolicy.policy_class(name) for name in policies]
    for cls in classes:  # fail now, not after the calibration run
        try:
            cls.check_calibration_options(geometry.schedule, geometry.num_layers, budget_tokens, **result_options)
        except ValueError as error:
            if args.policy is not None or not result_options:
                raise
            # without --policy every calibrated policy is calibrated; a policy-specific option needs --policy
            raise ValueError(f"{error}; choose the policies it is for with --policy NAME") from None
    exporters = [cls for cls in classes if cls.plan_file_option is not None]
    if args.export_budget and len(exporters) != 1:
        raise ValueError(f"--export-budget writes one policy's plan file; policies that have one: "
                         f"{', '.join(c.name for c in exporters) or 'none'} (choose one with --policy)")
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise ValueError(f"--out {args.out!r} must name a .json file")
    if args.export_budget:
        from .outputs import check_new_file

        check_new_file(Path(args.export_budget), "--export-budget", overwrite=True)
    dtype = default_dtype(device, args.dtype)
    from .distributed import setup

    dist = setup(device, getattr(args, "dist_backend", None), getattr(args, "dist_timeout", None))
    try:
        folder = out.parent if str(out.parent) else Path(".")
        dist.on_main(lambda: prepare_output(folder))
        dist.check_shared_folder(folder)
        set_threads(threads)
        from adapters import load_model

        model = load_model(args.model, device=dist.local_device(device), dtype=parse_dtype(dtype), **weights)
        started = time.perf_counter()
        collector, geometry = run_calibration(model, args.model, conditions, policies=policies, seed=args.seed,
                                              top_k=args.top_k, resolution=resolution, aspect_ratio=args.aspect_ratio,
                                              dist=dist, condition_bar=not args.no_progress)
        result = classes[0].calibration_result(collector, source=calibration_source(args.model, geometry),
                                               schedule=geometry.schedule, budget_tokens=budget_tokens,
                                               **result_options)
        # every rank holds the same result; rank 0 writes the files and prints
        dist.on_main(lambda: _write_calibration(args, policies, classes, exporters, result, out, geometry, budget,
                                                budget_tokens, result_options, len(conditions),
                                                time.perf_counter() - started, dist))
    except BaseException:
        dist.close(finished=False)
        raise
    dist.close()
    return 0


def _write_calibration(args, policies, classes, exporters, result, out: Path, geometry, budget, budget_tokens,
                       result_options: dict, num_conditions: int, seconds: float, dist) -> None:
    result.save(out)
    where = "" if not dist.enabled else f" on {dist.world_size} process(es)"
    print(f"calibrated {args.model} on {num_conditions} condition(s){where} in {seconds:.1f} s for "
          f"{', '.join(policies)}: {geometry.num_layers} layers x {geometry.schedule.num_scales} scales; wrote {out}")
    if budget_tokens is not None:
        for cls in classes:
            for line in cls.describe_calibration(result, geometry.schedule, budget_tokens):
                print(line)
        if args.export_budget:
            cls = exporters[0]
            policy = kvpolicy.get_policy(cls.name, budget=budget, **{cls.calibration_option: result}, **result_options)
            policy.export_plan_file(geometry.schedule, geometry.num_layers, args.export_budget)
            print(f"wrote the {cls.name} plan file {args.export_budget}")
