"""`scaletune launch`, `launch-args` and `slurm --dry-run`: bad options, the peft section, output_dir and
--resume are refused here, before any process starts or any job is queued; and the launcher's
signals (SIGTERM, SIGUSR1, Ctrl-C) with a stand-in accelerate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stutil import assert_clean_error, run_cli


@pytest.fixture
def nothing_starts(monkeypatch, tmp_path):
    """Fail the test if `scaletune launch` would start accelerate (in process, or by exec as it once did) or
    `scaletune slurm` would run sbatch; run it in an empty directory (no logs/ where the tests run)."""
    import scaletune.launch

    def started(*args, **kwargs):
        raise AssertionError(f"started: {args}")

    monkeypatch.setattr(scaletune.launch, "run_accelerate", started, raising=False)
    monkeypatch.setattr(os, "execvp", started)
    monkeypatch.setattr(subprocess, "run", started)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("argv", [
    ["launch", "--nproc", "2", "peft.lora_r=8"],
    ["launch", "--nproc", "2", "--dry-run", "peft.lora_r=8"],
    ["launch-args", "peft.method=lorax"],
    ["slurm", "--dry-run", "peft.method=lorax"],
    ["slurm", "peft.lora_r=8"],
], ids=["launch", "launch-dry-run", "launch-args", "slurm-dry-run", "slurm"])
def test_launch_and_slurm_check_the_peft_section_first(capsys, make_config, nothing_starts, argv):
    """The peft section is checked as `train` checks it: once, before composing a command (a launch used to
    start every process to fail the same way; --dry-run, launch-args and slurm accepted it)."""
    path = make_config("causal_lm")
    code, out, err = run_cli([argv[0], path, *argv[1:]], capsys)
    wanted = "peft.lora_r: not a LoraConfig option" if "peft.lora_r=8" in argv else "unknown method 'lorax'"
    assert_clean_error(code, err, wanted)
    assert out == ""  # not even the command: nothing was composed


@pytest.mark.parametrize(("argv", "wanted"), [
    (["launch", "--dry-run", "--nproc", "0"], "--nproc must be >= 1"),
    (["launch", "--dry-run", "--nproc", "-1"], "--nproc must be >= 1"),
    (["launch", "--dry-run", "--nnodes", "0"], "--nnodes >= 1"),
    (["launch", "--dry-run", "--nnodes", "2", "--node-rank", "-1"], "--node-rank: must be in [0, 1]"),
    (["launch", "--dry-run", "--master-port", "0"], "--master-port: must be in [1, 65535]"),
    (["slurm", "--dry-run", "--nodes", "0"], "--nodes must be >= 1"),
    (["slurm", "--dry-run", "--gpus-per-node", "-1"], "--gpus-per-node >= 0"),
    (["slurm", "--dry-run", "--sbatch-arg=qos=high"], "--sbatch-arg 'qos=high': not an sbatch option"),
    # the templates ask for the checkpoint 300 s before the limit: a job this short stopped itself at start
    (["slurm", "--dry-run", "--gpus-per-node", "0", "--time", "00:05:00"],
     "--time 00:05:00: the job is told to checkpoint 300 s before its time limit"),
    (["slurm", "--dry-run", "--gpus-per-node", "0", "--time", "2:00", "--sbatch-arg=--signal=B:USR1@150"],
     "--time 2:00: the job is told to checkpoint 150 s before"),
    (["slurm", "--dry-run", "--gpus-per-node", "0", "--time", "forever"],
     "--time 'forever' is not a Slurm time limit"),
    # (a limit given as an sbatch option was not checked)
    (["slurm", "--dry-run", "--gpus-per-node", "0", "--sbatch-arg=--time=3"],
     "--sbatch-arg=--time 3: the job is told to checkpoint 300 s before its time limit"),
    (["slurm", "--dry-run", "--gpus-per-node", "0", "--time", "10:00", "--sbatch-arg=-t4"],
     "--sbatch-arg=--time 4: the job is told to checkpoint 300 s"),  # (sbatch takes the last limit given)
    # CPU-only nodes (a process each) have a world size too: the batch check was skipped for them
    (["slurm", "--dry-run", "--nodes", "2", "--gpus-per-node", "0", "train.global_batch_size=8",
      "train.micro_batch_size=8"], "cannot run on 2 node(s) x 1 CPU process(es)"),
    (["plan", "--nodes", "0"], "--nodes must be >= 1"),
    (["plan", "--gpus-per-node", "-2"], "--gpus-per-node >= 0"),
    (["plan", "--gpu-memory", "0GiB"], "--gpu-memory: '0GiB' is no memory at all"),
    (["plan", "--cpu-memory", "0GiB"], "--cpu-memory: '0GiB' is no memory at all"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_numeric_launch_options_out_of_range(capsys, make_config, nothing_starts, argv, wanted):
    """`--nproc 0` used to be taken as "one per GPU" (a dry run composed --num_processes 1)."""
    code, out, err = run_cli([argv[0], make_config("causal_lm"), *argv[1:]], capsys)
    assert_clean_error(code, err, wanted)
    assert "launch" not in out


def test_slurm_time_longer_than_the_signal_lead_is_accepted(capsys, make_config, nothing_starts):
    path = make_config("causal_lm")
    for extra in (["--time", "00:05:01"], ["--time", "00:05:00", "--sbatch-arg=--signal=B:USR1@60"],
                  ["--time", "0"], ["--time", "-1"], ["--time", "00:00:00"], ["--time", "UNLIMITED"],
                  ["--time", "2-00"]):  # (any zero, -1: no limit)
        code, out, err = run_cli(["slurm", path, "--dry-run", "--gpus-per-node", "0", *extra], capsys)
        assert code == 0 and "sbatch" in out, err


def test_slurm_gpus_asked_for_by_sbatch_arg_are_not_checked_as_cpu_nodes(capsys, make_config, nothing_starts):
    """GPUs asked for with --sbatch-arg=--gres (--gpus-per-node left at 0): the job runs a process per GPU,
    so the CPU-node world (one process, no CUDA) must not refuse its batch arithmetic or bf16."""
    path = make_config("causal_lm")
    code, out, err = run_cli(["slurm", path, "--dry-run", "--nodes", "2", "--gpus-per-node", "0",
                              "--sbatch-arg=--gres=gpu:4", "train.global_batch_size=16", "train.micro_batch_size=8",
                              "train.mixed_precision=bf16"], capsys)
    assert code == 0 and "--gres=gpu:4" in out, err
    code, _, err = run_cli(["slurm", path, "--dry-run", "--nodes", "2", "--gpus-per-node", "0",  # (no GPU in it)
                            "--sbatch-arg=--gres=lscratch:100", "train.global_batch_size=8",
                            "train.micro_batch_size=8"], capsys)
    assert_clean_error(code, err, "cannot run on 2 node(s) x 1 CPU process(es)")


def _fake_checkpoint(cfg_path: Path, root: Path, step: int) -> Path:
    """A checkpoint that verifies, written by the run config at `cfg_path` (for the resume checks only)."""
    from scaletune import checkpoint as ckpt
    from scaletune.config import load_config
    from scaletune.identity import config_fingerprint

    cfg = load_config(str(cfg_path), [])
    path = root / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True)
    for name in ckpt.REQUIRED_FILES:
        (path / name).write_text("{}")
    (path / "state.json").write_text(json.dumps({"step": step, "config": cfg.to_dict()}, default=str))
    ckpt.write_manifest(path, step, config_fingerprint(cfg))
    return path


@pytest.mark.parametrize("case", ["finished", "foreign-file", "config-change"])
def test_launch_refuses_output_dir_and_resume_before_starting(capsys, make_config, nothing_starts, tmp_path, case):
    """output_dir / --resume refusals need no model: `launch` used to start every rank to print the same
    error once per rank (with torch's W/E lines). Now one error, exit 2, nothing started; a dry run
    composes the command without looking at the directory."""
    path = make_config("causal_lm")
    out = tmp_path / "run"  # make_config's output_dir
    out.mkdir()
    argv = ["launch", path, "--nproc", "2"]
    if case == "finished":
        (out / "adapter").mkdir()
        (out / "run.json").write_text("{}")
        wanted = "is not empty; resume it with --resume auto"
    elif case == "foreign-file":
        (out / "notes.txt").write_text("mine")
        argv += ["--resume", "auto"]
        wanted = "it holds files scaletune did not write (notes.txt)"
    else:
        step = _fake_checkpoint(path, out, 4)
        argv += ["--resume", step, "train.learning_rate=0.02"]
        wanted = "was written by a different run config (changed: train.learning_rate"
    code, out_text, err = run_cli(argv, capsys)
    assert_clean_error(code, err, wanted)
    assert err.count("error:") == 1 and out_text == ""
    code, out_text, _ = run_cli([*argv, "--dry-run"], capsys)
    assert code == 0 and " launch " in out_text


def test_launch_resume_checks_let_a_resumable_run_through(capsys, make_config, monkeypatch, tmp_path):
    """--resume auto on a run with a checkpoint of the same config reaches the launch."""
    import scaletune.launch

    path = make_config("causal_lm")
    _fake_checkpoint(path, tmp_path / "run", 4)
    started = []
    monkeypatch.setattr(scaletune.launch, "run_accelerate", lambda cmd, usr1=None: started.append(cmd) or 0)
    code, _, err = run_cli(["launch", path, "--nproc", "2", "--resume", "auto"], capsys)
    assert code == 0 and len(started) == 1, err


def test_launch_args_prints_the_deepspeed_flags_or_says_why_there_are_none(capsys, make_config):
    """launch-args printed one empty line for a DDP config, with nothing to say why."""
    path = make_config("causal_lm")
    code, out, err = run_cli(["launch-args", path], capsys)
    assert code == 0 and out == "\n" and "no DeepSpeed flags: distributed.zero_stage is 0" in err
    code, out, err = run_cli(["launch-args", path, "distributed.zero_stage=3"], capsys)
    assert code == 0 and "--use_deepspeed" in out and "--zero_stage 3" in out and err == "", (out, err)


def _fake_accelerate(monkeypatch, *, writes: str | None, ends: BaseException | None):
    """Replace accelerate's launch_command: optionally write `writes` to the preemption marker the ranks
    would write, then raise `ends` (how accelerate ends a launch stopped by a signal). Returns the list of
    marker paths it saw."""
    import accelerate.commands.launch as acl

    seen = []

    def launch_command(args):
        marker = os.environ.get("SCALETUNE_PREEMPT_MARKER")
        seen.append(marker)
        if writes is not None:
            Path(marker).write_text(writes + "\n")
        if ends is not None:
            raise ends

    monkeypatch.setattr(acl, "launch_command", launch_command)
    return seen


CMD = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m", "scaletune", "train", "r.yaml"]


def test_launch_stopped_by_sigterm_after_a_checkpoint_exits_124(capsys, monkeypatch):
    """torchrun passes a SIGTERM on to the ranks, which checkpoint and exit 124; accelerate then ends with
    sys.exit(143). The launch used to exit 143 without a word; now 124 and the checkpoint, and the
    temporary marker is gone again."""
    from scaletune.launch import run_accelerate

    monkeypatch.delenv("SCALETUNE_PREEMPT_MARKER", raising=False)
    # (the ranks' marker: the checkpoint, then the signal that stopped them)
    seen = _fake_accelerate(monkeypatch, writes="/r/checkpoints/step-3\nSIGTERM", ends=SystemExit(143))
    assert run_accelerate(CMD) == 124
    err = capsys.readouterr().err
    assert err.strip() == ("scaletune launch: stopped by SIGTERM; checkpoint /r/checkpoints/step-3 "
                           "(continue with --resume auto)")
    assert seen[0] and not Path(seen[0]).parent.exists()
    assert "SCALETUNE_PREEMPT_MARKER" not in os.environ


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM, None])
def test_the_preemption_marker_names_the_checkpoint_and_the_signal(tmp_path, monkeypatch, signum):
    """The Slurm templates requeue a job whose ranks were stopped by SIGUSR1, which `scancel --signal=USR1
    JOBID` (no --batch) sends to the ranks alone: the marker's second line says which signal it was (empty
    when another rank had it), as the templates read it (sed -n 2p)."""
    from types import SimpleNamespace

    from scaletune.loop import mark_preempted

    marker = tmp_path / "marker"
    monkeypatch.setenv("SCALETUNE_PREEMPT_MARKER", str(marker))
    mark_preempted(SimpleNamespace(is_local_main_process=False), "/r/checkpoints/step-3", signum)
    assert not marker.exists()  # (one process a node writes it)
    mark_preempted(SimpleNamespace(is_local_main_process=True), "/r/checkpoints/step-3", signum)
    second = subprocess.run(["sed", "-n", "2p", str(marker)], capture_output=True, text=True).stdout.strip()
    assert marker.read_text().splitlines()[0] == "/r/checkpoints/step-3"
    assert second == (signal.Signals(signum).name if signum else "")


def test_launch_stopped_by_sigterm_without_a_checkpoint(capsys, monkeypatch, tmp_path):
    """No checkpoint written (a user's marker left by an earlier run does not count): 128 + SIGTERM, said
    in one line; the user's marker is left where it is."""
    from scaletune.launch import run_accelerate

    marker = tmp_path / "marker"
    marker.write_text("/old/checkpoints/step-1\n")
    monkeypatch.setenv("SCALETUNE_PREEMPT_MARKER", str(marker))
    seen = _fake_accelerate(monkeypatch, writes=None, ends=SystemExit(143))
    assert run_accelerate(CMD) == 143
    assert capsys.readouterr().err.strip() == "scaletune launch: stopped by SIGTERM; the ranks saved no checkpoint"
    assert seen == [str(marker)] and marker.exists()


def test_launch_restores_the_signal_handlers(monkeypatch):
    """torchrun installs handlers for TERM/INT/HUP/QUIT and the launch one for USR1: all are put back."""
    import signal

    from scaletune.launch import run_accelerate

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
    _fake_accelerate(monkeypatch, writes=None, ends=None)
    import accelerate.commands.launch as acl

    inner = acl.launch_command

    def launch_command(args):
        assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, before[signal.SIGUSR1])
        signal.signal(signal.SIGTERM, lambda *a: None)  # as torchrun's PContext.start does
        inner(args)

    monkeypatch.setattr(acl, "launch_command", launch_command)
    assert run_accelerate(CMD) == 0
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_one_process_launch_alone_passes_ctrl_c_on_as_a_stop(monkeypatch):
    """Only accelerate's one-process launcher (one process, one machine, no DeepSpeed) stops its rank on a
    Ctrl-C with SIGTERM and SIGKILL 5 s later: there the launch catches SIGINT itself and passes the first on
    as SIGTERM, and stops passing once the launch has ended. torchrun (several processes, or DeepSpeed) passes
    a Ctrl-C on itself: nothing of scaletune's handles it there."""
    import signal

    import accelerate.commands.launch as acl

    from scaletune.launch import run_accelerate

    _fake_accelerate(monkeypatch, writes=None, ends=None)
    handlers = []
    monkeypatch.setattr(acl, "launch_command", lambda args: handlers.append(signal.getsignal(signal.SIGINT)))
    one = ["accelerate", "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "-m", "scaletune",
           "train", "r.yaml"]
    ds = ["accelerate", "launch", "--use_deepspeed", *one[3:]]
    for cmd in (one, CMD, ds):
        assert run_accelerate(cmd) == 0
    passer = getattr(handlers[0], "__self__", None)
    assert passer is not None and passer.first_as == signal.SIGTERM and passer.stopped.is_set()
    assert not any(type(getattr(h, "__self__", None)).__name__ == "_PassOn" for h in handlers[1:]), handlers


