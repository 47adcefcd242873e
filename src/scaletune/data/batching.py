"""Which examples go into which optimizer step, micro-step and rank.

The order depends only on (seed, epoch, global batch): each optimizer step takes the next
`global_batch_size` examples of the epoch's permutation, sorts them by length (less padding) and
deals them out as micro-batches round-robin over ranks. Because the loss is normalised over the
whole step, this split does not change the update, so the same run at world size 1 or 2 sees the
same data per step, and a checkpoint's "data position" is just the step number.
An incomplete last global batch of an epoch is dropped so every step has the same shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any, Callable

import torch


def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    return n_examples // global_batch


def step_micro_batches(lengths: list[int], step: int, *, global_batch: int, micro: int, world: int, rank: int,
                       seed: int, group_by_length: bool) -> list[list[int]]:
    """Index lists of this rank's micro-batches for optimizer step `step` (counted from 0 over epochs)."""
    per_epoch = steps_per_epoch(len(lengths), global_batch)
    epoch, k = divmod(step, per_epoch)
    perm = _permutation(len(lengths), seed, epoch)[k * global_batch:(k + 1) * global_batch]
    if group_by_length:
        perm.sort(key=lambda i: (-lengths[i], i))
    chunks = [perm[i:i + micro] for i in range(0, global_batch, micro)]
    return chunks[rank::world]


@lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


class StepBatches:
    """Iterates, from `start_step`, the collated micro-batches of each optimizer step for this rank."""

    def __init__(self, dataset: Any, collate: Callable[[list[dict]], dict], *, global_batch: int, micro: int,
                 world: int, rank: int, seed: int, group_by_length: bool, num_workers: int = 0):
        self.dataset, self.collate = dataset, collate
        self.lengths = list(dataset["length"])
        self.kw = dict(global_batch=global_batch, micro=micro, world=world, rank=rank, seed=seed,
                       group_by_length=group_by_length)
        self.accum = global_batch // (micro * world)
        self.num_workers = num_workers

    def __call__(self, start_step: int, end_step: int) -> Iterator[list[dict]]:
        plan = [idx for s in range(start_step, end_step) for idx in step_micro_batches(self.lengths, s, **self.kw)]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=plan, collate_fn=self.collate,
                                             num_workers=self.num_workers,
                                             persistent_workers=False)
        step: list[dict] = []
        for batch in loader:
            step.append(batch)
            if len(step) == self.accum:
                yield step
                step = []


def eval_batches(n: int, micro: int, world: int, rank: int) -> list[list[int] | None]:
    """This rank's eval batches; every rank gets the same count (ZeRO-3 forwards are collective),
    with `None` where a rank has run out (it repeats a batch and discards the result)."""
    batches = [list(range(i, min(i + micro, n))) for i in range(0, n, micro)]
    mine: list[list[int] | None] = batches[rank::world]
    rounds = -(-len(batches) // world)
    return mine + [None] * (rounds - len(mine))
