"""Side-by-side timing of ScaleKV's reference-mode selection: vectorised vs per-row/per-head loop.

Both implement the released rule (reference/scalekv.md §4.2) on an Infinity 1024² cache before the
last scale (L = 6425, the 48 × 48 map current): window = 16 patch centres, raw window-query logits
summed, max pooling (kernel 5), top (capacity − 16) per batch row and head. The loop form below is
the released code written plainly, one (row, head) at a time (matmul of the 16 window queries with
the keys, divide, sum, pool, top-k). The vectorised form is ``scalekv``'s ``select``
(``mode="reference"``, what ``kvpolicy.compress`` calls), which sums the window queries first
(``patch_window.summed_window_logits``): the same scores up to float rounding. Inputs are realistic
(unit-norm keys, raw query projections ~ N(0, 1) per coordinate). The script reports whether both
keep identical indices (and, if not, how many (row, head) pairs and tokens differ), both medians
and their ratio, and exits with an error when the indices differ.

    python scripts/bench_scalekv.py                      # CPU, 1 thread, B = 2 and 16
    python scripts/bench_scalekv.py --device cuda --threads 0
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from adapters.infinity.schedule import infinity_schedule
from kvpolicy import CompressionContext, compress, get_policy
from policies.common import patch_window
from policies.scalekv import resolve_budget_file


def loop_reference_indices(keys, raw_queries, window, capacity, kernel_size=5):
    """The released rule written plainly: one batch row and head at a time."""
    batch, heads, length, dim = keys.shape
    start = length - raw_queries.shape[2]
    local = window - start
    out = torch.empty(batch, heads, capacity, dtype=torch.long, device=keys.device)
    for b in range(batch):
        for h in range(heads):
            logits = torch.matmul(raw_queries[b, h, local], keys[b, h].transpose(0, 1)) / math.sqrt(dim)
            logits[:, window] = float("-inf")
            scores = logits.sum(dim=0)
            pooled = F.max_pool1d(scores[None, None], kernel_size, stride=1, padding=kernel_size // 2)[0, 0]
            pooled[window] = float("-inf")
            top = pooled.topk(capacity - window.numel()).indices
            out[b, h] = torch.cat([top, window]).sort().values
    return out


def _time(fn, repeats, synchronize):
    fn()  # warm-up
    synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(batch: int, heads: int, dim: int, layer: int, repeats: int, device: str, dtype: torch.dtype, budget_file: str):
    schedule = infinity_schedule(1024)
    scale = 11
    length, n = schedule.cumulative[scale], schedule.tokens(scale)
    g = torch.Generator().manual_seed(batch)
    keys = F.normalize(torch.randn(batch, heads, length, dim, generator=g), dim=-1).to(device, dtype)
    values = torch.randn(batch, heads, length, dim, generator=g).to(device, dtype)
    raw = torch.randn(batch, heads, n, dim, generator=g).to(device, dtype)
    policy = get_policy("scalekv", mode="reference", budget_file=resolve_budget_file(budget_file))
    capacity = policy.plan(schedule, 32).capacity(scale, layer)
    h, w = schedule.shape(scale)
    window = patch_window.observation_window_positions(h, w, 16, length - n, device=keys.device)

    ctx = CompressionContext(schedule=schedule, scale=scale, layer=layer, num_layers=32, capacity=capacity,
                             length=length, raw_queries=raw)
    # The public path gives the same indices as the timed selection call.
    assert torch.equal(compress(policy, keys, values, schedule=schedule, scale=scale, layer=layer, num_layers=32,
                                raw_queries=raw).indices, policy.select(keys, values, ctx).indices)

    def vectorised():
        return policy.select(keys, values, ctx).indices

    def loop():
        return loop_reference_indices(keys, raw, window, capacity)

    mine, plain = vectorised(), loop()
    same = torch.equal(mine, plain)
    detail = ""
    if not same:
        pairs = int((mine != plain).any(dim=-1).sum())
        tokens = sum(len(set(a.tolist()) ^ set(b.tolist())) // 2
                     for a, b in zip(mine.flatten(0, 1), plain.flatten(0, 1)))
        detail = f" ({pairs} of {batch * heads} (row, head) pairs differ, {tokens} tokens swapped)"
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    t_vec = _time(vectorised, repeats, sync)
    t_loop = _time(loop, repeats, sync)
    print(f"B={batch:3d} H={heads} L={length} D={dim} capacity={capacity} ({dtype}, {device}): "
          f"vectorised {t_vec * 1e3:9.2f} ms  loop {t_loop * 1e3:9.2f} ms  ratio {t_loop / t_vec:6.2f}x  "
          f"identical indices: {same}{detail}")
    return same, t_vec, t_loop


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layer", type=int, default=5, help="layer of the 2B file (0 = drafter 6385, 5 = refiner 465)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--budget-file", default="infinity-2b-10%", help="a path or a released name")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ok = True
    for batch in args.batches:
        same, _, _ = run(batch, args.heads, args.dim, args.layer, args.repeats, args.device,
                         getattr(torch, args.dtype), args.budget_file)
        ok &= same
    if not ok:
        raise SystemExit("the vectorised and loop selections differ")


if __name__ == "__main__":
    main()
