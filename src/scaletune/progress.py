"""Progress of long work that is not training steps (tokenising, evaluating): a bar on a terminal, else a
line every half minute, so a Slurm .out file or a CI log does not sit silent for minutes as if hung."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

LINE_EVERY_S = 30.0


def sized_terminal(stream: Any) -> bool:
    """Whether `stream` is a terminal with room to draw a bar in: a pseudo-terminal nobody sized (as some
    exec and CI tools open) has no width, and tqdm draws nothing there, not even a count; nor at a width with
    no rows (`script` and some CI runners), where tqdm counts its one bar as below the screen."""
    try:
        size = os.get_terminal_size(stream.fileno()) if stream.isatty() else None
        return size is not None and size.columns > 0 and size.lines > 0
    except (OSError, ValueError, AttributeError):  # (a replaced stream without a file descriptor)
        return False


class Progress:
    """`update(n)` after each piece of `total`; `close()` at the end. Shows nothing where `shown` is false
    (another rank) or SCALETUNE_NO_PROGRESS=1."""

    def __init__(self, total: int, desc: str, unit: str, shown: bool = True) -> None:
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.shown = shown and os.environ.get("SCALETUNE_NO_PROGRESS") != "1"
        self.bar: Any = None
        if self.shown and sized_terminal(sys.stderr):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
        self.said = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.shown and time.monotonic() - self.said > LINE_EVERY_S:
            print(f"{self.desc}: {self.done}/{self.total} {self.unit}", file=sys.stderr, flush=True)
            self.said = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
