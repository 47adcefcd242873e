"""A stop signal during a training run's eval (a long eval set, train.eval_generate): the eval is dropped, the
step's checkpoint written at once (not after minutes more of eval, past a preemption's grace period), and the
resumed run evaluates that step first: the same evals, losses and best adapter as a run never stopped."""

from __future__ import annotations

import json

import pytest

from scaletune.config import load_config
from scaletune.data.batching import column_values, eval_batches
from scaletune.loop import fit
from scaletune.train import StopFlag, setup

from stutil import read_metrics


class StopDuringEval:
    """Stands in for a SIGUSR1 arriving during the eval at step `at`, after that eval has asked `after` times
    whether to stop (one ask per eval batch, then per generation batch); never while training."""

    def __init__(self, run, at: int, after: int = 1):
        self.run, self.at, self.after, self.asked = run, at, after, 0

    @property
    def signal(self):
        if self.run.step < self.at or self.run.model.training:
            return None
        self.asked += 1
        return 10 if self.asked > self.after else None

    def catch_interrupts(self) -> None:
        pass

    def release_interrupts(self) -> None:
        pass


def _records(run_dir, event: str) -> list[float]:
    return [x for r in read_metrics(run_dir, event) for x in (r["step"], r.get("loss"), r.get("token_f1", 0.0))]


@pytest.mark.parametrize("where", ["in_the_loss_pass", "in_generation"])
def test_a_stop_during_an_eval_checkpoints_the_step_and_the_resume_evaluates_it_first(make_config, tmp_path, where):
    train = {"max_steps": 6, "eval_every": 2, "save_every": 3, "log_every": 1, "best_metric": "loss",
             "eval_generate": 4, "eval_max_new_tokens": 4, "save_total_limit": None}
    path = make_config("causal_lm", n=32, train=train)
    run, _ = setup(load_config(path))
    assert fit(run, StopFlag()) == "done"
    whole = tmp_path / "whole"
    (tmp_path / "run").rename(whole)

    run, _ = setup(load_config(path))
    # (one ask per eval batch of the loss pass, then one per generation batch)
    loss_pass = len(eval_batches(column_values(run.data["eval"], "length"), 4, 1, 0))
    stop = StopDuringEval(run, 4, 1 if where == "in_the_loss_pass" else loss_pass)
    assert fit(run, stop) == "preempted"
    assert stop.asked == (2 if where == "in_the_loss_pass" else loss_pass + 1)  # (stopped where meant)
    run_dir = tmp_path / "run"
    assert [r["step"] for r in read_metrics(run_dir, "eval")] == [2]  # (step 4's eval dropped)
    assert [r["step"] for r in read_metrics(run_dir, "preempted")] == [4]
    assert (run_dir / "checkpoints" / "step-4").is_dir()  # written at once, not at the save step (6)
    assert not (run_dir / "generations" / "step-4.jsonl").exists()

    run, resumed = setup(load_config(path), resume="auto")
    assert resumed.name == "step-4"
    assert fit(run, StopFlag()) == "done"
    # every eval (loss and generated answers' scores) and every step's loss as the run never stopped
    assert _records(run_dir, "eval") == pytest.approx(_records(whole, "eval"), rel=1e-6)
    assert _records(run_dir, "train") == pytest.approx(_records(whole, "train"), rel=1e-6)
    assert [r["step"] for r in read_metrics(run_dir, "best")] == [r["step"] for r in read_metrics(whole, "best")]
    best = json.loads((run_dir / "best_adapter" / "scaletune.json").read_text())["best"]
    assert best["step"] == json.loads((whole / "best_adapter" / "scaletune.json").read_text())["best"]["step"]
    assert (run_dir / "generations" / "step-4.jsonl").read_text() == (whole / "generations" / "step-4.jsonl").read_text()


@pytest.mark.parametrize("end", ["last_step", "early_stop"])
def test_a_run_finished_by_its_redone_eval_is_complete_on_a_later_resume(make_config, tmp_path, end, capsys):
    """Stopped during the eval that ends the run (its last step's, or one that stops it early), the resumed run
    evaluates it and finishes without training another step: the checkpoint of that step must then hold that eval
    (final_outputs keeps the existing one). It held the stopped run's counters (evaluated_step, best, stopped_early):
    a later resume of the done run (the job requeued again, the same command run again) evaluated that step once
    more, another eval record and minutes of generation."""
    train = {"max_steps": 4 if end == "last_step" else 8, "eval_every": 2, "save_every": None, "log_every": 1,
             "best_metric": "loss", "eval_generate": 2, "eval_max_new_tokens": 2}
    if end == "early_stop":  # step 2's eval is the best; step 4's cannot beat it by 1e9: the run stops there
        train.update(early_stopping_patience=1, early_stopping_threshold=1e9)
    path = make_config("causal_lm", n=32, train=train)
    run, _ = setup(load_config(path))
    assert fit(run, StopDuringEval(run, 4)) == "preempted"
    run_dir = tmp_path / "run"
    assert [r["step"] for r in read_metrics(run_dir, "preempted")] == [4]

    capsys.readouterr()
    run, resumed = setup(load_config(path), resume="auto")
    assert resumed.name == "step-4"
    assert fit(run, StopFlag()) == "done"
    if end == "last_step":  # (not "complete" alone: no eval and no adapter/ yet)
        assert "run already complete (4/4 steps); its eval at step 4 and adapter are still to do" in \
            capsys.readouterr().out
    assert [r["step"] for r in read_metrics(run_dir, "eval")] == [2, 4]
    assert [r["step"] for r in read_metrics(run_dir, "early_stop")] == ([4] if end == "early_stop" else [])

    run, resumed = setup(load_config(path), resume="auto")
    assert resumed.name == "step-4"
    assert fit(run, StopFlag()) == "done"
    assert [r["step"] for r in read_metrics(run_dir, "eval")] == [2, 4]  # (not evaluated again)
    assert [r["step"] for r in read_metrics(run_dir, "train")][-1] == 4  # (no training past the early stop)
    assert not list((run_dir / "checkpoints").glob(".step-*"))  # (the replaced copy deleted)


class StopAfterEval(StopDuringEval):
    """Stands in for a SIGUSR1 heard at the first step boundary after the eval of step `at` (none during it)."""

    @property
    def signal(self):
        return 10 if self.run.model.training and self.run.counters.get("evaluated_step") == self.at else None


def test_a_stop_just_after_the_redone_eval_checkpoints_that_eval(make_config, tmp_path):
    """Stopped right after the resumed run redid the step's eval, before training on: the step's checkpoint (the
    one it resumed from, kept as verified) must be rewritten with that eval, or the next resume redoes it again."""
    train = {"max_steps": 6, "eval_every": 2, "save_every": None, "log_every": 1, "eval_generate": 2,
             "eval_max_new_tokens": 2}
    path = make_config("causal_lm", n=32, train=train)
    run, _ = setup(load_config(path))
    assert fit(run, StopDuringEval(run, 4)) == "preempted"
    run, _ = setup(load_config(path), resume="auto")
    assert fit(run, StopAfterEval(run, 4)) == "preempted"
    run_dir = tmp_path / "run"
    assert [r["step"] for r in read_metrics(run_dir, "preempted")] == [4, 4]
    run, resumed = setup(load_config(path), resume="auto")
    assert resumed.name == "step-4"
    assert fit(run, StopFlag()) == "done"
    assert [r["step"] for r in read_metrics(run_dir, "eval")] == [2, 4, 6]  # (step 4's once)
