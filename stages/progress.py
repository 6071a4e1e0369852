"""Progress bars of the long stages: throughput on a terminal, a line now and then in a log file."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(*, total: int, desc: str, unit: str, enabled: bool = True) -> tqdm:
    # Redirected to a file (a DVC log, CI), every redraw would be a new line: update every 15 s there.
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=0.1 if interactive else 15.0,
    )
