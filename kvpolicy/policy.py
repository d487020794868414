"""The ``Policy`` base class and the score-based helper ``ScoredPolicy``.

A policy does two things:

1. ``plan(schedule, num_layers)`` turns its budget into a ``CapacityPlan`` (tokens per
   (scale, layer) and optionally per head); plans are cached per geometry. This is the policy's
   *allocation* (``make_plan``).
2. ``select(keys, values, ctx)`` chooses which cached tokens a layer keeps after a scale's step:
   its *selector*. A ``Selection`` holds (B, H, k) indices and, when (row, head)s keep different
   counts, their (B, H) ``lengths``.

Allocations and selectors are separate parts that ``kvpolicy.compose`` combines (see there).

Policies declare what they need (``needs_queries``, ``needs_raw_queries``, ``stateful``) so that
callers compute only that. Policy state (H2O's accumulated attention, say) is never hidden in the
policy object: it travels through ``compress(..., state=...)`` and is owned by the caller's cache,
which resets it for every generation.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, ClassVar, Optional

import attrs
import torch

from .budget import Budget, Ratio, Tokens, budget_to_json, parse_budget
from .plan import CapacityPlan
from .schedule import ScaleSchedule
from . import scoring


def _optional_budget(value):
    return None if value is None else parse_budget(value)


@attrs.frozen
class CompressionContext:
    """Everything a policy may look at when selecting tokens for one (scale, layer)."""

    schedule: ScaleSchedule
    scale: int
    layer: int
    num_layers: int
    capacity: Optional[int]
    length: int  # L: tokens in the cache now (kept history + the current map)
    queries: Optional[torch.Tensor] = None  # (B, Hq, n_current, D): logits = queries @ keys^T
    raw_queries: Optional[torch.Tensor] = None  # (B, Hq, n_current, D): x @ W_q^T, nothing else
    state: Any = None
    # Head-wise plans: (H,) int64 per-head capacities on the keys' device (None: every head has
    # ``capacity``, the layer's per-head average budget).
    head_capacities: Optional[torch.Tensor] = None
    # Ragged caches (heads holding different numbers of tokens): (B, H) int64 tokens each (row, head)
    # holds now. The keys a policy sees are then left-padded to ``length``: the (row, head)'s tokens
    # are the last lengths[b, h] positions, so the current map is always at ``current_start`` and
    # positions before ``padding()[b, h]`` are padding (zeros) that must not be kept. None: every
    # (row, head) holds ``length`` tokens.
    lengths: Optional[torch.Tensor] = None
    # ``lengths`` as Python ints ([b][h]), where the caller knows them without a device read (compress
    # does: a Ragged keeps them on the host), else None.
    host_lengths: Optional[tuple] = None

    @property
    def ragged(self) -> bool:
        return self.lengths is not None

    def padding(self) -> Optional[torch.Tensor]:
        """(B, H) number of padding positions at the front of each (row, head), or None."""
        return None if self.lengths is None else self.length - self.lengths

    def valid_mask(self) -> Optional[torch.Tensor]:
        """(B, H, L) True where a position holds a real token (None when nothing is padded)."""
        if self.lengths is None:
            return None
        positions = torch.arange(self.length, device=self.lengths.device)
        return positions >= self.padding().unsqueeze(-1)

    def capacities_per_head(self, batch: int, heads: int) -> Optional[torch.Tensor]:
        """(B, H) int64 capacity of every (row, head), or None when every (row, head) has ``capacity``
        and nothing is ragged (the layer-wise case)."""
        if self.head_capacities is None and self.lengths is None:
            return None
        device = self.lengths.device if self.lengths is not None else self.head_capacities.device
        if self.head_capacities is not None:
            return self.head_capacities.to(device).expand(batch, heads)
        return torch.full((batch, heads), self.capacity, dtype=torch.long, device=device)

    @property
    def n_current(self) -> int:
        return self.schedule.tokens(self.scale)

    @property
    def current_start(self) -> int:
        """Cache position of the current map's first token (the current map is never evicted yet)."""
        return self.length - self.n_current

    @property
    def current_shape(self) -> tuple[int, int]:
        return self.schedule.shape(self.scale)


