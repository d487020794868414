"""Micro-benchmark of ``kvpolicy.compress``: median seconds per call for every registered policy.

Geometry (issue 2): a registered model's geometry (``--model``, default the first benchmark preset
of the registry: Infinity-2B, so keys/values (B, H=16, L=6425, D=128) bf16 at its 1024^2 schedule's
scale 11, the 48x48 map: L = 6425 cached tokens, 2304 queries), budget 650 tokens, at the scale
before the last (the longest cache a scale reads); the timed layer is ``--layer``. Stateful
policies get a zero state aligned with the history. Run: ``python -m benchmarks.bench_compress
[--repeats N] [--batch B]``; a policy that takes a plan file runs with ``--budget-file`` (default:
the released file it ships for that model and budget). A policy that cannot be built is an error,
never skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import kvpolicy
from adapters.families import get_geometry
from benchmarks.policy_spec import build_policy, check_budget


def make_inputs(batch: int, heads: int, head_dim: int, length: int, n_current: int, seed: int, dtype, device):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    keys = F.normalize(randn(batch, heads, length, head_dim), dim=-1).to(dtype).to(device)
    values = randn(batch, heads, length, head_dim).to(dtype).to(device)
    # Infinity's cosine attention multiplies unit q, k by a learned scale (<= 100, typically ~10).
    queries = (10 * F.normalize(randn(batch, heads, n_current, head_dim), dim=-1)).to(dtype).to(device)
    raw_queries = randn(batch, heads, n_current, head_dim).to(dtype).to(device)
    return keys, values, queries, raw_queries


def time_policy(policy, inputs, *, schedule, scale, layer, num_layers, repeats, warmup, device) -> list[float]:
    keys, values, queries, raw_queries = inputs
    state = None
    if policy.stateful:
        state = torch.zeros(keys.shape[0], keys.shape[1], keys.shape[2] - schedule.tokens(scale), device=device)
    kwargs = dict(schedule=schedule, scale=scale, layer=layer, num_layers=num_layers,
                  queries=queries if policy.needs_queries else None,
                  raw_queries=raw_queries if policy.needs_raw_queries else None, state=state)
    sync = torch.cuda.synchronize if keys.is_cuda else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        kvpolicy.compress(policy, keys, values, **kwargs)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per policy (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument("--batch", type=int, default=2, help="rows B (e.g. 2 = one prompt with CFG)")
    parser.add_argument("--budget", default="650", help="budget: tokens (650), '10%%' or a fraction")
    parser.add_argument("--layer", type=int, default=0, help="layer index (matters for per-layer plans)")
    parser.add_argument("--policies", default="", help="comma-separated names (default: every registered policy)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="the geometry (default: the registry's first benchmark preset)")
    parser.add_argument("--budget-file", default=None,
                        help="plan file for the policies that take one, a path or a released name (default: the "
                             "released file the policy ships for this model and budget, e.g. ScaleKV's "
                             "infinity-2b-10%%)")
    args = parser.parse_args(argv)
    for name in ("repeats", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    from benchmarks.bench_gpu import default_models

    model = args.model or default_models(dry=False).split(",")[0]
    geometry = get_geometry(model)
    schedule, num_layers, heads, head_dim = geometry.schedule, geometry.num_layers, geometry.num_heads, geometry.head_dim
    scale = max(0, schedule.num_scales - 2)
    length = schedule.cumulative_length(scale)
    names = [n for n in args.policies.split(",") if n] or list(kvpolicy.list_policies())
    policies = {}
    for name in names:  # every policy is built before any timing: one that cannot run stops the benchmark
        try:
            budget_file = None
            if kvpolicy.capabilities(name).plan_file_option:
                budget_file = args.budget_file or kvpolicy.policy_class(name).released_plan_file(
                    model, check_budget(args.budget, schedule, model).tokens(schedule))
            policy = build_policy(name, args.budget, budget_file=budget_file)
            policies[name] = (policy, policy.capacity(schedule, num_layers, scale, args.layer))
        except ValueError as exc:
            parser.error(f"policy {name!r} cannot run here: {exc} (leave it out with --policies)")
    inputs = make_inputs(args.batch, heads, head_dim, length, schedule.tokens(scale), 0, torch.bfloat16, args.device)
    print(f"compress on (B={args.batch}, H={heads}, L={length}, D={head_dim}) bf16, {model} scale {scale} "
          f"({schedule.shape(scale)[0]}x{schedule.shape(scale)[1]} map), budget {args.budget}, layer {args.layer}/"
          f"{num_layers}, {args.repeats} repeats after {args.warmup} warm-up, {torch.get_num_threads()} threads, "
          f"device {args.device}")
    print(f"{'policy':<16} {'capacity':>8} {'median ms':>10} {'min ms':>9}")
    for name, (policy, capacity) in policies.items():
        times = time_policy(policy, inputs, schedule=schedule, scale=scale, layer=args.layer, num_layers=num_layers,
                            repeats=args.repeats, warmup=args.warmup, device=args.device)
        print(f"{name:<16} {str(capacity):>8} {statistics.median(times) * 1e3:>10.1f} {min(times) * 1e3:>9.1f}")


if __name__ == "__main__":
    main()
