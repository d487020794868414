"""What the harness feeds a model, chosen by how its family is conditioned, never by its name.

A family conditioned on text takes prompts (``--prompts FILE``, ``--prompt TEXT``); a
class-conditional one takes class labels (``--labels 1,2,3``, ``--label N``). Defaults when none are
given: the family's own ``evaluation_conditions`` / ``calibration_conditions`` if it declares them,
else the shipped prompt lists or labels 0-3 (evaluation) / 0-9 (calibration).
"""

from __future__ import annotations

from typing import Optional, Sequence

from adapters.families import ModelFamily, family_of

from .prompts import check_unique, default_prompts, parse_labels, read_prompts

DEFAULT_EVAL_PROMPTS = 8
DEFAULT_EVAL_LABELS = "0-3"
DEFAULT_CALIBRATION_LABELS = "0-9"
# the options that carry each kind of condition, per command style: (list option, single option)
OPTIONS = {"prompt": ("--prompts", "--prompt"), "label": ("--labels", "--label")}


def check_kind(family: ModelFamily, model: str, *, prompts=None, labels=None, single: bool = False) -> None:
    """Refuse conditions of the other kind with a message naming the option this model takes."""
    index = 1 if single else 0
    wrong = "label" if family.conditioning == "prompt" and labels is not None else (
        "prompt" if family.conditioning == "label" and prompts is not None else None)
    if wrong is None:
        return
    what = "text-to-image" if family.conditioning == "prompt" else "class-conditional"
    right = OPTIONS[family.conditioning][index]
    raise ValueError(f"{model} is a {what} model: use {right}, not {OPTIONS[wrong][index]}")


def evaluation_conditions(model: str, *, prompts=None, labels=None, limit: Optional[int] = None) -> tuple[list, str]:
    """The conditions ``compare`` runs and their kind ("prompt" or "label")."""
    family = family_of(model)
    check_kind(family, model, prompts=prompts, labels=labels)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    kind = family.conditioning
    if kind == "label":
        if labels is not None:
            conditions = parse_labels(labels, family.num_classes)
        elif family.evaluation_conditions is not None:
            conditions = list(family.evaluation_conditions)
        else:
            conditions = parse_labels(DEFAULT_EVAL_LABELS, family.num_classes)
        conditions = conditions[:limit]
    elif prompts is not None:
        conditions = read_prompts(prompts, limit)
    elif family.evaluation_conditions is not None:
        conditions = list(family.evaluation_conditions)[:limit]
    else:
        conditions = read_prompts(default_prompts(model, "eval"), limit or DEFAULT_EVAL_PROMPTS)
    check_unique(conditions, OPTIONS["label"][0] if kind == "label" else "the prompts")
    return conditions, kind


def calibration_conditions(model: str, prompts=None, labels=None) -> list:
    """The conditions a calibration runs on: the user's, else the family's, else the shipped ones."""
    family = family_of(model)
    check_kind(family, model, prompts=prompts, labels=labels)
    if family.conditioning == "label":
        if labels is not None:
            return parse_labels(labels, family.num_classes)
        if family.calibration_conditions is not None:
            return list(family.calibration_conditions)
        return parse_labels(DEFAULT_CALIBRATION_LABELS, family.num_classes)
    if prompts is not None:
        return read_prompts(prompts)
    if family.calibration_conditions is not None:
        return list(family.calibration_conditions)
    return read_prompts(default_prompts(model, "calibration"))


def single_conditions(model: str, *, prompt: Optional[Sequence[str]] = None, label: Optional[Sequence[int]] = None) -> list:
    """``generate``'s repeatable --prompt / --label, checked against the model's kind."""
    family = family_of(model)
    check_kind(family, model, prompts=prompt, labels=label, single=True)
    conditions = list(prompt if prompt is not None else label)
    if family.conditioning == "label":
        bad = [c for c in conditions if not 0 <= c < family.num_classes]
        if bad:
            raise ValueError(f"--label {bad} out of range: classes are 0..{family.num_classes - 1}")
    return conditions


def synthetic_conditions(model: str, count: int) -> list:
    """``count`` distinct conditions for timing runs (their content does not matter)."""
    family = family_of(model)
    if family.conditioning == "label":
        return [i % family.num_classes for i in range(count)]
    return [f"benchmark prompt {i}" for i in range(count)]