@attrs.frozen
class Selection:
    """What ``Policy.select`` returns: kept indices (B, H, k), or None to keep everything.

    ``lengths`` (B, H) int64, optional: (row, head) keeps only ``indices[b, h, :lengths[b, h]]``
    (ascending); the rest of its row is padding and ignored. Without it every (row, head) keeps k.

    ``indices`` may also be a ``scoring.PerHeadTopk`` (from ``scoring.per_head_topk``, with no
    ``lengths``): a per-(row, head) top-k whose width ``compress`` learns in its one device read
    (head-wise policies return this). ``resolved()`` gives the tensors (reading the device).

    ``keys_finite``, optional: a 0-d bool tensor the policy computed while scoring, True only if it
    proved every key finite (a score that reads every key gets this almost for free: a NaN or ±inf
    key makes its dot products NaN or ±inf). ``compress`` then skips its own read of the keys
    (one pass over the cache); False proves nothing and ``compress`` reads the keys itself.

    ``redo_if`` and ``redo``, optional, together: a check the policy leaves to ``compress``'s one
    device->host read (instead of reading a device value itself, a host sync each): ``redo_if`` a
    one-element bool tensor, True where this selection must not be used, and ``redo()`` returning
    the ``Selection`` to use then (it may read the device; it runs only on that rare path, before
    ``compress``'s own checks of the result).

    ``queries_finite``, optional: like ``keys_finite`` for the queries: a 0-d bool tensor, True only
    if the policy proved finite every query row (of ``queries`` and ``raw_queries``) its selection
    depends on. ``compress`` then checks no query itself: a row the policy never read cannot change
    what it keeps (ScaleKV's reference mode reads 16 window rows of thousands). False proves nothing
    and ``compress`` reads the queries itself.
    """

    indices: Optional[torch.Tensor]
    state: Any = None
    lengths: Optional[torch.Tensor] = None
    keys_finite: Optional[torch.Tensor] = attrs.field(default=None, kw_only=True)
    queries_finite: Optional[torch.Tensor] = attrs.field(default=None, kw_only=True)
    redo_if: Optional[torch.Tensor] = attrs.field(default=None, kw_only=True)
    redo: Optional[Callable[[], "Selection"]] = attrs.field(default=None, kw_only=True)

    def resolved(self) -> "Selection":
        """This selection with tensor ``indices``/``lengths`` (and the state they give) where
        ``indices`` is a deferred ``scoring.PerHeadTopk``; itself otherwise."""
        if not isinstance(self.indices, scoring.PerHeadTopk):
            return self
        indices, lengths = self.indices.resolve()
        state = self.state if self.indices.state_from is None else self.indices.state_from(indices, lengths)
        return attrs.evolve(self, indices=indices, lengths=lengths, state=state)


