"""A finished multi-process run exits 0: the interpreter teardown that aborted a rank after its run had
succeeded is skipped (distributed.exit_finished_rank)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import stutil

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("exit_worker.py")


def _launch(how: str) -> list[tuple[int, str]]:
    port = str(stutil.free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), how], stderr=subprocess.PIPE, text=True,
                              env=stutil.child_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                   MASTER_PORT=port))
             for r in range(2)]
    return [(p.wait(timeout=120), p.stderr.read()) for p in procs]


def test_finished_ranks_exit_without_the_teardown_abort():
    """With the process groups still referenced, a plain exit aborted in "terminate called without an
    active exception" in about 6 of 10 such launches here (a gloo worker thread ended by CPython during
    finalization, inside a noexcept destructor); a ZeRO-3 run of scaletune, about once in 30. Ten launches
    that end through exit_finished_rank all exit 0."""
    for _ in range(10):
        for code, err in _launch("ours"):
            assert code == 0 and "terminate called" not in err, err
