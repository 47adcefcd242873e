"""The training loop: the loss is the mean over all target tokens of a step, the logged lr is the one each step
used, resume continues exactly, per-epoch eval/save intervals, eval's loss and batches, a preemption heard by
another rank. (Replacing a run: test_overwrite.py; each task learning and its adapter reloading:
test_tasks_learn.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from scaletune.cli import main
from scaletune.config import load_config
from scaletune.loop import fit
from scaletune.train import StopFlag, setup

from stutil import StopAt, read_metrics


def _capture_first_step_grads(run):
    grads = {}
    opt = run.optimizer
    original = opt.step

    def step(*a, **k):
        if not grads:
            model = run.accelerator.unwrap_model(run.model)
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return original(*a, **k)

    opt.step = step
    return grads


@pytest.mark.parametrize("task", ["causal_lm", "dpo", "reward", "seq_cls", "token_cls"])
def test_loss_is_mean_over_all_target_tokens_of_the_step(make_config, tmp_path, task):
    """micro 1 x accumulation 4 and micro 4 x accumulation 1 give the same loss and LoRA gradients. Every task's
    `loss_sum` must be a sum over its targets (the loop divides by the step's target count): a per-micro-batch
    mean (seq_cls dividing by its batch's label count) gives micro 4 a quarter of micro 1's loss and gradient."""
    results = {}
    for micro in (1, 4):
        path = make_config(task, train={"global_batch_size": 4, "micro_batch_size": micro, "max_steps": 1,
                                                "max_grad_norm": None},
                           output_dir=str(tmp_path / f"m{micro}"))
        run, _ = setup(load_config(path))
        grads = _capture_first_step_grads(run)
        fit(run, StopFlag())
        results[micro] = (read_metrics(run.output_dir)[0]["loss"], grads)
    (loss1, g1), (loss4, g4) = results[1], results[4]
    assert loss1 == pytest.approx(loss4, rel=1e-5, abs=1e-6)
    assert g1.keys() == g4.keys() and len(g1) > 0
    for name in g1:
        torch.testing.assert_close(g1[name], g4[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in g1.values())


def test_data_has_variable_lengths_so_mean_of_means_would_differ(make_config, tmp_path):
    """Guards the test above: on this data a per-micro-batch mean gives a different loss."""
    path = make_config("causal_lm", train={"global_batch_size": 4, "micro_batch_size": 1, "max_steps": 1})
    run, _ = setup(load_config(path))
    from scaletune.data.batching import epoch_order, step_micro_batches

    lengths = list(run.data["train"]["length"])
    order = epoch_order(lengths, 42, 0, 4, True)
    batches = step_micro_batches(order, lengths, 0, global_batch=4, micro=1, world=1, rank=0)
    counts = [sum(lab != -100 for lab in run.data["train"][b[0]]["labels"][1:]) for b in batches]
    assert len(set(counts)) > 1, counts


@pytest.mark.parametrize("task", ["causal_lm", "dpo", "kto", "reward"])
def test_resume_continues_exactly(make_config, tmp_path, task):
    """8 uninterrupted steps == 4 steps, stop (signal path), resume auto, 4 more steps. The split run logs
    every 3 steps: each logged loss is the mean of the steps since the last log, the resume at 4 included."""
    common = {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 8, "save_every": 3,
              "lr_scheduler": "cosine", "warmup_steps": 2}
    full = make_config(task, train=common, output_dir=str(tmp_path / "full"),
                       peft={"lora_dropout": 0.1})
    run, _ = setup(load_config(full))
    assert fit(run, StopFlag()) == "done"
    split = make_config(task, train={**common, "log_every": 3}, output_dir=str(tmp_path / "split"),
                        peft={"lora_dropout": 0.1})
    run, _ = setup(load_config(split))
    assert fit(run, StopAt(run, 4)) == "preempted"
    assert (tmp_path / "split/checkpoints/latest").read_text().strip() == "step-4"
    run, used = setup(load_config(split), resume="auto")
    assert used.name == "step-4" and run.step == 4
    assert fit(run, StopFlag()) == "done"
    a = read_metrics(tmp_path / "full")
    b = read_metrics(tmp_path / "split")
    assert [r["step"] for r in a] == list(range(1, 9)) and [r["step"] for r in b] == [3, 6, 8]
    step_loss = [r["loss"] for r in a]
    means = [sum(step_loss[i:j]) / (j - i) for i, j in ((0, 3), (3, 6), (6, 8))]
    assert [r["loss"] for r in b] == pytest.approx(means, rel=1e-6)
    assert [a[s - 1]["lr"] for s in (3, 6, 8)] == [r["lr"] for r in b]
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "full/adapter/adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "split/adapter/adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    # save_total_limit (default 3) pruned old ones; the final step is checkpointed
    names = sorted(p.name for p in (tmp_path / "split/checkpoints").iterdir() if p.name.startswith("step-"))
    assert names == ["step-4", "step-6", "step-8"]


def _record_step_lrs(run) -> list[float]:
    """The lr each optimizer update of `run` applies, read when it applies it."""
    used: list[float] = []
    inner = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate's wrapper holds the torch one
    inner.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    return used


def test_logged_lr_is_the_lr_each_step_used(make_config, tmp_path):
    """Linear warmup 2 of 4 steps at peak 1e-2, with gradient accumulation, stopped after step 2 and
    resumed: steps 1-4 update with lr 0, 0.005, 0.01, 0.005, and that is what is logged for them (was the
    next step's lr: 0.005, 0.01, 0.005, 0)."""
    path = make_config("causal_lm", train={"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 4,
                                           "lr_scheduler": "linear", "warmup_steps": 2, "save_every": 2})
    schedule = [0.0, 0.005, 0.01, 0.005]
    run, _ = setup(load_config(path))
    assert run.accum == 2
    before = _record_step_lrs(run)
    assert fit(run, StopAt(run, 2)) == "preempted"
    run, _ = setup(load_config(path), resume="auto")
    assert run.step == 2
    after = _record_step_lrs(run)
    assert fit(run, StopFlag()) == "done"
    assert before + after == pytest.approx(schedule)
    logged = read_metrics(run.output_dir)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [r["lr"] for r in logged] == pytest.approx(schedule)


def test_resume_of_finished_run_does_nothing_more(make_config, tmp_path):
    path = make_config("causal_lm", train={"max_steps": 2})
    run, _ = setup(load_config(path))
    fit(run, StopFlag())
    run, used = setup(load_config(path), resume="auto")
    assert run.step == 2 and used.name == "step-2"
    assert fit(run, StopFlag()) == "done"
    assert [r["step"] for r in read_metrics(run.output_dir)] == [1, 2]


def test_setup_says_what_each_epoch_leaves_out_and_when_warmup_covers_the_run(make_config, tmp_path, caplog):
    """The examples that cannot fill a last global batch sit each epoch out: said in the log and run.json
    of a run that reaches an epoch's end (not of a shorter one: it was said of a 3-step run on 100k
    examples). A one-step run with a one-step warmup trains at lr 0: said as a warning."""
    path = make_config("causal_lm", n=30, train={"global_batch_size": 8, "max_steps": 1, "warmup_steps": 1})
    with caplog.at_level("INFO", logger="scaletune"):
        run, _ = setup(load_config(path))
    n = len(run.data["train"])
    assert n % 8 and n // 8 > 1, n
    note = f"{n % 8} of {n} examples do not fill a last global batch of 8 and sit each epoch out"
    assert note not in caplog.text
    assert "reaches at most 0% of train.learning_rate and nothing is trained" in caplog.text
    assert json.loads((run.output_dir / "run.json").read_text())["left_out_per_epoch"] == n % 8
    caplog.clear()
    with caplog.at_level("INFO", logger="scaletune"):
        setup(load_config(path, [f"train.max_steps={n // 8}", "train.warmup_steps=0", f"output_dir={tmp_path / 'r2'}"]))
    assert note in caplog.text


def test_eval_loss_is_the_mean_over_every_eval_target_token(make_config):
    """evaluate() sums the per-target losses of all batches and divides once by the number of targets; a mean
    of per-batch means weights the targets of a small batch (here the last one, a single example) more than
    the others. Reference: each eval example alone, unpadded, through the model's plain logits."""
    from scaletune.evaluate import evaluate
    from scaletune.tasks import IGNORE

    path = make_config("causal_lm", train={"global_batch_size": 8, "micro_batch_size": 8, "max_steps": 1})
    run, _ = setup(load_config(path))
    data = run.data["eval"]
    assert len(data) % 3 == 1  # batches of 3 then 1: unequal target counts
    model = run.accelerator.unwrap_model(run.model)
    total, n = 0.0, 0
    with torch.no_grad():
        model.eval()
        for ex in data:
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(ex["labels"][1:])
            total += float(torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE,
                                                             reduction="sum"))
            n += int((labels != IGNORE).sum())
    got = evaluate(run.accelerator, run.model, run.task, data, run.data["labels"], 3, run.tokenizer.pad_token_id)
    assert got["loss"] == pytest.approx(total / n, rel=1e-5)


def test_eval_batches_cover_every_example_once_at_any_world_size():
    """Every eval example is scored exactly once across the ranks, the last partial batch included (dropping
    it, as training drops an incomplete global batch, would leave up to micro - 1 examples out of every eval
    metric); every rank gets the same number of batches, `None` marking a padding round it runs and discards."""
    import random

    from scaletune.data.batching import eval_batches

    rng = random.Random(0)
    for n in (1, 5, 6, 7, 16):
        lengths = [rng.randint(1, 50) for _ in range(n)]
        for micro in (1, 2, 3, 8):
            for world in (1, 2, 3):
                per_rank = [eval_batches(lengths, micro, world, rank) for rank in range(world)]
                assert len({len(b) for b in per_rank}) == 1, (n, micro, world)
                real = [b for batches in per_rank for b in batches if b is not None]
                assert sorted(i for b in real for i in b) == list(range(n)), (n, micro, world)
                assert all(0 < len(b) <= micro for b in real)
                assert len(real) == -(-n // micro)  # a None is padding only, never a batch left out


def test_eval_batches_group_similar_lengths():
    """Eval batches hold examples of similar length (longest first): in file order half of what eval computed on
    real dev sets was padding. Sorted, no batch's examples could be swapped with another's to pad less."""
    import random

    from scaletune.data.batching import eval_batches

    rng = random.Random(1)
    lengths = [rng.choice([5, 6, 80, 90]) for _ in range(64)]
    batches = eval_batches(lengths, 8, 1, 0)
    padded = sum(8 * max(lengths[i] for i in b) for b in batches)
    in_file_order = sum(8 * max(lengths[i:i + 8]) for i in range(0, 64, 8))
    assert padded < 0.75 * in_file_order
    spans = [(min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches]
    assert all(lo >= hi_next for (lo, _), (_, hi_next) in zip(spans, spans[1:]))  # no overlap: sorted
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest first: memory shows at once


def test_batch_larger_than_packed_rows_says_the_examples_were_packed(make_config, capsys):
    path = make_config("causal_lm", n=6, data={"packing": True, "max_length": 512},
                       train={"global_batch_size": 4, "micro_batch_size": 4})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "larger than the training set (6 usable examples packed into 2 row(s) of data.max_length=512" in err


def test_evals_and_saves_per_epoch_set_the_step_intervals(make_config, tmp_path, caplog):
    """axolotl's evals_per_epoch / saves_per_epoch had no equivalent (an unknown key): the user worked out
    the steps of an epoch. 80 examples in global batches of 8 are 10 steps an epoch: 4 evals an epoch are at
    its steps 3, 5, 8 and 10, 3 checkpoints at 4, 7 and 10; over 2 epochs. (One every 10 // 4 steps was 5 evals
    an epoch, and checkpoints every 3 steps missed the epochs' ends.)"""
    import yaml

    from scaletune.errors import ConfigError

    path = make_config("causal_lm", train={"global_batch_size": 8, "micro_batch_size": 4, "epochs": 2,
                                           "max_steps": None, "evals_per_epoch": 4, "saves_per_epoch": 3,
                                           "eval_every": None, "save_every": None, "save_total_limit": None},
                       n=80)
    raw = yaml.safe_load(path.read_text())
    for key in ("eval_every", "save_every"):  # (as a user writes it: only the per-epoch keys)
        raw["train"].pop(key)
    path.write_text(yaml.safe_dump(raw))
    with caplog.at_level("INFO", logger="scaletune"):
        assert main(["train", str(path)]) == 0
    assert "train.evals_per_epoch=4: evaluating at steps 3, 5, 8, 10 of each epoch of 10" in caplog.text
    out = tmp_path / "run"
    assert [r["step"] for r in read_metrics(out, "eval")] == [3, 5, 8, 10, 13, 15, 18, 20]
    assert sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")) == [4, 7, 10, 14, 17, 20]
    # run.json's config runs again as it is (it held the resolved eval_every beside evals_per_epoch: refused)
    saved = json.loads((out / "run.json").read_text())["config"]
    assert saved["train"]["evals_per_epoch"] == 4 and saved["train"]["eval_every"] == 200  # (the default: unset)
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump({**saved, "output_dir": str(tmp_path / "again")}))
    load_config(again, [], check_peft=True)
    # eval_every: null beside evals_per_epoch says the same (a base config's eval_every turned off)
    assert load_config(path, ["train.eval_every=null", "train.save_every=null"], check_peft=True).train.eval_every is None
    # one or the other; and evals need eval data
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.eval_every=5", "data.eval=null"], check_peft=True)
    text = "\n".join(err.value.problems)
    assert "train.evals_per_epoch and train.eval_every: give one or the other" in text
    assert "train.evals_per_epoch: there is no eval data to evaluate" in text


def test_per_epoch_schedules_fall_due_the_asked_number_of_times_each_epoch():
    """N times an epoch is N steps of every epoch, the last at its end, for any epoch length; more than the
    epoch has steps is every step. Fixed intervals stay as they were."""
    from scaletune.train import Every

    for epoch in (1, 7, 10, 64, 999):
        for times in (1, 3, 4, 50):
            every = Every.per_epoch(times, epoch)
            due = [step for step in range(1, 3 * epoch + 1) if every.due(step)]
            assert len(due) == 3 * min(times, epoch) and due[-1] == 3 * epoch
            assert all(every.due(k * epoch) for k in (1, 2, 3))
            gaps = {b - a for a, b in zip(due, due[1:])}
            assert max(gaps) - min(gaps) <= 1  # evenly spread
    assert [s for s in range(1, 13) if Every(5).due(s)] == [5, 10] and not any(Every().due(s) for s in range(9))
    assert Every.per_epoch(50, 999).describe() == "at steps 20, 40, 60, ..., 999 of each epoch of 999"
    # up to six steps are all named; a single one reads "step"
    assert Every.per_epoch(6, 12).describe() == "at steps 2, 4, 6, 8, 10, 12 of each epoch of 12"
    assert Every.per_epoch(1, 7).describe() == "at step 7 of each epoch of 7"


def test_a_preemption_another_rank_heard_marks_the_checkpoint_with_its_signal(make_config, tmp_path, monkeypatch, capsys):
    """Ranks stop on the signal step_head agrees on, which another rank may have heard alone: the marker the
    Slurm templates read (requeue on SIGUSR1), the preempted event and the message name that signal, not
    this rank's own (none)."""
    import signal

    from scaletune import loop

    marker = tmp_path / "marker"
    monkeypatch.setenv("SCALETUNE_PREEMPT_MARKER", str(marker))
    path = make_config("causal_lm", train={"global_batch_size": 4, "micro_batch_size": 4, "max_steps": 4})
    run, _ = setup(load_config(path))
    monkeypatch.setattr(loop, "step_head", lambda acc, n, stop, w=None: (n, n if w is None else w,
                                                                   signal.SIGUSR1 if run.step >= 2 else None))
    assert fit(run, StopFlag()) == "preempted"
    assert marker.read_text().splitlines() == [str(tmp_path / "run/checkpoints/step-2"), "SIGUSR1"]
    assert read_metrics(tmp_path / "run", "preempted")[0]["signal"] == signal.SIGUSR1
    assert "stopped on SIGUSR1 (to another rank) at step 2" in capsys.readouterr().out
