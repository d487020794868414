"""``kvpolicy compare``'s settings: every argument checked before any model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import attrs

import kvpolicy
from adapters.families import preset

from .conditions import evaluation_conditions
from .metrics import DEFAULT_FID_MODE, DEFAULT_SSIM_CONVENTION, check_fid_mode, check_ssim_convention
from .model_args import check_device, cpu_threads, default_dtype, weights_kwargs
from .plan import parse_resolution
from .policy_spec import check_policy_name, parse_dtype, parse_policy_options, parse_seeds, split_list
from .prompts import DATA_DIR

PAPER_BUDGETS = "4%,10%,20%"
# a tiny preset's short schedule (265 tokens at 256^2) leaves 4% = 11 tokens, below the observation windows
TINY_BUDGETS = "20%,40%"


@attrs.define
class CompareSettings:
    """Everything that defines a comparison run (recorded in run.json and in every row)."""

    model: str
    policies: list[str]
    budgets: list[str]
    conditions: list[Any]
    condition_kind: str  # "prompt" or "label"
    seeds: list[int]
    out: Path
    device: str = "cpu"
    dtype: str = "fp32"
    batch_size: int = 1
    repeats: int = 1
    warmup: int = 1
    resolution: Any = None
    aspect_ratio: float = 1.0
    budget_file: Optional[str] = None
    calibration: Optional[str] = None
    learned_metrics: bool = True
    fid_mode: str = DEFAULT_FID_MODE  # clean-fid's "clean" (the paper's) or "legacy_tensorflow"
    ssim_convention: str = DEFAULT_SSIM_CONVENTION
    progress: bool = True
    options: dict = attrs.field(factory=dict)  # {policy: {option: value}}
    threads: Optional[int] = None  # torch intra-op threads (None: leave torch's setting)
    command: Optional[str] = None  # the command line, for the record
    weights: dict = attrs.field(factory=dict)  # load_model's weights / vae_weights / text_encoder, when given
    key_dtype: Optional[str] = None  # --key-dtype (None: the model's official key-cache layout)

    def fingerprint(self) -> dict:
        """Settings that change the images: a resumed run must match them."""
        fingerprint = {"model": self.model, "device": self.device, "dtype": self.dtype, "batch_size": self.batch_size,
                       "resolution": self.resolution, "aspect_ratio": self.aspect_ratio, "threads": self.threads}
        if self.weights:  # absent when not given, so runs recorded before the option existed still resume
            fingerprint["weights"] = {k: str(v) for k, v in sorted(self.weights.items())}
        if self.key_dtype is not None:
            fingerprint["key_dtype"] = self.key_dtype
        if self.ssim_convention != DEFAULT_SSIM_CONVENTION:  # rows hold SSIM values: one convention per run
            fingerprint["ssim"] = self.ssim_convention
        return fingerprint

    def as_dict(self) -> dict:
        d = attrs.asdict(self)
        d["out"] = str(self.out)
        return d


def default_budgets(model: str) -> str:
    """The paper's settings; larger fractions for tiny presets (their schedules are short)."""
    return TINY_BUDGETS if preset(model).tiny else PAPER_BUDGETS


def paper_defaults() -> dict:
    """``data/paper_defaults.json``: the paper's table order and the policies whose largest batch
    bench-gpu measures (data about the paper, kept out of the code)."""
    import json

    return json.loads((DATA_DIR / "paper_defaults.json").read_text())


def policy_order() -> list[str]:
    """The registered policies but the full cache: the paper's Table 1 order for those it lists,
    then the others alphabetically."""
    table = paper_defaults()["table_order"]
    registered = [p for p in kvpolicy.list_policies() if not kvpolicy.capabilities(p).keeps_everything]
    return [p for p in table if p in registered] + [p for p in registered if p not in table]


def default_model() -> str:
    """The first runnable tiny preset of the registry: a comparison that runs anywhere in minutes."""
    from adapters.families import list_families

    for family in list_families().values():
        for name, p in family.presets.items():
            if p.tiny and p.runnable and family.load is not None:
                return name
    raise ValueError("no registered model family has a tiny preset; give --model")


def default_out(model: str) -> Path:
    """``kvpolicy-runs/compare-MODEL/`` (was ``./kvpolicy-compare``): out of the working tree's root,
    and stable, so running the same command again resumes it."""
    from .outputs import resumable_run_dir

    return resumable_run_dir(f"compare-{model}")


def settings_from_args(args) -> CompareSettings:
    """Validate every argument before any model is loaded."""
    if args.model is None:
        args.model = default_model()
    conditions, kind = evaluation_conditions(args.model, prompts=args.prompts, labels=args.labels, limit=args.limit)
    if args.policies is None:
        policies = policy_order()
    else:
        policies = split_list(args.policies, "--policies")
    for name in policies:
        check_policy_name(name)
    budgets = split_list(args.budgets if args.budgets is not None else default_budgets(args.model), "--budgets")
    seeds = parse_seeds(args.seeds)
    device = check_device(str(args.device))
    weights = weights_kwargs(args, args.model)
    warmup = args.warmup if args.warmup is not None else (1 if device.startswith("cuda") else 0)
    for name, value, low in (("--batch-size", args.batch_size, 1), ("--repeats", args.repeats, 1), ("--warmup", warmup, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    dtype = default_dtype(device, args.dtype)
    parse_dtype(dtype)
    from .model_args import key_dtype_kwargs
    from .plan import resolve_geometry

    key_dtype = getattr(args, "key_dtype", None)
    key_dtype_kwargs(key_dtype, resolve_geometry(args.model, parse_resolution(args.resolution), args.aspect_ratio), dtype)
    from .policy_spec import check_file_options

    check_file_options(policies, budget_file=args.budget_file, calibration=args.calibration)
    options = parse_policy_options(getattr(args, "option", None), policies)
    threads = cpu_threads(getattr(args, "threads", None), device)
    return CompareSettings(key_dtype=key_dtype, weights=weights, threads=threads, options=options, model=args.model, policies=policies, budgets=budgets, conditions=conditions,
                           condition_kind=kind, seeds=seeds, out=default_out(args.model) if args.out is None else Path(args.out), device=device, dtype=dtype,
                           batch_size=args.batch_size, repeats=args.repeats, warmup=warmup,
                           resolution=parse_resolution(args.resolution), aspect_ratio=args.aspect_ratio,
                           budget_file=args.budget_file, calibration=args.calibration,
                           learned_metrics=not args.no_learned_metrics, progress=not args.no_progress,
                           fid_mode=check_fid_mode(getattr(args, "fid_mode", DEFAULT_FID_MODE)),
                           ssim_convention=check_ssim_convention(getattr(args, "ssim", DEFAULT_SSIM_CONVENTION)))
