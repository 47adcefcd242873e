"""One rank of a 2-process gloo world around `distributed.main_process_first` (test_configs.py).

`relay_worker.py MODE OUT_DIR`: rank 0 runs the block first and, by MODE, fails with a DataError
("user"), a ValueError ("bug") or succeeds ("ok"); every rank writes what it saw to OUT_DIR/rank<N>.json
and exits 0 (the test reads the files). "slow0" / "slow1": the process group's timeout is 2 s and rank 0's
(rank 1's) block takes 5 s; a collective of the process group follows the block.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist

from scaletune.distributed import main_process_first
from scaletune.errors import DataError, UserError


def body(rank: int, mode: str, out: Path) -> None:
    if rank == 0:
        if mode == "user":
            raise DataError("data.train: no usable examples in train.jsonl", hint="raise data.max_length")
        if mode == "bug":
            raise ValueError("something broke\nsecond line")
        if mode == "slow0":  # tokenising a large file
            time.sleep(5)
        (out / "built").write_text("rank 0 was here")
    else:  # runs only after rank 0's block: what it built is there
        if mode == "slow1":  # another node, without the cache rank 0 wrote, tokenises it again
            time.sleep(5)
        (out / "seen").write_text((out / "built").read_text())


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=2) if mode.startswith("slow") else None)
    accelerator = SimpleNamespace(num_processes=2, is_main_process=rank == 0)
    seen: dict = {"error": None}
    try:
        with main_process_first(accelerator):
            body(rank, mode, out)
    except UserError as exc:
        seen["error"] = {"type": type(exc).__name__, "text": exc.render(),
                         "relayed_from": getattr(exc, "relayed_from", None)}
    except ValueError as exc:
        seen["error"] = {"type": "ValueError", "text": str(exc), "relayed_from": None}
    if seen["error"] is None:
        dist.barrier()  # (within the 2 s: both left the block together)
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    # no destroy_process_group: a rank whose block failed would be its peer's only partner in it


if __name__ == "__main__":
    main()
