"""``kvpolicy compare``: every policy x budget against the full cache, on the same seeds.

Protocol (ScaleKV, shared/reference/scalekv.md §6.1): each condition (prompt or class label) is
generated once with the full cache (the reference) and once per (policy, budget) with the same seed;
fidelity is measured against the reference image. Work is split into jobs (``jobs``: one generate
call on a chunk of ``batch_size`` conditions with one seed and one configuration), each run and
timed by ``runner``; finished rows (``rows``) go to ``results.jsonl`` right after their job, so an
interrupted run resumes where it stopped; ``compare_reports`` writes the summary, plots and
contact sheet. Reference images are kept as PNG (lossless) and reference tokens as .pt, so resumed
jobs compare against exactly the same reference. Policies that need a calibration and got none are
calibrated on the model first (``calibration.json`` in the output folder). Under torchrun
(``distributed``) each rank runs its share of the (seed, chunk) groups into its own shard of rows,
and rank 0 merges them and writes the reports.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import distributed, progress, reports
from .calibrate import auto_calibrate
from .compare_reports import write_reports
from .compare_settings import CompareSettings, default_budgets, settings_from_args  # noqa: F401  (public names)
from .jobs import Config, Job, all_jobs, build_configs, check_resume, pending_jobs, reference_config, row_key
from . import metric_registry
from .metric_registry import ImageBatch, MetricContext
from .metrics import token_agreement
from .outputs import library_versions, load_png, prepare_output, save_png  # noqa: F401  (their old home)
from .model_args import key_dtype_kwargs
from .plan import resolve_geometry
from .policy_spec import parse_dtype, policies_to_calibrate
from .rows import ResultRow, jsonable
from .runner import TimedRunner


def calibration_note(policies: Sequence[str]) -> str:
    """summary.md's line for the policies compare calibrated: it names only the flags that apply to
    them (a plan file is taken by the policies that declare a ``plan_file_option``)."""
    import kvpolicy

    file_takers = [name for name in policies if kvpolicy.capabilities(name).plan_file_option]
    other = f"; --budget-file FILE also sets the plan of {', '.join(file_takers)}" if file_takers else ""
    return (f"{', '.join(policies)}: the plan comes from calibrating this model on the shipped calibration "
            "conditions (calibration.json) before evaluating, as the paper protocol does; pass "
            f"--calibration FILE to use another calibration{other}.")


class Comparison:
    """Runs (or resumes) a comparison. ``model`` may be injected (tests count its calls)."""

    def __init__(self, settings: CompareSettings, model=None, log: Callable[[str], None] = None,
                 dist: Optional[distributed.Distributed] = None):
        self.s = settings
        # torchrun: this process's rank; one process without it (benchmarks/distributed.py)
        self.dist = dist or distributed.SINGLE
        log = log or progress.note  # above the job bar, never into its line
        self.log = log if not self.dist.sharded else (lambda msg: log(f"[rank {self.dist.rank}] {msg}"))
        self.model = model
        self.device = self.dist.local_device(settings.device)  # cuda: this rank's GPU under torchrun
        self.out = settings.out
        self.results = self.out / "results.jsonl"
        # where this process appends its rows: its own shard when there are several ranks
        self.rows_file = distributed.shard_path(self.out, self.dist.rank) if self.dist.sharded else self.results
        # every registered metric (benchmarks.metric_registry) shares this: backends, options, reasons
        self.metrics = MetricContext(learned_metrics=settings.learned_metrics, fid_mode=settings.fid_mode,
                                     ssim_convention=settings.ssim_convention)
        self._reported_reasons: set[str] = set()
        self.runner = None

    @property
    def generate_calls(self) -> int:
        return 0 if self.runner is None else self.runner.calls

    # paths
    def image_path(self, config: Config, index: int, seed: int) -> Path:
        return self.out / "images" / config.slug / f"{index:04d}_seed{seed}.png"

    def tokens_path(self, index: int, seed: int) -> Path:
        return self.out / "reference_tokens" / f"{index:04d}_seed{seed}.pt"

    def _load_model(self):
        if self.model is None:
            from adapters import load_model

            self.log(f"loading {self.s.model} on {self.device} ({self.s.dtype})")
            geometry = resolve_geometry(self.s.model, self.s.resolution, self.s.aspect_ratio)
            self.model = load_model(self.s.model, device=self.device, dtype=parse_dtype(self.s.dtype),
                                    **self.s.weights, **key_dtype_kwargs(
                                        self.s.key_dtype, resolve_geometry(self.s.model, self.s.resolution,
                                                                           self.s.aspect_ratio), self.s.dtype))
        if self.runner is None:
            self.runner = TimedRunner(self.model, device=self.device, repeats=self.s.repeats,
                                      resolution=self.s.resolution, aspect_ratio=self.s.aspect_ratio)
        return self.model

    def _note_reasons(self) -> None:
        for name, reason in self.metrics.reasons.items():
            if name not in self._reported_reasons:
                self._reported_reasons.add(name)
                self.log(f"note: {reason}")

    @property
    def to_calibrate(self) -> list[str]:
        """The policies that need a calibration this run makes (none given on the command line)."""
        return policies_to_calibrate(self.s.policies, self.s.options, budget_file=self.s.budget_file,
                                     calibration=self.s.calibration)

    def run(self) -> dict:
        previous = torch.get_num_threads()
        if self.s.threads is not None:
            torch.set_num_threads(self.s.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(previous)

    def _run(self) -> Optional[dict]:
        from .outputs import check_output_dir

        check_output_dir(self.out, "--out")
        geometry = resolve_geometry(self.s.model, self.s.resolution, self.s.aspect_ratio)
        to_calibrate = self.to_calibrate
        # every argument is checked before anything is written or loaded (roles from a calibration come later)
        build_configs(self.s, geometry.schedule, geometry.num_layers, skip=to_calibrate)
        from .calibrate import check_before_calibration
        from .policy_spec import check_budget

        for name in to_calibrate:  # their budgets too: below a window fails now, not after calibrating
            for budget in self.s.budgets:
                check_before_calibration(name, check_budget(budget, geometry.schedule, self.s.model), geometry,
                                         self.s.options.get(name))
        self.dist.on_main(lambda: prepare_output(self.out))
        self.dist.check_shared_folder(self.out)
        calibration = None
        if to_calibrate:
            self.dist.on_main(lambda: check_resume(self.s, self.out))
            calibration = auto_calibrate(self._load_model(), self.s.model, to_calibrate, self.out / "calibration.json",
                                         resolution=self.s.resolution, aspect_ratio=self.s.aspect_ratio, log=self.log,
                                         dist=self.dist)
        configs = build_configs(self.s, geometry.schedule, geometry.num_layers, calibration=calibration,
                                calibrated=to_calibrate)
        self.dist.on_main(lambda: check_resume(self.s, self.out))
        # rows of an earlier run that died under torchrun are merged first; every rank gets rank 0's view
        done = self.dist.on_main(lambda: self._merge_and_read_done(configs))
        jobs = all_jobs(self.s, configs)
        pending = pending_jobs(self.s, jobs, done)
        if len(pending) < len(jobs) and self.dist.is_main:
            self.log(f"resuming: {len(jobs) - len(pending)} of {len(jobs)} jobs already finished in {self.results}")
        if self.dist.sharded:  # this rank's share: whole (seed, chunk) groups, reference first
            groups = self.dist.share(list(dict.fromkeys((j.seed, tuple(i for i, _ in j.chunk)) for j in pending)))
            mine = set(groups)
            pending = [j for j in pending if (j.seed, tuple(i for i, _ in j.chunk)) in mine]
            self.log(f"{len(pending)} job(s) in {len(groups)} group(s) on {self.device}")
            self.rows_file.parent.mkdir(parents=True, exist_ok=True)
        versions = library_versions()
        warmed: set[str] = set()
        if pending:
            self._load_model()
            # One untimed full-cache call first: lazy initialisation must not be billed to the reference.
            self.runner.generate(pending[0].conditions, None, pending[0].seed)
            # one bar (rank 0's share) rather than N bars fighting over the terminal
            desc = "compare" if not self.dist.sharded else f"compare, rank 0 of {self.dist.world_size}"
            with progress.progress_bar(len(pending), desc, unit="job",
                                       enabled=self.s.progress and self.dist.is_main) as bar:
                for job in pending:
                    config = job.config
                    bar.set_postfix_str(f"{config.policy_name}{'@' + config.budget if config.budget else ''} "
                                        f"seed {job.seed}")
                    if config.config_id not in warmed:
                        for _ in range(self.s.warmup):
                            self.runner.generate(job.conditions, config.policy, job.seed)
                        warmed.add(config.config_id)
                    rows = self._run_job(job, done, versions)
                    reports.append_rows(self.rows_file, rows)
                    done.update(r["key"] for r in rows)
                    self._note_reasons()
                    self.dist.exit_hook.job_done()
                    bar.update(1)
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
        from .results_io import quarantine_torn_lines

        quarantine_torn_lines(self.results, warn=self.log)  # a crash mid-write left a fragment: set it aside
        self._merge_shards(configs)
        return {r["key"] for r in reports.read_rows(self.results)}

    def _run_job(self, job: Job, done: set, versions: dict) -> list[dict]:
        seed, chunk, config = job.seed, job.chunk, job.config
        timed = self.runner.timed(job.conditions, config.policy, seed)
        out, report = timed.output, timed.output.cache_report
        n = len(chunk)
        if out.images.shape[0] != n:
            raise RuntimeError(f"model returned {out.images.shape[0]} images for {n} conditions")
        fidelity = None
        if config.is_reference:
            for j, (index, _) in enumerate(chunk):
                path = self.image_path(config, index, seed)
                path.parent.mkdir(parents=True, exist_ok=True)
                save_png(out.images[j], path)
                tpath = self.tokens_path(index, seed)
                tpath.parent.mkdir(parents=True, exist_ok=True)
                torch.save([t[j:j + 1].cpu() for t in out.tokens], tpath)
        else:
            fidelity = self._fidelity(out, chunk, seed)
        last_read = max(0, report.schedule.num_scales - 2)
        settings = {"device": self.s.device, "dtype": self.s.dtype, "batch_size": self.s.batch_size,
                    "threads": self.s.threads, "repeats": self.s.repeats, "warmup": self.s.warmup,
                    "resolution": self.s.resolution, "aspect_ratio": self.s.aspect_ratio,
                    **({"weights": {k: str(v) for k, v in self.s.weights.items()}} if self.s.weights else {})}
        rows = []
        for j, (index, condition) in enumerate(chunk):
            key = row_key(self.s, condition, seed, config)
            if key in done:
                continue  # finished earlier (partial chunk): keep the old row
            image_path = self.image_path(config, index, seed)
            if not config.is_reference:
                image_path.parent.mkdir(parents=True, exist_ok=True)
                save_png(out.images[j], image_path)
            row = ResultRow(
                key=key, config_id=config.config_id, model=self.s.model, condition_index=index,
                condition_kind=self.s.condition_kind, condition=condition, seed=seed,
                policy=config.policy_name, budget=config.budget,
                policy_config=None if config.is_reference else config.policy.to_config(),
                budget_tokens=None if config.is_reference else
                config.policy.plan(report.schedule, report.num_layers).budget_tokens,
                images_per_call=n,
                kv_bytes_per_scale=[b // n for b in report.kv_bytes],
                full_kv_bytes_per_scale=[b // n for b in report.full_kv_bytes],
                kv_bytes_final=report.kv_bytes[-1] // n, kv_bytes_last_read=report.kv_bytes[last_read] // n,
                peak_kv_bytes=report.peak_kv_bytes // n, full_peak_kv_bytes=report.full_peak_kv_bytes // n,
                kept_lengths_last_read=report.kept_lengths[last_read],
                device_peak_bytes=timed.device_peak,
                seconds_per_image=timed.median_seconds / n, seconds_per_call_repeats=timed.seconds,
                scale_seconds_per_image=[t / n for t in timed.scale_seconds],
                image=str(image_path.relative_to(self.out)), settings=settings,
                generation_config=jsonable(out.config), versions=versions)
            if fidelity is not None:
                row.metrics = {field: per_image[j] for field, per_image in fidelity["values"].items()}
                row.identical_to_reference = bool(torch.equal(out.images[j].cpu(), fidelity["refs"][j]))
                row.token_agreement_per_scale = fidelity["agreement"][j]
            rows.append(row.to_json())
        return rows

    def _fidelity(self, out, chunk, seed: int) -> dict:
        """Per-image fidelity against the saved reference images and tokens of the same seed."""
        reference = reference_config()
        refs = torch.stack([load_png(self.image_path(reference, index, seed)) for index, _ in chunk])
        refs_tokens = [torch.load(self.tokens_path(index, seed)) for index, _ in chunk]
        ref_tok = [torch.cat([t[s] for t in refs_tokens]) for s in range(len(out.tokens))]
        tokens = [t.cpu() for t in out.tokens]
        return {"refs": refs, "agreement": token_agreement(tokens, ref_tok),
                "values": metric_registry.image_values(self.metrics, ImageBatch(out.images, refs, tokens, ref_tok))}

    def write_reports(self, configs: Sequence[Config]) -> dict:
        self._note_reasons()
        notes = []
        if self.to_calibrate:
            notes.append(calibration_note(self.to_calibrate))
        return write_reports(self.s, configs, out=self.out, results=self.results, metrics=self.metrics,
                             image_path=self.image_path, notes=notes)


def compare_command(args) -> int:
    import shlex

    settings = settings_from_args(args)
    settings.command = "kvpolicy " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    dist = distributed.setup(settings.device, getattr(args, "dist_backend", None), getattr(args, "dist_timeout", None))
    started = time.perf_counter()
    try:
        result = Comparison(settings, dist=dist).run()
    except BaseException:
        dist.close(finished=False)
        raise
    dist.close()
    if result is None:  # not rank 0: its rows are merged and reported by rank 0
        return 0
    print(reports.summary_table(result["summary"]))
    print(f"\nFID: clean-fid's {settings.fid_mode!r} mode; summary.md names every metric's implementation and version.")
    in_file = len(reports.read_rows(settings.out / "results.jsonl"))
    print(f"wrote {settings.out}/results.jsonl ({len(result['rows'])} rows for this command's conditions, seeds and "
          f"configurations; the file holds {in_file}), summary.md, plots, contact_sheet.png "
          f"in {time.perf_counter() - started:.1f} s")
    return 0
