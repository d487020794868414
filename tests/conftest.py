"""Shared test configuration: offline, CPU, deterministic, one thread."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)

GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
# CI sets this (.ci/run) so that a missing ../shared/golden fails the run instead of passing it with
# zero parity checks; a user's checkout without the vectors still skips those tests.
REQUIRE_GOLDEN = "KVPOLICY_REQUIRE_GOLDEN"


def golden_required() -> bool:
    return os.environ.get(REQUIRE_GOLDEN, "") not in ("", "0")


def require_golden(path: Path, what: str = "golden vectors") -> Path:
    """``path`` if it exists; otherwise skip the test, or fail it when KVPOLICY_REQUIRE_GOLDEN=1."""
    path = Path(path)
    if path.exists():
        return path
    message = f"{what} not found at {path} (they live in ../shared/golden and ../shared/reference)"
    if golden_required():
        pytest.fail(f"{message}; {REQUIRE_GOLDEN}=1 (set by .ci/run) makes that a failure", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """``../shared/golden`` next to the checkout; tests using it skip where it is absent (fail in CI)."""
    return require_golden(GOLDEN_DIR)


def released_budget_file(golden_dir: Path, official_name: str) -> Path:
    """The copy in golden/scalekv/budgets/ of the official budget file a golden run names
    (e.g. 'budgets/2b_10%_budget.json' -> infinity-2b-10pct.json)."""
    stem = Path(official_name).name  # '2b_10%_budget.json'
    model, percent = stem.split("_")[0], stem.split("_")[1].rstrip("%")
    path = golden_dir / "scalekv" / "budgets" / f"infinity-{model}-{percent}pct.json"
    return require_golden(path, f"the copy of {official_name}")
