"""One rank of a 2-process DDP run whose rank 1 reaches the end of the run late (test_final_checkpoint.py).
argv: the run config."""

from __future__ import annotations

import os
import sys
import time

from scaletune import loop
from scaletune.config import load_config
from scaletune.distributed import exit_rank
from scaletune.train import StopFlag, setup

real = loop.final_outputs


def late(run, mlog):
    if int(os.environ["RANK"]) == 1:
        time.sleep(5)  # rank 0 has written the last step's checkpoint by now (DDP's save waits for no rank)
    real(run, mlog)


if __name__ == "__main__":
    loop.final_outputs = late
    run, _ = setup(load_config(sys.argv[1]))
    assert loop.fit(run, StopFlag()) == "done"
    exit_rank(0)  # (as `scaletune train` ends a rank: past its last collective)