@attrs.define(kw_only=True)
class Policy:
    """Base class. Subclass with ``@register_policy("name")`` and ``@attrs.define(kw_only=True)``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_queries: ClassVar[bool] = False
    needs_raw_queries: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    requires_budget: ClassVar[bool] = True
    # What kvpolicy.testing (``kvpolicy check``) builds the policy with on its small geometries, and
    # the values it draws for each option; see ``promised_positions`` for what it must always keep.
    check_options: ClassVar[dict] = {}
    check_option_values: ClassVar[dict] = {}
    # capabilities the harness acts on (kvpolicy.capabilities explains each)
    keeps_everything: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False
    calibration_option: ClassVar[Optional[str]] = None
    plan_file_option: ClassVar[Optional[str]] = None
    plan_sources: ClassVar[tuple] = ()
    # True for policies whose per-(row, head) lengths depend on the data (AdaKV-style): compress then
    # checks each row's total over heads against H x capacity instead of every head against its own.
    head_adaptive: ClassVar[bool] = False

    budget: Optional[Budget] = attrs.field(default=None, converter=_optional_budget)
    _plans: dict = attrs.field(factory=dict, init=False, repr=False, eq=False)

    # -- planning ----------------------------------------------------------------------------
    def budget_tokens(self, schedule: ScaleSchedule, budget: Budget | None = None) -> Optional[int]:
        budget = self.budget if budget is None else parse_budget(budget)
        if budget is None:
            if self.requires_budget:
                raise ValueError(f"policy {self.name!r} needs a budget, e.g. "
                                 f"get_policy({self.name!r}, budget='10%') or budget=650 tokens")
            return None
        return budget.tokens(schedule)

    def plan(self, schedule: ScaleSchedule, num_layers: int, budget: Budget | str | int | float | None = None) -> CapacityPlan:
        """The capacity plan for a model geometry (cached per geometry and budget)."""
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if not isinstance(schedule, ScaleSchedule):
            raise TypeError(f"schedule must be a ScaleSchedule, got {type(schedule).__name__}")
        key = (schedule, num_layers, None if budget is None else parse_budget(budget))
        plan = self._plans.get(key)
        if plan is None:
            tokens = self.budget_tokens(schedule, key[2])
            plan = self.make_plan(schedule, num_layers, tokens)
            if plan.num_scales != schedule.num_scales or plan.num_layers != num_layers:
                raise ValueError(f"policy {self.name!r} made a {plan.num_scales}x{plan.num_layers} plan "
                                 f"for a {schedule.num_scales}-scale, {num_layers}-layer model")
            if plan.cumulative is None:
                plan = attrs.evolve(plan, cumulative=schedule.cumulative)
            self._plans[key] = plan
        return plan

    def make_plan(self, schedule: ScaleSchedule, num_layers: int, budget_tokens: Optional[int]) -> CapacityPlan:
        """Default: the same capacity in every layer at every scale (no limit without a budget)."""
        row = [budget_tokens] * num_layers
        return CapacityPlan(capacities=[row] * schedule.num_scales, budget_tokens=budget_tokens,
                            policy=self.name, cumulative=schedule.cumulative)

    def check_plan(self, plan: CapacityPlan, schedule: ScaleSchedule) -> CapacityPlan:
        """A selector's check that a plan suits it (e.g. every capacity holds its window); returns the plan.

        Allocations call it at the end of ``make_plan``, so any allocation composes with any selector."""
        return plan

    def capacity(self, schedule: ScaleSchedule, num_layers: int, scale: int, layer: int) -> Optional[int]:
        return self.plan(schedule, num_layers).capacity(scale, layer)

    # -- selection ---------------------------------------------------------------------------
    def select(self, keys: torch.Tensor, values: torch.Tensor, ctx: CompressionContext) -> Selection:
        raise NotImplementedError(f"{type(self).__name__} must implement select()")

    def promised_positions(self, ctx: CompressionContext) -> torch.Tensor:
        """Cache positions (numbered as in ``select``'s keys) this policy promises to keep whenever
        the layer evicts (sinks, recent or observation windows), checked by ``kvpolicy.testing``:
        a 1-D tensor for every row and head, or (H, P) per head / (B, H, P) per row and head with
        -1 where there is no promise (head-wise capacities). Default: no promise."""
        return torch.empty(0, dtype=torch.long)

    # -- calibration ------------------------------------------------------------------------
    @classmethod
    def calibration_measures(cls, schedule: ScaleSchedule) -> list:
        """Measures (``kvpolicy.attention_stats``) this policy's calibration needs on ``schedule``;
        ``kvpolicy calibrate`` records those of every registered policy in one run (default: none)."""
        return []

    # -- calibration (policies with needs_calibration) -------------------------------------------
    @classmethod
    def calibration_collector(cls, num_layers: int, num_scales: int, *, seed: int = 0, **options):
        """The ``stats=`` object a model's generation feeds (``observe(layer, scale, queries, keys,
        current_start=...)``); its ``result(source=..., **options)`` is what ``calibration_option``
        takes and has ``save(path)``."""
        raise NotImplementedError(f"policy {cls.name!r} does not calibrate (needs_calibration is False)")

    @classmethod
    def check_calibration_options(cls, schedule: ScaleSchedule, num_layers: int, budget_tokens: Optional[int] = None,
                                  **options) -> None:
        """Refuse bad calibration settings before any model runs (default: this policy takes none)."""
        if options:
            raise ValueError(f"policy {cls.name!r} takes no calibration option(s) {sorted(options)}")

    @classmethod
    def calibration_result(cls, collector, *, source: str, schedule: ScaleSchedule, budget_tokens: Optional[int] = None,
                           **options):
        """The calibration made from a filled collector; ``options`` are the command line's
        calibration settings, checked by ``check_calibration_options``."""
        cls.check_calibration_options(schedule, collector.num_layers, budget_tokens, **options)
        return collector.result(source=source)

    @classmethod
    def released_plan_file(cls, model: str, budget_tokens: int):
        """A published plan file this policy knows for a model at a budget (a path), or None."""
        return None

    @classmethod
    def resolve_plan_file(cls, value) -> str:
        """The path a plan file given on the command line names (default: an existing file)."""
        if not pathlib.Path(str(value)).expanduser().is_file():
            raise FileNotFoundError(f"plan file {str(value)!r} does not exist")
        return str(pathlib.Path(str(value)).expanduser())

    def export_plan_file(self, schedule: ScaleSchedule, num_layers: int, path) -> None:
        """Write this policy's plan in the format its ``plan_file_option`` reads back."""
        raise NotImplementedError(f"policy {self.name!r} has no plan file format")

    @classmethod
    def planning_stand_in(cls, schedule: ScaleSchedule, num_layers: int, budget) -> tuple[dict, str]:
        """Options that give this policy's memory plan without a calibration (``kvpolicy plan``
        without weights), and a note saying what they stand in for. A head-wise policy may take a
        keyword ``num_heads`` too: callers pass the model's head count when the method accepts it."""
        raise NotImplementedError(f"policy {cls.name!r} cannot be planned without a calibration")

    @classmethod
    def describe_calibration(cls, calibration, schedule: ScaleSchedule, budget_tokens: int) -> list[str]:
        """Lines that say what a calibration means for this policy at a budget (printed by calibrate)."""
        return []

    # -- configuration -----------------------------------------------------------------------
    def to_config(self) -> dict:
        """A JSON-friendly dict that ``Policy.from_config`` turns back into an equal policy."""
        config: dict[str, Any] = {"name": self.name}
        for field in attrs.fields(type(self)):
            if not field.init:
                continue
            config[field.alias or field.name] = _to_jsonable(getattr(self, field.name))
        return config

    @classmethod
    def from_config(cls, config: dict) -> "Policy":
        from .registry import get_policy

        if not isinstance(config, dict) or "name" not in config:
            raise ValueError(f"a policy config is a dict with a 'name' key, got {config!r}")
        options = dict(config)
        name = options.pop("name")
        policy = get_policy(name, **options)
        if cls is not Policy and not isinstance(policy, cls):
            raise TypeError(f"config names {name!r} ({type(policy).__name__}), not a {cls.__name__}")
        return policy

    def with_budget(self, budget) -> "Policy":
        return attrs.evolve(self, budget=budget)

    def __str__(self) -> str:
        return f"{self.name}(budget={self.budget})" if self.budget is not None else self.name


