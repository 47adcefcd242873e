"""Kill it anywhere: SIGKILL at random moments (and mid-checkpoint) and SIGTERM — every interrupted run,
resumed with --resume auto, ends with exactly the adapter and step count of an uninterrupted run, and
`latest` never points at a partial checkpoint. (The 2-process ZeRO-3 case is in test_kills_zero3.py, a
file of its own so that it can run beside this one on another test worker.)"""

from __future__ import annotations

import json
import random
import signal
import subprocess

import pytest

import forking
from killing import (
    ENV,
    KILLS,
    STEPS,
    assert_latest_complete,
    assert_same_run,
    base_config,
    command,
    kill_group,
    run_with_interruptions,
    start,
    write_cfg,
)
from stutil import wait_until_caught


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory, tiny_llama):
    return base_config(tmp_path_factory.mktemp("kills"), tiny_llama)


@pytest.fixture(scope="module")
def reference(base_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    # forked: the reference is not about how a process starts (the interrupted runs are forked the same way)
    res = forking.run(command(write_cfg(base_cfg, out))[3:], ENV, out.with_suffix(".log"), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    times = [json.loads(line)["time"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, max(times) - min(times)


def test_twenty_random_sigkills_end_in_the_same_adapter(base_cfg, reference, tmp_path):
    ref, train_time = reference
    rng = random.Random(2026)
    # 4 deterministic kills half-way through a checkpoint write, 16 at random moments of training
    step_time = train_time / STEPS
    delays = [rng.uniform(0, 2 * step_time) for _ in range(KILLS)]  # land anywhere in the next ~2 steps
    faults = {i: f"kill-in-checkpoint@{s}" for i, s in zip((3, 8, 13, 18), (6, 14, 22, 30))}
    out = tmp_path / "run"
    landed = run_with_interruptions(write_cfg(base_cfg, out), out, delays, signal.SIGKILL, faults=faults)
    assert landed + sum(1 for i in faults if i < len(delays)) >= KILLS - 2, landed
    assert_same_run(out, ref)
    print(f"kill points survived: {landed} random SIGKILLs + {len(faults)} mid-checkpoint kills")


# SIGUSR1 takes the same StopFlag path; it is exercised end to end under ZeRO-3 in
# tests/distributed/test_scale_out.py and by the real `scancel --signal=USR1` in tests/slurm. Ctrl-C (SIGINT)
# during training takes it too (it ended the run without a checkpoint: the steps since the last one were lost).
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_signals_checkpoint_and_resume_exactly(base_cfg, reference, tmp_path, sig):
    ref, train_time = reference
    rng = random.Random(int(sig))
    out = tmp_path / "run"
    landed = run_with_interruptions(write_cfg(base_cfg, out), out,
                                    [rng.uniform(0, 3 * train_time / STEPS) for _ in range(3)], sig)
    assert landed >= 2
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "preempted" for e in events) >= 2
    assert_same_run(out, ref)


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(base_cfg, tmp_path):
    """The first Ctrl-C asks for a checkpoint at the end of the step and says so; a user who will not wait
    presses it again, and the run ends at once (exit 130, as a shell reports an interrupt) without writing
    one, `latest` still naming a complete checkpoint."""
    import time

    out = tmp_path / "run"
    path = write_cfg(base_cfg, out, steps=STEPS)
    proc = start(path, {**ENV, "SCALETUNE_FAULT": "slow@3"})  # step 3 takes 8 s: both Ctrl-Cs land in it
    metrics, log = out / "metrics.jsonl", path.with_suffix(".stderr")
    deadline = time.monotonic() + 240
    # inside step 3's 8 s, past its boundary (a stop asked before it checkpoints step 2 at once). A fixed 1 s after
    # `latest` named step-2 raced the save's end and step 3's start on a loaded machine.
    while not (log.exists() and "step 3 is slow" in log.read_text()) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_group(proc, signal.SIGINT)
    while "Ctrl-C" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    kill_group(proc, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Ctrl-C again stops at once" in err and "interrupted" in err, err[-3000:]
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert not [e for e in events if e["event"] == "preempted"], events
    assert_latest_complete(out)


def test_stop_signal_during_start_up_ends_in_a_checkpoint(base_cfg, reference, tmp_path):
    """SIGUSR1 while `scaletune train` is still importing and loading (a Slurm preemption notice at job
    start; srun signals every process of the step) is kept: the run checkpoints at its first step
    boundary and exits 124, and the resume ends in the uninterrupted adapter. Before, the signal's
    default action killed the process (a launcher passes SIGUSR1 on with no ignore disposition)."""
    import sys

    ref, _ = reference
    out = tmp_path / "run"
    path = write_cfg(base_cfg, out)
    proc = subprocess.Popen([sys.executable, "-m", "scaletune", "train", str(path), "--resume", "auto"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    # as soon as the stop is kept, before torch / transformers are imported (several seconds). A fixed 1 s sleep
    # could end before the interpreter had reached its handler on a loaded machine: killed (-10), not stopped.
    wait_until_caught(proc.pid, signal.SIGUSR1)
    assert not (out / "metrics.jsonl").exists(), "the run started training before the signal"
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 124, err[-3000:]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "preempted"] == [0], events
    resumed = start(path, ENV)  # forked from the zygote: the start-up path was the point above
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert_same_run(out, ref)


def test_more_stop_signals_after_the_checkpoint_keep_exit_124(base_cfg, tmp_path):
    """srun signals every process of a step, and a launcher passes the signal on too: a rank can get SIGUSR1
    again after it has stopped. Python's shutdown puts the default action back, so such a signal used to
    end the exit as 138 (or a launch as 1 / 143) with the checkpoint written."""
    import sys
    import time

    out = tmp_path / "run"
    path = write_cfg(base_cfg, out, steps=STEPS)
    proc = subprocess.Popen([sys.executable, "-m", "scaletune", "train", str(path)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and '"train"' in metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    for line in proc.stdout:  # until the run says it stopped, then keep signalling it while it exits
        if line.startswith("stopped on SIGUSR1"):
            break
    while proc.poll() is None:
        try:
            proc.send_signal(signal.SIGUSR1)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == 124


def test_a_second_run_into_a_running_runs_output_dir_is_refused(base_cfg, reference, tmp_path):
    """The same job submitted twice (each `--resume auto`), or a second terminal: without the output_dir
    lock the second run resumed the first's checkpoints and both trained into one directory, rotating
    each other's checkpoints away. Now `train` and `launch` refuse it (exit 2, naming the running one)
    and the first run ends as if alone."""
    import time

    ref, _ = reference
    out = tmp_path / "run"
    path = write_cfg(base_cfg, out)
    first = start(path, ENV)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not ((out / "checkpoints" / "latest").exists() and metrics.exists()) and first.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second started"
    for argv in (command(path)[3:], ["launch", str(path), "--nproc", "1", "--resume", "auto"]):
        second = forking.start(argv, ENV, tmp_path / f"{argv[0]}.stderr")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err[-3000:]
        assert f"output_dir: {out} is in use by another run (pid {first.pid} on " in err, err[-3000:]
        assert "Traceback" not in err
    assert first.poll() is None, "the refusals came too late to prove anything"
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert_same_run(out, ref)
