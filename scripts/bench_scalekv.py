"""ScaleKV reference mode side by side with the released ``ScaleKVCluster.update_kv``, and the floors.

Cases (issue 12): the Infinity-2B 1024² geometry (H = 16, D = 128) at L = 6425 (scale 11, the 48×48
map current) and L = 10521 (scale 12, 64×64), a drafter (layer 0, capacity 6385) and a refiner
(layer 5, capacity 465) of the released 2B 10 % budget file, B = 2 and 16 rows, in float32,
bfloat16 and the real pipeline's mixed flow (float32 keys, bf16 values and queries, the release
under bf16 autocast). Per case, interleaved in one process, medians of ``--repeats`` calls after a
warm-up:

- ``release``: the released code, imported from a checkout you point to (``--release DIR`` or
  ``KVPOLICY_SCALEKV_RELEASE``; the folder holding ``scale_kv.py``, e.g. a clone of
  StargazerX0/ScaleKV at eb0615a — nothing of it is shipped here). Without one, a restatement of
  the release's steps written here (``restated_update_kv``) stands in, and the table says so.
- ``ours``: ``kvpolicy.compress`` with ``get_policy("scalekv", mode="reference")`` (selection and
  the kept K/V copied out).
- ``in place``: the same call with ``in_place=True``, as ``KVCache(compaction="in_place")``
  makes it for a layer that evicts at most 1/8 of its tokens: the kept K/V moved to the front of
  the cache's own memory instead of a new allocation (inputs restored before each call, untimed);
  checked identical too. Where the layer evicts more (drafters at L = 10521, every refiner) the
  cache copies instead, as in place would hold the whole allocation until the next append, and the
  table says so; the column is what ``compress(in_place=True)`` gives a caller that manages its
  own memory.
- floors measured in the same run: for a refiner, one read of K (``keys.sum(-1)``) plus the top-k
  of this case (``topk(capacity − 16, sorted=False)`` on the pooled scores ours ranks: the tie
  plateaus of real scores make it about half as long as on random scores, which the tables before
  December 2026 used); for a drafter, writing the kept K and V (``gather_tokens`` of both).
- ``bound``: three of ours' own steps, each timed alone on this case's data, that no exact
  implementation built from torch's operations can skip: ``scoring`` (the release's arithmetic up
  to the pooled scores: its product in its compute dtype, divided by √D, summed over the window
  queries, max pooled; ours' blocked form, the fastest found), ``top-k`` (the release's
  tie-for-tie top-k on those values) and ``write`` (the kept K and V written into a new tensor, as
  ``ours`` returns them). ``ours`` minus ``bound`` is what ours spends around them (window
  positions, ordering the kept indices, the checks, the one device read, Python). A goal the bound
  itself misses (``release/bound`` below the speed-up asked, or ``bound/floor`` above the ratio
  asked) is out of reach for such an implementation on this machine; the second table says so per
  goal. A hand-written kernel could still fuse the division into the sum (one pass over the
  in-cache product block less; benchmarks/results/scalekv-reference/README.md gives that pass's
  share of a profiled call).
- ``product``: the release's one batched product of the 16 window queries with every key in its
  compute dtype (one ``matmul`` into a new (B, H, 16, L) tensor; the float32 -> bf16 cast, block by
  block, included in the mixed flow). Exactness pins these 16 dot products per key in that dtype
  (each logit's rounding decides ties), not the way the release forms them: ours computes the
  same products block by block (of positions, or of whole (row, head)s for half-precision or cast
  keys), each block divided and summed while in cache, so
  ``ours/product`` may fall below 1 where the new tensor's page faults and passes dominate;
  ``product/floor`` says how far the floor is out of reach for the release's form of the product.

Each case checks that both keep identical indices and identical K/V, and the script exits with an
error if any case differs. Results go to stdout and, with ``--out``, a Markdown table + JSON.

    python scripts/bench_scalekv.py --release /path/to/ScaleKV --out benchmarks/results/scalekv-reference
    python scripts/bench_scalekv.py --device cuda --threads 0

On CPU, writing the kept K/V into fresh memory is mostly page faults: glibc serves allocations
above its mmap threshold (at most 32 MiB by default) with fresh pages that the kernel zeroes on
first touch, and returns them on free. ``--keep-freed-memory`` raises glibc's mmap and trim
thresholds (``mallopt``) so freed blocks are reused, as a caching allocator (CUDA's, jemalloc)
would; every contender and floor benefits alike. Then each timed call follows an untimed call of
the same function: otherwise a contender's large blocks often find the heap as the previous
contender left it and are new memory again (measured: reference mode at B=16, L=6425, float32
took 875-957 ms right after a release call, 302 ms after its own).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from adapters.infinity.schedule import infinity_schedule
from kvpolicy import compress, get_policy
from kvpolicy.compress import gather_tokens
from policies.common.patch_window import observation_window_positions
from policies.common.released_scores import _cast_blocked_matmul, released_pooled_scores, released_topk
from policies.scalekv import resolve_budget_file

FLOWS = {
    # name: (key dtype, value dtype, query dtype, autocast dtype for the release or None)
    "float32": (torch.float32, torch.float32, torch.float32, None),
    "bfloat16": (torch.bfloat16, torch.bfloat16, torch.bfloat16, None),
    "mixed": (torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16),
}


def load_release(folder: str | None):
    """The released ``ScaleKVCluster`` class from a checkout, or None."""
    if not folder:
        return None
    path = Path(folder).expanduser() / "scale_kv.py"
    if not path.is_file():
        raise SystemExit(f"error: --release {folder!r} has no scale_kv.py (point it at a ScaleKV checkout)")
    spec = importlib.util.spec_from_file_location("released_scale_kv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ScaleKVCluster


def restated_update_kv(keys, raw_queries, values, capacity, *, window_size=16, kernel_size=5):
    """The release's steps restated here (used when no checkout is given): the window positions
    found per (row, head) with ``torch.unique``, a boolean (B, H, 1, L) mask applied to the whole
    product with ``masked_fill``, the pooled scores cloned before masking, ``torch.gather`` of K and
    V with an index expanded over D."""
    batch, heads, length, dim = keys.shape
    n = raw_queries.shape[2]
    side, grid = math.isqrt(n), math.isqrt(window_size)
    patch = side // grid
    centres = [i * patch + (patch - 1) // 2 for i in range(grid)]
    flat = torch.tensor([r * side + c for r in centres for c in centres]) + (length - n)
    window = torch.stack([torch.stack([torch.unique(flat) for _ in range(heads)]) for _ in range(batch)])
    local = window - (length - n)
    window_q = torch.gather(raw_queries, 2, local.unsqueeze(-1).expand(-1, -1, -1, dim))
    logits = torch.matmul(window_q, keys.transpose(2, 3)) / math.sqrt(dim)
    mask = torch.ones(batch, heads, 1, length, dtype=torch.bool)
    mask.scatter_(3, window.unsqueeze(2), False)
    scores = logits.masked_fill(~mask, float("-inf")).sum(dim=2)
    pooled = F.max_pool1d(scores, kernel_size, padding=kernel_size // 2, stride=1).clone()
    pooled.scatter_(2, window, float("-inf"))
    top = pooled.topk(capacity - window_size, dim=-1).indices
    kept = torch.cat([top, window], dim=-1).sort(dim=-1).values
    index = kept.unsqueeze(-1).expand(-1, -1, -1, dim)
    return torch.gather(keys, 2, index), torch.gather(values, 2, index)


def cache_sizes_from_plan(plan, num_scales: int):
    """The release's ``cache_sizes`` list (entry si + 2 holds scale si's per-layer capacities)."""
    sizes = [None] * (num_scales + 1)
    for si in range(num_scales - 1):
        sizes[si + 2] = [c if c is not None else 10 ** 9 for c in plan.capacities[si]]
    return sizes


def _median_interleaved(fns: dict, repeats: int, synchronize, setups: dict | None = None,
                        settle: bool = False) -> dict:
    """Median seconds of each function, called in turn after a warm-up; ``setups[name]`` (untimed)
    runs before each call of ``name``. ``settle``: each timed call follows an untimed call of the
    same function, so that with freed memory kept it reuses its own freed blocks (a caching
    allocator's steady state) rather than whatever the previous contender left."""
    setups = setups or {}
    for name, fn in fns.items():  # warm-up
        setups.get(name, lambda: None)()
        fn()
    synchronize()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if settle:
                setups.get(name, lambda: None)()
                fn()
            setups.get(name, lambda: None)()
            synchronize()
            t0 = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def keep_freed_memory() -> None:
    """glibc only: serve large blocks from the heap and keep them there after free (see the docstring)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2 ** 31 - 1)):
        raise SystemExit("error: --keep-freed-memory: glibc refused mallopt")


def run_case(*, batch, scale, layer, flow, repeats, device, release_cls, policy, plan, settle=False):
    schedule = infinity_schedule(1024)
    key_dtype, value_dtype, query_dtype, autocast = FLOWS[flow]
    length, n = schedule.cumulative[scale], schedule.tokens(scale)
    dim, heads = 128, 16
    g = torch.Generator().manual_seed(1000 * batch + scale + layer)
    keys = F.normalize(torch.randn(batch, heads, length, dim, generator=g), dim=-1).to(device, key_dtype)
    values = torch.randn(batch, heads, length, dim, generator=g).to(device, value_dtype)
    raw = torch.randn(batch, heads, n, dim, generator=g).to(device, query_dtype)
    capacity = plan.capacity(min(scale, 11), layer)
    sizes = cache_sizes_from_plan(plan, schedule.num_scales)

    def ours():
        return compress(policy, keys, values, schedule=schedule, scale=scale, layer=layer, num_layers=32,
                        raw_queries=raw)

    def release():
        context = torch.autocast(keys.device.type, dtype=autocast) if autocast else nullcontext()
        with context:
            if release_cls is None:
                return restated_update_kv(keys, raw, values, capacity)
            cluster = release_cls(sizes, window_size=16, base_capacity=650, kernel_size=5, pooling="maxpool",
                                  layer_idx=layer)
            return cluster.update_kv(keys, raw, values, scale)

    mine = ours()
    theirs_k, theirs_v = release()
    identical = (torch.equal(mine.keys, theirs_k) and torch.equal(mine.values, theirs_v))
    detail = ""
    if not identical:
        index_k = mine.indices.unsqueeze(-1).expand(-1, -1, -1, dim)
        same_rows = (torch.gather(keys, 2, index_k) == theirs_k).all(-1).all(-1)
        detail = f"{int((~same_rows).sum())} of {batch * heads} (row, head) pairs differ"

    compute = torch.bfloat16 if autocast else key_dtype
    drafter = capacity >= length // 2
    window_q = raw[:, :, :16].to(compute)

    def product():
        if keys.dtype == compute:
            return torch.matmul(window_q, keys.transpose(2, 3))
        return _cast_blocked_matmul(window_q, keys, compute)

    fns = {"release": release, "ours": ours, "product": product}
    setups = {}
    # compress(in_place=True), what KVCache(compaction="in_place") does for a layer that evicts at most
    # 1/8 of its tokens: the kept tokens moved to the front of the cache's own (already written)
    # memory; each call gets a fresh copy of the inputs, untimed. Measured for refiners too, which
    # the cache copies (it would hold the whole allocation until the next append).
    work_keys, work_values = keys.clone(), values.clone()

    def restore():
        work_keys.copy_(keys)
        work_values.copy_(values)

    def ours_in_place():
        return compress(policy, work_keys, work_values, schedule=schedule, scale=scale, layer=layer,
                        num_layers=32, raw_queries=raw, in_place=True)

    restore()
    compacted = ours_in_place()
    in_place_identical = torch.equal(compacted.keys, theirs_k) and torch.equal(compacted.values, theirs_v)
    identical = identical and in_place_identical
    if not in_place_identical:
        detail = (detail + "; " if detail else "") + "in-place compaction differs"
    fns["in_place"] = ours_in_place
    setups["in_place"] = restore
    # Writing the kept K/V: a drafter's floor, and part of every case's bound.
    fns["write"] = lambda: (gather_tokens(keys, mine.indices), gather_tokens(values, mine.indices))
    if not drafter:
        fns["floor_read"] = lambda: keys.sum(dim=-1)
    # The bound: ours' own steps that the release's result pins, timed alone on this case's data
    # (see the docstring): the scoring arithmetic, the top-k on its values, writing the kept K/V.
    h, w = schedule.shapes[scale]
    window = observation_window_positions(h, w, 16, length - n, length=length)
    q_window = raw.index_select(2, window - (length - n))
    pooled = released_pooled_scores(q_window, keys, window)
    keep = capacity - window.numel()
    if not torch.equal(released_topk(pooled, window, capacity), mine.indices):
        raise SystemExit(f"error: the bound's steps do not reproduce ours' selection (B={batch}, L={length}, {flow})")
    fns["scoring"] = lambda: released_pooled_scores(q_window, keys, window)
    fns["top_k"] = lambda: pooled.topk(keep, dim=-1, sorted=False)
    sync = torch.cuda.synchronize if keys.device.type == "cuda" else (lambda: None)
    t = _median_interleaved(fns, repeats, sync, setups, settle)
    floor = t["write"] if drafter else t["floor_read"] + t["top_k"]
    bound = t["scoring"] + t["top_k"] + t["write"]
    return {
        "B": batch, "L": length, "scale": scale, "layer": layer, "role": "drafter" if drafter else "refiner",
        "capacity": capacity, "flow": flow, "identical": identical, "detail": detail,
        "release_ms": t["release"] * 1e3, "ours_ms": t["ours"] * 1e3, "floor_ms": floor * 1e3,
        "speedup": t["release"] / t["ours"], "ours_over_floor": t["ours"] / floor,
        "floor_kind": "write kept K/V" if drafter else "read K + top-k",
        "product_ms": t["product"] * 1e3, "product_over_floor": t["product"] / floor,
        "ours_over_product": t["ours"] / t["product"],
        "scoring_ms": t["scoring"] * 1e3, "top_k_ms": t["top_k"] * 1e3,
        "write_ms": t["write"] * 1e3,
        "bound_ms": bound * 1e3, "bound_over_floor": bound / floor, "release_over_bound": t["release"] / bound,
        "ours_over_bound": t["ours"] / bound,
        "in_place_ms": t["in_place"] * 1e3,
        "speedup_in_place": t["release"] / t["in_place"],
        "in_place_over_floor": t["in_place"] / floor,
    }


def table(rows, source: str) -> str:
    lines = [f"release = {source}", "",
             "| B | L | role | cap | flow | identical | release ms | ours ms | floor ms | release/ours | ours/floor "
             "| product ms | product/floor | ours/product | in place ms | release/in place | in place/floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def optional(value, form):
        return "-" if value is None else form.format(value)

    def cache_copies(r):  # KVCache(compaction="in_place") compacts only layers that evict <= 1/8
        evicted = r["L"] - r["capacity"]
        return f" (the cache copies: evicts {evicted / r['L']:.0%})" if r.get("in_place_ms") and evicted * 8 > r["L"] else ""

    for r in rows:
        lines.append(f"| {r['B']} | {r['L']} | {r['role']} (layer {r['layer']}) | {r['capacity']} | {r['flow']} | "
                     f"{'yes' if r['identical'] else 'NO: ' + r['detail']} | {r['release_ms']:.1f} | {r['ours_ms']:.1f} | "
                     f"{r['floor_ms']:.1f} ({r['floor_kind']}) | {r['speedup']:.2f}x | {r['ours_over_floor']:.2f}x | "
                     f"{r['product_ms']:.1f} | {r['product_over_floor']:.2f}x | {r['ours_over_product']:.2f}x | "
                     f"{optional(r.get('in_place_ms'), '{:.1f}')}{cache_copies(r)} | "
                     f"{optional(r.get('speedup_in_place'), '{:.2f}x')} | "
                     f"{optional(r.get('in_place_over_floor'), '{:.2f}x')} |")
    return "\n".join(lines)


# The speed goals, as (name, applies to, met by ours, within reach of the bound).
GOALS = (
    ("release/ours >= 2", lambda r: True,
     lambda r: r["speedup"] >= 2, lambda r: r["release_over_bound"] >= 2),
    ("refiner B=16: release/ours >= 4", lambda r: r["role"] == "refiner" and r["B"] == 16,
     lambda r: r["speedup"] >= 4, lambda r: r["release_over_bound"] >= 4),
    ("refiner B=16: ours/floor <= 2", lambda r: r["role"] == "refiner" and r["B"] == 16,
     lambda r: r["ours_over_floor"] <= 2, lambda r: r["bound_over_floor"] <= 2),
    ("drafter: ours/floor <= 1.3", lambda r: r["role"] == "drafter",
     lambda r: r["ours_over_floor"] <= 1.3, lambda r: r["bound_over_floor"] <= 1.3),
)


def bound_table(rows) -> str:
    """Per case: the bound's parts, and per goal whether ours meets it and whether the bound allows it."""
    lines = ["| B | L | role | flow | scoring ms | top-k ms | write ms | bound ms | ours/bound | release/bound "
             "| bound/floor | goals: met by ours / within the bound's reach |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdicts = []
        for name, applies, met, reachable in GOALS:
            if applies(r):
                verdicts.append(f"{name}: {'met' if met(r) else 'unmet'}, "
                                f"{'reachable' if reachable(r) else 'out of reach'}")
        lines.append(f"| {r['B']} | {r['L']} | {r['role']} | {r['flow']} | {r['scoring_ms']:.1f} | {r['top_k_ms']:.1f} | "
                     f"{r['write_ms']:.1f} | {r['bound_ms']:.1f} | {r['ours_over_bound']:.2f}x | "
                     f"{r['release_over_bound']:.2f}x | {r['bound_over_floor']:.2f}x | {'; '.join(verdicts)} |")
    return "\n".join(lines)


def goal_summary(rows) -> str:
    """One line per goal: cases met, and among the unmet how many the bound puts out of reach."""
    lines = []
    for name, applies, met, reachable in GOALS:
        cases = [r for r in rows if applies(r)]
        unmet = [r for r in cases if not met(r)]
        out = [r for r in unmet if not reachable(r)]
        lines.append(f"- {name}: met in {len(cases) - len(unmet)} of {len(cases)}; of the {len(unmet)} unmet, "
                     f"{len(out)} out of reach of the bound, {len(unmet) - len(out)} within it")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", default=os.environ.get("KVPOLICY_SCALEKV_RELEASE"),
                        help="folder of a ScaleKV checkout (holds scale_kv.py); default $KVPOLICY_SCALEKV_RELEASE")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--scales", type=int, nargs="+", default=[11, 12], help="11: L=6425, 12: L=10521")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 5], help="0: drafter, 5: refiner (2B file)")
    parser.add_argument("--flows", nargs="+", default=["float32", "bfloat16", "mixed"], choices=list(FLOWS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--budget-file", default="infinity-2b-10%",
                        help="a path or a released name (default: the shipped infinity-2b-10%% file)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc: reuse freed large blocks instead of fresh zeroed pages (see the docstring)")
    parser.add_argument("--out", help="folder for table.md and results.json")
    args = parser.parse_args(argv)
    try:
        args.budget_file = resolve_budget_file(args.budget_file)
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    release_cls = load_release(args.release)
    source = (f"the released ScaleKVCluster.update_kv from {args.release}" if release_cls is not None
              else "restated_update_kv (no checkout given: the release's steps restated here)")
    policy = get_policy("scalekv", mode="reference", budget_file=str(args.budget_file))
    plan = policy.plan(infinity_schedule(1024), 32)
    rows = []
    source += "; freed memory kept (glibc mallopt)" if args.keep_freed_memory else "; default glibc allocation"
    print(f"release = {source}; torch {torch.__version__}, {args.device}, threads {torch.get_num_threads()}")
    for scale in args.scales:
        for layer in args.layers:
            for batch in args.batches:
                for flow in args.flows:
                    row = run_case(batch=batch, scale=scale, layer=layer, flow=flow, repeats=args.repeats,
                                   device=args.device, release_cls=release_cls, policy=policy, plan=plan,
                                   settle=args.keep_freed_memory)
                    rows.append(row)
                    print(table([row], source).splitlines()[-1], flush=True)
    text = table(rows, source)
    print(bound_table(rows))
    print(goal_summary(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
                "repeats": args.repeats, "release": source, "command": " ".join(sys.argv),
                "load_average_at_end": os.getloadavg()}
        (out / "table.md").write_text(text + "\n\n## Bound and goals\n\n" + bound_table(rows) + "\n\n"
                                      + goal_summary(rows) + "\n")
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    if not all(r["identical"] for r in rows):
        raise SystemExit("error: reference mode and the release kept different tokens (see the table)")


if __name__ == "__main__":
    main()
