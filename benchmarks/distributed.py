"""``compare`` and ``calibrate`` on several processes, GPUs and machines, launched by ``torchrun``.

Only PyTorch's own machinery is used: ``torchrun`` (``torch.distributed.run``) starts the
processes and sets RANK / WORLD_SIZE / LOCAL_RANK, and ``torch.distributed`` connects them
(``gloo`` on CPU, ``nccl`` on CUDA, ``--dist-backend`` to choose). A command started without
torchrun runs as one process, exactly as before.

How the work is split (``Distributed.share``): the unit is a *group*, one (seed, chunk of
conditions) with every configuration (the full-cache reference first, then each policy x budget,
which read that reference's image and tokens). The groups that still have unfinished jobs are
dealt round robin: rank r takes pending groups r, r + N, r + 2N, … Which rank generates an image
never changes the image: each job is one seeded ``generate`` call on the same conditions in the
same batch as in a single process.

Rows: with one process they go to ``results.jsonl`` as before; with N > 1 each rank appends its
rows to its own shard ``shards/rankNNNN.jsonl`` right after each job. After a barrier rank 0
merges the shards into ``results.jsonl`` (deduplicated by row key, in job order), deletes them and
computes the set metrics (FID) and reports. Every run first merges shards left by an earlier run
that died, so resuming works with any number of processes (also 1, without torchrun): a job whose
rows are in ``results.jsonl`` or in any shard is not redone, and a killed rank loses at most its
job in flight.

Calibration (``reduce_collectors``): every rank calibrates its share of the chunks with one
collector per chunk; the per-chunk sums are all-reduced and merged in chunk order on every rank,
which is exactly what one process does, so the calibration is bit-identical for any N.

Test hook: ``KVPOLICY_TEST_EXIT_AFTER_JOBS=RANK:N`` makes rank RANK exit abruptly (``os._exit``,
status 17) right after writing the rows of its N-th job, so tests can kill a rank mid-run; it is
for tests only.

Every rank and node must see the same ``--out`` folder (one machine, or a shared filesystem across
nodes); this is checked before any work.
"""

from __future__ import annotations

import datetime
import importlib
import os
import pickle
import uuid
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, TypeVar

import attrs
import torch

from . import reports

BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_TIMEOUT_MINUTES = 120
SHARD_DIR = "shards"
TEST_EXIT_ENV = "KVPOLICY_TEST_EXIT_AFTER_JOBS"
TEST_EXIT_STATUS = 17

T = TypeVar("T")

# torch modules whose functions take ``torch.distributed.group.WORLD`` as a default argument value,
# read when the module is imported. Imported after init_process_group (transformers imports them
# when a model loads), they keep the process group alive after destroy_process_group: its gloo
# threads then run into interpreter exit, which now and then aborts a rank with "terminate called
# without an active exception". Imported before joining, they hold None.
WORLD_AT_IMPORT = ("torch.distributed.nn", "torch.distributed.optim", "torch.distributed.fsdp")


def launched_by_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    return "WORLD_SIZE" in environ and "RANK" in environ


def choose_backend(requested: Optional[str], device: str) -> str:
    """``gloo`` for CPU, ``nccl`` for CUDA unless ``requested`` says otherwise (checked)."""
    requested = requested or "auto"
    if requested not in BACKENDS:
        raise ValueError(f"--dist-backend {requested!r}: choose one of {', '.join(BACKENDS)}")
    is_cuda = torch.device(device).type == "cuda"
    backend = ("nccl" if is_cuda else "gloo") if requested == "auto" else requested
    if backend == "nccl" and not is_cuda:
        raise ValueError(f"--dist-backend nccl needs --device cuda (got --device {device}); use gloo on CPU")
    available = {"gloo": torch.distributed.is_gloo_available(), "nccl": torch.distributed.is_nccl_available()}
    if not available[backend]:
        others = [b for b, ok in available.items() if ok]
        raise ValueError(f"--dist-backend {backend}: this torch build ({torch.__version__}) has no {backend} "
                         f"backend; available: {', '.join(others) or 'none'}")
    return backend


def _env_int(environ: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    text = environ.get(name)
    if text is None:
        if default is None:
            raise ValueError(f"{name} is not set; start the command with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK)")
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} must be an integer (torchrun sets it)") from None
    if value < 0:
        raise ValueError(f"{name}={value} must be >= 0")
    return value


class ExitHook:
    """The test hook ``KVPOLICY_TEST_EXIT_AFTER_JOBS=RANK:N`` (see the module docstring)."""

    def __init__(self, rank: int, environ: Mapping[str, str] = os.environ):
        self.after = None
        self.jobs = 0
        text = environ.get(TEST_EXIT_ENV)
        if not text:
            return
        try:
            target, after = (int(part) for part in text.split(":"))
        except ValueError:
            raise ValueError(f"{TEST_EXIT_ENV}={text!r} must be RANK:N (a test hook: rank RANK exits after "
                             "its N-th job), e.g. 1:1") from None
        if after < 1:
            raise ValueError(f"{TEST_EXIT_ENV}={text!r}: N must be >= 1")
        if target == rank:
            self.after = after

    def job_done(self) -> None:
        self.jobs += 1
        if self.after is not None and self.jobs >= self.after:
            os._exit(TEST_EXIT_STATUS)


