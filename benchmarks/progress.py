"""Progress bars for the long steps of the commands, and notes that do not break them.

A bar goes to stderr, only on a terminal (``disable=None``: never into a log file or a pipe) and
only once its step has lasted ``DELAY_S`` (short runs stay quiet). ``note`` prints a line above any
bar in flight (``tqdm.write``), where a plain print to stderr would land in the middle of the bar's
line. Every bar of the commands is made by ``progress_bar``, so a test (or a caller that wants the
numbers) can watch the updates by replacing it.
"""

from __future__ import annotations

import sys
from typing import Optional

DELAY_S = 0.5  # a bar appears only for steps that last longer than this
MININTERVAL_S = 0.1  # between redraws


def progress_bar(total: Optional[int], desc: str, *, unit: str = "it", enabled: bool = True):
    """A tqdm bar on stderr (a context manager with ``update(n)`` and ``set_postfix_str``);
    ``enabled=False`` (e.g. ``--no-progress``) turns it off even on a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None if enabled else True,
                delay=DELAY_S, mininterval=MININTERVAL_S, leave=False, dynamic_ncols=True)


def note(message: str) -> None:
    """One line on stderr, above any progress bar in flight instead of inside its line."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)
