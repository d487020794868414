"""``kvpolicy compare``'s work list: configurations, jobs, row keys, and what a resumed run skips.

A configuration is one column of the comparison (the full-cache reference, or a policy at a
budget); a job is one generate call on a chunk of ``batch_size`` conditions with one seed and one
configuration. Every row has a key that digests what determines its image, so a resumed run (the
same ``--out``) skips the jobs whose rows are all written, and ``run.json`` refuses a resume with
settings that would change the images.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import attrs

import kvpolicy

from .compare_settings import CompareSettings
from .outputs import library_versions
from .policy_spec import build_policy, check_budget, plan_now
from .reports import REFERENCE  # the full-cache column's name in rows and reports


def digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@attrs.define
class Config:
    """One column of the comparison: the reference (policy None) or a policy at a budget."""

    policy_name: str
    budget: Optional[str]
    policy: Optional[kvpolicy.Policy]
    config_id: str

    @property
    def is_reference(self) -> bool:
        return self.policy is None

    @property
    def slug(self) -> str:
        text = self.policy_name if self.budget is None else f"{self.policy_name}_{self.budget}"
        return "".join(ch if ch.isalnum() or ch in "-_" else "p" if ch == "%" else "_" for ch in text)


def reference_config() -> Config:
    return Config(REFERENCE, None, None, digest({"policy": REFERENCE}))


def build_configs(settings: CompareSettings, schedule, num_layers: int, *, calibration=None,
                  calibrated: Sequence[str] = (), skip: Sequence[str] = ()) -> list[Config]:
    """The reference plus every (policy, budget). The command line's --calibration goes to every
    policy that takes one; ``calibration`` (a file this run made) to the ``calibrated`` policies it
    was made for; ``skip``: policies whose budgets are only checked (they wait for that calibration)."""
    configs = [reference_config()]
    for name in settings.policies:
        if name in skip:
            for budget in settings.budgets:
                check_budget(budget, schedule, settings.model)
            continue
        caps = kvpolicy.capabilities(name)
        budgets = [None] if caps.keeps_everything else settings.budgets
        for budget in budgets:
            parsed = None if budget is None else check_budget(budget, schedule, settings.model)
            policy = build_policy(name, parsed,
                                  budget_file=settings.budget_file if caps.plan_file_option else None,
                                  calibration=(calibration if name in calibrated else settings.calibration)
                                  if caps.calibration_option else None,
                                  options=settings.options.get(name))
            plan_now(name, policy, schedule, num_layers)  # fail now, not after an hour of generation
            configs.append(Config(name, budget, policy, digest(policy.to_config())))
    return configs


def row_key(settings: CompareSettings, condition, seed: int, config: Config) -> str:
    return digest({"model": settings.model, "resolution": settings.resolution, "aspect": settings.aspect_ratio,
                   "condition": condition, "seed": seed, "config": config.config_id})


@attrs.frozen
class Job:
    """One generate call: ``chunk`` holds (condition index, condition) pairs."""

    seed: int
    chunk: tuple
    config: Config

    @property
    def conditions(self) -> list:
        return [c for _, c in self.chunk]


def all_jobs(settings: CompareSettings, configs: Sequence[Config]) -> list[Job]:
    """Seeds outermost, then chunks of conditions, then configurations (the reference first, so a
    chunk's reference images exist before its policies are compared with them)."""
    items = list(enumerate(settings.conditions))
    chunks = [(seed, tuple(items[k:k + settings.batch_size])) for seed in settings.seeds
              for k in range(0, len(items), settings.batch_size)]
    return [Job(seed, chunk, config) for seed, chunk in chunks for config in configs]


def pending_jobs(settings: CompareSettings, jobs: Sequence[Job], done: set) -> list[Job]:
    """The jobs with at least one row not yet written."""
    return [j for j in jobs if not all(row_key(settings, c, j.seed, j.config) in done for c in j.conditions)]


def check_resume(settings: CompareSettings, out: Path) -> None:
    """Refuse to resume a run made with other image-changing settings; record these settings."""
    run_file = out / "run.json"
    fingerprint = settings.fingerprint()
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous.get("fingerprint") != fingerprint:
            raise ValueError(f"{str(out)!r} holds a run with other settings {previous.get('fingerprint')} "
                             f"(now {fingerprint}); use a new --out or the same settings to resume")
    run_file.write_text(json.dumps({"fingerprint": fingerprint, "settings": settings.as_dict(),
                                    "versions": library_versions()}, indent=1, default=str))


def requested_keys(settings: CompareSettings, configs: Sequence[Config]) -> set:
    return {row_key(settings, c, seed, config) for seed in settings.seeds for c in settings.conditions
            for config in configs}