@attrs.frozen
class Distributed:
    """This process's place among the ranks; the default is a single process (no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None  # None: not launched by torchrun, no process group
    exit_hook: ExitHook = attrs.field(factory=lambda: ExitHook(0, {}), eq=False)

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Rows go to per-rank shards (more than one process)."""
        return self.world_size > 1

    def describe(self) -> str:
        return (f"rank {self.rank} of {self.world_size} (local rank {self.local_rank}, {self.backend})"
                if self.enabled else "one process")

    def local_device(self, device: str) -> str:
        """Where this rank runs: plain ``cuda`` means this rank's GPU, cuda:LOCAL_RANK."""
        parsed = torch.device(device)
        if self.enabled and parsed.type == "cuda" and parsed.index is None:
            return f"cuda:{self.local_rank}"
        return device

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's deterministic share: items rank, rank + N, rank + 2N, …"""
        return list(items[self.rank::self.world_size])

    # -- collectives (no-ops for one process) --------------------------------------------------
    def _collective_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if not self.enabled:
            return
        if self.backend == "nccl":
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self._collective_device())
        return box[0]

    def all_gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks (in place; returned). Summing one non-zero entry with
        zeros is exact, which ``reduce_collectors`` relies on."""
        if not self.enabled:
            return tensor
        on_device = tensor.to(self._collective_device())
        torch.distributed.all_reduce(on_device, op=torch.distributed.ReduceOp.SUM)
        tensor.copy_(on_device)
        return tensor

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only; every rank gets its result, or raises its error, so no rank
        waits forever for a rank 0 that failed (rank 0 keeps the original traceback)."""
        if not self.enabled:
            return fn()
        outcome, error = None, None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
                error = exc
                try:
                    pickle.dumps(exc)
                    outcome = ("error", exc)
                except Exception:  # noqa: BLE001
                    outcome = ("error", RuntimeError(f"rank 0 failed: {type(exc).__name__}: {exc}"))
        outcome = self.broadcast(outcome)
        if error is not None:
            raise error
        if outcome[0] == "error":
            raise outcome[1]
        return outcome[1]

    def check_shared_folder(self, folder: Path) -> None:
        """Every rank must see rank 0's files in ``folder`` (multi-node: a shared filesystem)."""
        if not self.sharded:
            return
        name = self.on_main(lambda: _write_probe(folder))
        visible = self.all_gather((folder / name).is_file())
        if self.is_main:
            (folder / name).unlink(missing_ok=True)
        blind = [rank for rank, ok in enumerate(visible) if not ok]
        if blind:
            raise ValueError(f"output folder {str(folder)!r} is not shared: rank(s) {blind} cannot see files rank 0 "
                             "writes there; on several nodes give an --out on a filesystem every node mounts")

    def close(self, finished: bool = True) -> None:
        """Leave the process group. After success every rank first waits for the others (rank 0
        writes the reports last): a rank tearing down its connections while a peer still uses them
        can abort the peer (gloo: "terminate called without an active exception"). After an error
        no barrier: the other ranks may be waiting elsewhere, and torchrun stops them anyway."""
        if self.enabled and torch.distributed.is_initialized():
            if finished:
                self.barrier()
            torch.distributed.destroy_process_group()


SINGLE = Distributed()


def _write_probe(folder: Path) -> str:
    name = f".rank0-probe-{uuid.uuid4().hex}"
    (folder / name).write_text("visible to every rank?")
    return name


def setup(device: str, backend: Optional[str] = None, timeout_minutes: Optional[float] = None,
          environ: Mapping[str, str] = os.environ) -> Distributed:
    """Join the torchrun process group when launched by torchrun; otherwise one process.

    Everything is checked before connecting: the backend against the device, the GPU this rank
    would use (cuda:LOCAL_RANK) against the GPUs present."""
    if timeout_minutes is not None and not timeout_minutes > 0:
        raise ValueError(f"--dist-timeout must be > 0 minutes, got {timeout_minutes}")
    if not launched_by_torchrun(environ):
        if backend not in (None, "auto"):
            raise ValueError(f"--dist-backend {backend} applies to runs started by torchrun (WORLD_SIZE and RANK "
                             "are not set): launch with `torchrun --nproc_per_node=N …`")
        return SINGLE
    rank, world = _env_int(environ, "RANK"), _env_int(environ, "WORLD_SIZE")
    local_rank = _env_int(environ, "LOCAL_RANK", default=0)
    if world < 1 or rank >= world:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    parsed = torch.device(device)
    if parsed.type == "cuda":
        if parsed.index is not None and world > 1:
            raise ValueError(f"--device {device}: with torchrun every rank uses its own GPU, cuda:LOCAL_RANK; "
                             "give --device cuda (choose the GPUs with CUDA_VISIBLE_DEVICES)")
        count = torch.cuda.device_count()
        index = parsed.index if parsed.index is not None else local_rank
        if index >= count:
            raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: this node has {count} CUDA device(s); start at "
                             f"most {count} process(es) per node (--nproc_per_node={count})")
        torch.cuda.set_device(index)
    elif parsed.type != "cpu":
        raise ValueError(f"--device {device}: torchrun runs support cpu and cuda")
    chosen = choose_backend(backend, device)
    hook = ExitHook(rank, environ)
    timeout = datetime.timedelta(minutes=timeout_minutes or DEFAULT_TIMEOUT_MINUTES)
    if not torch.distributed.is_initialized():
        for name in WORLD_AT_IMPORT:
            try:
                importlib.import_module(name)
            except ImportError:  # not in this torch build: nothing can import it later either
                pass
        torch.distributed.init_process_group(chosen, timeout=timeout)
    return Distributed(rank=rank, world_size=world, local_rank=local_rank, backend=chosen, exit_hook=hook)


