"""Micro-benchmark: attention over a physically ragged cache vs a dense one at equal total tokens.

Geometry: Infinity-2B at 1024² (13 scales, 16 heads, D = 128), one row. At scale s the queries are
the scale's map (n_s tokens) and the dense cache holds L_s = min(cumulative(s), 6425) tokens per
head (6425 = N_ref, the longest cache the last scale reads). The ragged cache holds the same total:
every head has the current map plus a history spread linearly from 0.3x to 1.7x the dense history
(the shape of a head-wise budget), rounded so that the sum over heads is exactly 16 x L_s.

Per scale it times, interleaved (one call of each in turn, ``--repeats`` rounds after ``--warmup``,
more for the sub-millisecond scales so that each method runs for about half a second):
``dense`` (one SDPA over (1, 16, L_s, D)) and ``ragged_attention`` with each method (``per_head``:
one SDPA per head over its view; ``padded``: one masked SDPA over a transient padded copy), and
reports medians and the ratio to dense. Run with one thread on CPU (the default):
``python -m benchmarks.bench_ragged [--device cpu|cuda] [--dtype float32|bfloat16] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adapters.families import get_geometry
from kvpolicy import Ragged, ragged_attention
from kvpolicy.ragged import METHODS

# Set from the model's geometry in main() (defaults: the registry's first benchmark preset).
HEADS, DIM, N_REF = 16, 128, 6425


def head_lengths(length: int, n_current: int, heads: int = HEADS) -> list[int]:
    """Per-head lengths: the current map plus histories from 0.3x to 1.7x the mean, sum exactly heads x length."""
    history = length - n_current
    if heads == 1 or history == 0:
        return [length] * heads
    weights = [0.3 + 1.4 * h / (heads - 1) for h in range(heads)]
    exact = [history * w for w in weights]  # the weights average 1
    floors = [int(e) for e in exact]
    for h in sorted(range(heads), key=lambda h: -(exact[h] - floors[h]))[:heads * history - sum(floors)]:
        floors[h] += 1
    return [n_current + f for f in floors]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_scale(scale: int, schedule, *, device, dtype, repeats: int, warmup: int, seed: int = 0,
                min_seconds: float = 0.5, max_repeats: int = 201) -> dict:
    n = schedule.tokens(scale)
    length = min(schedule.cumulative[scale], N_REF)
    lengths = head_lengths(length, n)
    assert sum(lengths) == HEADS * length
    g = torch.Generator().manual_seed(seed + scale)
    queries = (10 * F.normalize(torch.randn(1, HEADS, n, DIM, generator=g), dim=-1)).to(device, dtype)
    dense_k = F.normalize(torch.randn(1, HEADS, length, DIM, generator=g), dim=-1).to(device, dtype)
    dense_v = torch.randn(1, HEADS, length, DIM, generator=g).to(device, dtype)
    lens = torch.tensor([lengths], dtype=torch.long, device=device)
    longest = max(lengths)
    padded_k = F.normalize(torch.randn(1, HEADS, longest, DIM, generator=g), dim=-1).to(device, dtype)
    padded_v = torch.randn(1, HEADS, longest, DIM, generator=g).to(device, dtype)
    ragged_k, ragged_v = Ragged.from_padded(padded_k, lens), Ragged.from_padded(padded_v, lens)
    del padded_k, padded_v
    calls = {"dense": lambda: F.scaled_dot_product_attention(queries, dense_k, dense_v, scale=1.0)}
    for method in METHODS:
        calls[method] = (lambda m: lambda: ragged_attention(queries, ragged_k, ragged_v, scale=1.0, method=m))(method)
    times = {name: [] for name in calls}
    # Small scales take well under a millisecond, where one preemption by another process (the
    # development machine is shared) would dominate a median of a few calls: repeat those until
    # every method has run for about min_seconds in all.
    started = time.perf_counter()
    for call in calls.values():
        _synchronize(device)
        call()
        _synchronize(device)
    once = (time.perf_counter() - started) / len(calls)
    repeats = max(repeats, min(max_repeats, int(min_seconds / max(once, 1e-9))))
    for round_ in range(warmup + repeats):
        for name, call in calls.items():
            _synchronize(device)
            started = time.perf_counter()
            call()
            _synchronize(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"scale": scale, "map": list(schedule.shape(scale)), "queries": n, "dense_length": length,
            "ragged_lengths_min_max": [min(lengths), max(lengths)], "total_tokens": HEADS * length,
            "repeats": repeats, "median_seconds": medians,
            "ratio_to_dense": {m: medians[m] / medians["dense"] for m in METHODS}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="the geometry (default: the registry's first benchmark preset)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--scales", default=None, help="comma-separated scale indices (default: all 13)")
    parser.add_argument("--out", default=None, help="folder for ragged_attention.json / .md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    from benchmarks.bench_gpu import default_models

    global HEADS, DIM, N_REF
    model = args.model or default_models(dry=False).split(",")[0]
    geometry = get_geometry(model, args.resolution)
    schedule = geometry.schedule
    HEADS, DIM, N_REF = geometry.num_heads, geometry.head_dim, schedule.reference_length
    scales = range(schedule.num_scales) if args.scales is None else [int(s) for s in args.scales.split(",")]
    rows = []
    for scale in scales:
        row = bench_scale(scale, schedule, device=device, dtype=dtype, repeats=args.repeats, warmup=args.warmup)
        rows.append(row)
        ms = {k: 1e3 * v for k, v in row["median_seconds"].items()}
        print(f"scale {scale:2d} {row['map'][0]:>2}x{row['map'][1]:<2} L={row['dense_length']:5d} "
              f"heads {row['ragged_lengths_min_max'][0]}-{row['ragged_lengths_min_max'][1]}: dense {ms['dense']:8.2f} ms, "
              + ", ".join(f"{m} {ms[m]:8.2f} ms ({row['ratio_to_dense'][m]:.2f}x)" for m in METHODS), flush=True)
    totals = {name: sum(r["median_seconds"][name] for r in rows) for name in rows[0]["median_seconds"]}
    summary = {"model": model, "resolution": args.resolution, "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), "dtype": args.dtype,
               "threads": torch.get_num_threads() if device.type == "cpu" else None, "torch": torch.__version__,
               "repeats": args.repeats, "warmup": args.warmup, "heads": HEADS, "head_dim": DIM, "rows": 1,
               "scales": rows, "total_seconds": totals,
               "total_ratio_to_dense": {m: totals[m] / totals["dense"] for m in METHODS},
               "max_ratio_to_dense": {m: max(r["ratio_to_dense"][m] for r in rows) for m in METHODS}}
    print("total over scales: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in totals.items())
          + " | ratio to dense: " + ", ".join(f"{m} {summary['total_ratio_to_dense'][m]:.2f}x" for m in METHODS))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ragged_attention.json").write_text(json.dumps(summary, indent=1) + "\n")
        lines = [f"# Ragged vs dense attention, {model} at {args.resolution}, 1 row x {HEADS} heads x D={DIM}, {args.dtype}, "
                 f"{summary['device_name']}, {summary['threads'] or ''} thread(s), torch {torch.__version__}",
                 "", f"Medians of at least {args.repeats} interleaved calls after {args.warmup} warm-up rounds (more at "
                 "the sub-millisecond scales: 'repeats' in the JSON) (`python -m benchmarks.bench_ragged`); equal "
                 "total tokens per scale.", "",
                 "| scale | map | dense L | ragged head lengths | dense ms | "
                 + " | ".join(f"{m} ms (ratio)" for m in METHODS) + " |",
                 "|---|---|---|---|---|" + "---|" * len(METHODS)]
        for r in rows:
            ms = {k: 1e3 * v for k, v in r["median_seconds"].items()}
            lines.append(f"| {r['scale']} | {r['map'][0]}x{r['map'][1]} | {r['dense_length']} | "
                         f"{r['ragged_lengths_min_max'][0]}-{r['ragged_lengths_min_max'][1]} | {ms['dense']:.2f} | "
                         + " | ".join(f"{ms[m]:.2f} ({r['ratio_to_dense'][m]:.2f}x)" for m in METHODS) + " |")
        lines.append(f"| total | | | | {1e3 * totals['dense']:.1f} | "
                     + " | ".join(f"{1e3 * totals[m]:.1f} ({summary['total_ratio_to_dense'][m]:.2f}x)" for m in METHODS) + " |")
        (out / "ragged_attention.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
