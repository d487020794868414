"""Turning command-line policy names, budgets and files into policies, with clear errors."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Optional, Sequence

import attrs

import kvpolicy
from adapters.dtypes import parse_dtype  # noqa: F401  (one dtype parser for the harness and the adapters)
from kvpolicy import ScaleSchedule, Tokens, parse_budget


def split_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what} {text!r} is empty; give a comma-separated list")
    duplicates = sorted({t for t in items if items.count(t) > 1})
    if duplicates:
        raise ValueError(f"{what} {text!r} repeats {duplicates}")
    return items


MAX_SEED = 2 ** 63 - 1


def check_seed(seed, option: str = "--seed") -> int:
    """A seed is an int in 0..2^63-1 (torch would take -1 and wrap it to 2^64-1 without a word)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{option} {seed!r} is not a seed: use an integer from 0 to {MAX_SEED}")
    return seed


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]: integers >= 0, each once (rows are keyed by seed)."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{option} {text!r} is empty; give comma-separated integers like 0,1,2")
    seeds = []
    for item in items:
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"{option} {text!r}: {item!r} is not an integer; give comma-separated integers "
                             f"from 0 to {MAX_SEED}") from None
        seeds.append(check_seed(value, f"{option} {text!r}: seed"))
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"{option} {text!r} repeats {repeated}: each seed is generated once per condition")
    return seeds


def parse_policy_options(items, policies) -> dict[str, dict]:
    """``["snapkv.window_size=16", "h2o.heavy_ratio=0.25"]`` -> {policy: {option: value}}; values
    are read as JSON when they parse (16, 0.25, true, "max") and as plain strings otherwise."""
    out: dict[str, dict] = {}
    for item in items or []:
        name, dot, rest = str(item).partition(".")
        key, eq, raw = rest.partition("=")
        if not dot or not eq or not name or not key:
            raise ValueError(f"--option {item!r} must look like POLICY.OPTION=VALUE, e.g. NAME.window_size=16 (`kvpolicy list` names the policies)")
        if name not in policies:
            raise ValueError(f"--option {item!r} names policy {name!r}, which is not among {', '.join(policies)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name, {})[key] = value
    return out


def check_policy_name(name: str) -> None:
    """Raise the registry's error (known names, closest match) for an unknown policy."""
    kvpolicy.policy_class(name)


def check_budget(budget, schedule: ScaleSchedule, model: str):
    """Parse a budget and reject token counts beyond the longest cache the last scale reads."""
    parsed = parse_budget(budget)
    if isinstance(parsed, Tokens) and parsed.count > schedule.reference_length:
        raise ValueError(f"budget {budget!r} is out of range for {model}: at most {schedule.reference_length} "
                         f"tokens per layer (the longest cache its last scale reads) or a percentage in (0%, 100%]")
    return parsed


def _takers(option: str) -> list[str]:
    """Registered policies that accept a plan file ("plan_file_option") or a calibration ("calibration_option")."""
    return [name for name in kvpolicy.list_policies() if getattr(kvpolicy.capabilities(name), option) is not None]


def check_file_options(policies, *, budget_file=None, calibration=None) -> None:
    """--budget-file / --calibration must configure at least one of the chosen policies."""
    for flag, value, option in (("--budget-file", budget_file, "plan_file_option"),
                                ("--calibration", calibration, "calibration_option")):
        if value and not any(getattr(kvpolicy.capabilities(p), option) for p in policies):
            raise ValueError(f"{flag} configures the policies that take one ({', '.join(_takers(option)) or 'none'}); "
                             f"none of them is among --policies ({', '.join(policies)})")


def build_policy(name: str, budget=None, *, budget_file: Optional[str] = None, calibration=None,
                 options: Optional[dict] = None):
    """``get_policy(name, budget=…)`` plus the files that define a plan: a plan/budget file (for a
    policy with a ``plan_file_option``) and a calibration (``calibration_option``). A file given to
    a policy that takes none is refused rather than ignored."""
    check_policy_name(name)
    caps = kvpolicy.capabilities(name)
    options = dict(options or {})
    if budget_file is not None:
        if caps.plan_file_option is None:
            raise ValueError(f"--budget-file configures the policies that take a plan file "
                             f"({', '.join(_takers('plan_file_option')) or 'none'}), not {name!r}")
        options[caps.plan_file_option] = kvpolicy.policy_class(name).resolve_plan_file(budget_file)
    if calibration is not None:
        if caps.calibration_option is None:
            raise ValueError(f"--calibration configures the policies that are calibrated "
                             f"({', '.join(_takers('calibration_option')) or 'none'}), not {name!r}")
        if isinstance(calibration, (str, Path)) and not Path(calibration).is_file():
            raise FileNotFoundError(f"calibration file {str(calibration)!r} does not exist "
                                    "(make one with `kvpolicy calibrate`)")
        options[caps.calibration_option] = str(calibration) if isinstance(calibration, Path) else calibration
    if budget is not None:
        options["budget"] = budget
    try:
        return kvpolicy.get_policy(name, **options)
    except TypeError as exc:
        # options come from the command line (--option, files): an unknown option or a value of the
        # wrong type is the user's error, not a bug
        raise ValueError(str(exc)) from None
    except ValueError as exc:
        if caps.calibration_needed(options):
            files = " or ".join(flag for flag, option in (("--budget-file FILE", caps.plan_file_option),
                                                          ("--calibration FILE", caps.calibration_option)) if option)
            raise ValueError(f"{exc}. On the command line: {files} (a calibration comes from "
                             "`kvpolicy calibrate --model M --out FILE`)") from None
        raise


def option_hint(name: str, message: str) -> str:
    """How to change, on the command line, what a policy's error message names: its calibration or
    plan file (``--calibration FILE``, ``--budget-file FILE``) and the first option it names
    (``--option NAME.KEY=VALUE``; budgets have their own flag); '' when it names none of them."""
    caps = kvpolicy.capabilities(name)
    flags = {caps.calibration_option: "--calibration FILE", caps.plan_file_option: "--budget-file FILE"}
    found = []
    for field in attrs.fields(kvpolicy.policy_class(name)):
        key = field.alias or field.name
        match = re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message) if field.init and key != "budget" else None
        if match:
            found.append((key in flags, match.start(), flags.get(key) or f"--option {name}.{key}=VALUE"))
    files = [flag for is_file, _, flag in sorted(found) if is_file]
    options = [flag for is_file, _, flag in sorted(found) if not is_file][:1]
    if not files and not options:
        return ""
    return f" (on the command line: {' or '.join(files + options)})"


