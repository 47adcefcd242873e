"""Faults survived: corrupt/foreign checkpoints, full disk, non-finite loss, out of memory, a kill
half-way through a checkpoint write. Each failure ends with a clear message and nothing finished is lost."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scaletune.checkpoint import REQUIRED_FILES, checkpoint_dirs, verify
from scaletune.cli import main
from scaletune.config import load_config
from scaletune.train import oom_fixes

import forking
from stutil import free_port, read_metrics

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SCALETUNE_NO_PROGRESS": "1"}
_runs = itertools.count()


def train(path, *extra, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`scaletune train` in a process of its own (forked from tests/zygote.py: no 10 s of imports)."""
    env = dict(ENV)
    if fault:
        env["SCALETUNE_FAULT"] = fault
    log = Path(path).with_name(f"train{next(_runs)}.log")
    return forking.run(["train", str(path), *extra], env, log, timeout=timeout)


@pytest.fixture()
def cfg_path(make_config):
    return make_config("causal_lm", train={"max_steps": 6, "save_every": 2, "save_total_limit": None})


def test_kill_during_checkpoint_write_never_leaves_a_partial_latest(cfg_path, tmp_path):
    res = train(cfg_path, fault="kill-in-checkpoint@4")
    assert res.returncode == -9
    out = tmp_path / "run"
    assert (out / "checkpoints/latest").read_text().strip() == "step-2"
    assert [p.name for p in checkpoint_dirs(out)] == ["step-2"]  # the half-written step-4 is not a checkpoint
    res = train(cfg_path, "--resume", "auto")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr
    assert not list((out / "checkpoints").glob(".step-*.tmp"))  # the stale temp dir was cleaned up
    assert verify(out / "checkpoints/step-6") is None


def test_corrupt_checkpoint_is_skipped_with_a_warning(cfg_path, tmp_path, capsys, caplog):
    assert main(["train", str(cfg_path), "train.max_steps=4"]) == 0
    out = tmp_path / "run"
    victim = out / "checkpoints/step-4/trainable.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert verify(out / "checkpoints/step-4") == "file trainable.safetensors does not match its hash"
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="scaletune"):
        assert main(["train", str(cfg_path), "train.max_steps=4", "--resume", "auto"]) == 0
    out_text = "".join(capsys.readouterr())
    assert "resumed from" in out_text and "step-2" in out_text
    assert "the checkpoints after it (step-4 (damaged)) are not this run's path" in caplog.text


def test_checkpoint_of_another_config_is_refused_unless_allowed(cfg_path, capsys):
    assert main(["train", str(cfg_path), "train.max_steps=2"]) == 0
    capsys.readouterr()
    code = main(["train", str(cfg_path), "train.max_steps=4", "train.learning_rate=0.5", "--resume", "auto"])
    err = capsys.readouterr().err
    assert code == 2 and "written by a different run config" in err and "--allow-config-change" in err
    assert main(["train", str(cfg_path), "train.max_steps=4", "train.learning_rate=0.5", "--resume", "auto",
                 "--allow-config-change"]) == 0


def test_disk_full_keeps_previous_checkpoint_and_says_so(cfg_path, tmp_path):
    res = train(cfg_path, fault="enospc@4")
    assert res.returncode == 2
    assert "could not write checkpoint step 4" in res.stderr and "No space left on device" in res.stderr
    assert "previous checkpoint is intact" in res.stderr and "Traceback" not in res.stderr
    out = tmp_path / "run"
    assert [p.name for p in checkpoint_dirs(out)] == ["step-2"] and verify(out / "checkpoints/step-2") is None
    assert not list((out / "checkpoints").glob(".step-*"))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a size-limited tmpfs needs root")
