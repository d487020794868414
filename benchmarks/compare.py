"""``kvpolicy compare``: every policy x budget against the full cache, on the same seeds.

Protocol (ScaleKV, shared/reference/scalekv.md §6.1): each condition (prompt or class label) is
generated once with the full cache (the reference) and once per (policy, budget) with the same seed;
fidelity is measured against the reference image. Work is split into jobs (one generate call on a
chunk of ``batch_size`` conditions with one seed and one configuration); finished rows go to
``results.jsonl`` right after their job, so an interrupted run resumes where it stopped. Reference
images are kept as PNG (lossless) and reference tokens as .pt, so resumed jobs compare against
exactly the same reference.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import attrs
import numpy as np
import torch

import kvpolicy
from . import distributed, reports
from .model_args import check_device, cpu_threads, default_dtype, weights_kwargs
from .metrics import LearnedMetrics, psnr, ssim, token_agreement
from .plan import parse_resolution, resolve_geometry
from .policy_spec import (build_policy, check_budget, check_policy_name, parse_dtype, parse_policy_options,
                          split_list)
from .prompts import EVAL_PROMPTS, check_unique, parse_labels, read_prompts

DEFAULT_BUILTIN_PROMPTS = 8
# Table 1 order for the built-in policies; other registered policies follow alphabetically.
CANONICAL_ORDER = ("uniform", "sliding_window", "streamingllm", "h2o", "snapkv", "pyramidkv", "scalekv")


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
    progress: bool = True
    options: dict = attrs.field(factory=dict)  # {policy: {option: value}}
    threads: Optional[int] = None  # torch intra-op threads (None: leave torch's setting)
    command: Optional[str] = None  # the command line, for the record
    weights: dict = attrs.field(factory=dict)  # load_model's weights / vae_weights / text_encoder, when given

    def fingerprint(self) -> dict:
        """Settings that change the images: a resumed run must match them."""
        fingerprint = {"model": self.model, "device": self.device, "dtype": self.dtype, "batch_size": self.batch_size,
                       "resolution": self.resolution, "aspect_ratio": self.aspect_ratio, "threads": self.threads}
        if self.weights:  # absent when not given, so runs recorded before the option existed still resume
            fingerprint["weights"] = {k: str(v) for k, v in sorted(self.weights.items())}
        return fingerprint


# -- argument checking ------------------------------------------------------------------------------

def model_family(model: str) -> str:
    return "var" if model.startswith("var") else "infinity"


def default_budgets(model: str) -> str:
    """The paper's settings; larger fractions for the tiny presets (their 256^2 schedule is short)."""
    return "20%,40%" if model.endswith("-tiny") else "4%,10%,20%"


