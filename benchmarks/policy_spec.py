"""Turning command-line policy names, budgets and files into policies, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

import kvpolicy
from kvpolicy import ScaleSchedule, Tokens, parse_budget

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(text: str) -> torch.dtype:
    try:
        return DTYPES[text]
    except KeyError:
        raise ValueError(f"dtype {text!r} is not one of {', '.join(DTYPES)}") from None


def split_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what} {text!r} is empty; give a comma-separated list")
    duplicates = sorted({t for t in items if items.count(t) > 1})
    if duplicates:
        raise ValueError(f"{what} {text!r} repeats {duplicates}")
    return items


def parse_policy_options(items, policies) -> dict[str, dict]:
    """``["snapkv.window_size=16", "h2o.heavy_ratio=0.25"]`` -> {policy: {option: value}}; values
    are read as JSON when they parse (16, 0.25, true, "max") and as plain strings otherwise."""
    out: dict[str, dict] = {}
    for item in items or []:
        name, dot, rest = str(item).partition(".")
        key, eq, raw = rest.partition("=")
        if not dot or not eq or not name or not key:
            raise ValueError(f"--option {item!r} must look like POLICY.OPTION=VALUE, e.g. snapkv.window_size=16")
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


def build_policy(name: str, budget=None, *, budget_file: Optional[str] = None, calibration=None,
                 options: Optional[dict] = None):
    """``get_policy(name, budget=…)`` plus ScaleKV's sources of a capacity plan (a released budget
    file or a calibration result); those files are refused for other policies rather than ignored."""
    check_policy_name(name)
    options = dict(options or {})
    if budget_file is not None or calibration is not None:
        if name != "scalekv":
            raise ValueError(f"--budget-file/--calibration configure the 'scalekv' policy, not {name!r}")
        if budget_file is not None:
            from .budget_files import resolve_budget_file

            options["budget_file"] = resolve_budget_file(budget_file)  # a path or a released name
        if calibration is not None:
            if isinstance(calibration, (str, Path)) and not Path(calibration).is_file():
                raise FileNotFoundError(f"calibration file {str(calibration)!r} does not exist "
                                        "(make one with `kvpolicy calibrate`)")
            options["calibration"] = str(calibration) if isinstance(calibration, Path) else calibration
    if budget is not None:
        options["budget"] = budget
    try:
        return kvpolicy.get_policy(name, **options)
    except TypeError as exc:
        # options come from the command line (--option, files): an unknown option or a value of the
        # wrong type is the user's error, not a bug
        raise ValueError(str(exc)) from None
    except ValueError as exc:
        if name == "scalekv" and budget_file is None and calibration is None:
            raise ValueError(f"{exc}. On the command line: --budget-file FILE (released ScaleKV budgets) or "
                             "--calibration FILE (from `kvpolicy calibrate --model M --out FILE`)") from None
        raise
