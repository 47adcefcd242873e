"""The stop request of a training process: SIGUSR1 / SIGTERM, recorded as soon as `scaletune train` starts,
and Ctrl-C while the training loop runs."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

# SIGUSR1 is POSIX only (Windows has none)
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGUSR1", "SIGTERM") if hasattr(signal, n))


class StopFlag:
    """Set by SIGUSR1/SIGTERM; the loop stops at the next optimizer-step boundary (all ranks agree).

    `scaletune train` creates it before importing torch or loading anything, so a signal that arrives
    while the model loads (a Slurm preemption notice at job start, a launcher passing one on) is kept
    and answered with a checkpoint at the first step boundary, instead of killing the process by the
    signal's default action."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._catching, self._before = False, None  # SIGINT's handler while the loop catches it
        self._pid = 0
        self._previous: dict[int, Any] = {}  # the handlers it replaced, for `restore`
        # Python installs handlers from the main thread only: a run started in another thread (scaletune.api
        # from a worker thread) trains without the graceful stop instead of failing
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signal is None:  # (the first stop signal names the stop: a launcher's SIGTERM after a Ctrl-C)
            self.signal = signum

    def catch_interrupts(self) -> None:
        """While the training loop runs: Ctrl-C (SIGINT) stops the run like SIGTERM, at the next step boundary
        with a checkpoint, rather than losing the steps since the last one; a second Ctrl-C interrupts at once.
        Before the loop (imports, model load, tokenising) there is nothing to save and Ctrl-C interrupts as
        usual. Under a launcher the ranks get SIGINT from it (torchrun passes it on) and stop together."""
        if threading.current_thread() is not threading.main_thread() or self._catching:
            return
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # (started so, `cmd &` in a script: it stays so)
            return
        self._pid = os.getpid()  # (DataLoader workers forked from here inherit the handler: they keep quiet)
        self._before, self._catching = signal.signal(signal.SIGINT, self._interrupt), True

    def _interrupt(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return
        if self.signal is not None:  # (a second Ctrl-C, or one after SIGTERM: the user will not wait)
            raise KeyboardInterrupt
        self.signal = signum
        if os.environ.get("RANK", "0") == "0":  # (each rank of a launch gets it; one line is enough)
            # os.write, not print: the handler may run inside a write to stderr (the progress bar), which
            # Python's buffered stream refuses to re-enter
            os.write(2, b"\nCtrl-C: stopping at the end of this step with a checkpoint "
                        b"(Ctrl-C again stops at once, without one)\n")

    def release_interrupts(self) -> None:
        """Ctrl-C does what it did before the loop again (the run has ended, its final save written, or it
        failed)."""
        if threading.current_thread() is threading.main_thread() and self._catching:
            signal.signal(signal.SIGINT, self._before if self._before is not None else signal.default_int_handler)
            self._catching = False

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

    def settle(self) -> None:
        """Once training has ended (checkpoint written, or done): ignore further stop signals. Python's
        shutdown puts its handlers back to the default action, so a second SIGUSR1 from srun or a launcher
        (Slurm signals every process of the step) would end the exit with 138 instead of 124."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        self.release_interrupts()

    def restore(self) -> None:
        """In a process that goes on after the run (scaletune.api in a notebook or a script): the stop signals'
        and Ctrl-C's handlers from before the run, not `settle`'s ignoring of them."""
        self.release_interrupts()
        if threading.current_thread() is threading.main_thread():
            for sig, handler in self._previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