def settings_from_args(args) -> CompareSettings:
    """Validate every argument before any model is loaded."""
    family = model_family(args.model)
    if args.labels is not None and family != "var":
        raise ValueError(f"--labels are class labels for VAR models; {args.model} is a text-to-image model: "
                         "use --prompts FILE (or no option for the built-in prompts)")
    if args.prompts is not None and family == "var":
        raise ValueError(f"{args.model} is class-conditional: give --labels (e.g. 1,2,3), not --prompts")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if family == "var":
        conditions, kind = parse_labels(args.labels if args.labels is not None else "0-3")[: args.limit], "label"
    elif args.prompts is not None:
        conditions, kind = read_prompts(args.prompts, args.limit), "prompt"
    else:
        conditions, kind = read_prompts(EVAL_PROMPTS, args.limit or DEFAULT_BUILTIN_PROMPTS), "prompt"
    check_unique(conditions, "--labels" if kind == "label" else "the prompts")
    if args.policies is None:
        registered = [p for p in kvpolicy.list_policies() if p != "full"]
        policies = [p for p in CANONICAL_ORDER if p in registered] + [p for p in registered if p not in CANONICAL_ORDER]
    else:
        policies = split_list(args.policies, "--policies")
    for name in policies:
        check_policy_name(name)
    budgets = split_list(args.budgets if args.budgets is not None else default_budgets(args.model), "--budgets")
    try:
        seeds = [int(s) for s in split_list(args.seeds, "--seeds")]
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r} must be comma-separated integers") from None
    device = check_device(str(args.device))
    weights = weights_kwargs(args, args.model)
    warmup = args.warmup if args.warmup is not None else (1 if device.startswith("cuda") else 0)
    for name, value, low in (("--batch-size", args.batch_size, 1), ("--repeats", args.repeats, 1), ("--warmup", warmup, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    dtype = default_dtype(device, args.dtype)
    parse_dtype(dtype)
    if args.budget_file and "scalekv" not in policies:
        raise ValueError("--budget-file configures scalekv, which is not among --policies")
    if args.calibration and "scalekv" not in policies:
        raise ValueError("--calibration configures scalekv, which is not among --policies")
    options = parse_policy_options(getattr(args, "option", None), policies)
    threads = cpu_threads(getattr(args, "threads", None), device)
    return CompareSettings(weights=weights, threads=threads, options=options, model=args.model, policies=policies, budgets=budgets, conditions=conditions,
                           condition_kind=kind, seeds=seeds, out=Path(args.out), device=device, dtype=dtype,
                           batch_size=args.batch_size, repeats=args.repeats, warmup=warmup,
                           resolution=parse_resolution(args.resolution), aspect_ratio=args.aspect_ratio,
                           budget_file=args.budget_file, calibration=args.calibration,
                           learned_metrics=not args.no_learned_metrics, progress=not args.no_progress)


def prepare_output(out: Path) -> None:
    """Create the folder and prove it is writable before any work starts."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"output folder {str(out)!r} is not writable ({exc.strerror or exc}); choose another --out") from None


# -- configurations and jobs ------------------------------------------------------------------------

@attrs.define
class Config:
    """One column of the comparison: the reference (policy None) or a policy at a budget."""

    policy_name: str
    budget: Optional[str]
    policy: Optional[kvpolicy.Policy]
    config_id: str

    @property
    def slug(self) -> str:
        text = self.policy_name if self.budget is None else f"{self.policy_name}_{self.budget}"
        return "".join(ch if ch.isalnum() or ch in "-_" else "p" if ch == "%" else "_" for ch in text)


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_configs(settings: CompareSettings, schedule, num_layers: int, *, calibration=None,
                  skip: Sequence[str] = ()) -> list[Config]:
    """The reference plus every (policy, budget); ``calibration`` overrides settings.calibration."""
    calibration = settings.calibration if calibration is None else calibration
    configs = [Config(reports.REFERENCE, None, None, _digest({"policy": reports.REFERENCE}))]
    for name in settings.policies:
        if name in skip:
            for budget in settings.budgets:
                check_budget(budget, schedule, settings.model)
            continue
        budgets = [None] if name == "full" else settings.budgets
        for budget in budgets:
            parsed = None if budget is None else check_budget(budget, schedule, settings.model)
            policy = build_policy(name, parsed, budget_file=settings.budget_file if name == "scalekv" else None,
                                  calibration=calibration if name == "scalekv" else None,
                                  options=settings.options.get(name))
            policy.plan(schedule, num_layers)  # fail now, not after an hour of generation
            config = policy.to_config()
            configs.append(Config(name, budget, policy, _digest(config)))
    return configs


def row_key(settings: CompareSettings, condition, seed: int, config: Config) -> str:
    return _digest({"model": settings.model, "resolution": settings.resolution, "aspect": settings.aspect_ratio,
                    "condition": condition, "seed": seed, "config": config.config_id})


def library_versions() -> dict:
    """Versions of everything that can change an image or a timing (None: not installed / no GPU)."""
    from importlib import metadata

    import PIL

    def installed(name: str) -> Optional[str]:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"kvpolicy": kvpolicy.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__, "transformers": installed("transformers"),
            "huggingface_hub": installed("huggingface_hub"), "safetensors": installed("safetensors"),
            "python": platform.python_version(), "platform": platform.platform(), "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# -- running ----------------------------------------------------------------------------------------

def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image.cpu().numpy()).save(path)


def load_png(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB")))


class Comparison:
    """Runs (or resumes) a comparison. ``model`` may be injected (tests count its calls)."""

    def __init__(self, settings: CompareSettings, model=None, log: Callable[[str], None] = None,
                 dist: Optional[distributed.Distributed] = None):
        self.s = settings
        # torchrun: this process's rank; one process without it (benchmarks/distributed.py)
        self.dist = dist or distributed.SINGLE
        log = log or (lambda msg: print(msg, file=sys.stderr))
        self.log = log if not self.dist.sharded else (lambda msg: log(f"[rank {self.dist.rank}] {msg}"))
        self.model = model
        self.device = self.dist.local_device(settings.device)  # cuda: this rank's GPU under torchrun
        self.out = settings.out
        self.results = self.out / "results.jsonl"
        # where this process appends its rows: its own shard when there are several ranks
        self.rows_file = distributed.shard_path(self.out, self.dist.rank) if self.dist.sharded else self.results
        self.metrics = LearnedMetrics(enabled=settings.learned_metrics)
        self._reported_reasons: set[str] = set()
        self.generate_calls = 0

    # paths
    def image_path(self, config: Config, index: int, seed: int) -> Path:
        return self.out / "images" / config.slug / f"{index:04d}_seed{seed}.png"

    def tokens_path(self, index: int, seed: int) -> Path:
        return self.out / "reference_tokens" / f"{index:04d}_seed{seed}.pt"

    def _check_resume(self) -> None:
        run_file = self.out / "run.json"
        fingerprint = self.s.fingerprint()
        if run_file.is_file():
            previous = json.loads(run_file.read_text())
            if previous.get("fingerprint") != fingerprint:
                raise ValueError(f"{str(self.out)!r} holds a run with other settings {previous.get('fingerprint')} "
                                 f"(now {fingerprint}); use a new --out or the same settings to resume")
        run_file.write_text(json.dumps({"fingerprint": fingerprint, "settings": self._settings_dict(),
                                        "versions": library_versions()}, indent=1, default=str))

    def _settings_dict(self) -> dict:
        d = attrs.asdict(self.s)
        d["out"] = str(self.s.out)
        return d

    def _load_model(self):
        if self.model is None:
            from adapters import load_model

            self.log(f"loading {self.s.model} on {self.device} ({self.s.dtype})")
            self.model = load_model(self.s.model, device=self.device, dtype=parse_dtype(self.s.dtype),
                                    **self.s.weights)
        return self.model

    def _generate(self, conditions: Sequence, config: Config, seed: int):
        kwargs = {}
        if self.s.resolution is not None:
            kwargs["resolution"] = self.s.resolution
        if self.s.aspect_ratio != 1.0:
            kwargs["aspect_ratio"] = self.s.aspect_ratio
        self.generate_calls += 1
        return self.model.generate(list(conditions), policy=config.policy, seed=seed,
                                   batch_size=len(conditions), progress=False, **kwargs)

    def _timed(self, conditions, config: Config, seed: int):
        """Run ``repeats`` generations; return the first output, median seconds and per-scale medians."""
        cuda = self.device.startswith("cuda")
        outputs, seconds, peaks = [], [], []
        for _ in range(self.s.repeats):
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            _synchronize(self.device)
            start = time.perf_counter()
            out = self._generate(conditions, config, seed)
            _synchronize(self.device)
            seconds.append(time.perf_counter() - start)
            if cuda:
                peaks.append(torch.cuda.max_memory_allocated(self.device))
            outputs.append(out)
        per_scale = [statistics.median(col) for col in zip(*[o.cache_report.scale_seconds for o in outputs])] \
            if outputs[0].cache_report.scale_seconds else []
        return outputs[0], seconds, per_scale, (max(peaks) if peaks else None)

    def _note_reasons(self) -> None:
        for name, reason in self.metrics.reasons.items():
            if name not in self._reported_reasons:
                self._reported_reasons.add(name)
                self.log(f"note: {reason}")

    @property
    def auto_calibration(self) -> bool:
        return ("scalekv" in self.s.policies and not self.s.budget_file and not self.s.calibration
                and "drafters" not in self.s.options.get("scalekv", {}))

    def _calibrate(self, geometry) -> Path:
        """scalekv without --calibration/--budget-file: calibrate this model first, as the paper does,
        on the shipped calibration prompts (VAR: labels 0-9); reused when the file exists (resume)."""
        path = self.out / "calibration.json"
        if self.dist.on_main(path.is_file):  # every rank decides as rank 0 saw it
            if self.dist.is_main:
                self.log(f"scalekv: using the calibration in {path}")
            return path
        from .calibrate import calibration_conditions, calibration_source, run_calibration

        conditions = calibration_conditions(self.s.model)
        if self.dist.is_main:
            self.log(f"scalekv: no --calibration or --budget-file given; calibrating {self.s.model} on "
                     f"{len(conditions)} shipped calibration conditions -> {path}")
        # under torchrun every rank calibrates its share; the statistics are all-reduced, so each holds the result
        collector, geometry = run_calibration(self._load_model(), self.s.model, conditions, resolution=self.s.resolution,
                                              aspect_ratio=self.s.aspect_ratio, dist=self.dist)
        result = collector.result(source=calibration_source(self.s.model, geometry))
        self.dist.on_main(lambda: result.save(path))
        return path

    def run(self) -> dict:
        previous = torch.get_num_threads()
        if self.s.threads is not None:
            torch.set_num_threads(self.s.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(previous)

    def _run(self) -> Optional[dict]:
        self.dist.on_main(lambda: prepare_output(self.out))
        self.dist.check_shared_folder(self.out)
        geometry = resolve_geometry(self.s.model, self.s.resolution, self.s.aspect_ratio)
        calibration = None
        if self.auto_calibration:
            # every other argument is checked before the model is loaded for calibration
            build_configs(self.s, geometry.schedule, geometry.num_layers, skip=("scalekv",))
            self.dist.on_main(self._check_resume)
            calibration = self._calibrate(geometry)
        configs = build_configs(self.s, geometry.schedule, geometry.num_layers, calibration=calibration)
        self.dist.on_main(self._check_resume)
        # rows of an earlier run that died under torchrun are merged first; every rank gets rank 0's view
        done = self.dist.on_main(lambda: self._merge_and_read_done(configs))
        items = [(i, c) for i, c in enumerate(self.s.conditions)]
        chunks = [(seed, items[k:k + self.s.batch_size]) for seed in self.s.seeds
                  for k in range(0, len(items), self.s.batch_size)]
        jobs = [(seed, chunk, config) for seed, chunk in chunks for config in configs]
        pending = [j for j in jobs if not all(row_key(self.s, c, j[0], j[2]) in done for _, c in j[1])]
        if len(pending) < len(jobs) and self.dist.is_main:
            self.log(f"resuming: {len(jobs) - len(pending)} of {len(jobs)} jobs already finished in {self.results}")
        if self.dist.sharded:  # this rank's share: whole (seed, chunk) groups, reference first
            groups = self.dist.share(list(dict.fromkeys((seed, tuple(i for i, _ in chunk)) for seed, chunk, _ in pending)))
            mine = set(groups)
            pending = [j for j in pending if (j[0], tuple(i for i, _ in j[1])) in mine]
            self.log(f"{len(pending)} job(s) in {len(groups)} group(s) on {self.device}")
            self.rows_file.parent.mkdir(parents=True, exist_ok=True)
        versions = library_versions()
        warmed: set[str] = set()
        if pending:
            self._load_model()
            # One untimed full-cache call first: lazy initialisation must not be billed to the reference.
            self._generate([c for _, c in pending[0][1]], configs[0], pending[0][0])
            from tqdm.auto import tqdm

            # one bar (rank 0's share) rather than N bars fighting over the terminal
            bar = tqdm(pending, desc="compare" if not self.dist.sharded else f"compare, rank 0 of {self.dist.world_size}",
                       unit="job", disable=not self.s.progress or not self.dist.is_main, file=sys.stderr)
            for seed, chunk, config in bar:
                bar.set_postfix_str(f"{config.policy_name}{'@' + config.budget if config.budget else ''} seed {seed}")
                if config.config_id not in warmed:
                    for _ in range(self.s.warmup):
                        self._generate([c for _, c in chunk], config, seed)
                    warmed.add(config.config_id)
                rows = self._run_job(seed, chunk, config, done, versions)
                reports.append_rows(self.rows_file, rows)
                done.update(r["key"] for r in rows)
                self._note_reasons()
                self.dist.exit_hook.job_done()
        if self.dist.sharded:
            self.dist.barrier()  # every rank's rows are in its shard
            if not self.dist.is_main:
                return None
            self._merge_shards(configs)
        return self.write_reports(configs)

    # -- several processes (benchmarks/distributed.py) -------------------------------------------
    def _merge_shards(self, configs: Sequence[Config]) -> None:
        """Rank 0 (or a later run): the shards' rows into results.jsonl, in job order."""
        position = {c.config_id: k for k, c in enumerate(configs)}
        seeds = {seed: k for k, seed in enumerate(self.s.seeds)}
        added = distributed.merge_shards(self.results, self.out, order=lambda r: (
            seeds.get(r["seed"], len(seeds)), r["condition_index"], position.get(r["config_id"], len(position))))
        if added:
            self.log(f"merged {added} row(s) from {distributed.SHARD_DIR}/ into {self.results}")

    def _merge_and_read_done(self, configs: Sequence[Config]) -> set:
        self._merge_shards(configs)
        return {r["key"] for r in reports.read_rows(self.results)}

    def _run_job(self, seed: int, chunk, config: Config, done: set, versions: dict) -> list[dict]:
        conditions = [c for _, c in chunk]
        out, seconds, per_scale, device_peak = self._timed(conditions, config, seed)
        report = out.cache_report
        n = len(conditions)
        if out.images.shape[0] != n:
            raise RuntimeError(f"model returned {out.images.shape[0]} images for {n} conditions")
        is_ref = config.policy is None
        refs = refs_tokens = None
        if is_ref:
            for j, (index, _) in enumerate(chunk):
                path = self.image_path(config, index, seed)
                path.parent.mkdir(parents=True, exist_ok=True)
                save_png(out.images[j], path)
                tpath = self.tokens_path(index, seed)
                tpath.parent.mkdir(parents=True, exist_ok=True)
                torch.save([t[j:j + 1].cpu() for t in out.tokens], tpath)
        else:
            ref_config = Config(reports.REFERENCE, None, None, "")
            refs = torch.stack([load_png(self.image_path(ref_config, index, seed)) for index, _ in chunk])
            refs_tokens = [torch.load(self.tokens_path(index, seed)) for index, _ in chunk]
            ref_tok = [torch.cat([t[s] for t in refs_tokens]) for s in range(len(out.tokens))]
            psnrs, ssims = psnr(out.images, refs), ssim(out.images, refs)
            lpips = self.metrics.lpips(out.images, refs)
            agreement = token_agreement([t.cpu() for t in out.tokens], ref_tok)
        last_read = max(0, report.schedule.num_scales - 2)
        median_seconds = statistics.median(seconds)
        rows = []
        for j, (index, condition) in enumerate(chunk):
            key = row_key(self.s, condition, seed, config)
            if key in done:
                continue  # finished earlier (partial chunk): keep the old row
            image_path = self.image_path(config, index, seed)
            if not is_ref:
                image_path.parent.mkdir(parents=True, exist_ok=True)
                save_png(out.images[j], image_path)
            row = {
                "key": key, "config_id": config.config_id, "model": self.s.model,
                "condition_index": index, self.s.condition_kind: condition, "seed": seed,
                "policy": config.policy_name, "budget": config.budget,
                "policy_config": None if is_ref else config.policy.to_config(),
                "budget_tokens": None if is_ref else _budget_tokens(config, report),
                "images_per_call": n,
                # counted bytes of the whole call divided by its images (every row holds the same)
                "kv_bytes_per_scale": [b // n for b in report.kv_bytes],
                "full_kv_bytes_per_scale": [b // n for b in report.full_kv_bytes],
                "kv_bytes_final": report.kv_bytes[-1] // n, "kv_bytes_last_read": report.kv_bytes[last_read] // n,
                "peak_kv_bytes": report.peak_kv_bytes // n, "full_peak_kv_bytes": report.full_peak_kv_bytes // n,
                "kept_lengths_last_read": report.kept_lengths[last_read],
                "device_peak_bytes": device_peak,
                "seconds_per_image": median_seconds / n, "seconds_per_call_repeats": seconds,
                "scale_seconds_per_image": [t / n for t in per_scale],
                "psnr": None, "ssim": None, "lpips": None, "identical_to_reference": None,
                "token_agreement_per_scale": None, "token_agreement_mean": None,
                "image": str(image_path.relative_to(self.out)),
                "settings": {"device": self.s.device, "dtype": self.s.dtype, "batch_size": self.s.batch_size,
                             "threads": self.s.threads,
                             "repeats": self.s.repeats, "warmup": self.s.warmup, "resolution": self.s.resolution,
                             "aspect_ratio": self.s.aspect_ratio,
                             **({"weights": {k: str(v) for k, v in self.s.weights.items()}} if self.s.weights else {})},
                "generation_config": _jsonable(out.config), "versions": versions,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            if not is_ref:
                identical = bool(torch.equal(out.images[j].cpu(), refs[j]))
                row.update({"psnr": None if identical else psnrs[j], "ssim": ssims[j], "lpips": lpips[j],
                            "identical_to_reference": identical,
                            "token_agreement_per_scale": agreement[j],
                            "token_agreement_mean": sum(agreement[j]) / len(agreement[j])})
            rows.append(row)
        return rows

    # -- reports ------------------------------------------------------------------------------
    def requested_rows(self, configs: Sequence[Config]) -> list[dict]:
        wanted = {row_key(self.s, c, seed, config) for seed in self.s.seeds for c in self.s.conditions for config in configs}
        rows, seen = [], set()
        for row in reports.read_rows(self.results):
            if row["key"] in wanted and row["key"] not in seen:
                seen.add(row["key"])
                rows.append(row)
        return rows

    def write_reports(self, configs: Sequence[Config]) -> dict:
        rows = self.requested_rows(configs)
        set_metrics = self._set_metrics(configs, rows)
        summary = reports.summarize(rows, set_metrics)
        # Table 1 layout: reference, then budgets from largest to smallest, policies in --policies order
        order = {name: i for i, name in enumerate(self.s.policies)}
        summary.sort(key=lambda e: (e["policy"] != reports.REFERENCE, -(e["budget_tokens"] or 10 ** 9),
                                    order.get(e["policy"], len(order))))
        self._note_reasons()
        notes = [reason for reason in self.metrics.reasons.values()]
        if self.auto_calibration:
            notes.insert(0, "scalekv roles come from calibrating this model on the shipped calibration conditions "
                            "(calibration.json), as ScaleKV does before evaluating; pass --calibration or "
                            "--budget-file to use others.")
        reports.write_summary(self.out / "summary.md", summary, settings=self._settings_dict(), notes=notes)
        (self.out / "set_metrics.json").write_text(json.dumps(set_metrics, indent=1))
        reports.plot_fidelity_vs_budget(self.out / "fidelity_vs_budget.png", summary)
        reports.plot_per_scale(self.out / "kv_bytes_per_scale.png", rows, field="kv_bytes_per_scale",
                               ylabel="KV MiB per image after the scale (log)", scale_by=reports.MIB, logy=True)
        if all(r["scale_seconds_per_image"] for r in rows):
            reports.plot_per_scale(self.out / "latency_per_scale.png", rows, field="scale_seconds_per_image",
                                   ylabel="seconds per image (median over repeats)")
        self._contact_sheet(configs)
        return {"rows": rows, "summary": summary, "set_metrics": set_metrics}

    def _set_metrics(self, configs, rows, batch: int = 32) -> dict:
        """FID between the full-cache set and each configuration's set (None with a reason if absent).

        Features are extracted from the saved PNGs in batches (a COCO-sized run never holds every
        image in memory), the reference set's once."""
        out = {}
        by_config: dict[str, dict] = {}
        for r in rows:
            by_config.setdefault(r["config_id"], {})[(r["condition_index"], r["seed"])] = r
        ref = by_config.get(configs[0].config_id, {})
        ref_features: dict = {}

        def features(entries: dict, keys, cache: Optional[dict] = None):
            todo = [k for k in keys if cache is None or k not in cache]
            found = {} if cache is None else cache
            for i in range(0, len(todo), batch):
                chunk = todo[i:i + batch]
                f = self.metrics.features(torch.stack([load_png(self.out / entries[k]["image"]) for k in chunk]))
                if f is None:
                    return None
                found.update(zip(chunk, f))
            return torch.stack([found[k] for k in keys])

        for config in configs[1:]:
            mine = by_config.get(config.config_id, {})
            common = sorted(set(mine) & set(ref))
            fid = None
            if len(common) >= 2 and self.metrics.enabled:
                ref_f = features(ref, common, ref_features)
                if ref_f is not None:
                    fid = self.metrics.fid_from_features(features(mine, common), ref_f)
            elif common and self.metrics.enabled:
                self.metrics.reasons.setdefault("fid_small", "FID needs at least 2 images per set")
            out[config.config_id] = {"label": reports.config_label(mine[common[0]]) if common else config.slug,
                                     "fid": fid, "images": len(common),
                                     "reason": None if fid is not None else self.metrics.reasons.get("fid") or
                                     self.metrics.reasons.get("fid_small")}
        return out

    def _contact_sheet(self, configs: Sequence[Config], max_rows: int = 8) -> None:
        seed = self.s.seeds[0]
        indices = list(range(min(max_rows, len(self.s.conditions))))
        grid = [[self.image_path(c, i, seed) for c in configs] for i in indices]
        labels = ["full" if c.policy is None else f"{c.policy_name} {c.budget or ''}".strip() for c in configs]
        reports.contact_sheet(self.out / "contact_sheet.png", grid, labels)


def _budget_tokens(config: Config, report) -> Optional[int]:
    plan = config.policy.plan(report.schedule, report.num_layers)
    return plan.budget_tokens


def _jsonable(value):
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)


def compare_command(args) -> int:
    import shlex

    settings = settings_from_args(args)
    settings.command = "kvpolicy " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    dist = distributed.setup(settings.device, getattr(args, "dist_backend", None), getattr(args, "dist_timeout", None))
    started = time.perf_counter()
    try:
        result = Comparison(settings, dist=dist).run()
    finally:
        dist.close()
    if result is None:  # not rank 0: its rows are merged and reported by rank 0
        return 0
    print(reports.summary_table(result["summary"]))
    print(f"\nwrote {settings.out}/results.jsonl ({len(result['rows'])} rows), summary.md, plots, contact_sheet.png "
          f"in {time.perf_counter() - started:.1f} s")
    return 0
