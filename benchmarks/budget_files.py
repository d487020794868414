"""ScaleKV's released budget files, shipped as package data, and the short names that find them.

``--budget-file`` accepts a path or a short name: ``infinity-2b-10%`` (also ``infinity-2b-10pct``
and the released file name ``2b_10%_budget.json``). The files are byte-identical copies of the
ScaleKV release (StargazerX0/ScaleKV at eb0615a, ``budgets/{2b,8b}_10%_budget.json``); see
``data/scalekv_budgets/SOURCE.md``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# short name -> file under data/scalekv_budgets/ (and the released file name it copies)
RELEASED = {
    "infinity-2b-10%": ("infinity-2b-10pct.json", "2b_10%_budget.json"),
    "infinity-8b-10%": ("infinity-8b-10pct.json", "8b_10%_budget.json"),
}
# the released file of each model's own geometry (bench-gpu and the micro-benchmark default to these)
DEFAULT_FOR_MODEL = {"infinity-2b": "infinity-2b-10%", "infinity-8b": "infinity-8b-10%"}


def _data_dir() -> Path:
    return Path(str(resources.files("benchmarks") / "data" / "scalekv_budgets"))


def released_budget_names() -> list[str]:
    return list(RELEASED)


def released_budget_file(name: str) -> Path:
    """The shipped copy of a released budget file, by short name (``infinity-2b-10%``)."""
    for short, (stored, official) in RELEASED.items():
        if name in (short, short.replace("%", "pct"), stored, official, f"budgets/{official}"):
            return _data_dir() / stored
    raise ValueError(f"budget file {name!r} is neither an existing file nor a released budget: "
                     f"the shipped ones are {', '.join(RELEASED)}")


def resolve_budget_file(value) -> str:
    """An existing path as given; otherwise a released file by short name; otherwise a one-line error."""
    text = str(value)
    if Path(text).expanduser().is_file():
        return str(Path(text).expanduser())
    try:
        return str(released_budget_file(text))
    except ValueError:
        raise ValueError(f"budget file {text!r} does not exist and is not a released budget name "
                         f"(shipped: {', '.join(RELEASED)})") from None
