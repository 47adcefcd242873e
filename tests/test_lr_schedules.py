"""train.lr_scheduler: the curves with a floor (cosine_with_min_lr, warmup_stable_decay), inverse_sqrt and
reduce_lr_on_plateau, step by step, each continued by a resume, and their keys' checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from scaletune.cli import main
from scaletune.config import load_config
from scaletune.loop import fit
from scaletune.schedules import PlateauLambda
from scaletune.train import StopFlag, setup

from stutil import StopAt, read_metrics


def _lrs_stopped_and_resumed(make_config, tmp_path, steps: int, stop_at: int, **train) -> list[float]:
    """Each step's logged learning rate (peak 1e-3) of a run stopped at `stop_at` and resumed to `steps`."""
    common = {"global_batch_size": 8, "micro_batch_size": 8, "max_steps": steps, "save_every": stop_at,
              "log_every": 1, "learning_rate": 1e-3, **train}
    path = make_config("causal_lm", n=32, train=common)
    run, _ = setup(load_config(path))
    assert fit(run, StopAt(run, stop_at)) == "preempted"
    run, _ = setup(load_config(path), resume="auto")
    assert fit(run, StopFlag()) == "done"
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "run")}
    return [lrs[s] for s in range(1, steps + 1)]


def test_cosine_with_min_lr_ends_at_its_floor_and_resumes_on_it(make_config, tmp_path):
    """cosine_with_min_lr: warmup, then cosine from the peak down to min_lr_ratio x peak (not 0); a resume
    continues the same curve."""
    lrs = _lrs_stopped_and_resumed(make_config, tmp_path, 8, 4, lr_scheduler="cosine_with_min_lr", min_lr_ratio=0.2,
                                   warmup_steps=2)

    def lam(k):  # the factor step k+1's update uses
        if k < 2:
            return k / 2
        return 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (k - 2) / 6))

    assert lrs == pytest.approx([1e-3 * lam(s - 1) for s in range(1, 9)], rel=1e-9)
    assert min(lrs[2:]) > 0.2e-3 - 1e-12


def test_warmup_stable_decay_holds_the_peak_then_decays_to_its_floor_and_resumes_on_it(make_config, tmp_path):
    """10 steps, warmup 2, decay_ratio 0.3: warmup from the floor (0.2 x peak) to the peak, the peak held for
    steps 3-7, a cosine decay over the last 3 steps towards the floor; a stop at step 5 and a resume give the
    same curve."""
    lrs = _lrs_stopped_and_resumed(make_config, tmp_path, 10, 5, lr_scheduler="warmup_stable_decay",
                                   decay_ratio=0.3, min_lr_ratio=0.2, warmup_steps=2)

    def lam(k):  # the factor step k+1's update uses
        if k < 2:
            return 0.2 + 0.8 * k / 2
        if k < 7:
            return 1.0
        return 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (k - 7) / 3))

    assert lrs == pytest.approx([1e-3 * lam(s - 1) for s in range(1, 11)], rel=1e-9)


def test_inverse_sqrt_decays_as_the_root_of_the_warmup_over_the_step_and_resumes_on_it(make_config, tmp_path):
    """inverse_sqrt, warmup 3: linear warmup, then peak x sqrt(3 / k) for the update after k steps, whatever
    the run's length; a stop at step 4 and a resume give the same curve."""
    lrs = _lrs_stopped_and_resumed(make_config, tmp_path, 9, 4, lr_scheduler="inverse_sqrt", warmup_steps=3)
    expected = [1e-3 * (k / 3 if k < 3 else math.sqrt(3 / k)) for k in range(9)]
    assert lrs == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("lower", [True, False])
def test_plateau_drops_when_and_as_torchs_reduce_lr_on_plateau_does(lower):
    """PlateauLambda's drops follow torch's ReduceLROnPlateau (HF Trainer's reduce_lr_on_plateau) eval for
    eval: the same better-by-1e-4-of-the-best test, patience count and factor, a non-finite eval no better."""
    values = [1.0, 0.99995, 0.9, 0.95, 0.9, 0.91, 0.5, 0.5, float("nan"), 0.6, 0.6, 0.6, 0.4, 0.4]
    if not lower:  # (positive: torch scales a negative best the other way, we by its size)
        values = [2 - v for v in values]
    param = torch.nn.Parameter(torch.zeros(1))
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD([param], lr=1.0), mode="min" if lower else "max",
                                                     factor=0.5, patience=2)
    ours = PlateauLambda(0, factor=0.5, patience=2, lower=lower)
    for v in values:
        ref.step(v)
        ours.observe(v)
        assert ours(100) == pytest.approx(ref.get_last_lr()[0], rel=1e-12)
    assert ours.drops >= 2  # (the sequence does drop)


