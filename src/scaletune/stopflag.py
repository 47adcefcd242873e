"""The stop request of a training process: SIGUSR1 / SIGTERM, recorded as soon as `scaletune train` starts."""

from __future__ import annotations

import signal
from typing import Any


class StopFlag:
    """Set by SIGUSR1/SIGTERM; the loop stops at the next optimizer-step boundary (all ranks agree).

    `scaletune train` creates it before importing torch or loading anything, so a signal that arrives
    while the model loads (a Slurm preemption notice at job start, a launcher passing one on) is kept
    and answered with a checkpoint at the first step boundary, instead of killing the process by the
    signal's default action."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def follow_launcher(self) -> None:
        """A rank of a launched run: SIGTERM when its launcher (the process that started it) dies, so the ranks
        checkpoint at the next step boundary and stop. torchrun starts each rank in a session of its own: a
        launcher killed with SIGKILL (or by the OOM killer) left its ranks training on, orphaned, holding the
        run's files and the GPUs, and the other nodes waiting for them. Linux only (prctl)."""
        import ctypes
        import os
        import sys

        if not sys.platform.startswith("linux"):
            return
        parent = os.getppid()
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
                return
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # (the launcher died before prctl: nothing would send the signal now)
            self.signal = signal.SIGTERM

    @staticmethod
    def settle() -> None:
        """Once training has ended (checkpoint written, or done): ignore further stop signals. Python's
        shutdown puts its handlers back to the default action, so a second SIGUSR1 from srun or a launcher
        (Slurm signals every process of the step) would end the exit with 138 instead of 124."""
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
