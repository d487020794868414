"""The interface every model adapter implements; the model registry lives in ``adapters.families``."""

from __future__ import annotations

from typing import Optional

import attrs
import torch

from kvpolicy import CacheReport, Policy, get_policy

from .families import list_models, load_model, register_model  # noqa: F401  (their old home)


@attrs.define
class GenerationOutput:
    """What ``generate`` returns.

    images: (N, H, W, 3) uint8 RGB on CPU. tokens: per scale, the sampled discrete outputs
    (Infinity: bits (N, h, w, d) uint8; VAR: indices (N, h*w) int64). cache_report: counted KV bytes
    (per scale, peak) and per-scale seconds. seconds: wall time of the whole call. config: the exact
    settings (policy config, seed, cfg, …) for result files.
    """

    images: torch.Tensor
    tokens: list[torch.Tensor]
    cache_report: CacheReport
    seconds: float
    config: dict = attrs.field(factory=dict)


def resolve_policy(policy: Policy | str | None, budget=None) -> Optional[Policy]:
    """``policy`` may be a Policy, a registered name or None (full cache, no policy overhead)."""
    if policy is None:
        if budget is not None:
            raise ValueError("budget= was given without policy=; name a policy, e.g. policy='scalekv'")
        return None
    if isinstance(policy, Policy):
        return policy.with_budget(budget) if budget is not None else policy
    return get_policy(policy, **({} if budget is None else {"budget": budget}))
