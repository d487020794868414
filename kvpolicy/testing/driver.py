"""Drive a policy through a whole generation with the real ``KVCache`` and check every call.

``drive`` appends each scale's synthetic keys/values to a ``KVCache`` layer by layer, compresses
as an adapter does, and checks, at every (scale, layer): the policy's own ``Selection`` (before the
core's guards see it: capacity, indices, no eviction while the cache fits, promised positions) and
the cache afterwards (the kept tensors are the generated ones bit for bit, tracked by global token
id; counted bytes equal the tensors held). After the generation it checks the report and the
budget. Failures raise ``InvariantViolation`` subclasses naming the invariant and the place.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import attrs
import torch

from ..cache import CacheReport, KVCache
from ..policy import Policy
from .inputs import Inputs
from .invariants import INVARIANTS, InvariantViolation, violation


class Blocked(Exception):
    """An invariant switched off for this run failed: the case cannot check the others."""


def label(policy: Optional[Policy]) -> str:
    return "full cache (no policy)" if policy is None else (policy.name or type(policy).__name__)


class Checker:
    """Which invariants raise, which are ignored (not asked for) and which block the case (known
    to fail already: a case where they fail cannot check the others); what was exercised; where."""

    def __init__(self, policy: Optional[Policy], case=None, enabled=None, ignored=()):
        self.policy_label = label(policy)
        self.case = case
        self.enabled = frozenset(INVARIANTS if enabled is None else enabled)
        self.ignored = frozenset(ignored) - self.enabled - {"completes"}
        self.exercised: set[str] = set()
        self.where = ""

    def wants(self, invariant: str) -> bool:
        return invariant in self.enabled

    def fail(self, invariant: str, detail: str):
        if invariant in self.ignored:
            return
        if invariant not in self.enabled:
            raise Blocked(invariant)
        raise violation(invariant, self.policy_label, f"{self.where}: {detail}" if self.where else detail, self.case)

    def check(self, condition: bool, invariant: str, detail: Callable[[], str] | str):
        if not condition:
            self.fail(invariant, detail() if callable(detail) else detail)


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    """Index of the first True entry of a boolean tensor."""
    return tuple(int(i) for i in mask.nonzero()[0])


@attrs.define
class Trace:
    """What one generation did: per (scale, layer) the kept indices, counts and cache lengths."""

    indices: dict = attrs.field(factory=dict)  # (scale, layer) -> (R, H, k) int64; row/head b,h valid up to kept[b, h]
    kept: dict = attrs.field(factory=dict)  # (scale, layer) -> (R, H) int64 tokens kept
    before: dict = attrs.field(factory=dict)  # (scale, layer) -> (R, H) int64 cache length before compression
    lengths: dict = attrs.field(factory=dict)  # (scale, layer) -> int, the longest cache before compression
    report: Optional[CacheReport] = None
    cache: Optional[KVCache] = None
    exercised: set = attrs.field(factory=set)

    def evicted(self) -> bool:
        return any(bool((self.kept[key] < self.before[key]).any()) for key in self.kept)

    def same_selection(self, other: "Trace") -> bool:
        return self.difference(other) is None

    def difference(self, other: "Trace", rows: Optional[slice] = None, other_rows: Optional[slice] = None) -> Optional[str]:
        """None if both generations kept the same tokens (optionally of some rows), else where they differ."""
        rows = rows or slice(None)
        other_rows = other_rows or slice(None)
        if self.indices.keys() != other.indices.keys():
            return "they ran different (scale, layer) steps"
        for key in sorted(self.indices):
            a_kept, b_kept = self.kept[key][rows], other.kept[key][other_rows]
            if a_kept.shape != b_kept.shape or not torch.equal(a_kept, b_kept):
                return f"scale {key[0]}, layer {key[1]}: kept {a_kept.tolist()} tokens vs {b_kept.tolist()}"
            # Compare positions among each (row, head)'s own tokens (views of other batches pad differently).
            a, b = self.own_positions(key)[rows], other.own_positions(key)[other_rows]
            width = int(a_kept.max()) if a_kept.numel() else 0
            a, b = _valid(a[..., :width], a_kept), _valid(b[..., :width], b_kept)
            if not torch.equal(a, b):
                at = _first(a != b)
                return (f"scale {key[0]}, layer {key[1]}, row {at[0]}, head {at[1]}: kept positions "
                        f"{_valid_row(a, a_kept, at)} vs {_valid_row(b, b_kept, at)}")
        return None

    def own_positions(self, key) -> torch.Tensor:
        """The kept indices counted among each (row, head)'s own tokens (0 = its oldest)."""
        padding = self.lengths[key] - self.before[key]
        return self.indices[key] - padding.unsqueeze(-1)


