"""Shared test configuration: offline, CPU, deterministic, one thread."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)

GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """``../shared/golden`` next to the checkout; tests using it skip where it is absent."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden vectors not found at {GOLDEN_DIR} (they live in ../shared/golden)")
    return GOLDEN_DIR


def released_budget_file(golden_dir: Path, official_name: str) -> Path:
    """The copy in golden/scalekv/budgets/ of the official budget file a golden run names
    (e.g. 'budgets/2b_10%_budget.json' -> infinity-2b-10pct.json)."""
    stem = Path(official_name).name  # '2b_10%_budget.json'
    model, percent = stem.split("_")[0], stem.split("_")[1].rstrip("%")
    path = golden_dir / "scalekv" / "budgets" / f"infinity-{model}-{percent}pct.json"
    if not path.is_file():
        pytest.skip(f"{path} (the copy of {official_name}) is absent")
    return path
