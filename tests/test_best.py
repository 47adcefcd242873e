"""train.best_metric and early stopping (scaletune/best.py): best_adapter/ holds the best eval's weights,
the run stops after `patience` evals without a better one and is complete at that step, a resumed run
picks and stops as the uninterrupted one, and bad combinations are refused up front."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file

import scaletune.loop as loop
from scaletune.cli import main
from scaletune.config import EVAL_METRICS, load_config
from scaletune.stopflag import StopFlag
from scaletune.train import setup

from stutil import StopAt, read_metrics

# the accuracy each eval "measures" (steps 1..): best at step 2, then 3 evals without a better one
SCRIPT = [0.5, 0.7, 0.6, 0.7, 0.65, 0.9, 0.9, 0.9]


@pytest.fixture
def scripted(monkeypatch):
    """Real evals whose accuracy follows SCRIPT by step, so where the best falls is known."""
    real = loop.evaluate

    def evaluate(acc, model, *args, **kwargs):
        metrics = real(acc, model, *args, **kwargs)
        return {**metrics, "accuracy": SCRIPT[current[0].step - 1]}

    monkeypatch.setattr(loop, "evaluate", evaluate)
    return evaluate


def _config(make_config, tmp_path, name="run", **train):
    return make_config("seq_cls", output_dir=str(tmp_path / name),
                       train={"max_steps": 8, "eval_every": 1, "save_every": 1, "save_total_limit": None,
                              "best_metric": "accuracy", "early_stopping_patience": 3, **train})


def _record(best: dict) -> dict:
    """A best record without its id (random: it tells two paths' bests of one step and value apart) and what
    it was scored over (the eval file's real path here)."""
    assert len(best.pop("id")) == 16 and best.pop("over").startswith("data.eval /") and len(best.pop("contents")) == 16
    return best


def _adapter(directory):
    return load_file(str(directory / "adapter_model.safetensors"))


def _fit(path, stop=None, resume=None, **overrides):
    cfg = load_config(path)
    for key, value in overrides.items():  # a resume-time change (--allow-config-change)
        setattr(cfg.train, key, value)
    run, _ = setup(cfg, resume=resume, allow_config_change=bool(overrides))
    current[0] = run
    return run, loop.fit(run, stop(run) if stop else StopFlag())


current: list = [None]  # the run being trained: the scripted evals read its step


def test_best_adapter_is_the_best_evals_and_the_run_stops_early(make_config, tmp_path, scripted, capsys,
                                                                caplog):
    path = _config(make_config, tmp_path)
    run, result = _fit(path)
    out = run.output_dir
    assert result == "done" and run.step == 5  # evals 3, 4 and 5 did not beat step 2's 0.7
    assert [r["step"] for r in read_metrics(out, "best")] == [1, 2]
    (stop,) = read_metrics(out, "early_stop")
    assert (stop["step"], stop["evals_without_better"], stop["best_step"]) == (5, 3, 2)
    assert not (out / "checkpoints" / "step-6").exists()
    best, snapshot = _adapter(out / "best_adapter"), _adapter(out / "checkpoints" / "step-2" / "adapter")
    assert best.keys() == snapshot.keys()
    for name, w in snapshot.items():
        assert torch.equal(best[name], w), name
    final = _adapter(out / "adapter")
    assert any(not torch.equal(final[n], w) for n, w in snapshot.items())  # adapter/ is the last step's
    meta = json.loads((out / "best_adapter" / "scaletune.json").read_text())
    assert _record(meta["best"]) == {"metric": "accuracy", "value": 0.7, "step": 2} and meta["task"] == "seq_cls"
    # complete: a resume trains no further
    capsys.readouterr()
    assert main(["train", str(path), "--resume", "auto"]) == 0
    # (and says what continues it: a user who raised max_steps or epochs got no hint)
    assert ("run already complete (5/8 steps, stopped early: train.early_stopping_patience=null, or a larger one, "
            "continues it)") in capsys.readouterr().out
    # a longer run stays stopped early: no word of the lr a step it does not train would have had
    with caplog.at_level(logging.WARNING, logger="scaletune"):
        assert main(["train", str(path), "--resume", "auto", "train.max_steps=16"]) == 0
    assert "run already complete (5/16 steps, stopped early" in capsys.readouterr().out
    assert "trains at lr" not in caplog.text, caplog.text
    assert max(r["step"] for r in read_metrics(out)) == 5
    # the best adapter evaluates like any adapter
    assert main(["eval", str(path), "--adapter", str(out / "best_adapter")]) == 0
    # without --adapter eval scores the last step's, and says where the best eval's is
    with caplog.at_level(logging.INFO, logger="scaletune"):
        assert main(["eval", str(path)]) == 0
    assert (f"the best eval's (step 2, accuracy 0.7) is {out / 'best_adapter'}: --adapter {out / 'best_adapter'}"
            in caplog.text), caplog.text


def test_a_preempted_run_resumes_to_the_same_best_and_stop(make_config, tmp_path, scripted):
    whole, _ = _fit(_config(make_config, tmp_path, "whole"))
    path = _config(make_config, tmp_path, "cut")
    run, result = _fit(path, stop=lambda run: StopAt(run, 3))
    assert result == "preempted" and run.step == 3
    run, result = _fit(path, resume="auto")
    assert result == "done" and run.step == whole.step == 5
    assert read_metrics(run.output_dir, "early_stop")[-1]["best_step"] == 2
    for name in ("best_adapter", "adapter"):
        want, have = _adapter(whole.output_dir / name), _adapter(run.output_dir / name)
        for key, w in want.items():
            assert torch.equal(have[key], w), (name, key)


def test_an_early_stop_between_two_logs_logs_its_last_steps(make_config, tmp_path, scripted, capsys, monkeypatch):
    """The run ends at step 5, a step log_every 4 would not log: its train record is written all the same, the
    mean of step 5 alone (step 4 logged 1-4), and the console's last step line has no time left to show."""
    each, _ = _fit(_config(make_config, tmp_path, "each", log_every=1))
    monkeypatch.setenv("SCALETUNE_NO_PROGRESS", "0")  # (captured stderr is no terminal: a line per log)
    run, result = _fit(_config(make_config, tmp_path, "four", log_every=4))
    assert result == "done" and run.step == 5
    logged = {r["step"]: r for r in read_metrics(run.output_dir, "train")}
    every = {r["step"]: r for r in read_metrics(each.output_dir, "train")}
    assert sorted(logged) == [4, 5]
    assert logged[5]["loss"] == pytest.approx(every[5]["loss"], rel=1e-6)
    assert logged[4]["loss"] == pytest.approx(sum(every[s]["loss"] for s in range(1, 5)) / 4, rel=1e-6)
    assert logged[5]["lr"] == every[5]["lr"] and logged[5]["grad_norm"] == pytest.approx(every[5]["grad_norm"])
    last = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step 5/8 ")]
    assert last and "eta=" not in last[-1], last


def test_best_metric_and_early_stopping_problems_are_reported_together(make_config, capsys):
    path = make_config("seq_cls", data={"eval": None},
                       train={"best_metric": "f1", "early_stopping_patience": 0, "eval_every": None,
                              "early_stopping_threshold": -1})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    for wanted in ("train.best_metric: 'f1' is not a seq_cls eval metric (loss | accuracy | macro_f1 | micro_f1)",
                   "train.best_metric: there is no eval data to pick the best adapter by",
                   "train.early_stopping_patience: must be >= 1", "train.early_stopping_patience: needs "
                   "train.eval_every", "train.early_stopping_threshold: must be >= 0"):
        assert wanted in err, wanted
    path = make_config("seq_cls", train={"early_stopping_patience": 2})
    assert main(["train", str(path)]) == 2
    assert "train.early_stopping_patience: needs train.best_metric" in capsys.readouterr().err


def test_the_metrics_best_metric_may_name_are_the_tasks_eval_metrics():
    from types import SimpleNamespace

    from scaletune.generation_metrics import score
    from scaletune.tasks import get_task

    reported = {"causal_lm": get_task("causal_lm").metrics([], 2.0, 4, None),
                "seq_cls": get_task("seq_cls").metrics([(0, 0), (1, 0)], 1.0, 2, ["a", "b"]),
                "token_cls": get_task("token_cls").metrics([([0, 1], [0, 1], [])], 1.0, 2, ["O", "B-X"]),
                "seq_regression": get_task("seq_regression").metrics([(0.5, 1.0), (2.0, 3.0)], 1.25, 2, None),
                "dpo": get_task("dpo").metrics([[0.5, -0.5], [0.25, 1.0]], 1.2, 2, None),
                "kto": get_task("kto").metrics([[0.5, 1.0, 0.1], [-0.25, 0.0, 0.1]], 0.8, 2, None),
                "reward": get_task("reward").metrics([(0.5, -0.5), (0.25, 1.0)], 1.2, 2, None)}
    # (causal_lm's exact_match and token_f1 are those of its generated answers: train.eval_generate)
    nobody = SimpleNamespace(process_index=0, num_processes=1, is_main_process=False)
    reported["causal_lm"].update(score(nobody, None, None, [], 4)[0])
    for task, names in EVAL_METRICS.items():
        assert set(names) <= set(reported[task]), task
        assert all(isinstance(reported[task][n], float) for n in names), task


def test_the_threshold_is_patiences_alone(make_config, tmp_path, scripted, monkeypatch):
    """Every better eval is the best adapter; only patience asks for a margin (HF's early stopping): evals
    0.5, 0.52, 0.53 with threshold 0.05 and patience 2 keep step 3's adapter and stop there."""
    import sys

    monkeypatch.setattr(sys.modules[__name__], "SCRIPT", [0.5, 0.52, 0.53, 0.9, 0.9, 0.9, 0.9, 0.9])
    run, result = _fit(_config(make_config, tmp_path, early_stopping_patience=2, early_stopping_threshold=0.05))
    assert result == "done" and run.step == 3
    assert [r["step"] for r in read_metrics(run.output_dir, "best")] == [1, 2, 3]
    assert json.loads((run.output_dir / "best_adapter" / "scaletune.json").read_text())["best"]["step"] == 3


def test_a_lost_best_adapter_is_restored_from_its_checkpoint_on_resume(make_config, tmp_path, scripted, capsys):
    import shutil

    whole, _ = _fit(_config(make_config, tmp_path, "whole"))
    path = _config(make_config, tmp_path, "cut")
    run, result = _fit(path, stop=lambda run: StopAt(run, 3))
    assert result == "preempted"
    shutil.rmtree(run.output_dir / "best_adapter")  # (a cleanup script, a disk that filled while writing it)
    capsys.readouterr()
    run, result = _fit(path, resume="auto")
    assert result == "done"
    assert (f"{run.output_dir / 'best_adapter'}: restored from "
            f"{run.output_dir / 'checkpoints' / 'step-2'}") in capsys.readouterr().out
    want, have = _adapter(whole.output_dir / "best_adapter"), _adapter(run.output_dir / "best_adapter")
    for key, w in want.items():
        assert torch.equal(have[key], w), key
    meta = json.loads((run.output_dir / "best_adapter" / "scaletune.json").read_text())
    assert _record(meta["best"]) == {"metric": "accuracy", "value": 0.7, "step": 2}


def test_a_lost_best_adapter_without_its_checkpoint_is_said(make_config, tmp_path, scripted, capsys):
    import shutil

    path = _config(make_config, tmp_path, "gone")
    run, result = _fit(path, stop=lambda run: StopAt(run, 3))
    shutil.rmtree(run.output_dir / "best_adapter")
    shutil.rmtree(run.output_dir / "checkpoints" / "step-2")
    capsys.readouterr()
    run, result = _fit(path, resume="auto")
    out = capsys.readouterr().out
    assert f"warning: {run.output_dir / 'best_adapter'} is missing, and no kept checkpoint holds the best eval's " \
           "adapter (step 2)" in out
    stop = [line for line in out.splitlines() if "stopping early" in line]
    assert stop and "its adapter is in" not in stop[0]  # no pointer to a directory that is not there


def test_resuming_an_older_checkpoint_sets_the_later_best_aside(make_config, tmp_path, scripted, monkeypatch):
    """--resume of a checkpoint before a later best (another path from there): that best_adapter/ is moved
    aside with the later checkpoints' kind, and the path's own best is restored from its checkpoint."""
    import sys

    monkeypatch.setattr(sys.modules[__name__], "SCRIPT", [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.96, 0.97])
    path = _config(make_config, tmp_path, early_stopping_patience=None, max_steps=4)
    run, _ = _fit(path)
    assert json.loads((run.output_dir / "best_adapter" / "scaletune.json").read_text())["best"]["step"] == 4
    run, _ = _fit(path, resume=str(run.output_dir / "checkpoints" / "step-2"))  # another path from step 2
    # (that path's evals, 0.7 and 0.8 again, are better than its best 0.6: written anew as they come)
    assert json.loads((run.output_dir / "best_adapter" / "scaletune.json").read_text())["best"]["step"] == 4
    aside = list((run.output_dir / ".abandoned").glob("best_adapter-step4-*"))
    assert len(aside) == 1 and (aside[0] / "adapter_model.safetensors").is_file()


def test_an_early_stopped_run_continues_when_early_stopping_is_relaxed(make_config, tmp_path, scripted, capsys):
    path = _config(make_config, tmp_path)
    run, _ = _fit(path)
    assert run.step == 5
    assert main(["report", str(run.output_dir)]) == 0
    out = capsys.readouterr().out
    assert "stopped early at step 5: 3 evals without a better value (best at step 2)" in out and "incomplete" not in out
    assert main(["train", str(path), "--resume", "auto", "train.early_stopping_patience=null"]) == 0
    out = capsys.readouterr().out
    assert "continuing the run that stopped early at step 5: train.early_stopping_patience is now null" in out
    assert max(r["step"] for r in read_metrics(run.output_dir)) == 8
    assert main(["report", str(run.output_dir)]) == 0
    assert "stopped early" not in capsys.readouterr().out  # the resume went past that stop


def test_resuming_a_checkpoint_of_a_left_path_restores_that_paths_best(make_config, tmp_path, scripted,
                                                                       monkeypatch, capsys):
    """Two paths each wrote a best at step 4: going back onto the first (its checkpoint in
    checkpoints/.abandoned-*/) tells them apart by value and restores the first path's own best adapter."""
    import sys

    module = sys.modules[__name__]
    first, second = [0.5, 0.6, 0.7, 0.8, 0.6], [0.5, 0.6, 0.75, 0.85, 0.6]
    monkeypatch.setattr(module, "SCRIPT", first)
    path = _config(make_config, tmp_path, early_stopping_patience=None, max_steps=5)
    run, _ = _fit(path)
    out = run.output_dir
    monkeypatch.setattr(module, "SCRIPT", second)
    _fit(path, resume=str(out / "checkpoints" / "step-2"))
    assert json.loads((out / "best_adapter" / "scaletune.json").read_text())["best"]["value"] == 0.85
    kept = next((out / ".abandoned").glob("best_adapter-step4-*"))  # the first path's best, set aside
    left = next((out / "checkpoints").glob(".abandoned-*"))
    monkeypatch.setattr(module, "SCRIPT", first)
    capsys.readouterr()
    _fit(path, resume=str(left / "step-4"))
    log = capsys.readouterr().out
    assert f"{out / 'best_adapter'}: restored from {left / 'step-4'}" in log
    assert _record(json.loads((out / "best_adapter" / "scaletune.json").read_text())["best"]) == {
        "metric": "accuracy", "value": 0.8, "step": 4}
    want, have = _adapter(kept), _adapter(out / "best_adapter")
    assert all(torch.equal(have[k], w) for k, w in want.items())
    assert len(list((out / ".abandoned").glob("best_adapter-step4-*"))) == 2  # the second path's, kept too


def test_best_metric_turned_off_on_an_older_checkpoint_sets_the_later_best_aside(make_config, tmp_path, scripted,
                                                                                 monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys.modules[__name__], "SCRIPT", [0.5, 0.6, 0.7, 0.8])
    run, _ = _fit(_config(make_config, tmp_path, early_stopping_patience=None, max_steps=4))
    out = run.output_dir
    capsys.readouterr()
    path = _config(make_config, tmp_path, early_stopping_patience=None, max_steps=4, best_metric=None)
    assert main(["train", str(path), "--resume", str(out / "checkpoints" / "step-2")]) == 0
    log = capsys.readouterr().out
    assert not (out / "best_adapter").exists()
    aside = list((out / ".abandoned").glob("best_adapter-step4-*"))
    assert len(aside) == 1 and f"moved to {aside[0]}" in log
    assert "the path this run continues did not write it" in log


def test_a_best_adapter_that_says_nothing_is_named_so_and_replaced(make_config, tmp_path, scripted, capsys):
    path = _config(make_config, tmp_path)
    run, _ = _fit(path, stop=lambda run: StopAt(run, 3))
    (run.output_dir / "best_adapter" / "scaletune.json").write_text("{}")
    capsys.readouterr()
    _fit(path, resume="auto")
    log = capsys.readouterr().out
    assert "(with no record of its eval) is not this run's best so far" in log and "step None" not in log
    assert f"restored from {run.output_dir / 'checkpoints' / 'step-2'}" in log


def test_an_abandoned_file_in_the_way_is_one_error(make_config, tmp_path, scripted, capsys):
    path = _config(make_config, tmp_path)
    run, _ = _fit(path, stop=lambda run: StopAt(run, 3))
    out = run.output_dir
    (out / "best_adapter" / "scaletune.json").write_text("{}")
    (out / ".abandoned").write_text("my notes")
    latest = (out / "checkpoints" / "latest").read_text()
    capsys.readouterr()
    for resume in ("auto", str(out / "checkpoints" / "step-2")):  # (the older one would move step-3 aside)
        assert main(["train", str(path), "--resume", resume]) == 2
        err = capsys.readouterr().err
        assert f"{out / '.abandoned'} is not a directory" in err and "Traceback" not in err
    assert (out / ".abandoned").read_text() == "my notes" and (out / "best_adapter").is_dir()
    assert (out / "checkpoints" / "step-3").is_dir() and (out / "checkpoints" / "latest").read_text() == latest


def test_continuing_an_early_stop_for_another_metric_says_so(make_config, tmp_path, scripted, capsys):
    path = _config(make_config, tmp_path)
    run, _ = _fit(path)
    assert run.step == 5
    capsys.readouterr()
    assert main(["train", str(path), "--resume", "auto", "train.best_metric=macro_f1"]) == 0
    out = capsys.readouterr().out
    assert "continuing the run that stopped early at step 5: train.best_metric is now macro_f1" in out


def test_a_resume_evaluating_other_examples_picks_the_best_anew(make_config, tmp_path, scripted, capsys):
    """data.eval may change at a resume; the best so far was scored over the old examples, so it is no bar
    for the new ones: the next eval is the best, and an early stop counted on the old ones goes on. The same
    file named by another path is the same eval."""
    import shutil

    path = _config(make_config, tmp_path)
    run, _ = _fit(path)
    assert run.step == 5 and run.counters["best"]["step"] == 2
    evalf = load_config(path).data.eval
    capsys.readouterr()
    # the same file, written otherwise: nothing changes (the run stays stopped)
    same = f"{os.path.dirname(evalf)}/../{os.path.basename(os.path.dirname(evalf))}/./{os.path.basename(evalf)}"
    assert main(["train", str(path), "--resume", "auto", f"data.eval={same}"]) == 0
    out = capsys.readouterr().out
    assert "picked anew" not in out and "continuing" not in out
    other = tmp_path / "other-eval.jsonl"
    shutil.copy(evalf, other)
    assert main(["train", str(path), "--resume", "auto", f"data.eval={other}"]) == 0
    out = capsys.readouterr().out
    assert f"the best accuracy so far (0.7, step 2) was scored over data.eval {os.path.realpath(evalf)}, " \
           f"the evals now over data.eval {other}: the best adapter is picked anew from the next eval" in out, out
    assert f"continuing the run that stopped early at step 5: the evals are now over data.eval {other}" in out
    best = json.loads((tmp_path / "run" / "best_adapter" / "scaletune.json").read_text())["best"]
    # (the scripted evals of a CLI run read the last _fit's run: 0.65, below the old best 0.7, and still the best)
    assert best["step"] == 6 and best["value"] == 0.65 and best["over"] == f"data.eval {other}"


def test_a_resume_on_an_eval_file_edited_in_place_picks_the_best_anew(make_config, tmp_path, scripted, capsys):
    """The same data.eval path holding other records (appended to, fixed) scores other examples: the best so far
    is no bar, as for another path (it was kept, and no later eval could beat an incomparable value)."""
    path = _config(make_config, tmp_path)
    run, _ = _fit(path)
    assert run.step == 5 and run.counters["best"]["step"] == 2
    evalf = load_config(path).data.eval
    capsys.readouterr()
    assert main(["train", str(path), "--resume", "auto"]) == 0  # unchanged: nothing is picked anew
    assert "picked anew" not in capsys.readouterr().out
    with open(evalf, "a", encoding="utf-8") as f:
        f.write(open(evalf, encoding="utf-8").readline())
    assert main(["train", str(path), "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "the best accuracy so far (0.7, step 2) was scored over data.eval " in out, out
    assert "as it was then: data.eval has changed since, so the best adapter is picked anew" in out, out
    assert "continuing the run that stopped early at step 5: the eval examples' contents changed" in out, out
    best = json.loads((tmp_path / "run" / "best_adapter" / "scaletune.json").read_text())["best"]
    assert best["step"] == 6 and best["value"] == 0.65


def test_two_paths_bests_of_one_step_and_value_are_told_apart(make_config, tmp_path, scripted, monkeypatch, capsys):
    """Path B (from step 1, another learning rate) scores the same accuracy at step 2 as path A did, with
    other weights. Going back onto A (its step-2 checkpoint, left in checkpoints/.abandoned-*/) must not
    keep B's best_adapter/: the records' ids differ, and A's own best comes back from beside it."""
    import sys

    monkeypatch.setattr(sys.modules[__name__], "SCRIPT", [0.5, 0.9, 0.6])
    path = _config(make_config, tmp_path, early_stopping_patience=None, max_steps=3)
    run, _ = _fit(path)
    out = run.output_dir
    _fit(path, resume=str(out / "checkpoints" / "step-1"), learning_rate=0.05)
    a_best = next((out / ".abandoned").glob("best_adapter-step2-*"))  # A's, set aside when B began
    b_best = _adapter(out / "best_adapter")
    assert any(not torch.equal(b_best[k], w) for k, w in _adapter(a_best).items())  # other weights
    left = next((out / "checkpoints").glob(".abandoned-*"))
    capsys.readouterr()
    _fit(path, resume=str(left / "step-2"))
    assert f"restored from {left / 'step-2'}" in capsys.readouterr().out
    have = _adapter(out / "best_adapter")
    assert all(torch.equal(have[k], w) for k, w in _adapter(a_best).items())


def test_a_lost_best_is_restored_from_its_own_paths_checkpoint_not_the_same_steps_in_checkpoints(
        make_config, tmp_path, scripted, monkeypatch, capsys):
    """best_adapter/ lost on path A after A came back from its .abandoned-* folder: checkpoints/step-2 is path
    B's (left there), A's own step-2 is in that folder. The best is restored from A's (the record's id says
    whose), not from B's; with A's gone too, a warning says so."""
    import shutil
    import sys

    monkeypatch.setattr(sys.modules[__name__], "SCRIPT", [0.5, 0.9, 0.6, 0.6, 0.6])
    path = _config(make_config, tmp_path, early_stopping_patience=None, max_steps=5)
    run, _ = _fit(path)
    out = run.output_dir
    a_best = _adapter(out / "best_adapter")
    _fit(path, resume=str(out / "checkpoints" / "step-1"), learning_rate=0.05)  # B
    left = next((out / "checkpoints").glob(".abandoned-*"))
    _fit(path, resume=str(left / "step-3"))  # back onto A: B's step-2 stays in checkpoints/
    shutil.rmtree(out / "best_adapter")
    shutil.rmtree(out / "checkpoints" / "step-3")  # so --resume auto starts from A's step-5, best at 2
    capsys.readouterr()
    _fit(path, resume="auto")
    assert f"restored from {left / 'step-2'}" in capsys.readouterr().out
    have = _adapter(out / "best_adapter")
    assert all(torch.equal(have[k], w) for k, w in a_best.items())
    shutil.rmtree(out / "best_adapter")
    shutil.rmtree(left / "step-2")
    _fit(path, resume="auto")
    log = capsys.readouterr().out
    assert "restored from" not in log
    assert f"{out / 'best_adapter'} is missing, and no kept checkpoint holds the best eval's adapter (step 2)" in log


def test_best_metric_off_keeps_the_paths_own_best_across_resumes(make_config, tmp_path, scripted, capsys):
    path = _config(make_config, tmp_path)
    run, _ = _fit(path, stop=lambda run: StopAt(run, 3))
    out = run.output_dir
    before = _adapter(out / "best_adapter")
    off = _config(make_config, tmp_path, best_metric=None, early_stopping_patience=None)
    for stop_at in (4, 5):  # resumed twice with best_metric off
        _fit(off, stop=lambda run, at=stop_at: StopAt(run, at), resume="auto")
    capsys.readouterr()
    _fit(off, resume="auto")
    assert "moved to" not in capsys.readouterr().out
    have = _adapter(out / "best_adapter")
    assert all(torch.equal(have[k], w) for k, w in before.items())


def test_a_run_ended_at_a_mid_run_checkpoint_gets_its_end_of_run_eval(make_config, tmp_path, scripted):
    """max_steps lowered to a checkpoint's step: the resume said "run already complete" and left the best
    adapter of the evals before it, where a run of that length evaluates at its end."""
    path = _config(make_config, tmp_path, eval_every=3, save_every=2, early_stopping_patience=None)
    run, _ = _fit(path)
    assert [r["step"] for r in read_metrics(run.output_dir, "eval")] == [3, 6, 8]
    run, result = _fit(path, resume=str(run.output_dir / "checkpoints" / "step-4"), max_steps=4)
    assert result == "done" and run.step == 4
    evals = read_metrics(run.output_dir, "eval")
    assert [r["step"] for r in evals][-1] == 4 and evals[-1]["accuracy"] == SCRIPT[3]
    assert _record(json.loads((run.output_dir / "best_adapter" / "scaletune.json").read_text())["best"]) == \
        {"metric": "accuracy", "value": SCRIPT[3], "step": 4}


def test_a_nan_eval_is_never_the_best(make_config, tmp_path, scripted, monkeypatch):
    """An eval that measured NaN (a diverged step) is no best, though it is the first: the first finite eval
    is, and a NaN best would stay the best for the whole run (no value compares better than NaN)."""
    import sys

    monkeypatch.setattr(sys.modules[__name__], "SCRIPT", [float("nan"), 0.6, 0.5])
    run, result = _fit(_config(make_config, tmp_path, max_steps=3))
    assert result == "done"
    assert [r["step"] for r in read_metrics(run.output_dir, "best")] == [2]
    assert json.loads((run.output_dir / "best_adapter" / "scaletune.json").read_text())["best"]["value"] == 0.6


def test_a_resume_with_another_max_samples_picks_the_best_anew(make_config, tmp_path, scripted, capsys):
    """data.max_samples cuts data.eval (and the data.train the eval_fraction split holds out of) to its first N
    records: a resume that changes it (--allow-config-change) evaluates other examples, so the best so far is no
    bar (it was kept as though the evals were over the same set)."""
    path = _config(make_config, tmp_path)
    run, _ = _fit(path)
    assert run.step == 5 and run.counters["best"]["step"] == 2
    capsys.readouterr()
    assert main(["train", str(path), "--resume", "auto", "--allow-config-change", "data.max_samples=8"]) == 0
    out = capsys.readouterr().out
    assert "the best adapter is picked anew from the next eval" in out, out
    assert "(data.max_samples 8)" in out


def test_a_held_out_fraction_is_scored_over_its_source_and_seed(make_config, tmp_path):
    """eval_fraction holds out examples of data.train drawn by train.seed: a resume that changes either (with
    --allow-config-change) evaluates other examples, so its best is picked anew; the same file written
    otherwise is the same eval."""
    from scaletune.best import scored_over

    cfg = load_config(make_config("seq_cls", data={"eval": None, "eval_fraction": 0.2}))
    base = scored_over(cfg, "accuracy")
    train = cfg.data.train
    cfg.data.train = f"{os.path.dirname(train)}/./{os.path.basename(train)}"
    assert scored_over(cfg, "accuracy") == base
    cfg.train.seed = 7
    assert scored_over(cfg, "accuracy") != base
    cfg.train.seed = load_config(make_config("seq_cls")).train.seed
    cfg.data.train = str(tmp_path / "data" / "eval.jsonl")
    assert scored_over(cfg, "accuracy") != base
