"""JSON-lines result files that survive crashes: one atomic append per row, torn lines quarantined.

A row is written with a single ``os.write`` of its complete line on an ``O_APPEND`` descriptor, so
concurrent writers (ranks of a distributed run appending to one file, or each to its own shard)
never interleave inside a line and a crash leaves at most the row in flight cut short. Such a torn
line (the last one, without its newline, or any line that is not a JSON object) is moved to
``<file>.torn`` by ``quarantine_torn_lines`` with a warning before a run resumes, so the results
file holds complete rows only and its row count is true.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

try:
    import fcntl
except ImportError:  # not POSIX: appends stay atomic per row, the fragment check is unlocked
    fcntl = None


def append_jsonl(path: Path, rows: Iterable[dict], *, fsync: bool = True) -> int:
    """Append each row as one complete line (one ``os.write`` each); returns the number written.

    NaN and infinities are refused (``json.dumps(allow_nan=False)``): they are not JSON."""
    lines = [(json.dumps(row, allow_nan=False) + "\n").encode("utf-8") for row in rows]  # all encoded first
    fd = os.open(os.fspath(path), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            # Another writer's append may be half copied when this one looks at the last byte: without
            # the lock that read a "fragment" and ended it with a spurious blank line (seen in CI: 453
            # lines for 450 rows from 3 processes). Closing the descriptor releases the lock.
            fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if lines and size and os.pread(fd, 1, size - 1) != b"\n":
            # a crash left a fragment: end it, so this row starts on its own line (quarantined later)
            lines[0] = b"\n" + lines[0]
        for data in lines:
            written = os.write(fd, data)
            if written != len(data):  # a regular file takes a whole write; anything else is an I/O error
                raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        if fsync and lines:
            os.fsync(fd)
    finally:
        os.close(fd)
    return len(lines)


def _is_row(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def read_jsonl(path: Path) -> list[dict]:
    """Every complete row (a JSON object on a line ending in a newline); torn lines are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete = lines[:-1]  # the part after the last newline is a row in flight (or empty)
    rows = []
    for line in complete:
        if line.strip() and _is_row(line):
            rows.append(json.loads(line))
    return rows


def quarantine_torn_lines(path: Path, warn: Optional[Callable[[str], None]] = None) -> int:
    """Move lines that are not complete JSON objects to ``<path>.torn``; returns how many moved.

    The cleaned file replaces the old one atomically (written aside, then ``os.replace``)."""
    path = Path(path)
    if not path.is_file():
        return 0
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    good, torn = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        complete = i < len(lines) - 1  # followed by a newline
        (good if complete and _is_row(line) else torn).append(line)
    if not torn:
        return 0
    torn_path = path.with_name(path.name + ".torn")
    with open(torn_path, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in torn))
    aside = path.with_name(path.name + ".tmp")
    aside.write_text("".join(line + "\n" for line in good), encoding="utf-8")
    os.replace(aside, path)
    if warn is not None:
        warn(f"warning: {path} held {len(torn)} incomplete line(s) (an interrupted write); moved to {torn_path}, "
             f"{len(good)} complete row(s) kept, the missing results will be recomputed")
    return len(torn)
