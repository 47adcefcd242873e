"""Evaluation over a tokenised dataset, sharded across ranks; metrics come from the task."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import send_to_device

from .data.batching import column_values, eval_batches
from .progress import Progress


class EvalStopped(Exception):
    """A stop signal (`signum`) heard by some rank during a training run's eval: the eval is dropped, the step's
    checkpoint written without it, and the resumed run evaluates that step first (loop.fit). An eval of minutes
    (a large eval set, train.eval_generate) would otherwise outlast a preemption's grace period."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# Asked before each eval batch, the same number of times on every rank: the signal every rank stops on, or None
StopCheck = Callable[[], "int | None"]


@torch.no_grad()
def evaluate(accelerator: Any, model: Any, task: Any, dataset: Any, labels: list[str] | None, micro: int,
             pad_id: int, stop_check: StopCheck | None = None) -> dict:
    """Loss and task metrics over the whole eval set (identical result at any world size); with `stop_check`
    (during training) raises EvalStopped when it names a signal."""
    preds, loss_sum, n_targets, _ = _score(accelerator, model, task, dataset, micro, pad_id, per_example=False,
                                           stop_check=stop_check)
    return task.metrics(preds, loss_sum, n_targets, labels)


@torch.no_grad()
def evaluate_examples(accelerator: Any, model: Any, task: Any, dataset: Any, labels: list[str] | None, micro: int,
                      pad_id: int) -> tuple[dict, list[tuple]]:
    """`evaluate`'s metrics, and every example's (prediction, task's extra output) in the dataset's order,
    gathered from all ranks: the metrics are computed from those very predictions."""
    task.per_example = True  # (causal_lm's chunked loss then keeps each row's loss, which costs a pass per row)
    try:
        preds, loss_sum, n_targets, examples = _score(accelerator, model, task, dataset, micro, pad_id,
                                                      per_example=True)
    finally:
        del task.per_example  # (back to the class's False: an instance attribute would enter its cache_meta)
    return task.metrics(preds, loss_sum, n_targets, labels), [(pred, extra) for _, pred, extra in examples]


def _score(accelerator: Any, model: Any, task: Any, dataset: Any, micro: int, pad_id: int,
           per_example: bool, stop_check: StopCheck | None = None) -> tuple[list, float, int, list[tuple]]:
    """(predictions of all ranks in dataset order, summed loss, targets, and with `per_example` each example's
    (index, prediction or None, extra output) sorted by index) over the whole dataset. (Dataset order: token_cls
    stitches a sentence's data.too_long: split windows, consecutive examples, back together.)"""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    n_targets = 0
    preds: list = []
    examples: list[tuple] = []
    batches = eval_batches(column_values(dataset, "length"), micro, accelerator.num_processes,
                           accelerator.process_index)
    # an eval set of thousands takes minutes on a CPU with nothing on screen, as if hung
    progress = Progress(len(batches), "eval", "batches", shown=accelerator.is_main_process)
    for idx in batches:  # (padded: every rank runs as many rounds, so stop_check's collective pairs up)
        if stop_check is not None and (signum := stop_check()) is not None:
            progress.close()
            model.train(was_training)
            raise EvalStopped(signum)
        progress.update()
        batch = send_to_device(task.collate([dataset[i] for i in (idx or [0])], pad_id), accelerator.device)
        with accelerator.autocast():
            loss, logits = task.loss_sum(model, batch)
        if idx is None:
            continue  # padding round: this rank only kept ZeRO-3's collective forwards in step
        loss_sum += loss.double().cpu()
        n_targets += task.count_targets(batch)
        rows: list = []
        if logits is not None:  # None: causal_lm's chunked loss never builds them (and needs none)
            # on the device: the tasks take argmaxes (causal_lm takes nothing), where a float32 host copy of
            # causal_lm's logits would be batch x targets x vocabulary x 4 bytes, ~2 GB at Llama 3's vocabulary
            rows = task.predictions(logits, batch)
            preds += zip(idx, rows)
        if per_example:  # (batches are length-sorted and dealt over ranks: the index puts them back in order)
            examples += zip(idx, rows or [None] * len(idx), task.example_outputs(logits, batch))
    progress.close()
    totals = accelerator.reduce(torch.tensor([loss_sum.item(), float(n_targets)], device=accelerator.device,
                                             dtype=torch.float64), "sum")
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        preds = gather_object(preds)
        examples = gather_object(examples) if per_example else examples
    if was_training:
        model.train()
    preds = [row for _, row in sorted(preds, key=lambda e: e[0])]
    return preds, float(totals[0]), int(totals[1]), sorted(examples, key=lambda e: e[0])
