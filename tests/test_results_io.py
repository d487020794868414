"""results.jsonl survives crashes (issue 16, item 8): one atomic append per row, torn lines moved
aside with a warning before a resume, and the command reports true row counts."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from benchmarks import results_io
from benchmarks.results_io import append_jsonl, quarantine_torn_lines, read_jsonl


def test_each_row_is_one_write(tmp_path, monkeypatch):
    writes = []
    real = os.write
    monkeypatch.setattr(results_io.os, "write", lambda fd, data: writes.append(data) or real(fd, data))
    append_jsonl(tmp_path / "r.jsonl", [{"key": "a"}, {"key": "b", "x": [1, 2]}])
    assert writes == [b'{"key": "a"}\n', b'{"key": "b", "x": [1, 2]}\n']


def test_a_crash_mid_row_leaves_complete_rows_and_one_fragment(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [{"key": "a"}])
    real = os.write

    def crash(fd, data):  # the kernel took half of the line, then the process died
        real(fd, data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(results_io.os, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        append_jsonl(path, [{"key": "b", "payload": "x" * 40}])
    monkeypatch.setattr(results_io.os, "write", real)
    assert [r["key"] for r in read_jsonl(path)] == ["a"]
    # the next append does not glue its row onto the fragment
    append_jsonl(path, [{"key": "c"}])
    assert [r["key"] for r in read_jsonl(path)] == ["a", "c"]


def test_torn_lines_are_quarantined_with_a_warning(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b", "ps\n{"key": "c"}\n[1, 2]\n{"key": "d", "half')
    warnings = []
    assert quarantine_torn_lines(path, warn=warnings.append) == 3
    assert path.read_text() == '{"key": "a"}\n{"key": "c"}\n'
    assert (tmp_path / "results.jsonl.torn").read_text() == '{"key": "b", "ps\n[1, 2]\n{"key": "d", "half\n'
    assert warnings == [f"warning: {path} held 3 incomplete line(s) (an interrupted write); moved to "
                        f"{path}.torn, 2 complete row(s) kept, the missing results will be recomputed"]
    assert quarantine_torn_lines(path, warn=warnings.append) == 0 and len(warnings) == 1  # clean now


def test_a_complete_last_row_without_newline_counts_as_torn(tmp_path):
    # a row is complete only with its newline: the write of a row is one call ending in "\n"
    path = tmp_path / "r.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b"}')
    assert [r["key"] for r in read_jsonl(path)] == ["a"]
    assert quarantine_torn_lines(path) == 1


def _writer(path, worker, count, pad=500):
    for i in range(count):
        append_jsonl(path, [{"key": f"{worker}-{i}", "pad": "y" * (pad + 37 * worker)}], fsync=False)


def test_concurrent_writers_never_interleave_inside_a_line(tmp_path):
    path = tmp_path / "shared.jsonl"
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_writer, args=(path, w, 150)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    lines = path.read_text().splitlines()
    assert len(lines) == 450 and all(json.loads(l)["key"] for l in lines)
    assert {json.loads(l)["key"] for l in lines} == {f"{w}-{i}" for w in range(3) for i in range(150)}


def test_concurrent_writers_never_mistake_each_other_for_a_crash(tmp_path):
    """Rows spanning several pages take long to copy: a writer checking the last byte for a crash
    fragment must not see another's half-copied row (it then added a blank line)."""
    path = tmp_path / "shared.jsonl"
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_writer, args=(path, w, 60, 40_000)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    text = path.read_text()
    assert "\n\n" not in text and not text.startswith("\n")
    assert len(text.splitlines()) == 240 and quarantine_torn_lines(path) == 0


def test_nan_never_reaches_the_file(tmp_path):
    path = tmp_path / "r.jsonl"
    with pytest.raises(ValueError):
        append_jsonl(path, [{"key": "ok"}, {"key": "x", "psnr": float("nan")}])
    assert not path.exists() or path.read_text() == ""  # encoded before anything is written
