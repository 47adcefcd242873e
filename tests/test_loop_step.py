"""Details of a training step that test_train.py's end-to-end runs do not pin: fresh randomness per step, the
logged loss and epoch, causal_lm's target count, and a mid-run eval that neither records
autograd nor leaves the model in eval mode."""

from __future__ import annotations

import pytest
import torch

from scaletune.config import load_config
from scaletune.evaluate import evaluate
from scaletune.loop import fit
from scaletune.tasks import IGNORE, get_task
from scaletune.train import StopFlag, setup

from stutil import read_metrics


def test_each_step_draws_its_own_randomness_and_logs_its_mean_loss_and_epoch(make_config, monkeypatch):
    """Dropout masks come from a seed of (seed, step, rank): a seed without the step would give every step the
    same masks (which a resume would still replay exactly). A step's logged loss is its
    micro-batches' summed loss over their summed targets (not the sum, which the micro 1 x 4 = micro 4 x 1 test
    cannot tell apart), and its epoch the epochs it completes: 16 examples in batches of 4 make step k k / 4."""
    path = make_config("causal_lm", n=16, data={"eval": None},
                       train={"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 2, "log_every": 1})
    run, _ = setup(load_config(path))
    draws, sums = [], []
    inner = type(run.task).train_loss_sum

    def watched(task, model, batch):
        draws.append(torch.rand(4))
        out = inner(task, model, batch)
        sums.append((float(out[0]), task.count_targets(batch)))
        return out

    monkeypatch.setattr(type(run.task), "train_loss_sum", watched)  # (an instance attribute would enter its cache)
    assert fit(run, StopFlag()) == "done"
    assert len(draws) == 4 and not torch.equal(draws[0], draws[2])  # each step's first micro-batch
    logged = read_metrics(run.output_dir)
    assert [(r["step"], r["epoch"]) for r in logged] == [(1, 0.25), (2, 0.5)]
    means = [sum(s for s, _ in sums[i:i + 2]) / sum(n for _, n in sums[i:i + 2]) for i in (0, 2)]
    assert [r["loss"] for r in logged] == pytest.approx(means, rel=1e-5)


def test_eval_records_no_autograd_and_gives_the_model_back_in_its_mode(make_config, monkeypatch):
    """A mid-run eval switches dropout off and autograd off while it scores, then hands a training model back
    training: left in eval mode, every later step would train without dropout."""
    run, _ = setup(load_config(make_config("seq_cls", n=16)))
    seen = []
    inner = type(run.task).loss_sum

    def watched(task, model, batch):
        seen.append((torch.is_grad_enabled(), model.training))
        return inner(task, model, batch)

    monkeypatch.setattr(type(run.task), "loss_sum", watched)
    args = (run.accelerator, run.model, run.task, run.data["eval"], run.data["labels"], 4, run.tokenizer.pad_token_id)
    run.model.train()
    evaluate(*args)
    assert seen and set(seen) == {(False, False)}
    assert run.model.training
    run.model.eval()  # a model given in eval mode stays so
    evaluate(*args)
    assert not run.model.training


def test_causal_lm_counts_only_the_tokens_it_predicts():
    """Position 0 is never predicted (the shift): a label there, as a row without a BOS token trained on its
    prompt has, is no target; counted, the step's denominator would exceed what its loss sums over."""
    batch = {"labels": torch.tensor([[5, 6, IGNORE, 7], [8, IGNORE, IGNORE, 9]])}
    assert get_task("causal_lm").count_targets(batch) == 3