def plan_now(name: str, policy, schedule: ScaleSchedule, num_layers: int):
    """``policy.plan(...)`` before any long work, so a budget or option that the policy refuses
    fails first; the message says how to set the options it names from the command line."""
    try:
        return policy.plan(schedule, num_layers)
    except ValueError as exc:
        raise ValueError(f"{exc}{option_hint(name, str(exc))}") from exc


def planning_stand_in(name: str, schedule: ScaleSchedule, num_layers: int, budget, num_heads: int):
    """The policy's ``planning_stand_in`` (options and a note), given the model's head count when the
    policy's method takes ``num_heads`` (head-wise placeholders must match the model's heads)."""
    method = kvpolicy.policy_class(name).planning_stand_in
    parameters = inspect.signature(method).parameters
    if "num_heads" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return method(schedule, num_layers, budget, num_heads=num_heads)
    return method(schedule, num_layers, budget)


def policies_to_calibrate(policies: Sequence[str], options: Optional[dict] = None, *, budget_file=None,
                          calibration=None) -> list[str]:
    """The policies among ``policies`` that need a calibration and are not given one (nor a plan
    file or another source of their plan) through ``options`` or the command line's files."""
    out = []
    for name in policies:
        caps = kvpolicy.capabilities(name)
        given = dict((options or {}).get(name, {}))
        if budget_file and caps.plan_file_option:
            given[caps.plan_file_option] = budget_file
        if calibration and caps.calibration_option:
            given[caps.calibration_option] = calibration
        if caps.calibration_needed(given):
            out.append(name)
    return out


def calibrated_policies() -> list[str]:
    """Every registered policy that declares needs_calibration."""
    return [name for name in kvpolicy.list_policies() if kvpolicy.capabilities(name).needs_calibration]
