"""Packing for causal_lm: several tokenised examples per row, attention isolated per example.

Rows are filled best-fit-decreasing (near-zero waste). Each row carries `position_ids` that restart
at 0 for every example; the collator passes them with `attention_mask=None`, and transformers then
confines attention to each example (block-diagonal causal mask on SDPA/eager, varlen kernels with
flash attention). The first label of every example is masked so no example learns to predict the
next example's first token.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from ..tasks.base import IGNORE
from .batching import column_values


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: example indices per row, every row at most `max_length` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    space: list[tuple[int, int]] = []  # sorted (free tokens, row id)
    for i in order:
        n = lengths[i]
        pos = bisect.bisect_left(space, (n, -1))
        if pos < len(space):
            free, row = space.pop(pos)
        else:
            rows.append([])
            free, row = max_length, len(rows) - 1
        rows[row].append(i)
        bisect.insort(space, (free - n, row))
    return rows


def pack_dataset(dataset: Any, max_length: int) -> Any:
    """A datasets.Dataset of packed rows (input_ids, labels, position_ids, length, n_examples)."""
    import datasets

    rows = pack_rows(column_values(dataset, "length"), max_length)
    ids_col, lab_col = dataset["input_ids"], dataset["labels"]
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "length": [], "n_examples": []}
    for members in rows:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in members:
            ids += ids_col[i]
            labels += [IGNORE] + list(lab_col[i][1:])
            pos += list(range(len(ids_col[i])))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(pos)
        out["length"].append(len(ids))
        out["n_examples"].append(len(members))
    return datasets.Dataset.from_dict(out)


def collate_packed(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows padded at the end; padding gets its own restarting positions and no labels, so it is a
    separate (ignored) segment that no real token attends to. `cu_seq_lens` marks every example and
    padding stretch for the varlen attention kernel (attention.py)."""
    from ..attention import segment_bounds

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    pos = torch.arange(width).repeat(len(examples), 1)
    n_tokens = 0
    segments = []
    for r, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[r, :n] = torch.tensor(e["input_ids"])
        labels[r, :n] = torch.tensor(e["labels"])
        pos[r, :n] = torch.tensor(e["position_ids"])
        pos[r, n:] = torch.arange(width - n)
        starts = (pos[r, :n] == 0).nonzero().squeeze(1).tolist() + [n]
        segments.append([b - a for a, b in zip(starts, starts[1:])])
        n_tokens += n
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "n_tokens": torch.tensor(n_tokens),
            "cu_seq_lens": segment_bounds(segments, width)}
