"""One rank of a gloo world that ends the way a finished `scaletune train` rank does (python -m from the
test): collectives, a last flag reduce and barrier with the process groups still referenced (as ZeRO-3's
parameters keep them), then `exit_rank` (argv[1] == "ours"; rank 0 first destroys its group, as a run with
trackers does) or a plain interpreter exit."""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
KEPT = [dist.group.WORLD, dist.new_group(backend="gloo", timeout=timedelta(days=7))]
for _ in range(20):
    dist.all_reduce(torch.ones(1000) * dist.get_rank())
flag = torch.tensor([0.0])
dist.all_reduce(flag)
dist.barrier()
if sys.argv[1] == "ours":
    from scaletune.distributed import exit_rank

    if dist.get_rank() == 0:  # what accelerate's end_training() does on the rank that ran the trackers
        dist.destroy_process_group()
    exit_rank(0)
sys.exit(0)
