"""What a run prints: a plain progress line per interval off a terminal, and a line instead of
transformers' weight-loading table (the new head) or a warning where base weights really are missing."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
import types

import pytest
from safetensors.torch import load_file, save_file

from scaletune.config import load_config
from scaletune.model import load_model, load_tokenizer
from scaletune.tasks import get_task
from scaletune.tracking import MetricsLog


def test_progress_off_a_terminal_is_one_plain_line_per_interval(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALETUNE_NO_PROGRESS", "0")
    err = io.StringIO()  # not a TTY, as a Slurm .out file or `| tee` is
    monkeypatch.setattr("sys.stderr", err)
    acc = types.SimpleNamespace(is_main_process=True, trackers=[])
    clock = [1000.0]
    monkeypatch.setattr("scaletune.tracking.time", types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    mlog = MetricsLog(acc, tmp_path, total_steps=20, start_step=0)
    clock[0] += 75  # 10 steps in 75 s: the 10 left take as long (a log has no bar to show an ETA)
    mlog.progress(10, {"loss": 1.23456, "tok/s": 900})
    clock[0] += 4000
    mlog.progress(20, {"loss": 0.5, "tok/s": 950})
    mlog.close()
    assert mlog.bar is None and "\r" not in err.getvalue()
    assert err.getvalue().splitlines() == ["step 10/20 loss=1.235 tok/s=900 elapsed=1m15s eta=1m15s",
                                           "step 20/20 loss=0.5 tok/s=950 elapsed=1h07m55s eta=0s"]
    # a resumed run's pace is from its own first step, not from step 0
    err.truncate(0)
    err.seek(0)
    mlog = MetricsLog(acc, tmp_path, total_steps=20, start_step=15)
    clock[0] += 10
    mlog.progress(16, {"loss": 0.5})
    assert err.getvalue() == "step 16/20 loss=0.5 elapsed=10s eta=40s\n"


def test_a_run_starts_by_saying_what_it_trains_for_how_long_and_where(make_config, tmp_path, caplog):
    """Only the step lines followed the data's: no word of the parameters trained, the epochs the steps make
    or where the adapter goes."""
    from scaletune.cli import main

    path = make_config("seq_cls", n=40, train={"max_steps": 3, "global_batch_size": 8, "micro_batch_size": 4})
    with caplog.at_level("INFO", logger="scaletune"):
        assert main(["train", str(path)]) == 0
    facts = json.loads((tmp_path / "run" / "run.json").read_text())
    trainable, total = facts["trainable_params"], facts["total_params"]
    assert (f"training seq_cls with lora on {facts['config']['model']['name_or_path']}: {trainable:,} of {total:,} "
            f"parameters trainable ({100 * trainable / total:.2g}%); 40 training examples, 16 for eval; 3 steps of "
            f"8 examples = 4 x 2 accumulation (0.6 epochs); writing to {tmp_path / 'run'}") in caplog.text


def test_the_run_summary_counts_epochs_ranks_and_a_missing_eval_set():
    from scaletune.tracking import run_summary

    cfg = types.SimpleNamespace(task="causal_lm", peft_method="lora",
                                model=types.SimpleNamespace(name_or_path="m"), output_dir="out",
                                train=types.SimpleNamespace(global_batch_size=64, micro_batch_size=8))
    facts = {"trainable_params": 1000, "total_params": 1_000_000, "train_examples": 6400, "eval_examples": 0,
             "total_steps": 100, "steps_per_epoch": 100, "grad_accum": 2, "world_size": 4}
    assert run_summary(cfg, facts) == ("training causal_lm with lora on m: 1,000 of 1,000,000 parameters trainable "
                                       "(0.1%); 6,400 training examples, no eval set; 100 steps of 64 examples = 8 x 2 "
                                       "accumulation x 4 ranks (1 epoch); writing to out")


def _load(cfg, caplog):
    task = get_task(cfg.task)
    tok = load_tokenizer(cfg)
    with caplog.at_level("INFO"):
        load_model(cfg, task, ["neg", "pos"], tok, total_steps=10)
    return caplog.text


def test_new_head_is_one_line_not_a_load_report(make_config, caplog):
    cfg = load_config(make_config("seq_cls"))
    text = _load(cfg, caplog)
    assert "LOAD REPORT" not in text
    assert "new task head (classifier.bias, classifier.weight) starts from random weights" in text
    assert "not in the checkpoint" not in text


def test_a_resume_does_not_announce_a_random_head(make_config, tmp_path, caplog):
    """The head's weights come from the checkpoint: 'starts from random weights' alarmed a user."""
    from scaletune.cli import main

    path = make_config("seq_cls", n=16, train={"max_steps": 2, "save_every": 1})
    assert main(["train", str(path), "train.max_steps=1"]) == 0
    caplog.clear()
    with caplog.at_level("INFO", logger="scaletune"):
        assert main(["train", str(path), "--resume", "auto"]) == 0
    assert "new task head (classifier.bias, classifier.weight) comes from the checkpoint resumed" in caplog.text
    assert "random" not in caplog.text