def _valid(indices: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Indices with the entries past each (row, head)'s kept count set to -1."""
    mask = torch.arange(indices.shape[2]) < kept.unsqueeze(-1)
    return torch.where(mask, indices, torch.full_like(indices, -1))


def _valid_row(indices: torch.Tensor, kept: torch.Tensor, at) -> list:
    row = indices[at[0], at[1], : int(kept[at[0], at[1]])].tolist()
    return row if len(row) <= 24 else row[:10] + ["..."] + row[-10:]


# -- selection-level checks (inside compress, before the core's own guards) ----------------------

def _bounds(ctx, heads: int):
    """Per-head capacities (H,) or None for no limit, and whether the bound is a per-row sum."""
    if ctx.capacity is None:
        return None, False
    head_caps = getattr(ctx, "head_capacities", None)
    if head_caps is not None:
        return torch.as_tensor(head_caps, dtype=torch.long).cpu().reshape(heads), False
    return torch.full((heads,), int(ctx.capacity), dtype=torch.long), False


def _lengths_before(ctx, keys: torch.Tensor) -> torch.Tensor:
    lengths = getattr(ctx, "lengths", None)
    if lengths is not None:
        return torch.as_tensor(lengths, dtype=torch.long).cpu()
    return torch.full(tuple(keys.shape[:2]), int(ctx.length), dtype=torch.long)


def check_selection(checker: Checker, policy: Policy, keys: torch.Tensor, ctx, selection) -> None:
    """The invariants a ``Selection`` must satisfy for a context (per row and head)."""
    batch, heads = keys.shape[:2]
    before = _lengths_before(ctx, keys)
    bounds, per_row_sum = _bounds(ctx, heads)
    adaptive = per_row_sum or bool(getattr(policy, "head_adaptive", False))
    if hasattr(selection, "resolved"):
        selection = selection.resolved()  # a deferred per-head top-k as the tensors compress forms
    indices = selection.indices
    if indices is None:
        if bounds is not None:
            over = before > bounds.view(1, heads)
            if bool(over.any()):
                b, h = _first(over)
                checker.fail("capacity", f"row {b}, head {h}: the policy kept all {int(before[b, h])} tokens "
                                         f"(Selection(None)) over capacity {int(bounds[h])}")
        return
    if not isinstance(indices, torch.Tensor) or indices.dim() != 3 or tuple(indices.shape[:2]) != (batch, heads) \
            or indices.dtype != torch.long:
        checker.fail("indices", f"Selection.indices is {getattr(indices, 'dtype', type(indices).__name__)} "
                                f"{tuple(getattr(indices, 'shape', ()))}; need (B={batch}, H={heads}, k) int64")
    indices = indices.detach().cpu()
    k = indices.shape[2]
    lengths = getattr(selection, "lengths", None)
    if lengths is None:
        kept = torch.full((batch, heads), k, dtype=torch.long)
    else:
        kept = torch.as_tensor(lengths).detach().cpu()
        if tuple(kept.shape) != (batch, heads) or kept.dtype != torch.long or bool((kept < 0).any() | (kept > k).any()):
            checker.fail("indices", f"Selection.lengths {kept.dtype} {tuple(kept.shape)} must be (B={batch}, H={heads}) "
                                    f"int64 in 0..{k}")
    fits = check_kept(checker, before, bounds, adaptive, indices, kept)
    if fits is None or not bool((~fits).any()):
        return
    promised = policy.promised_positions(ctx)
    if promised is None:
        return
    promised = torch.as_tensor(promised, dtype=torch.long).detach().cpu()
    if promised.dim() > 3 or promised.dim() > 1 and tuple(promised.shape[-3:-1]) not in ((batch, heads), (heads,)):
        checker.fail("promises", f"promised_positions returned shape {tuple(promised.shape)}; need (P,) for every "
                                 f"row and head, (H={heads}, P) per head or (B={batch}, H={heads}, P), -1 = none")
    promised = promised.reshape((1, 1) + tuple(promised.shape[-1:]) if promised.dim() == 1 else
                                (1,) * (3 - promised.dim()) + tuple(promised.shape)).expand(batch, heads, -1)
    if not bool((promised >= 0).any()):
        return
    checker.exercised.add("promises")
    valid = torch.arange(k) < kept.unsqueeze(-1)
    present = ((indices.unsqueeze(-1) == promised.unsqueeze(2)) & valid.unsqueeze(-1)).any(dim=2)  # (B, H, P)
    missing = ~present & (promised >= 0) & ~fits.unsqueeze(-1)
    if bool(missing.any()):
        b, h, p = _first(missing)
        mine = [v for v in promised[b, h].tolist() if v >= 0]
        checker.fail("promises", f"row {b}, head {h}: promised position {int(promised[b, h, p])} (of "
                                 f"{_short(mine)}) was evicted; kept {_valid_row(indices, kept, (b, h))}")


def check_kept(checker: Checker, before: torch.Tensor, bounds: Optional[torch.Tensor], adaptive: bool,
               indices: torch.Tensor, kept: torch.Tensor) -> Optional[torch.Tensor]:
    """Indices in range, unique and ascending; kept <= bound; no eviction where the cache fits.

    before (R, H) tokens each (row, head) holds, bounds (H,) capacities or None, indices (R, H, k)
    valid up to kept (R, H), counted in the policy's view: ``length`` = before.max() positions with
    each (row, head)'s tokens last (left padding before them when the cache is ragged).
    ``adaptive``: the bound holds for each row's sum over heads. Returns the (R, H) mask of what
    fits (None without a bound).
    """
    batch, heads, k = indices.shape
    checker.exercised.add("indices")
    length = int(before.max()) if before.numel() else 0
    first = length - before  # (R, H) the first real position of each (row, head)
    valid = torch.arange(k) < kept.unsqueeze(-1)
    out = valid & ((indices < first.unsqueeze(-1)) | (indices >= length))
    if bool(out.any()):
        b, h, i = _first(out)
        checker.fail("indices", f"row {b}, head {h}: index {int(indices[b, h, i])} outside the cache "
                                f"{int(first[b, h])}..{length - 1}")
    if k > 1:
        bad = valid[..., 1:] & (indices[..., 1:] <= indices[..., :-1])
        if bool(bad.any()):
            b, h, i = _first(bad)
            checker.fail("indices", f"row {b}, head {h}: indices not unique and ascending: "
                                    f"... {int(indices[b, h, i])}, {int(indices[b, h, i + 1])} ...")
    if bounds is None:
        return None
    if adaptive:
        total, allowed = kept.sum(dim=1), int(bounds.sum())
        over = total > allowed
        if bool(over.any()):
            b = _first(over)[0]
            checker.fail("capacity", f"row {b}: kept {int(total[b])} tokens over its {heads} heads, more than "
                                     f"the {allowed} of H x capacity")
    else:
        over = kept > bounds.view(1, heads)
        if bool(over.any()):
            b, h = _first(over)
            checker.fail("capacity", f"row {b}, head {h}: kept {int(kept[b, h])} tokens, capacity {int(bounds[h])} "
                                     f"(cache length {int(before[b, h])})")
    # Nothing evicted while the cache fits: every (row, head) under its bound (adaptive: whole rows).
    fits = before <= bounds.view(1, heads)
    if adaptive:
        fits = fits.all(dim=1, keepdim=True).expand(batch, heads)
    if bool((~fits).any()):
        checker.exercised.add("capacity")
    if bool(fits.any()):
        checker.exercised.add("no_early_eviction")
        positions = first.unsqueeze(-1) + torch.arange(k)
        evicted = fits & ((kept != before) | (valid & (indices != positions)).any(dim=-1))
        if bool(evicted.any()):
            b, h = _first(evicted)
            checker.fail("no_early_eviction", f"row {b}, head {h}: the cache of {int(before[b, h])} tokens fits "
                                              f"capacity {int(bounds[h])} but the policy kept "
                                              f"{_valid_row(indices, kept, (b, h))}")
    return fits


def plan_bounds(plan, scale: int, layer: int, heads: int) -> Optional[torch.Tensor]:
    """(H,) capacities of a layer at a scale from a plan (head capacities where it has them)."""
    capacity = plan.capacity(scale, layer)
    if capacity is None:
        return None
    head_capacity = getattr(plan, "head_capacity", None)
    per_head = head_capacity(scale, layer) if head_capacity is not None else None
    if per_head is not None:
        return torch.tensor(list(per_head), dtype=torch.long)
    return torch.full((heads,), int(capacity), dtype=torch.long)


def _short(values: list) -> list:
    return values if len(values) <= 24 else values[:10] + ["..."] + values[-10:]


_PROBES: dict[type, type] = {}


def _probe_class(cls: type) -> type:
    """A subclass whose ``select`` reports each Selection to the active checker (same object layout)."""
    probe = _PROBES.get(cls)
    if probe is None:
        def select(self, keys, values, ctx):
            selection = cls.select(self, keys, values, ctx)
            checker = self._kvpolicy_checker
            if checker is not None:
                check_selection(checker, self, keys, ctx, selection)
            return selection

        probe = type(cls.__name__, (cls,), {"__slots__": (), "select": select, "_kvpolicy_checker": None,
                                            "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _PROBES[cls] = probe
    return probe


def probe(policy: Policy) -> Policy:
    """A copy of ``policy`` whose selections are checked while a checker is active."""
    copied = copy.copy(policy)
    copied.__class__ = _probe_class(type(policy))
    return copied


# -- the generation -------------------------------------------------------------------------------

def _held(cache: KVCache, layer: int):
    """A layer's held keys and values as left-padded (R, H, L, D) views, the tokens each (row,
    head) holds (R, H), and the tensors that hold them (dense tensors, or a ragged store's data)."""
    keys, values = cache.keys[layer], cache.values[layer]
    if isinstance(keys, torch.Tensor):
        kept = torch.full(tuple(keys.shape[:2]), keys.shape[2], dtype=torch.long)
        return keys, values, kept, [keys, values]
    # Physically ragged storage (kvpolicy.ragged.Ragged): packed data, (B, H) lengths.
    kept = keys.lengths.detach().cpu().long()
    return keys.padded(), values.padded(), kept, [keys.data, values.data]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def drive(policy: Optional[Policy], inputs: Inputs, *, reuse: Optional[Trace] = None,
          checker: Optional[Checker] = None) -> Trace:
    """One checked generation of ``policy`` (None = the cache without a policy) on ``inputs``.

    ``reuse`` runs on the (reset) cache of an earlier trace, to catch state kept across
    generations. Raises ``InvariantViolation`` (or ``Blocked``) at the first broken invariant.
    """
    checker = checker or Checker(policy)
    schedule, num_layers = inputs.schedule, inputs.num_layers
    trace = Trace()
    if reuse is not None:
        cache = reuse.cache
        cache.reset()
        checked = cache.policy
    else:
        checked = None if policy is None else probe(policy)
        cache = KVCache(num_layers, schedule, checked)
    trace.cache = cache
    plan = None if policy is None else policy.plan(schedule, num_layers)
    rows, heads = inputs.rows, inputs.heads
    ids: list = [None] * num_layers  # (R, H, L) global token ids held per layer
    id_kept: list = [None] * num_layers  # (R, H) valid entries per row and head
    originals: list = [([], []) for _ in range(num_layers)]
    held_bytes = [0] * num_layers
    peak = 0
    item = {}
    if checked is not None:
        type(checked)._kvpolicy_checker = checker  # a class attribute: one generation is checked at a time
    try:
        for scale in range(schedule.num_scales):
            n, offset = schedule.tokens(scale), schedule.offset(scale)
            for layer in range(num_layers):
                checker.where = f"scale {scale}, layer {layer}"
                keys, values, queries, raw = inputs.tensors[(scale, layer)]
                item[layer] = (keys.element_size() * keys.shape[-1] + values.element_size() * values.shape[-1])
                originals[layer][0].append(keys)
                originals[layer][1].append(values)
                cache.append(layer, scale, keys, values)
                new_ids = torch.arange(offset, offset + n).expand(rows, heads, n)
                if ids[layer] is None:
                    ids[layer], id_kept[layer] = new_ids, torch.full((rows, heads), n, dtype=torch.long)
                else:  # left-padded like the policy's view: the new map follows every (row, head)
                    ids[layer], id_kept[layer] = torch.cat([ids[layer], new_ids], dim=2), id_kept[layer] + n
                before = id_kept[layer].clone()
                held_bytes[layer] = int(before.sum()) * item[layer]
                peak = max(peak, sum(held_bytes))
                result = None
                if checked is not None:
                    result = cache.compress(layer, scale, queries=queries if cache.needs_queries else None,
                                            raw_queries=raw if cache.needs_raw_queries else None)
                if result is None:
                    idx = (before.max() - before).unsqueeze(-1) + torch.arange(int(before.max()))
                    kept = before
                else:
                    idx = result.indices.detach().cpu()
                    lengths = getattr(result, "lengths", None)
                    kept = (torch.full((rows, heads), idx.shape[2], dtype=torch.long) if lengths is None
                            else torch.as_tensor(lengths).cpu().long())
                    capacity = None if plan is None else plan.capacity(scale, layer)
                    checker.check(result.capacity == capacity, "capacity",
                                  lambda: f"compress reported capacity {result.capacity}, the plan says {capacity}")
                    check_kept(checker, before, plan_bounds(plan, scale, layer, heads),
                               bool(getattr(policy, "head_adaptive", False)), idx, kept)
                ids[layer] = _gather_ids(ids[layer], idx, kept)
                id_kept[layer] = kept
                held_bytes[layer] = int(kept.sum()) * item[layer]
                _check_held(checker, cache, layer, scale, originals[layer], ids[layer], kept, item[layer])
                trace.indices[(scale, layer)] = idx.clone()
                trace.kept[(scale, layer)] = kept.clone()
                trace.before[(scale, layer)] = before
                trace.lengths[(scale, layer)] = int(before.max())
        checker.where = "after the generation"
        trace.report = cache.report()
        _check_report(checker, policy, plan, inputs, trace, item, peak)
    finally:
        if checked is not None:
            type(checked)._kvpolicy_checker = None
    trace.exercised = set(checker.exercised)
    return trace


def _gather_ids(ids: torch.Tensor, indices: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Global ids (left-padded with -1, like the policy's view) of the kept positions."""
    rows, heads, k = indices.shape
    width = int(kept.max()) if kept.numel() else 0
    safe = indices.clamp(0, max(ids.shape[2] - 1, 0))
    gathered = torch.gather(ids, 2, safe) if k else indices.clone()
    valid = torch.arange(k) < kept.unsqueeze(-1)
    out = torch.full((rows, heads, width), -1, dtype=torch.long)
    # Entry i < kept[b, h] goes to slot width - kept[b, h] + i (each (row, head)'s tokens last).
    slots = (width - kept).unsqueeze(-1) + torch.arange(k)
    out_flat = out.view(-1)
    base = (torch.arange(rows * heads) * width).view(rows, heads, 1)
    out_flat[(base + slots)[valid]] = gathered[valid]
    return out


def _check_held(checker, cache, layer, scale, originals, ids, kept, item_bytes) -> None:
    """The cache holds exactly the generated tensors of the kept tokens; bytes are counted exactly."""
    keys, values, held_kept, tensors = _held(cache, layer)
    checker.exercised.update({"bit_exact", "bytes"})
    checker.check(torch.equal(held_kept, kept), "bit_exact",
                  lambda: f"the cache holds {held_kept.tolist()} tokens per row and head, the selection kept {kept.tolist()}")
    all_keys, all_values = torch.cat(originals[0], dim=2), torch.cat(originals[1], dim=2)
    for name, held, original in (("keys", keys, all_keys), ("values", values, all_values)):
        safe = ids.clamp(min=0)
        expected = torch.gather(original, 2, safe.unsqueeze(-1).expand(-1, -1, -1, original.shape[-1]))
        valid = (ids >= 0).unsqueeze(-1)
        if held.shape[:3] != expected.shape[:3] or held.dtype != expected.dtype:
            checker.fail("bit_exact", f"the cache holds {name} {held.dtype} {tuple(held.shape)}, expected "
                                      f"{expected.dtype} {tuple(expected.shape)}")
        same = (held == expected) | (torch.isnan(held) & torch.isnan(expected)) | ~valid
        if not bool(same.all()):
            b, h, i, _ = _first(~same)
            checker.fail("bit_exact", f"row {b}, head {h}: held {name} at kept slot {i} are not the generated "
                                      f"{name} of token {int(ids[b, h, i])}")
    tensor_bytes = _tensor_bytes(tensors)
    expected_bytes = int(kept.sum()) * item_bytes
    checker.check(tensor_bytes == expected_bytes, "bytes",
                  lambda: f"the tensors held take {tensor_bytes} bytes but {int(kept.sum())} kept tokens x "
                          f"{item_bytes} bytes are {expected_bytes} (padding?)")
    for t in tensors:
        if t.device.type == "cpu":
            storage = t.untyped_storage().nbytes()
            checker.check(storage == t.numel() * t.element_size(), "bytes",
                          lambda: f"a held tensor of {t.numel() * t.element_size()} bytes keeps a storage of {storage} "
                                  "bytes alive (a view of the uncompressed cache: eviction freed nothing)")
    counted = cache.report().layer_kv_bytes[scale][layer]
    checker.check(counted == tensor_bytes, "bytes",
                  lambda: f"the cache counts {counted} bytes but holds tensors of {tensor_bytes} bytes")


def _check_report(checker, policy, plan, inputs, trace, item, peak) -> None:
    report, schedule, num_layers = trace.report, inputs.schedule, inputs.num_layers
    rows, heads = inputs.rows, inputs.heads
    for s in range(schedule.num_scales):
        kept_max = [int(trace.kept[(s, l)].max()) for l in range(num_layers)]
        checker.check(list(report.kept_lengths[s]) == kept_max, "bytes",
                      lambda: f"scale {s}: the report says kept {list(report.kept_lengths[s])} tokens per layer, "
                              f"the cache held {kept_max}")
        if plan is not None:
            checker.check(list(report.capacities[s]) == list(plan.capacities[s]), "bytes",
                          lambda: f"scale {s}: the report's capacities {list(report.capacities[s])} are not the "
                                  f"plan's {list(plan.capacities[s])}")
        head_kept = getattr(report, "head_kept_lengths", None)
        if head_kept:
            per_head = [tuple(int(v) for v in trace.kept[(s, l)].max(dim=0).values) for l in range(num_layers)]
            checker.check([tuple(h) for h in head_kept[s]] == per_head, "bytes",
                          lambda: f"scale {s}: the report says heads kept {head_kept[s]} tokens, the cache held {per_head}")
        full = sum(rows * heads * schedule.cumulative[s] * item[l] for l in range(num_layers))
        checker.check(report.full_kv_bytes[s] == full, "bytes",
                      lambda: f"scale {s}: the report's full-cache bytes {report.full_kv_bytes[s]} != {full}")
    checker.check(report.peak_kv_bytes == peak, "bytes",
                  lambda: f"the report's peak {report.peak_kv_bytes} bytes != the largest total held {peak}")
    budget = None if policy is None else budget_tokens(policy, schedule)
    if budget is None:
        return
    checker.exercised.add("budget")
    for s in range(schedule.num_scales):
        total = sum(trace.kept[(s, l)] for l in range(num_layers)).sum(dim=1)  # (R,) over layers and heads
        allowed = budget * num_layers * heads
        over = total > allowed
        if bool(over.any()):
            b = _first(over)[0]
            checker.fail("budget", f"scale {s}, row {b}: {int(total[b])} tokens kept over {num_layers} layers x {heads} "
                                   f"heads, mean {int(total[b]) / (num_layers * heads):.2f} > budget {budget}")


def budget_tokens(policy: Policy, schedule) -> Optional[int]:
    """The policy's budget in tokens per layer on ``schedule`` (None: no budget)."""
    if policy.budget is None and not policy.requires_budget:
        return None
    return policy.budget_tokens(schedule)