def add_arguments(parser) -> None:
    """--dist-backend / --dist-timeout for the commands that run under torchrun."""
    group = parser.add_argument_group("several processes (start the command with torchrun --nproc_per_node=N; "
                                      "see the README)")
    group.add_argument("--dist-backend", default="auto", choices=BACKENDS,
                       help="torch.distributed backend under torchrun (default auto: nccl on CUDA, gloo on CPU)")
    group.add_argument("--dist-timeout", type=float, default=None, metavar="MINUTES",
                       help=f"how long a rank waits for the others at a barrier (default {DEFAULT_TIMEOUT_MINUTES}; "
                            "the fastest rank waits for the slowest to finish its share)")


# -- per-rank shards of results.jsonl ----------------------------------------------------------------

def shard_path(out: Path, rank: int) -> Path:
    return Path(out) / SHARD_DIR / f"rank{rank:04d}.jsonl"


def shard_files(out: Path) -> list[Path]:
    folder = Path(out) / SHARD_DIR
    return sorted(folder.glob("rank*.jsonl")) if folder.is_dir() else []


def merge_shards(results: Path, out: Path, order: Optional[Callable[[dict], object]] = None) -> int:
    """Append the shards' rows whose keys ``results`` lacks (each once, sorted by ``order``), then
    delete the shards. Dying between the two steps is harmless: the next merge skips known keys.
    Returns the number of rows added."""
    files = shard_files(out)
    if not files:
        return 0
    seen = {row["key"] for row in reports.read_rows(results)}
    new = []
    for path in files:
        for row in reports.read_rows(path):
            if row["key"] not in seen:
                seen.add(row["key"])
                new.append(row)
    if order is not None:
        new.sort(key=order)
    if new:
        reports.append_rows(results, new)
    for path in files:
        path.unlink()
    try:
        files[0].parent.rmdir()  # only when empty: a concurrent writer's shard is never lost
    except OSError:
        pass
    return len(new)


# -- calibration --------------------------------------------------------------------------------------

def reduce_collectors(collectors: Mapping[int, object], num_chunks: int, make: Callable[[], object],
                      dist: Distributed = SINGLE):
    """One collector equal to merging every chunk's collector in chunk order, on every rank.

    ``collectors`` holds this rank's chunks {chunk index: collector}; ``make`` creates an empty
    collector of the same configuration. A collector offers ``state_dict()`` (named tensors plus
    ``calls``), ``load_state_dict`` and ``merge``. The per-chunk statistics are all-reduced: each
    chunk's entries are non-zero on one rank only, so the sums are exact, and the ordered merge
    makes the result independent of which rank ran which chunk."""
    states = {index: collector.state_dict() for index, collector in collectors.items()}
    # the statistics' names, shapes and dtypes; a rank without chunks learns them from the others
    layouts = dist.all_gather(next(({name: (tuple(value.shape), value.dtype) for name, value in state.items()
                                     if name != "calls"} for state in states.values()), None))
    known = [layout for layout in layouts if layout is not None]
    total = make()
    if not known:
        return total  # no conditions at all
    layout = known[0]
    if any(other != layout for other in known):
        raise RuntimeError(f"ranks recorded different calibration statistics: {known}")
    stacks = {name: torch.zeros((num_chunks, *shape), dtype=dtype) for name, (shape, dtype) in layout.items()}
    calls = torch.zeros(num_chunks, dtype=torch.long)
    for index, state in states.items():
        for name in layout:
            stacks[name][index] = state[name]
        calls[index] = state["calls"]
    for tensor in (*stacks.values(), calls):
        dist.all_reduce_sum(tensor)
    for index in range(num_chunks):
        chunk = make()
        chunk.load_state_dict({**{name: stack[index] for name, stack in stacks.items()}, "calls": int(calls[index])})
        total.merge(chunk)
    return total