def test_base_weights_missing_from_the_checkpoint_are_a_warning(make_config, tiny_bert, tmp_path, caplog):
    damaged = tmp_path / "bert"
    shutil.copytree(tiny_bert, damaged)
    weights = load_file(damaged / "model.safetensors")
    dropped = next(k for k in sorted(weights) if "encoder.layer.0.output.dense.weight" in k)
    del weights[dropped]
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    cfg = load_config(make_config("seq_cls"), [f"model.name_or_path={damaged}"])
    text = _load(cfg, caplog)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "scaletune"]
    assert any("1 weight(s) are not in the checkpoint and start from random weights" in w
               and "encoder.layer.0.output.dense.weight" in w for w in warnings), text
    assert "LOAD REPORT" not in text


def test_checkpoint_weights_the_task_does_not_use_are_a_note(make_config, tiny_bert, tmp_path, caplog):
    """Weights the task does not use are a note (info), not a warning at every train / predict; a pretraining
    head (BERT's pooler under a token classifier, its MLM head) is always left so: not even a line (a real-data
    user took "pooler.dense... not used" at every NER predict for a problem)."""
    import torch

    for extra_key, level in (("cls.predictions.extra.weight", "DEBUG"), ("pooler.extra.weight", "DEBUG"),
                             ("encoder.extra.weight", "INFO")):
        extra = tmp_path / extra_key
        shutil.copytree(tiny_bert, extra)
        weights = load_file(extra / "model.safetensors")
        weights[extra_key] = torch.zeros(2, 2)
        save_file(weights, extra / "model.safetensors", metadata={"format": "pt"})
        cfg = load_config(make_config("seq_cls"), [f"model.name_or_path={extra}"])
        caplog.clear()
        with caplog.at_level("DEBUG"):
            load_model(cfg, get_task(cfg.task), ["neg", "pos"], load_tokenizer(cfg), total_steps=10)
        notes = [(r.levelname, r.getMessage()) for r in caplog.records
                 if "not used by this model class" in r.getMessage()]
        assert len(notes) == 1 and notes[0][0] == level and extra_key in notes[0][1], notes


