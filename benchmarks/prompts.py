"""Conditions for the harness: prompt lists (text files, COCO captions JSON) and class labels.

Shipped lists (written for this project): ``data/eval_prompts.txt`` (16 evaluation prompts) and
``data/calibration_prompts.txt`` (10 calibration prompts; the ScaleKV paper calibrated on 10
generated prompts). ScaleKV evaluated on MS-COCO 2017 validation captions, first caption of each
image (shared/reference/scalekv.md §6.1); ``read_prompts`` reads a ``captions_val2017.json`` the
user already has the same way: first caption per image in file order, images sorted by id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

DATA_DIR = Path(__file__).resolve().parent / "data"
EVAL_PROMPTS = DATA_DIR / "eval_prompts.txt"
CALIBRATION_PROMPTS = DATA_DIR / "calibration_prompts.txt"
NUM_IMAGENET_CLASSES = 1000


def default_prompts(model: str, purpose: str) -> Path:
    """The prompt list a command uses when none is given: the preset's own list when it ships one
    (the trained ``infinity-tiny`` ships held-out captions of its training scenes in
    ``adapters/tiny_weights/<model>/{eval,calibration}_prompts.txt``), else the generic shipped list."""
    if purpose not in ("eval", "calibration"):
        raise ValueError(f"purpose must be 'eval' or 'calibration', got {purpose!r}")
    from adapters.tiny_weights import ROOT

    own = ROOT / model / f"{purpose}_prompts.txt"
    if own.is_file():
        return own
    return EVAL_PROMPTS if purpose == "eval" else CALIBRATION_PROMPTS


def read_prompts(path: str | Path, limit: Optional[int] = None) -> list[str]:
    """Prompts from a text file (one per line; blank lines and '#' comments skipped), a JSON list of
    strings, or a COCO captions JSON (``{"annotations": [{"image_id", "caption"}, ...]}``)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"prompts file {str(path)!r} is a folder; give a .txt file with one prompt per line, a "
                         "JSON list of strings, or a COCO captions JSON")
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist (give a .txt file with one prompt "
                                "per line, a JSON list of strings, or a COCO captions JSON)")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        prompts = _prompts_from_json(json.loads(text), path)
    else:
        prompts = [line.strip() for line in text.splitlines()]
        prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {str(path)!r} holds no prompts")
    return prompts[:limit] if limit else prompts


def _prompts_from_json(data, path: Path) -> list[str]:
    if isinstance(data, list) and all(isinstance(p, str) for p in data):
        return [p.strip() for p in data if p.strip()]
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        return coco_first_captions(data)
    raise ValueError(f"{str(path)!r} is neither a JSON list of prompt strings nor a COCO captions file "
                     "(a dict with an 'annotations' list of {'image_id', 'caption'})")


def coco_first_captions(data: dict) -> list[str]:
    """First caption (in file order) of every image, images sorted by id."""
    first: dict[int, str] = {}
    for i, ann in enumerate(data["annotations"]):
        try:
            image_id, caption = int(ann["image_id"]), str(ann["caption"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"COCO annotation #{i} lacks an integer 'image_id' and a 'caption': {ann!r}") from None
        first.setdefault(image_id, " ".join(caption.split()))
    return [first[k] for k in sorted(first)]


def parse_labels(text: str, num_classes: int = NUM_IMAGENET_CLASSES) -> list[int]:
    """'1,2,3' or '0-3,7' -> class labels; each must lie in 0..num_classes-1."""
    labels: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                labels.extend(range(lo_i, hi_i + 1))
            else:
                labels.append(int(part))
        except ValueError:
            raise ValueError(f"labels {text!r}: {part!r} is not a class index or a range like '0-9'") from None
    if not labels:
        raise ValueError(f"labels {text!r} name no class; give e.g. '1,2,3' or '0-9'")
    bad = [l for l in labels if not 0 <= l < num_classes]
    if bad:
        raise ValueError(f"labels {bad} are out of range: classes are 0..{num_classes - 1}")
    return labels


def check_unique(conditions: list, what: str) -> None:
    """Refuse repeated conditions: results are keyed by (condition, seed), so a repeat would be
    generated once and silently counted once."""
    from collections import Counter

    repeated = [c for c, n in Counter(conditions).items() if n > 1]
    if repeated:
        shown = ", ".join(repr(c) for c in repeated[:5]) + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
        raise ValueError(f"{what} repeat {shown}: every condition is generated once per seed (use --seeds for more "
                         "samples of one condition); remove the repeats")
