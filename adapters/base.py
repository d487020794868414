"""The interface every model adapter implements, and the model registry used by the CLI."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import attrs
import torch

from kvpolicy import CacheReport, Policy, get_policy


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


# name prefix -> module that registers that family's loaders on import
_FAMILIES = {"infinity": "adapters.infinity", "var": "adapters.var"}
_LOADERS: dict[str, Callable[..., Any]] = {}


def register_model(name: str, loader: Callable[..., Any]) -> None:
    """Register ``loader(**kwargs) -> model`` under a preset name (done by each adapter package)."""
    _LOADERS[name] = loader


def _import_families(name: Optional[str] = None) -> None:
    for prefix, module in _FAMILIES.items():
        if name is None or name.startswith(prefix):
            importlib.import_module(module)


def list_models() -> list[str]:
    _import_families()
    return sorted(_LOADERS)


def load_model(name: str, **kwargs):
    """Build a model by preset name: ``load_model("infinity-tiny")``, ``load_model("infinity-2b",
    weights="/path/or/hub", device="cuda", dtype=torch.bfloat16)``."""
    _import_families(name)
    if name not in _LOADERS:
        import difflib

        known = list_models()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} Known models: {', '.join(known)}")
    return _LOADERS[name](**kwargs)
