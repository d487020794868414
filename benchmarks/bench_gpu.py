"""``kvpolicy bench-gpu``: memory and latency of full cache vs every policy on real model geometries.

Issue 5 point 5: Infinity-2B and -8B geometries with random weights in bf16 at 1024^2; for full
cache and each policy at the paper's 10 % (650 tokens per layer, shared/reference/scalekv.md §3.2):
peak allocated GPU memory (``torch.cuda.max_memory_allocated`` after a reset, so weights count in
every row), counted KV bytes, median latency per image at batch 1 and 8 (synchronised, after
warm-up), and the largest batch that fits for full cache and for the policies the paper's claim is
about (``data/paper_defaults.json``; doubling, then bisection, on ``torch.cuda.OutOfMemoryError``). One table of ratios, all measured in the same run, goes to
stdout and to ``benchmarks/results/bench_gpu_<time>.{md,json}``.

A policy that needs a calibration gets a plan file (``--budget-file MODEL=PATH``, default: the
released file the policy knows for that model and budget, ``released_plan_file``), else a
calibration run of the same random model on two conditions (its plan then means little, its
memory and speed are what is measured).

``--dry-run`` runs the whole script on the CPU with the tiny preset and small batches (no memory
numbers): a smoke test for sessions without a GPU.
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import kvpolicy
from .compare_settings import paper_defaults
from .conditions import synthetic_conditions
from .outputs import library_versions
from .plan import resolve_geometry
from .policy_spec import build_policy, check_budget, split_list

GIB = 2 ** 30
CALIBRATION_CONDITIONS = 2  # a calibration of random weights: its roles mean little, its costs are what is measured


def default_models(dry: bool) -> str:
    """Every family's benchmark presets (real run) or the first such family's tiny preset (dry run)."""
    from adapters.families import list_families

    families = [f for f in list_families().values() if f.benchmark_presets]
    if not dry:
        return ",".join(p for f in families for p in f.benchmark_presets)
    tiny = [name for f in families for name, p in f.presets.items() if p.tiny and p.runnable]
    if not tiny:
        raise ValueError("no registered model family has a tiny preset for --dry-run; pass --models")
    return tiny[0]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Bench:
    def __init__(self, args):
        self.dry = bool(args.dry_run)
        if not self.dry and not torch.cuda.is_available():
            raise ValueError("bench-gpu needs a CUDA GPU and torch.cuda.is_available() is False here; "
                               "run it on a GPU machine, or add --dry-run for a CPU smoke run on tiny sizes")
        self.device = "cpu" if self.dry else "cuda"
        self.dtype = torch.float32 if self.dry else torch.bfloat16
        def pick(value, real, dry):
            return value if value is not None else (dry if self.dry else real)

        self.models = split_list(args.models if args.models is not None else default_models(self.dry), "--models")
        for model in self.models:
            resolve_geometry(model)  # an unknown name fails now, with the closest known one
        if args.policies is None:
            names = [p for p in kvpolicy.list_policies() if not kvpolicy.capabilities(p).keeps_everything]
        else:
            names = split_list(args.policies, "--policies")
        for name in names:
            kvpolicy.policy_class(name)
        self.policies = names
        self.largest_batch_policies = [p for p in paper_defaults()["largest_batch_policies"] if p in names]
        self.budget = pick(args.budget, "650", "50%")
        batches = pick(args.batches, "1,8", "1,2")
        try:
            self.batches = [int(b) for b in split_list(batches, "--batches")]
        except ValueError:
            raise ValueError(f"--batches {batches!r} must be comma-separated positive integers") from None
        if any(b < 1 for b in self.batches):
            raise ValueError(f"--batches must be positive, got {batches}")
        self.repeats, self.warmup = pick(args.repeats, 3, 1), pick(args.warmup, 1, 0)
        self.max_batch = pick(args.max_batch, 64, 4)
        if self.repeats < 1 or self.warmup < 0 or self.max_batch < 1:
            raise ValueError("--repeats >= 1, --warmup >= 0 and --max-batch >= 1 are required")
        self.budget_files = self._budget_files(getattr(args, "budget_file", None))
        for name in self.policies:  # a bad plan file fails now, not after the first model's measurements
            if kvpolicy.capabilities(name).plan_file_option:
                for path in self.budget_files.values():
                    kvpolicy.policy_class(name).resolve_plan_file(path)
        # None: each model's official key cache (Infinity: float32 K next to bf16 V, as ScaleKV's Table 1)
        self.key_dtype = getattr(args, "key_dtype", None)
        from .model_args import key_dtype_kwargs

        for name in self.models:  # unknown models and impossible key dtypes fail before any loading
            key_dtype_kwargs(self.key_dtype, resolve_geometry(name), "fp32" if self.dry else "bf16")
        from .outputs import check_output_dir, fresh_run_dir

        if args.out is not None:
            self.out = Path(args.out)
        else:  # a dry run is a smoke test: its numbers must not land among the recorded GPU results
            self.out = fresh_run_dir("bench-gpu-dryrun") if self.dry else Path("benchmarks/results")
        check_output_dir(self.out, "--out")  # before minutes of benchmarking, not after
        self.rows: list[dict] = []
        self.max_batches: list[dict] = []
        self.progress = not getattr(args, "no_progress", False)

    @staticmethod
    def _budget_files(items) -> dict:
        files = {}
        for item in items or []:
            model, sep, path = item.partition("=")
            if not sep or not model or not path:
                raise ValueError(f"--budget-file {item!r} must be MODEL=PATH (or MODEL=NAME of a released file)")
            files[model] = path  # resolved by the policy that takes it (a path or a released name)
        return files

    def load(self, name: str):
        from adapters import load_model

        from adapters.families import family_of

        from .model_args import key_dtype_kwargs

        files = {option: "random" for option in family_of(name).weight_options}
        compute = {torch.float32: "fp32", torch.bfloat16: "bf16"}[self.dtype]
        files.update(key_dtype_kwargs(self.key_dtype, resolve_geometry(name), compute))
        return load_model(name, device=self.device, dtype=self.dtype, **files)

    def policy(self, name: str, model_name: str, model, geometry):
        budget = check_budget(self.budget, geometry.schedule, model_name)
        caps = kvpolicy.capabilities(name)
        if not caps.calibration_needed({}):
            return build_policy(name, budget)
        cls = kvpolicy.policy_class(name)
        plan_file = self.budget_files.get(model_name)
        if plan_file is None and caps.plan_file_option:
            plan_file = cls.released_plan_file(model_name, budget.tokens(geometry.schedule))
        if plan_file is not None:
            return build_policy(name, budget, budget_file=str(plan_file))
        from .calibrate import calibration_source, run_calibration

        collector, _ = run_calibration(model, model_name, synthetic_conditions(model_name, CALIBRATION_CONDITIONS),
                                       policies=[name])
        calibration = cls.calibration_result(collector, source=calibration_source(model_name, geometry),
                                             schedule=geometry.schedule)
        return build_policy(name, budget, calibration=calibration)

    def _release(self) -> None:
        """Give memory back after an out-of-memory failure (the failed call's frames may sit in cycles)."""
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def measure(self, model, model_name: str, policy, batch: int) -> dict:
        """Median latency and peak memory of ``repeats`` calls; an out-of-memory batch is a row, not a crash."""
        conds = synthetic_conditions(model_name, batch)
        seconds, peaks, above, report = [], [], [], None
        try:
            for _ in range(self.warmup):
                model.generate(conds, policy=policy, seed=0, batch_size=batch, progress=False)
            for _ in range(self.repeats):
                if self.device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    resident = torch.cuda.memory_allocated()  # weights (and anything else kept between calls)
                _sync(self.device)
                start = time.perf_counter()
                out = model.generate(conds, policy=policy, seed=0, batch_size=batch, progress=False)
                _sync(self.device)
                seconds.append(time.perf_counter() - start)
                if self.device == "cuda":
                    peaks.append(torch.cuda.max_memory_allocated())
                    above.append(peaks[-1] - resident)
                report = out.cache_report
                del out
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
        else:
            out_of_memory = False
        if out_of_memory:
            self._release()
            return {"out_of_memory": True, "seconds_per_image": None, "seconds_per_call": seconds,
                    "peak_allocated_bytes": None, "peak_above_resident_bytes": None,
                    "kv_peak_bytes": None, "kv_last_read_bytes": None}
        return {"out_of_memory": False, "seconds_per_image": statistics.median(seconds) / batch,
                "seconds_per_call": seconds, "peak_allocated_bytes": max(peaks) if peaks else None,
                "peak_above_resident_bytes": max(above) if above else None,
                "kv_peak_bytes": report.peak_kv_bytes, "kv_last_read_bytes": report.kv_bytes[max(0, len(report.kv_bytes) - 2)]}

    def fits(self, model, model_name: str, policy, batch: int) -> bool:
        try:
            model.generate(synthetic_conditions(model_name, batch), policy=policy, seed=0, batch_size=batch, progress=False)
            _sync(self.device)
            fitted = True
        except torch.cuda.OutOfMemoryError:
            fitted = False
        self._release()  # outside the handler: the exception and its frames are gone by now
        return fitted

    def largest_batch(self, model, model_name: str, policy) -> tuple[int, bool]:
        """Largest batch <= max_batch that runs; second value False when the cap was reached."""
        good, bad, b = 0, None, 1
        while b <= self.max_batch:
            if self.fits(model, model_name, policy, b):
                good, b = b, b * 2
            else:
                bad = b
                break
        if bad is None:
            if good < self.max_batch and self.fits(model, model_name, policy, self.max_batch):
                return self.max_batch, False
            return good, False
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if self.fits(model, model_name, policy, mid) else (good, mid)
        return good, True

    def steps(self) -> int:
        """The measurements ``run`` makes: every configuration at every batch, and one largest-batch
        search for the full cache and each policy the paper's claim is about, per model."""
        return len(self.models) * (len(self.batches) * (1 + len(self.policies)) + 1 + len(self.largest_batch_policies))

    def run(self) -> str:
        from .progress import note, progress_bar

        # minutes on a GPU, with nothing printed until a measurement ends: show where the run is
        with progress_bar(self.steps(), "bench-gpu", unit="measurement", enabled=self.progress) as bar:
            self._run(bar, note)
        return self.write()

    def _run(self, bar, note) -> None:
        for model_name in self.models:
            geometry = resolve_geometry(model_name)
            bar.set_postfix_str(f"loading {model_name}")
            model = self.load(model_name)
            configs = [("full", None)] + [(n, self.policy(n, model_name, model, geometry)) for n in self.policies]
            for batch in self.batches:
                full = None
                for name, policy in configs:
                    bar.set_postfix_str(f"{model_name} batch {batch} {name}")
                    m = self.measure(model, model_name, policy, batch)
                    bar.update(1)
                    full = m if name == "full" else full
                    row = {"model": model_name, "batch": batch, "policy": name, "budget": None if policy is None else str(policy.budget), **m}
                    row["memory_ratio"] = _ratio(m["peak_allocated_bytes"], full["peak_allocated_bytes"])
                    row["kv_ratio"] = _ratio(m["kv_peak_bytes"], full["kv_peak_bytes"])
                    row["speedup"] = _ratio(full["seconds_per_image"], m["seconds_per_image"])
                    self.rows.append(row)
                    if m["out_of_memory"]:
                        note(f"{model_name} batch {batch} {name}: out of memory")
                        continue
                    note(f"{model_name} batch {batch} {name}: {m['seconds_per_image']:.4f} s/image"
                         + (f", peak {m['peak_allocated_bytes'] / GIB:.2f} GiB" if m["peak_allocated_bytes"] else ""))
            built = dict(configs)
            for name, policy in [("full", None)] + [(n, built[n]) for n in self.largest_batch_policies]:
                bar.set_postfix_str(f"{model_name} largest batch {name}")
                largest, limited = self.largest_batch(model, model_name, policy)
                bar.update(1)
                self.max_batches.append({"model": model_name, "policy": name, "largest_batch": largest,
                                         "out_of_memory_above": limited, "cap": self.max_batch})
            del model
            if self.device == "cuda":
                torch.cuda.empty_cache()

    def table(self) -> str:
        lines = ["| model | batch | policy | budget | peak alloc GiB | above weights GiB | KV peak GiB (counted) | "
                 "s/image | memory ratio | KV ratio | speed-up |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]

        def fmt(value, spec: str, scale: float = 1.0, suffix: str = "") -> str:
            return "–" if value is None else f"{value / scale:{spec}}{suffix}"

        for r in self.rows:
            head = f"| {r['model']} | {r['batch']} | {r['policy']} | {r['budget'] or '–'} |"
            if r["out_of_memory"]:
                lines.append(head + " out of memory | – | – | – | – | – | – |")
                continue
            lines.append(f"{head} {fmt(r['peak_allocated_bytes'], '.2f', GIB)} | "
                         f"{fmt(r['peak_above_resident_bytes'], '.2f', GIB)} | {fmt(r['kv_peak_bytes'], '.3f', GIB)} | "
                         f"{fmt(r['seconds_per_image'], '.4f')} | {fmt(r['memory_ratio'], '.3f')} | "
                         f"{fmt(r['kv_ratio'], '.3f')} | {fmt(r['speedup'], '.2f', suffix='×')} |")
        lines += ["", "| model | policy | largest batch that fits |", "|---|---|---|"]
        for r in self.max_batches:
            value = str(r["largest_batch"]) if r["out_of_memory_above"] else f"≥ {r['largest_batch']} (cap)"
            lines.append(f"| {r['model']} | {r['policy']} | {value} |")
        return "\n".join(lines)

    def write(self) -> str:
        self.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        prefix = self.out / f"bench_gpu{'_dryrun' if self.dry else ''}_{stamp}"
        n = 2
        while Path(f"{prefix}.md").exists() or Path(f"{prefix}.json").exists():  # never replace a recorded run
            prefix, n = self.out / f"bench_gpu{'_dryrun' if self.dry else ''}_{stamp}-{n}", n + 1
        device = "cpu (dry run)" if self.dry else torch.cuda.get_device_name(0)
        table = self.table()
        keys = (f"{self.key_dtype} key cache" if self.key_dtype else
                "each model's official key cache (float32 K next to the compute-dtype V where the family caches so)")
        header = (f"# bench-gpu ({device})\n\nRandom weights, {'fp32' if self.dry else 'bf16'}, {keys}, budget {self.budget}, "
                  f"{self.repeats} timed repeat(s) after {self.warmup} warm-up; ratios are policy / full cache "
                  "(speed-up: full / policy) from this run.\n\n")
        Path(f"{prefix}.md").write_text(header + table + "\n")
        Path(f"{prefix}.json").write_text(json.dumps({"device": device, "budget": self.budget, "key_dtype": self.key_dtype,
                                                      "rows": self.rows,
                                                      "largest_batches": self.max_batches,
                                                      "versions": library_versions(), "host": platform.node()}, indent=1))
        print(table)
        print(f"\nwrote {prefix}.md and {prefix}.json")
        return table


def _ratio(numerator, denominator):
    """numerator / denominator, None when either is missing (out of memory, no GPU allocator)."""
    return numerator / denominator if numerator and denominator else None


def bench_gpu_command(args) -> int:
    Bench(args).run()
    return 0


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["bench-gpu", *sys.argv[1:]]))
