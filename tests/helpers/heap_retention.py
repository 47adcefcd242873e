"""Prints how many MiB of RSS stay after freeing 60 x 4 MiB tensors, each followed by a small tensor that
stays alive (the allocation pattern of a forward/backward pass). argv[1] == "on": with
scaletune.cpu_memory.release_freed_memory() applied first. Run in a fresh process: the setting is
process-wide and glibc's adaptive threshold depends on the process's history."""

import gc
import sys

import torch

from scaletune.cpu_memory import release_freed_memory


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


if sys.argv[1] == "on":
    why_not = release_freed_memory()
    assert why_not is None, why_not
big = torch.ones(4 * 2**20)  # 16 MiB: freeing it raises glibc's adaptive threshold, as a run's first tensors do
del big
base = rss_mib()
freed, kept = [], []
for _ in range(60):
    freed.append(torch.ones(2**20))
    kept.append(torch.ones(256))
del freed
gc.collect()
print(f"{rss_mib() - base:.0f}")
