"""The ``kvpolicy`` command: list, plan, generate, compare, calibrate, bench-gpu, check.

Heavy modules (models, matplotlib) are imported only by the sub-command that needs them. User
errors (bad arguments, missing or unreadable files: ``CommandError``, ``ValueError``, ``OSError``)
end with one line ``kvpolicy <command>: error: …`` on stderr and exit status 2; ``--debug`` (or
KVPOLICY_TRACEBACK=1) shows their traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence


def _add_model_args(p, *, required: bool = True, model_help: str = "model preset (see `kvpolicy list --models`)"):
    p.add_argument("--model", required=required, default=None, help=model_help)
    p.add_argument("--resolution", default=None, help="Infinity: 256/512/768/1024 or a pn name like 1M; VAR: 256/512")
    p.add_argument("--aspect-ratio", type=float, default=1.0,
                   help="h/w, one of Infinity's templates (0.333, 0.4, 0.5, 0.571, 0.666, 0.75, 0.8, 1, 1.25, 1.333, "
                        "1.5, 1.75, 2, 2.5, 3); VAR: 1 only; default 1")


def _add_plan_file_args(p):
    p.add_argument("--budget-file", default=None, metavar="PATH|NAME",
                   help="a plan/budget file, for the policies that take one: a path, or a released file shipped "
                        "with the policy by name (scalekv: infinity-2b-10%%, infinity-8b-10%%; heatkv: infinity-2b, "
                        "infinity-8b, its released head orders)")
    p.add_argument("--calibration", default=None, help="calibration JSON from `kvpolicy calibrate`, for the "
                   "calibrated policies (without it they are calibrated on the model first)")


def _add_option_arg(p):
    p.add_argument("--option", action="append", default=None, metavar="POLICY.KEY=VALUE",
                   help="a policy option, repeatable, e.g. snapkv.window_size=16 or streamingllm.num_sinks=1")


def _add_key_dtype_arg(p):
    p.add_argument("--key-dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="dtype of the cached keys (default: the model's official layout: Infinity caches float32 "
                        "keys, normalised in float32, next to values in the compute dtype; VAR the compute dtype). "
                        "--key-dtype bf16 gives a bf16 key cache")


def _add_run_args(p):
    from .model_args import add_weights_args

    add_weights_args(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, … (default cpu)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="compute dtype (default: fp32 on CPU, bf16 on CUDA)")
    _add_key_dtype_arg(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default on CPU: 1, which keeps "
                   "latencies stable on a shared machine and is fastest for the tiny models; raise it for large "
                   "models on a free machine)")


def _add_distributed_args(p):
    from .distributed import add_arguments

    add_arguments(p)


def _add_progress_arg(p) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (bars show only on a terminal, and only for steps longer than half a second)")


PLUGIN_HELP = ("a Python file or importable module that registers policies (@register_policy) or model families "
               "(adapters.families.register_family); repeatable. "
               "Also read from KVPOLICY_PLUGINS (separated by '" + os.pathsep + "')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpolicy", description="KV-cache policies for next-scale image models: "
                                     "plan memory, generate, compare policies, calibrate ScaleKV.")
    parser.add_argument("--plugin", action="append", default=[], dest="plugins_top", metavar="FILE|MODULE",
                        help=PLUGIN_HELP)
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of user errors too (same as KVPOLICY_TRACEBACK=1)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--plugin", action="append", default=[], dest="plugins", metavar="FILE|MODULE",
                        help=PLUGIN_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, parents=[common], **k)  # every command takes --plugin

    p = sub.add_parser("list", help="registered policies (or models) with one-line descriptions")
    p.add_argument("--models", action="store_true", help="list model presets instead of policies")

    p = sub.add_parser("plan", help="per-scale KV bytes of a model geometry under a policy (no weights needed)")
    _add_model_args(p)
    p.add_argument("--policy", required=True)
    p.add_argument("--budget", default=None, help="'10%%', 0.1 or a token count like 650")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="value (compute) dtype of the cache; default bf16")
    _add_key_dtype_arg(p)
    p.add_argument("--no-cfg", action="store_true", help="one row per image (default: conditional + unconditional)")
    _add_plan_file_args(p)
    p.add_argument("--per-head", action="store_true",
                   help="also print every head's kept tokens per scale (head-wise policies) and the plan's per-head capacities")
    _add_option_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    _add_progress_arg(p)

    p = sub.add_parser("generate", help="generate image(s) with a policy and print the cache report")
    _add_model_args(p)
    p.add_argument("--policy", default=None, help="default: full cache")
    p.add_argument("--budget", default=None)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", action="append", help="text prompt (Infinity); repeat for a batch")
    group.add_argument("--label", action="append", type=int, help="class label (VAR); repeat for a batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output PNG, index appended for a batch (default: image.png in a new "
                   "folder kvpolicy-runs/generate-MODEL-TIME/); an existing file is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _add_option_arg(p)
    _add_run_args(p)
    _add_plan_file_args(p)

    p = sub.add_parser("compare", help="head-to-head comparison of policies and budgets against the full cache")
    _add_model_args(p, required=False, model_help="model preset (see `kvpolicy list --models`); default: the first "
                    "tiny preset of the registry (infinity-tiny)")
    p.add_argument("--policies", default=None, help="comma-separated; default: every registered policy but full")
    p.add_argument("--budgets", default=None, help="comma-separated, e.g. 4%%,10%%,20%% or 265,650,1300 (the paper's "
                   "4/10/20%% at 1024^2); default 4%%,10%%,20%%, and 20%%,40%% for the *-tiny models, whose 256^2 "
                   "schedule (265 tokens) leaves 4%% = 11 tokens, below the observation windows of snapkv/scalekv")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--prompts", default=None, help="text file / JSON list / COCO captions JSON (Infinity)")
    cond.add_argument("--labels", default=None, help="class labels for VAR models, e.g. 1,2,3 or 0-7")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts (default: 8 for the built-in list)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; every condition is generated with each")
    p.add_argument("--out", default=None, help="output folder, resumed if it holds a run with the same settings "
                   "(default: kvpolicy-runs/compare-MODEL/)")
    p.add_argument("--batch-size", type=int, default=1, help="conditions per generate call")
    p.add_argument("--repeats", type=int, default=1, help="timed generations per job (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed generations before each configuration's first "
                   "job (default 1 on CUDA, 0 on CPU; one untimed full-cache call always precedes all timing)")
    p.add_argument("--no-learned-metrics", action="store_true", help="skip LPIPS/FID even when their weights exist")
    p.add_argument("--fid-mode", default="clean", choices=["clean", "legacy_tensorflow"],
                   help="FID preprocessing as clean-fid names it: clean (default; the paper's: PIL bicubic resize to "
                   "299 in float) or legacy_tensorflow (StyleGAN's: the Inception file's own bilinear resize)")
    p.add_argument("--ssim", default="valid", choices=["valid", "torchmetrics"],
                   help="SSIM convention: valid (default; Wang et al./MATLAB/skimage: windows inside the image) or "
                   "torchmetrics (reflect-padded borders, as StructuralSimilarityIndexMeasure(data_range=1.0))")
    _add_progress_arg(p)
    _add_option_arg(p)
    _add_run_args(p)
    _add_plan_file_args(p)
    _add_distributed_args(p)

    p = sub.add_parser("calibrate", help="calibrate a model for the policies that need it (attention statistics)")
    _add_model_args(p)
    p.add_argument("--policy", default=None, help="comma-separated calibrated policies (default: every registered "
                   "policy that needs a calibration)")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--prompts", default=None, help="default: the shipped 10 calibration prompts (Infinity)")
    cond.add_argument("--labels", default=None, help="class labels (VAR)")
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=None, help="history top-K' for the concentration statistic")
    p.add_argument("--num-drafters", type=int, default=None, help="number of drafter (layer, scale) pairs")
    p.add_argument("--export-budget", default=None, help="also write a released-format budget JSON for --budget")
    p.add_argument("--budget", default=None, help="budget for --export-budget, e.g. 10%%")
    _add_progress_arg(p)
    _add_run_args(p)
    _add_distributed_args(p)

    p = sub.add_parser("bench-gpu", help="GPU memory/latency of Infinity-2B/8B geometries with random weights")
    p.add_argument("--models", default=None, help="default infinity-2b,infinity-8b (dry run: infinity-tiny)")
    p.add_argument("--policies", default=None, help="default: every registered policy but full")
    p.add_argument("--budget", default=None, help="default 650 tokens per layer, the paper's 10%% at 1024^2 "
                   "(dry run: 50%%)")
    p.add_argument("--budget-file", action="append", default=None, metavar="MODEL=PATH",
                   help="plan/budget file per model for the policies that take one, a path or a released name "
                        "(default: the released file the policy ships for that model and budget, if any)")
    p.add_argument("--batches", default=None, help="default 1,8 (dry run: 1,2)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement, median (default 3; dry run 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 1; dry run 0)")
    p.add_argument("--max-batch", type=int, default=None, help="cap of the largest-batch search (default 64; dry run 4)")
    _add_key_dtype_arg(p)
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/ for GPU runs, files named "
                   "by time; a new kvpolicy-runs/bench-gpu-dryrun-TIME/ for --dry-run, never the tracked results)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: exercise the whole script without a GPU")
    _add_progress_arg(p)

    from .check import add_check_parser

    add_check_parser(sub, _add_option_arg)
    p = sub.add_parser("train-tiny", help="train infinity-tiny and var-tiny on procedural scenes (CPU)")
    from adapters.tiny.arguments import add_train_tiny_arguments

    add_train_tiny_arguments(p)
    return parser


def version_text() -> str:
    """``kvpolicy 0.1.0 (torch 2.13.0+cpu, python 3.12.3)``: what a bug report needs first."""
    import platform

    import kvpolicy

    try:
        from importlib import metadata

        torch_version = metadata.version("torch")
    except Exception:  # torch missing or installed without metadata: still answer --version
        torch_version = "not installed"
    return f"kvpolicy {kvpolicy.__version__} (torch {torch_version}, python {platform.python_version()})"


class CommandError(Exception):
    """An error whose message is for the user."""


# The exceptions that mean "the user asked for something impossible": everything else is a bug.
USER_ERRORS = (CommandError, ValueError, OSError)


def _cmd_list(args) -> int:
    if args.models:
        from adapters.families import list_families, list_models

        runnable = set(list_models())
        for family in list_families().values():
            for name, preset in sorted(family.presets.items()):
                kind = "runnable" if name in runnable else "geometry only (kvpolicy plan)"
                print(f"{name:<20} {family.name:<10} {family.conditioning:<7} {kind}"
                      f"{', tiny (CPU-sized)' if preset.tiny else ''}")
        return 0
    import kvpolicy

    policies = kvpolicy.list_policies()
    width = max(map(len, policies)) if policies else 0
    for name, description in policies.items():
        print(f"{name:<{width}}  {description}")
    return 0


def _cmd_plan(args) -> int:
    from .plan import format_plan, parse_resolution, plan_memory
    from .policy_spec import parse_dtype

    result = plan_memory(args.model, args.policy, args.budget, resolution=parse_resolution(args.resolution),
                         aspect_ratio=args.aspect_ratio, batch=args.batch, dtype=parse_dtype(args.dtype),
                         key_dtype=None if args.key_dtype is None else parse_dtype(args.key_dtype),
                         cfg=not args.no_cfg, budget_file=args.budget_file, calibration=args.calibration,
                         options=args.option, progress=not args.no_progress)
    print(json.dumps(result, indent=1) if args.json else format_plan(result, per_head=args.per_head))
    return 0


def _cmd_generate(args) -> int:
    from .generate import generate_command

    return generate_command(args)


def _cmd_compare(args) -> int:
    from .compare import compare_command

    return compare_command(args)


def _cmd_calibrate(args) -> int:
    from .calibrate import calibrate_command

    return calibrate_command(args)


def _cmd_bench_gpu(args) -> int:
    from .bench_gpu import bench_gpu_command

    return bench_gpu_command(args)


def _cmd_check(args) -> int:
    from .check import check_command

    return check_command(args)


def _cmd_train_tiny(args) -> int:
    from adapters.tiny.train import train_tiny_command

    return train_tiny_command(args)


COMMANDS = {"list": _cmd_list, "plan": _cmd_plan, "generate": _cmd_generate, "compare": _cmd_compare,
            "calibrate": _cmd_calibrate, "bench-gpu": _cmd_bench_gpu, "check": _cmd_check,
            "train-tiny": _cmd_train_tiny}


def load_plugins(specs: Sequence[str]) -> None:
    """Import user files/modules so that the policies they register are known to this process."""
    import importlib
    import importlib.util
    from pathlib import Path

    for spec in specs:
        if not spec:
            continue
        path = Path(spec)
        if spec.endswith(".py") or path.is_file():
            if not path.is_file():
                raise CommandError(f"plugin file {spec!r} does not exist (give a .py file or an importable module name)")
            name = f"kvpolicy_plugin_{path.stem}_{abs(hash(str(path.resolve()))):x}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(spec)
            except ModuleNotFoundError as exc:
                raise CommandError(f"plugin {spec!r} is neither a .py file nor an importable module ({exc})") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        env_plugins = [p for p in os.environ.get("KVPOLICY_PLUGINS", "").split(os.pathsep) if p]
        load_plugins(env_plugins + list(args.plugins_top) + list(getattr(args, "plugins", [])))
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if args.debug or os.environ.get("KVPOLICY_TRACEBACK"):
            raise
        hint = " (finished rows are kept: run the same command again to resume)" if args.command == "compare" else ""
        print(f"kvpolicy {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kvpolicy plan ... | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except USER_ERRORS as exc:
        if args.debug or os.environ.get("KVPOLICY_TRACEBACK"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"kvpolicy {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
