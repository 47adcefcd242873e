"""Fault injection for the reliability tests, off unless SCALETUNE_FAULT is set.

`SCALETUNE_FAULT="kind@step[,kind@step]"` makes the named failure happen at that optimizer step:
  kill-in-checkpoint  SIGKILL this process half-way through writing checkpoint `step`
  enospc              the checkpoint write of `step` fails as if the disk were full
  nan                 the loss of `step` becomes NaN
  oom                 the loss of `step` raises an out-of-memory error (after its forward pass)
  slow                step `step` takes 8 s more (a long step of a big model: what a stop must wait for); it
                      says so on stderr as the 8 s begin, so a test signals it inside them, not by guessing
  usr1-in-eval        the last rank sends itself SIGUSR1 as the eval after step `step` begins (a preemption
                      notice during a long eval, heard by one rank)
  oom-in-eval         the eval after step `step` raises an out-of-memory error as it begins (an eval batch,
                      train.eval_batch_size, too large)
Real faults take the same code paths; this only makes them happen on demand.
"""

from __future__ import annotations

import os
import signal
from functools import lru_cache


@lru_cache(maxsize=1)
def _plan() -> dict[str, set[int]]:
    plan: dict[str, set[int]] = {}
    for item in filter(None, os.environ.get("SCALETUNE_FAULT", "").split(",")):
        kind, _, step = item.partition("@")
        plan.setdefault(kind.strip(), set()).add(int(step))
    return plan


def armed(kind: str, step: int) -> bool:
    return step in _plan().get(kind, ())


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def at_step(step: int, loss):  # noqa: ANN001, ANN201 (a torch tensor; torch is not imported here)
    """Apply the step faults (`oom`, `nan`) to a micro-batch loss; returns it unchanged otherwise."""
    if not _plan():
        return loss
    if armed("oom", step):
        import torch

        raise torch.OutOfMemoryError("injected out-of-memory (SCALETUNE_FAULT)")
    if armed("nan", step):
        return loss * float("nan")
    if armed("slow", step):
        import time

        # (os.write: unbuffered, the line is in the log before the sleep starts; a test waiting for it knows the
        # step has begun, past the boundary where a stop would checkpoint the step before)
        os.write(2, f"SCALETUNE_FAULT: step {step} is slow (8 s)\n".encode())
        time.sleep(8)
    return loss


def at_eval(step: int, rank: int, world: int) -> None:
    """Apply the eval faults (`usr1-in-eval`, `oom-in-eval`) as the eval after `step` begins on `rank` of `world`."""
    if _plan() and armed("usr1-in-eval", step) and rank == world - 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    if _plan() and armed("oom-in-eval", step):
        import torch

        raise torch.OutOfMemoryError("injected out-of-memory in an eval (SCALETUNE_FAULT)")