def test_reduce_lr_on_plateau_drops_after_patience_flat_evals_and_a_resume_keeps_its_count(make_config, tmp_path):
    """An eval every step, an lr so small the eval loss cannot move by 1e-4 of itself: the first eval sets the
    best, each later one is no better, and with patience 1 every second one halves the rate from the next step
    on. The run stops at step 4, one eval after a drop: the resume must carry that count (the drop at 5)."""
    lrs = _lrs_stopped_and_resumed(make_config, tmp_path, 8, 4, lr_scheduler="reduce_lr_on_plateau",
                                   plateau_factor=0.5, plateau_patience=1, warmup_steps=0, eval_every=1,
                                   learning_rate=1e-9)
    assert lrs == pytest.approx([1e-9 * f for f in (1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.125)], rel=1e-9)
    drops = read_metrics(tmp_path / "run", "lr_drop")
    assert [(r["step"], r["metric"]) for r in drops] == [(3, "loss"), (5, "loss"), (7, "loss")]


@pytest.mark.parametrize("change", ["patience", "eval_data", "eval_edited"])
def test_a_resume_takes_the_plateaus_settings_from_the_config_and_counts_anew_over_other_evals(make_config, tmp_path,
                                                                                                caplog, change):
    """The run above, resumed at step 4 (a drop at 3, one flat eval since) with --allow-config-change:
    patience 3 now waits three more flat evals (the checkpoint's patience 1 would drop at 5); another eval file
    makes the old best no bar: eval 5 sets it anew, the drop comes at 7 either way; so does the same eval file
    edited in place (its old best was kept as a bar)."""
    train = {"global_batch_size": 8, "micro_batch_size": 8, "max_steps": 8, "save_every": 4, "log_every": 1,
             "learning_rate": 1e-9, "lr_scheduler": "reduce_lr_on_plateau", "plateau_factor": 0.5,
             "plateau_patience": 1, "warmup_steps": 0, "eval_every": 1}
    path = make_config("causal_lm", n=32, train=train)
    run, _ = setup(load_config(path))
    assert fit(run, StopAt(run, 4)) == "preempted"
    raw = yaml.safe_load(path.read_text())
    if change == "patience":
        raw["train"]["plateau_patience"] = 3
    elif change == "eval_edited":
        evalf = Path(raw["data"]["eval"])
        evalf.write_text(evalf.read_text().replace("a", "b"))
    else:
        other = tmp_path / "other_eval.jsonl"
        other.write_text(Path(raw["data"]["eval"]).read_text().replace("a", "b"))
        raw["data"]["eval"] = str(other)
    path.write_text(yaml.safe_dump(raw))
    run, _ = setup(load_config(path), resume="auto", allow_config_change=True)
    assert fit(run, StopFlag()) == "done"
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "run")}
    assert [lrs[s] for s in range(1, 9)] == pytest.approx([1e-9 * f for f in (1, 1, 1, .5, .5, .5, .5, .25)], rel=1e-9)
    assert ("counted anew from the next eval" in caplog.text) == (change != "patience")
    assert ("(its files edited since)" in caplog.text) == (change == "eval_edited")


def test_reduce_lr_on_plateau_checks(make_config, capsys):
    path = make_config("causal_lm", data={"eval": None},
                       train={"lr_scheduler": "reduce_lr_on_plateau", "plateau_factor": 1.5, "plateau_patience": -1})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    for expected in ("reduce_lr_on_plateau lowers the rate when the eval stops improving; set data.eval",
                     "train.plateau_factor: must be in (0, 1), got 1.5", "train.plateau_patience: must be >= 0, got -1"):
        assert expected in err
    path = make_config("causal_lm", train={"lr_scheduler": "reduce_lr_on_plateau", "eval_every": None})
    assert main(["train", str(path)]) == 2
    assert "reduce_lr_on_plateau needs evals during the run" in capsys.readouterr().err
    path = make_config("causal_lm", train={"plateau_patience": 3})
    assert main(["train", str(path)]) == 2
    assert "train.plateau_patience: only lr_scheduler: reduce_lr_on_plateau reads it" in capsys.readouterr().err


