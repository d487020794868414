"""Reading a JSON file that a user named (a calibration, a plan or schedule file): a missing file or
invalid JSON is a one-line error that names what the file was meant to be and its path."""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: str | Path, what: str, missing_hint: str = ""):
    """A JSON file's content. ``what`` names the file in errors ("calibration file"); ``missing_hint``
    follows "does not exist" (say, how to make one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist{missing_hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {exc}") from None
