"""One rank of a 2-process gloo world scoring a kto micro-batch (test_kto_kl.py).

`kto_kl_worker.py DIR`: reads DIR/inputs.pt (the model and each rank's collated micro-batch), scores this rank's
with task kto twice (a second call: every rank makes as many collectives as the others, one-example batch or
not) and writes [loss, each example's (reward, desirable, z)] of the first to DIR/rank<N>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from scaletune.tasks import get_task


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    inputs = torch.load(out / "inputs.pt", weights_only=False)
    task = get_task("kto")
    with torch.no_grad():
        first = task.loss_sum(inputs["model"], inputs["batches"][rank])
        again = task.loss_sum(inputs["model"], inputs["batches"][rank])
    assert torch.equal(first[1], again[1])
    torch.save(first, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