def test_decay_ratio_is_checked_and_only_read_by_its_schedule(make_config, capsys):
    path = make_config("causal_lm", train={"lr_scheduler": "warmup_stable_decay", "decay_ratio": 0})
    assert main(["train", str(path)]) == 2
    assert "train.decay_ratio: must be in (0, 1], got 0" in capsys.readouterr().err
    path = make_config("causal_lm", train={"lr_scheduler": "cosine", "decay_ratio": 0.2})
    assert main(["train", str(path)]) == 2
    assert "train.decay_ratio: only lr_scheduler: warmup_stable_decay has a final decay" in capsys.readouterr().err
    path = make_config("causal_lm", train={"lr_scheduler": "wsd"})
    assert main(["train", str(path)]) == 2
    assert "(did you mean 'warmup_stable_decay'?)" in capsys.readouterr().err


def test_reduce_lr_on_plateau_drops_nothing_while_the_rate_is_still_warming_up():
    """Flat evals at steps 1-4 of a 4-step warmup (patience 0): the rate was cut before it reached learning_rate;
    the first eval sets the best, and the plateau is counted from the end of warmup."""
    from types import SimpleNamespace

    from scaletune.schedules import after_eval, make_scheduler

    t = SimpleNamespace(lr_scheduler="reduce_lr_on_plateau", plateau_factor=0.5, plateau_patience=0, best_metric=None)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(t, optimizer, warmup=4, total=10)
    lrs = []
    for _ in range(6):
        optimizer.step()
        scheduler.step()
        after_eval(scheduler, optimizer, t, {"loss": 1.0})
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.5, 0.25])


def test_a_run_with_no_eval_before_its_last_step_is_warned_that_the_plateau_and_early_stopping_never_act(
        make_config, caplog):
    """(eval_every's default, 200, in a 4-step run: the one eval is the end's, after which nothing is left)"""
    train = {"max_steps": 4, "lr_scheduler": "reduce_lr_on_plateau", "best_metric": "loss",
             "early_stopping_patience": 2, "eval_every": 200}
    path = make_config("causal_lm", n=32, train=train)
    setup(load_config(path))
    assert "train.early_stopping_patience and lr_scheduler: reduce_lr_on_plateau: this run's 4 step(s) have no " \
           "eval before the last (train.eval_every 200), so they never act" in caplog.text
    caplog.clear()
    path = make_config("causal_lm", n=32, train={**train, "eval_every": 2})
    setup(load_config(path), overwrite=True)
    assert "never act" not in caplog.text


def test_a_plateau_resumed_under_another_schedule_and_back_counts_anew(make_config, tmp_path):
    """plateau (a drop at 3) -> linear from step 4 -> plateau again from step 6: the plateau's counters did not
    ride along in the linear schedule's state (its rate is the peak again, its first eval the best)."""
    train = {"global_batch_size": 8, "micro_batch_size": 8, "max_steps": 4, "save_every": 2, "log_every": 1,
             "learning_rate": 1e-9, "lr_scheduler": "reduce_lr_on_plateau", "plateau_factor": 0.5,
             "plateau_patience": 1, "warmup_steps": 0, "eval_every": 1}
    path = make_config("causal_lm", n=32, train=train)
    run, _ = setup(load_config(path))
    assert fit(run, StopFlag()) == "done"
    for scheduler, steps in (("linear", 6), ("reduce_lr_on_plateau", 8)):
        raw = yaml.safe_load(path.read_text())
        raw["train"].update(lr_scheduler=scheduler, max_steps=steps)
        if scheduler == "linear":
            for key in ("plateau_factor", "plateau_patience"):
                raw["train"].pop(key)
        path.write_text(yaml.safe_dump(raw))
        run, _ = setup(load_config(path), resume="auto", allow_config_change=True)
        assert fit(run, StopFlag()) == "done"
    state = run.scheduler.lr_lambdas[0]
    assert (state.drops, state.bad_evals) == (0, 1)  # (evals 7 and 8: the best, then one no better)