def _to_jsonable(value):
    if isinstance(value, (Ratio, Tokens)):
        return budget_to_json(value)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


@attrs.define(kw_only=True)
class ScoredPolicy(Policy):
    """Helper base for policies that score tokens: some positions are forced to stay (windows,
    sinks, recent tokens), the rest are ranked by ``score`` and the top (capacity - forced) kept.

    Subclasses implement ``score`` (B, H, L) and optionally ``forced_positions``. With head-wise
    capacities (or a ragged cache) each (row, head) keeps its own top count, padding never kept;
    ``head_budgets`` decides the per-(row, head) counts and is what a head-adaptive wrapper
    overrides (see ``kvpolicy.compose``).
    """

    def score(self, keys: torch.Tensor, ctx: CompressionContext) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def forced_positions(self, ctx: CompressionContext) -> torch.Tensor:
        """1-D tensor of cache positions every row and head keeps (default: none)."""
        return torch.empty(0, dtype=torch.long)

    def promised_positions(self, ctx: CompressionContext) -> torch.Tensor:
        return self.forced_positions(ctx)

    def head_budgets(self, scores: torch.Tensor, forced: torch.Tensor, ctx: CompressionContext) -> Optional[torch.Tensor]:
        """(B, H) tokens each (row, head) keeps, or None for ``ctx.capacity`` everywhere (layer-wise).

        Default: the plan's head capacities (``ctx.capacities_per_head``). Head-adaptive wrappers (class
        flag ``head_adaptive = True``) redistribute the layer's H x capacity across heads here."""
        return ctx.capacities_per_head(*scores.shape[:2])

    def head_budgets_deferred(self, scores: torch.Tensor, forced: torch.Tensor,
                              ctx: CompressionContext) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``head_budgets`` without reading the device: (budgets, ``redo_if``), where ``redo_if`` (a
        0-d bool tensor, or None) is True when the budgets rest on an assumption that does not hold
        and ``head_budgets`` (which may read) must give them instead. Default: ``head_budgets``, no
        assumption. Head-adaptive wrappers whose allocation needs a host number override both."""
        return self.head_budgets(scores, forced, ctx), None

    def per_head_selection(self, scores: torch.Tensor, forced: torch.Tensor, ctx: CompressionContext,
                           **proofs) -> Optional[Selection]:
        """The head-wise ``Selection`` for ``scores`` (a deferred ``scoring.per_head_topk``: the
        lengths and every check come back in ``compress``'s one device read), or None where
        ``head_budgets`` says layer-wise. ``proofs``: ``keys_finite``/``queries_finite``."""
        budgets, redo_if = self.head_budgets_deferred(scores, forced, ctx)
        if budgets is None:
            return None

        def selection(budgets):
            return Selection(scoring.per_head_topk(scores, budgets, forced=forced, valid=ctx.valid_mask()), ctx.state,
                             **proofs)

        if redo_if is None:
            return selection(budgets)
        return Selection(selection(budgets).indices, ctx.state, redo_if=redo_if,
                         redo=lambda: selection(self.head_budgets(scores, forced, ctx)), **proofs)

    def select(self, keys, values, ctx):
        if ctx.capacity is None or (ctx.length <= ctx.capacity and ctx.head_capacities is None):
            return Selection(None, ctx.state)
        forced = self.forced_positions(ctx).to(keys.device)
        scores = self.score(keys, ctx)
        per_head = self.per_head_selection(scores, forced, ctx)
        if per_head is not None:
            return per_head
        return Selection(scoring.topk_with_forced(scores, forced, ctx.capacity), ctx.state)