def test_trackers_get_the_whole_config_and_write_inside_output_dir(tmp_path, monkeypatch, caplog):
    """Trackers got two hyper-parameters (task, lr); W&B and MLflow wrote to ./wandb and ./mlruns of
    whatever directory the run was started from. The config goes flat (TensorBoard's hparams take only
    scalars); W&B and MLflow are pointed into output_dir unless the user set their own place."""
    from types import SimpleNamespace

    from scaletune.config import from_dict
    from scaletune.tracking import start_trackers, write_run_json

    calls = {}

    class WandB:  # accelerate's W&B tracker, recorded (wandb is not installed here)
        name = "wandb"

        def __init__(self, project, **kwargs):
            calls["wandb"] = {"project": project, **kwargs}

        def start(self):
            pass

        def store_init_configuration(self, config):
            calls["wandb_config"] = config

    monkeypatch.setattr("accelerate.tracking.WandBTracker", WandB)
    fake = SimpleNamespace(is_main_process=True, trackers=[], init_trackers=lambda name, config, init_kwargs:
                           calls.update(name=name, config=config, init_kwargs=init_kwargs))
    cfg = from_dict({"task": "causal_lm", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
                     "train": {"report_to": ["tensorboard", "wandb", "mlflow"], "learning_rate": 3e-4}})
    for var in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME",
                "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    start_trackers(SimpleNamespace(is_main_process=False, init_trackers=lambda *a, **k: None), cfg, out)
    assert not out.exists()  # only the rank that logs makes MLflow's store
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    start_trackers(fake, cfg, out)
    config = calls["config"]
    assert config["train.learning_rate"] == 3e-4 and config["peft.method"] == "lora"
    assert config["data.eval"] == "null" and config["train.report_to"] == '["tensorboard", "wandb", "mlflow"]'
    assert all(isinstance(v, (bool, int, float, str)) for v in config.values())
    assert calls["wandb"]["dir"] == str(out) and "wandb" not in calls["init_kwargs"]
    # W&B under a project of its own (accelerate's project name is TensorBoard's directory): the user's
    assert calls["wandb"]["project"] == "scaletune" and calls["wandb"]["name"] == "run"
    assert calls["wandb_config"] == config
    assert os.environ["WANDB_MODE"] == "offline"  # no API key: log locally instead of failing the run
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{(out / 'mlruns' / 'mlflow.db').resolve()}"
    assert (out / "mlruns").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mine"))
    start_trackers(fake, cfg, out)
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    assert calls["wandb"]["dir"] == str(tmp_path / "mine")
    assert calls["init_kwargs"]["mlflow"]["run_name"] == "run"  # not MLflow's seeded random name
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # (a resume asks the store for its run: not an unreachable host)
    # W&B: one run across resumes, not a new one per start (the id comes from run.json's first start)
    (out / "run.json").write_text(json.dumps({"started": "2026-12-04T06:00:00+0000"}))
    start_trackers(fake, cfg, out, start_step=0)
    first = calls["wandb"]
    start_trackers(fake, cfg, out, start_step=6)
    assert calls["wandb"]["id"] == first["id"] and first["resume"] == "allow"
    # TensorBoard drops what an earlier attempt logged past the step this start resumes from
    assert calls["init_kwargs"]["tensorboard"] == {"purge_step": 7}
    (out / "run.json").write_text(json.dumps({"started": "2026-12-05T06:00:00+0000"}))  # another run there
    start_trackers(fake, cfg, out)
    assert calls["wandb"]["id"] != first["id"]
    monkeypatch.setenv("WANDB_PROJECT", "sentiment")
    monkeypatch.setenv("WANDB_NAME", "lora-r8")
    (out / "run.json").write_text(json.dumps({"started": "2026-12-06T06:00:00+0000"}))  # a new run
    start_trackers(fake, cfg, out)
    assert calls["wandb"]["project"] == "sentiment" and calls["wandb"]["name"] == "lora-r8"
    assert calls["name"] == "scaletune"  # (TensorBoard's directory stays output_dir/scaletune)
    # a resume goes on in the project its W&B run is in (recorded at the first start), whatever WANDB_PROJECT
    # says now (a requeued job's environment): under another project W&B opened a second run, splitting it
    assert json.loads((out / "run.json").read_text())["wandb_project"] == "sentiment"
    monkeypatch.setenv("WANDB_PROJECT", "other")
    with caplog.at_level(logging.WARNING, logger="scaletune"):
        start_trackers(fake, cfg, out, start_step=6)
    assert calls["wandb"]["project"] == "sentiment" and "goes on in project 'sentiment'" in caplog.text
    write_run_json(out, cfg, {"resumed_from": "checkpoints/step-6"})  # the resume's run.json keeps it
    assert json.loads((out / "run.json").read_text())["wandb_project"] == "sentiment"


@pytest.mark.parametrize("columns", [120, 0])
def test_on_a_terminal_the_run_ends_with_where_its_outputs_are(make_config, tmp_path, columns):
    """The bar used to be drawn again below the closing line, so the screen ended on the bar, not on where
    the adapter went; that line names the other outputs too. A terminal of no width (one nobody sized)
    gets the plain step lines: tqdm drew nothing there, not even a step count."""
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from stutil import child_env

    path = make_config("causal_lm", n=16, train={"max_steps": 2, "report_to": ["tensorboard"]})
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24 if columns else 0, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "scaletune", "train", str(path)], stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=follower, env=child_env(SCALETUNE_NO_PROGRESS="0"))
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=300) == 0
    screen = [line.rsplit("\r", 1)[-1] for line in b"".join(chunks).decode().replace("\r\n", "\n").split("\n")]
    screen = [line for line in screen if line.strip()]
    run = tmp_path / "run"
    progress = "train:" if columns else "step 2/2 loss="  # a bar, or a plain line
    assert any(line.startswith(progress) for line in screen), screen
    assert screen[-5] == (f"adapter (step 2) saved to {run / 'adapter'}; checkpoints in {run / 'checkpoints'}, "
                          f"metrics in {run / 'metrics.jsonl'}, TensorBoard logs in {run / 'scaletune'}")
    assert screen[-4:] == ["next:", f"  scaletune eval {run}  # scores the adapter",
                           f"  scaletune predict {run} --input FILE  # applies it", f"  scaletune report {run}  # plots the run"]