def test_real_full_filesystem(make_config, tmp_path):
    """A tiny tmpfs fills up for real during a checkpoint write."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        path = make_config("causal_lm", train={"max_steps": 6, "save_every": 1, "save_total_limit": None},
                           output_dir=str(mnt / "run"))
        res = train(path)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "No space left on device" in res.stderr and "Traceback" not in res.stderr
        good = checkpoint_dirs(mnt / "run")
        assert good and all(verify(p) is None for p in good)
    finally:
        subprocess.run(["umount", str(mnt)])


def test_nonfinite_loss_stops_at_that_step_keeping_last_good_checkpoint(cfg_path, tmp_path):
    res = train(cfg_path, fault="nan@3")
    assert res.returncode == 2
    assert "non-finite loss at step 3" in res.stderr and "learning rate" in res.stderr and "fp16" in res.stderr
    out = tmp_path / "run"
    assert [p.name for p in checkpoint_dirs(out)] == ["step-2"]
    assert [r["step"] for r in read_metrics(out, "nonfinite")] == [3]
    # what the hint offers works: the same config resumed with on_nonfinite=skip (a resume-free key) goes on
    assert "--resume auto) with train.on_nonfinite=skip" in res.stderr
    res = train(cfg_path, "--resume", "auto", "train.on_nonfinite=skip", fault="nan@3")
    assert res.returncode == 0, res.stderr[-2000:]
    assert [r["step"] for r in read_metrics(out, "nonfinite")] == [3, 3]  # the stop's, then the skip's
    assert [p.name for p in checkpoint_dirs(out)][0] == "step-6"


def test_nonfinite_skip_drops_the_update_and_counts(make_config, tmp_path):
    path = make_config("causal_lm", train={"max_steps": 6, "on_nonfinite": "skip", "max_nonfinite_skips": 2})
    res = train(path, fault="nan@2,nan@4")
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "run"
    assert [r["step"] for r in read_metrics(out, "nonfinite")] == [2, 4]
    state = json.loads((out / "checkpoints/step-6/state.json").read_text())
    assert state["counters"]["nonfinite_skips"] == 2
    res = train(path, "--overwrite", fault="nan@2,nan@3,nan@4")
    assert res.returncode == 2 and "non-finite loss at step 4" in res.stderr


def test_out_of_memory_names_the_numbers_and_the_fix(cfg_path):
    res = train(cfg_path, fault="oom@3")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    err = res.stderr
    assert "out of memory at step 3 in a micro-batch of 4 x" in err
    assert "micro_batch_size=4" in err and "train.micro_batch_size=2" in err and "gradient_checkpointing" in err


@pytest.mark.parametrize(("micro", "global_", "suggested"), [
    (1, 16, None),  # nothing smaller to suggest (it was "micro_batch_size=1 ...: accumulation doubles")
    (3, 12, "train.micro_batch_size=1 (global batch stays 12: accumulation x3)"),  # (not "doubles")
    (9, 18, "train.micro_batch_size=3 (global batch stays 18: accumulation x3)"),  # 9 // 2 = 4 does not divide 18
    (6, 12, "train.micro_batch_size=3 (global batch stays 12: accumulation doubles)"),
])
def test_out_of_memory_suggests_only_a_micro_batch_the_config_allows(make_config, micro, global_, suggested):
    path = make_config("causal_lm", train={"micro_batch_size": micro, "global_batch_size": global_})
    fixes = oom_fixes(load_config(path), world_size=1)
    micro_fixes = [f for f in fixes if f.startswith("train.micro_batch_size=")]
    assert micro_fixes == ([suggested] if suggested else [])
    assert fixes[len(micro_fixes)].startswith("model.gradient_checkpointing=true")
    for fix in micro_fixes:  # the suggested value passes the config's own checks
        load_config(path, [fix.split(" ")[0]], world_size=1)
    # an eval's batch of 1 has nothing smaller to give either (no backward: no gradient checkpointing)
    evaluating = oom_fixes(load_config(path, ["train.eval_batch_size=1"]), world_size=1, evaluating=True)
    assert not any("batch_size=" in f or "gradient_checkpointing" in f for f in evaluating)


@pytest.mark.distributed
def test_disk_full_under_two_processes_stops_every_rank(make_config, tmp_path):
    """Only rank 0 writes checkpoints: when it fails, rank 1 must stop too instead of waiting forever."""
    port = free_port()
    path = make_config("causal_lm", train={"max_steps": 4, "save_every": 1, "save_total_limit": None,
                                           "micro_batch_size": 2})
    repo = Path(__file__).resolve().parents[2]
    env = {**ENV, "SCALETUNE_FAULT": "enospc@2"}
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
           str(repo / "launch" / "cpu_2proc.yaml"), "--main_process_port", str(port),
           "-m", "scaletune", "train", str(path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    text = res.stdout + res.stderr
    assert res.returncode != 0, text[-3000:]
    assert "could not write checkpoint step 2" in text and "rank 0 could not write checkpoint step 2" in text
    out = tmp_path / "run"
    assert [p.name for p in checkpoint_dirs(out)] == ["step-1"] and verify(out / "checkpoints/step-1") is None


@pytest.mark.distributed
def test_a_main_rank_failure_while_setting_up_a_resume_stops_every_rank(make_config, tmp_path):
    """Rank 0 alone copies a checkpoint from outside checkpoints/ in before resuming it. When that fails
    (here a dangling link inside it), its one-screen error must end rank 1 too, which would otherwise wait
    for it in the next collective; checkpoints/ and `latest` stay as they were."""
    path = make_config("causal_lm", train={"max_steps": 3, "save_every": 1, "save_total_limit": None,
                                           "micro_batch_size": 2})
    repo = Path(__file__).resolve().parents[2]

    def launch(*extra):
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
               str(repo / "launch" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
               "-m", "scaletune", "train", str(path), *extra]
        return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)

    assert launch().returncode == 0
    out = tmp_path / "run"
    left = out / "checkpoints" / ".abandoned-x" / "step-2"
    shutil.copytree(out / "checkpoints" / "step-2", left)
    (left / "adapter" / "broken").symlink_to(tmp_path / "gone")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    res = launch("--resume", str(left))
    text = res.stdout + res.stderr
    assert res.returncode != 0, text[-3000:]
    assert f"could not set up {out / 'checkpoints'} to resume {left}" in text and "rank 0 could not write" in text
    assert "scaletune/" not in "".join(ln for ln in res.stderr.splitlines() if ln.startswith("  File")), text[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-3"


@pytest.mark.parametrize("damage, reason", [
    (lambda mf: mf.write_bytes(b"\xff\xfe\x00garbage"), "unreadable manifest"),
    (lambda mf: mf.write_text("[]"), "malformed manifest"),
    (lambda mf: mf.write_text(json.dumps({"files": {"state.json": {}}})), "manifest lists no trainable.safetensors"),
    (lambda mf: mf.write_text(json.dumps({"files": {n: {} for n in REQUIRED_FILES}})), "does not match its hash"),
])
def test_damaged_manifest_is_a_reason_not_a_crash(tmp_path, damage, reason):
    """A manifest that is not what scaletune writes makes the checkpoint unusable (so `--resume auto`
    falls back to the one before), whatever its damage."""
    root = tmp_path / "step-1"
    root.mkdir()
    for name in REQUIRED_FILES:
        (root / name).write_text("x")
    damage(root / "manifest.json")
    assert reason in verify(root)


@pytest.mark.distributed
def test_a_stop_one_rank_hears_during_an_eval_stops_every_rank_there_and_the_resume_evaluates_first(make_config,
                                                                                                    tmp_path):
    """Rank 1 alone gets SIGUSR1 as step 2's eval begins: both ranks drop that eval together (a collective
    each eval batch: no rank left waiting in the other's forward), the step-2 checkpoint is written at once,
    and the resumed 2-process run evaluates step 2 before training on."""
    path = make_config("causal_lm", train={"max_steps": 4, "eval_every": 2, "save_every": None,
                                           "micro_batch_size": 2})
    repo = Path(__file__).resolve().parents[2]

    def launch(*extra, fault=None):
        env = {**ENV, **({"SCALETUNE_FAULT": fault} if fault else {})}
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
               str(repo / "launch" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
               "-m", "scaletune", "train", str(path), *extra]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)

    res = launch(fault="usr1-in-eval@2")
    out = tmp_path / "run"
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "at step 2 (during its eval, which the resumed run does first)" in text, text[-3000:]
    assert [r["step"] for r in read_metrics(out, "eval")] == []
    assert [(r["step"], r["signal_name"]) for r in read_metrics(out, "preempted")] == [(2, "SIGUSR1")]
    assert [p.name for p in checkpoint_dirs(out)] == ["step-2"]
    res = launch("--resume", "auto")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert [r["step"] for r in read_metrics(out, "eval")] == [2, 4]
