"""``kvpolicy calibrate``: ScaleKV's calibration on a real model.

Runs full-cache generations with a ``policies.scalekv.calibration.ScaleKVStatsCollector`` passed as
``stats=`` (the adapter feeds it every layer's queries and keys at every scale, conditional rows
only), turns the statistics into a ``CalibrationResult`` (Attention Selectivity Index per
(layer, scale); drafters = lowest z-scores) and saves it as JSON. ``compare`` and ``generate`` take
it back with ``--policy scalekv --calibration FILE``. The paper calibrated on 10 generated prompts
(shared/reference/scalekv.md §2.3); the shipped ``data/calibration_prompts.txt`` has 10.
"""

from __future__ import annotations

import time
from pathlib import Path

from .compare import model_family, prepare_output
from .model_args import check_device, cpu_threads, default_dtype, set_threads, weights_kwargs
from .plan import parse_resolution, resolve_geometry
from .policy_spec import check_budget, parse_dtype
from .prompts import CALIBRATION_PROMPTS, parse_labels, read_prompts

DEFAULT_CALIBRATION_LABELS = "0-9"


def calibration_conditions(model: str, prompts=None, labels=None) -> list:
    family = model_family(model)
    if labels is not None and family != "var":
        raise ValueError(f"--labels are class labels for VAR models; {model} takes --prompts")
    if prompts is not None and family == "var":
        raise ValueError(f"{model} is class-conditional: give --labels, not --prompts")
    if family == "var":
        return parse_labels(labels if labels is not None else DEFAULT_CALIBRATION_LABELS)
    return read_prompts(prompts if prompts is not None else CALIBRATION_PROMPTS)


def drafter_fraction_for(num_drafters: int, num_layers: int, num_decision_scales: int) -> float:
    """The CalibrationResult fraction that yields exactly ``num_drafters`` ranked pairs."""
    total = num_layers * num_decision_scales
    if not 0 <= num_drafters <= total:
        raise ValueError(f"--num-drafters must be in 0..{total} ({num_layers} layers x {num_decision_scales} "
                         f"compressed scales), got {num_drafters}")
    return num_drafters / total


def calibration_source(model_name: str, geometry) -> str:
    """What a calibration was made on, saved in its JSON and quoted when it does not fit a model."""
    return f"{model_name}, {geometry.num_layers} layers, schedule {geometry.schedule}"


def run_calibration(model, model_name: str, conditions, *, seed: int = 0, top_k=None, batch_size: int = 1,
                    resolution=None, aspect_ratio: float = 1.0, progress: bool = False, dist=None):
    """Feed every condition through ``model.generate(stats=collector)``; return the collector.

    Conditions go in chunks of ``batch_size`` (chunk starting at condition i: seed + i), one
    collector per chunk, merged in chunk order. Under torchrun (``dist``) each rank runs its share
    of the chunks and the statistics are all-reduced: every rank gets the same collector as one
    process would (``distributed.reduce_collectors``)."""
    from policies.scalekv.calibration import ScaleKVStatsCollector

    from .distributed import SINGLE, reduce_collectors

    dist = dist or SINGLE
    geometry = resolve_geometry(model_name, resolution, aspect_ratio)
    options = {} if top_k is None else {"top_k": top_k}

    def make():
        return ScaleKVStatsCollector(geometry.num_layers, geometry.schedule.num_scales, seed=seed, **options)

    kwargs = {}
    if resolution is not None:
        kwargs["resolution"] = resolution
    if aspect_ratio != 1.0:
        kwargs["aspect_ratio"] = aspect_ratio
    starts = list(range(0, len(conditions), batch_size))
    collectors = {}
    for index in dist.share(range(len(starts))):
        start = starts[index]
        chunk = list(conditions[start:start + batch_size])
        collectors[index] = make()
        model.generate(chunk, policy=None, seed=seed + start, batch_size=len(chunk), stats=collectors[index],
                       progress=progress, **kwargs)
    return reduce_collectors(collectors, len(starts), make, dist), geometry


def calibrate_command(args) -> int:
    from policies.scalekv.allocation import decision_scales

    conditions = calibration_conditions(args.model, args.prompts, args.labels)
    resolution = parse_resolution(args.resolution)
    geometry = resolve_geometry(args.model, resolution, args.aspect_ratio)
    device = check_device(args.device)
    weights = weights_kwargs(args, args.model)
    threads = cpu_threads(args.threads, device)
    budget_tokens = None
    if args.budget is not None:
        budget_tokens = check_budget(args.budget, geometry.schedule, args.model).tokens(geometry.schedule)
    if args.export_budget and budget_tokens is None:
        raise ValueError("--export-budget needs --budget (the budget the exported file is for), e.g. --budget 10%")
    fraction = None
    if args.num_drafters is not None:
        if budget_tokens is None:
            raise ValueError("--num-drafters needs --budget: the number of drafters is counted over the scales "
                             "that budget compresses")
        fraction = drafter_fraction_for(args.num_drafters, geometry.num_layers,
                                        len(decision_scales(geometry.schedule, budget_tokens)))
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise ValueError(f"--out {args.out!r} must name a .json file")
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
        collector, geometry = run_calibration(model, args.model, conditions, seed=args.seed, top_k=args.top_k,
                                              resolution=resolution, aspect_ratio=args.aspect_ratio, dist=dist)
        result = collector.result(source=calibration_source(args.model, geometry),
                                  **({} if fraction is None else {"drafter_fraction": fraction}))
        # every rank holds the same result; rank 0 writes the files and prints
        dist.on_main(lambda: _write_calibration(args, result, out, geometry, budget_tokens, len(conditions),
                                                time.perf_counter() - started, dist))
    finally:
        dist.close()
    return 0


def _write_calibration(args, result, out: Path, geometry, budget_tokens, num_conditions: int, seconds: float,
                       dist) -> None:
    result.save(out)
    where = "" if not dist.enabled else f" on {dist.world_size} process(es)"
    print(f"calibrated {args.model} on {num_conditions} condition(s){where} in {seconds:.1f} s: "
          f"{geometry.num_layers} layers x {geometry.schedule.num_scales} scales, top-K' {result.top_k}, "
          f"{result.operator} ASI; wrote {out}")
    if budget_tokens is not None:
        drafters = result.drafters(geometry.schedule, budget_tokens)
        count = sum(len(v) for v in drafters.values())
        print(f"drafters at {args.budget} ({budget_tokens} tokens per layer), {count} in all, by decision scale:")
        for scale, layers in drafters.items():
            print(f"  scale {scale:2d}: {', '.join(map(str, layers)) or '-'}")
        if args.export_budget:
            result.to_budget_file(geometry.schedule, args.budget,
                                  **({} if args.num_drafters is None else {"num_drafters": args.num_drafters})).save(args.export_budget)
            print(f"wrote budget file {args.export_budget} (released ScaleKV format)")