def test_tokenising_and_eval_progress_draw_no_bar_on_a_terminal_of_no_width(monkeypatch):
    """tqdm draws nothing at zero columns or zero rows: such a terminal gets the plain lines, as training's
    progress does."""
    import fcntl
    import pty
    import struct
    import termios

    from scaletune.progress import Progress

    monkeypatch.setenv("SCALETUNE_NO_PROGRESS", "0")
    leader, follower = pty.openpty()
    try:
        with open(follower, "w", closefd=False) as term:
            monkeypatch.setattr("sys.stderr", term)
            # (a width but no rows, as `script` opens: tqdm hid its bar as below the screen)
            for rows, columns, bar in ((24, 80, True), (0, 0, False), (0, 80, False)):
                fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
                progress = Progress(10, "tokenising", "examples")
                assert (progress.bar is not None) is bar, (rows, columns)
                progress.close()
    finally:
        os.close(follower)
        os.close(leader)


def test_the_wandb_project_of_a_run_json_that_is_no_object_is_the_asked_one(tmp_path, monkeypatch):
    """A run.json that is not an object (damaged, hand-edited) records no project: the run logs to
    $WANDB_PROJECT (else "scaletune") instead of failing at the trackers' start."""
    from scaletune.tracking import _wandb_place

    (tmp_path / "run.json").write_text("[1, 2]")
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "sentiment")
    assert _wandb_place(tmp_path) == ("sentiment", None)
    monkeypatch.delenv("WANDB_PROJECT")
    assert _wandb_place(tmp_path) == ("scaletune", None)


def test_a_run_json_from_before_entities_were_recorded_keeps_the_asked_entity(tmp_path, monkeypatch, caplog):
    """A run.json that records the project but no entity key (written before WANDB_ENTITY was recorded) says
    nothing of where the run started: the resume logs under $WANDB_ENTITY as it did, unwarned, and W&B still
    sees that variable (read as "started under the default entity", it was dropped from the environment)."""
    from scaletune.tracking import _wandb_place

    (tmp_path / "run.json").write_text(json.dumps({"wandb_project": "sentiment"}))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("WANDB_ENTITY", "team-a")
    with caplog.at_level(logging.WARNING, logger="scaletune"):
        assert _wandb_place(tmp_path) == ("sentiment", "team-a")
    assert "goes on in entity" not in caplog.text
    assert os.environ.get("WANDB_ENTITY") == "team-a"


@pytest.mark.parametrize("first", ["team-a", None])
def test_a_resume_logs_to_the_wandb_entity_its_run_started_under(tmp_path, monkeypatch, caplog, first):
    """WANDB_ENTITY, like WANDB_PROJECT, is kept from the run's first start: a requeued job whose environment
    names another entity (or none, or one the first start did not have) opened a second W&B run there."""
    from scaletune.config import from_dict
    from scaletune.tracking import _wandb_place, write_run_json

    cfg = from_dict({"task": "causal_lm", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}})
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    if first:
        monkeypatch.setenv("WANDB_ENTITY", first)
    else:
        monkeypatch.delenv("WANDB_ENTITY", raising=False)
    write_run_json(tmp_path, cfg, {})
    assert _wandb_place(tmp_path) == ("scaletune", first)
    write_run_json(tmp_path, cfg, {"resumed_from": "checkpoints/step-6"})  # the resume's run.json keeps it
    assert json.loads((tmp_path / "run.json").read_text())["wandb_entity"] == first
    for now in ("team-b", None):
        if now:
            monkeypatch.setenv("WANDB_ENTITY", now)
        else:
            monkeypatch.delenv("WANDB_ENTITY", raising=False)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="scaletune"):
            assert _wandb_place(tmp_path) == ("scaletune", first)
        assert ("goes on in entity" in caplog.text) == (now != first)
        # W&B reads WANDB_ENTITY itself: a run that started under the default entity must not see one now
        assert os.environ.get("WANDB_ENTITY") == (now if first else None)
