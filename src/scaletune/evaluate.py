"""Evaluation over a tokenised dataset, sharded across ranks; metrics come from the task."""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import send_to_device

from .data.batching import column_values, eval_batches
from .progress import Progress


@torch.no_grad()
def evaluate(accelerator: Any, model: Any, task: Any, dataset: Any, labels: list[str] | None, micro: int,
             pad_id: int) -> dict:
    """Loss and task metrics over the whole eval set (identical result at any world size)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    n_targets = 0
    preds: list = []
    batches = eval_batches(column_values(dataset, "length"), micro, accelerator.num_processes,
                           accelerator.process_index)
    # an eval set of thousands takes minutes on a CPU with nothing on screen, as if hung
    progress = Progress(len(batches), "eval", "batches", shown=accelerator.is_main_process)
    for idx in batches:
        progress.update()
        batch = send_to_device(task.collate([dataset[i] for i in (idx or [0])], pad_id), accelerator.device)
        with accelerator.autocast():
            loss, logits = task.loss_sum(model, batch)
        if idx is None:
            continue  # padding round: this rank only kept ZeRO-3's collective forwards in step
        loss_sum += loss.double().cpu()
        n_targets += task.count_targets(batch)
        if logits is not None:  # None: causal_lm's chunked loss never builds them (and needs none)
            # on the device: the tasks take argmaxes (causal_lm takes nothing), where a float32 host copy of
            # causal_lm's logits would be batch x targets x vocabulary x 4 bytes, ~2 GB at Llama 3's vocabulary
            preds += task.predictions(logits, batch)
    progress.close()
    totals = accelerator.reduce(torch.tensor([loss_sum.item(), float(n_targets)], device=accelerator.device,
                                             dtype=torch.float64), "sum")
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        preds = gather_object(preds)
    if was_training:
        model.train()
    return task.metrics(preds, float(totals[0]), int(totals[1]), labels)