def test_rank_pids_are_the_scaletune_train_children_only():
    """SIGUSR1 to the launcher is forwarded to its rank processes, not to any other child it has."""
    from scaletune.launch import rank_pids

    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "scaletune", "train", "r.yaml"])
    other = subprocess.Popen(["sleep", "60"])
    try:
        found = rank_pids(os.getpid())
    finally:
        for child in (rank, other):
            child.kill()
            child.wait()
    assert rank.pid in found and other.pid not in found


def test_sigusr1_to_the_launcher_waits_until_a_rank_handles_it():
    """A SIGUSR1 that reaches the launcher while a rank is still starting (a Slurm preemption notice at job
    start) is held and passed on once the rank handles it: not lost, and not the default action that
    would kill the rank (it exits 7 from its handler here, instead of -SIGUSR1)."""
    import signal

    from scaletune.launch import _PassOn, catches

    code = "import signal, sys, time; time.sleep(1.5); signal.signal(signal.SIGUSR1, lambda *a: sys.exit(7)); " \
           "time.sleep(60)"
    rank = subprocess.Popen([sys.executable, "-c", code, "-m", "scaletune", "train", "r.yaml"])
    passer = _PassOn()
    try:
        assert not catches(rank.pid, signal.SIGUSR1)
        passer.handler(signal.SIGUSR1, None)  # as the signal would call it
        assert rank.wait(timeout=30) == 7
    finally:
        passer.stop()
        if rank.poll() is None:
            rank.kill()
            rank.wait()
