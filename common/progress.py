"""Progress bars for long work (loading, quantizing, tuning, benchmarking), from tqdm.

A bar shows only on a terminal (tqdm's `disable=None`) and only for work that lasts longer than
`delay` seconds, so logs, pipes and tests stay clean; `TQDM_DISABLE=1` turns every bar off.
`note(msg)` prints a line above any live bar instead of through it.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

DELAY_S = 0.5


def bar(total: float | None, desc: str, *, unit: str = "B", delay: float = DELAY_S, leave: bool = False) -> tqdm:
    """A bar to stderr: `unit="B"` counts bytes (shown as kB/MB/GB and a rate), else items."""
    byte_units = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=byte_units, unit_divisor=1024 if byte_units else 1000,
                delay=delay, leave=leave, disable=None, file=sys.stderr, dynamic_ncols=True)


def note(msg: str) -> None:
    """One line on stderr, printed above any bar that is showing."""
    tqdm.write(msg, file=sys.stderr)
    sys.stderr.flush()
