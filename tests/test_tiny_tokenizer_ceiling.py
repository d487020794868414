"""scripts/tiny_tokenizer_ceiling.py: the shipped infinity-tiny tokenizer's own depiction ceiling."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "tiny_tokenizer_ceiling", Path(__file__).resolve().parents[1] / "scripts" / "tiny_tokenizer_ceiling.py")
ceiling = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ceiling)


def test_the_ceiling_table_has_the_rendered_row_and_one_row_per_scale_prefix(capsys):
    assert ceiling.main(["--pairs", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| rendered scenes |") and lines[3].startswith("| BSQ reconstruction, all scales |")
    assert [line.split(" scales only")[0] for line in lines[4:]] == [f"| first {k}" for k in range(1, 7)]


def test_a_non_positive_pair_count_is_refused(capsys):
    with pytest.raises(SystemExit):
        ceiling.main(["--pairs", "0"])
    assert "--pairs must be at least 1, got 0" in capsys.readouterr().err
