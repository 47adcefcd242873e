"""`scaletune slurm` submitting through a stand-in sbatch (and squeue): its refusals, the options and
environment it passes, and the output_dirs that a queued job or a live run already holds.

Not named test_slurm_*: conftest starts the DeepSpeed prebuild for a run whose arguments name "slurm"."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from stutil import assert_clean_error, run_cli


def _fake_sbatch(bin_dir: Path, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\n{script}\n")
    sbatch.chmod(0o755)


def test_slurm_without_sbatch_is_one_error_and_creates_nothing(capsys, make_config, tmp_path, monkeypatch):
    path = make_config("causal_lm")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    code, out, err = run_cli(["slurm", path], capsys)
    assert_clean_error(code, err, "`sbatch` not found on PATH", "hint:", "--dry-run")
    assert not (work / "logs").exists() and out == ""
    code, out, _ = run_cli(["slurm", path, "--dry-run"], capsys)  # the hint's way out works without sbatch
    assert code == 0 and out.startswith("sbatch ")


def test_slurm_sbatch_refusal_names_command_and_message(capsys, make_config, tmp_path, monkeypatch):
    """sbatch without a reachable controller: its message inside a normal error (was: sbatch's raw stderr,
    exit 1, and a logs/ directory left behind)."""
    path = make_config("causal_lm")
    _fake_sbatch(tmp_path / "bin", "echo 'sbatch: fatal: Could not establish a configuration source' >&2; exit 1")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = run_cli(["slurm", path, "--gpus-per-node", "0"], capsys)
    assert_clean_error(code, err, "sbatch refused the job (exit 1)", "`sbatch --nodes=1",
                       "sbatch: fatal: Could not establish a configuration source", "--dry-run")
    assert not (work / "logs").exists()


def test_slurm_sbatch_arg_is_passed_to_sbatch(capfd, make_config, tmp_path, monkeypatch):
    path = make_config("causal_lm")
    record = tmp_path / "argv.txt"
    _fake_sbatch(tmp_path / "bin", f'printf "%s\\n" "$@" > {record}; echo "Submitted batch job 7"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["slurm", path, "--sbatch-arg=--qos=high", "--gpus-per-node", "0",
                              "--sbatch-arg=--mail-type=END", "train.learning_rate=1e-3"], capfd)
    assert code == 0, err
    assert "Submitted batch job 7" in out and (tmp_path / "logs").is_dir()
    argv = record.read_text().splitlines()
    template = next(i for i, a in enumerate(argv) if a.endswith("single_node.sbatch"))
    assert argv[template - 3:template - 1] == ["--qos=high", "--mail-type=END"]
    assert argv[template - 1] == f"--comment=scaletune output_dir={(tmp_path / 'run').resolve()}"
    assert argv[template + 1:] == [str(Path(path).resolve()), "train.learning_rate=1e-3"]


def test_slurm_refuses_an_output_dir_a_queued_job_was_submitted_for(capfd, make_config, tmp_path, monkeypatch):
    """A job still waiting in the queue holds no run lock: a second `scaletune slurm` of the same run was
    accepted and queued behind it, to be refused (or to find the run complete) only when it started. Each job
    carries its output_dir in its comment, and squeue shows it."""
    path = make_config("causal_lm")
    out = (tmp_path / "run").resolve()
    record = tmp_path / "argv.txt"
    _fake_sbatch(tmp_path / "bin", f'printf "%s\\n" "$@" > {record}; echo "Submitted batch job 7"')
    squeue = tmp_path / "bin" / "squeue"
    squeue.write_text(f"#!/bin/sh\necho '5|RUNNING|other'\necho '7|PENDING|scaletune output_dir={out}'\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)
    assert_clean_error(code, err, "job 7 (pending) was submitted for it", "--dependency=afterany:7")
    assert not record.exists()  # nothing submitted
    code, _, err = run_cli(["slurm", path, "--gpus-per-node", "0", "--sbatch-arg=--dependency=afterany:7"], capfd)
    assert code == 0, err
    assert run_cli(["slurm", path, "--gpus-per-node", "0", "--sbatch-arg=--dependency=singleton"], capfd)[0] == 0
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # job 7 submitting its own continuation: not a duplicate of itself
    assert run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)[0] == 0
    monkeypatch.delenv("SLURM_JOB_ID")
    assert f"--comment=scaletune output_dir={out}" in record.read_text().splitlines()
    squeue.write_text("#!/bin/sh\necho 'squeue: error: Unable to contact slurm controller' >&2\nexit 1\n")
    assert run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)[0] == 0  # (squeue cannot tell: sbatch decides)


def test_slurm_tells_the_job_which_python_submitted_it(capfd, make_config, tmp_path, monkeypatch):
    """`.venv/bin/scaletune slurm` without activating the venv: the job looked for `python` on PATH, found
    one without scaletune and failed after its wait in the queue. It now gets this python (SCALETUNE_PYTHON,
    exported to the job), unless SCALETUNE_VENV or SCALETUNE_PYTHON says otherwise."""
    path = make_config("causal_lm")
    record = tmp_path / "env.txt"
    _fake_sbatch(tmp_path / "bin", f'echo "$SCALETUNE_PYTHON" > {record}; echo "Submitted batch job 7"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCALETUNE_PYTHON", raising=False)
    monkeypatch.delenv("SCALETUNE_VENV", raising=False)
    assert run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)[0] == 0
    assert record.read_text().strip() == sys.executable
    monkeypatch.setenv("SCALETUNE_VENV", str(tmp_path / "venv"))  # the user's choice stands
    assert run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)[0] == 0
    assert record.read_text().strip() == ""
    monkeypatch.delenv("SCALETUNE_VENV")
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)  # a system or module python: the nodes' PATH finds theirs
    assert run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)[0] == 0
    assert record.read_text().strip() == ""


def _hold_lock(out: str, ready, release, job: str | None = None) -> None:
    from scaletune import runlock

    if job is None:
        os.environ.pop("SLURM_JOB_ID", None)
    else:
        os.environ["SLURM_JOB_ID"] = job
    runlock.acquire(Path(out))
    ready.set()
    release.wait(60)


def test_slurm_refuses_at_submit_an_output_dir_a_live_run_holds(capfd, make_config, tmp_path, monkeypatch):
    """A job for an output_dir that a running run holds would wait in the queue only to be refused at
    start: it is refused before sbatch, naming that run, with nothing submitted. A job chained after that
    run (--dependency) is submitted; so is the job once the run has ended."""
    import multiprocessing

    path = make_config("causal_lm")
    out = Path(yaml.safe_load(Path(path).read_text())["output_dir"])
    record = tmp_path / "argv.txt"
    _fake_sbatch(tmp_path / "bin", f'printf "%s\\n" "$@" > {record}; echo "Submitted batch job 7"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(out), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        code, out_text, err = run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)
        # (a run outside Slurm: no job id a --dependency could name)
        assert_clean_error(code, err, f"output_dir: {out} is in use by another run (pid {holder.pid} on ",
                           "it is no Slurm job, so --dependency cannot wait for it")
        assert not record.exists() and "Submitted" not in out_text
        for waits_for_nothing in ("--sbatch-arg=--dependency=singleton", "--sbatch-arg=--dependency="):
            code, _, err = run_cli(["slurm", path, "--gpus-per-node", "0", waits_for_nothing], capfd)
            assert_clean_error(code, err, "is in use by another run")
        code, out_text, err = run_cli(["slurm", path, "--gpus-per-node", "0",
                                       "--sbatch-arg=--dependency=afterany:6"], capfd)
        assert code == 0 and "Submitted batch job 7" in out_text, err
        assert "--dependency=afterany:6" in record.read_text().splitlines()
    finally:
        release.set()
        holder.join(60)
    record.unlink()
    code, out_text, err = run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)
    assert code == 0 and "Submitted batch job 7" in out_text, err
    # a Slurm job holding it (its ranks write SLURM_JOB_ID into the lock): this one can be queued after it
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(out), ready, release, "4242"))
    holder.start()
    try:
        assert ready.wait(60)
        code, _, err = run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)
        assert_clean_error(code, err, "wait for job 4242 to end, or queue this one after it: "
                                      "--sbatch-arg=--dependency=afterany:4242")
    finally:
        release.set()
        holder.join(60)
    assert sorted(p.name for p in out.iterdir()) == [".scaletune.lock"]  # the probe wrote nothing there


def test_slurm_singleton_queues_after_the_running_job_of_its_name(capfd, make_config, tmp_path, monkeypatch):
    """`--dependency=singleton` for the output_dir a running job of the same name trains (that job holds the
    run lock) was refused as "in use by another run", though Slurm starts it only after that job. A job of
    another name, which singleton does not wait for, is still refused."""
    import multiprocessing

    path = make_config("causal_lm")
    out = Path(yaml.safe_load(Path(path).read_text())["output_dir"]).resolve()
    record = tmp_path / "argv.txt"
    _fake_sbatch(tmp_path / "bin", f'printf "%s\\n" "$@" > {record}; echo "Submitted batch job 8"')
    squeue = tmp_path / "bin" / "squeue"  # (job 7, named scaletune, runs for out: no job is named other)
    squeue.write_text(f"#!/bin/sh\ncase \" $* \" in *\" -n other \"*) exit 0;; esac\n"
                      f"echo '7|RUNNING|scaletune output_dir={out}'\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SBATCH_JOB_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(out), ready, release))  # (job 7's run)
    holder.start()
    try:
        assert ready.wait(60)
        code, out_text, err = run_cli(["slurm", path, "--gpus-per-node", "0",
                                       "--sbatch-arg=--dependency=singleton"], capfd)
        assert code == 0 and "Submitted batch job 8" in out_text, err
        assert "--dependency=singleton" in record.read_text().splitlines()
        record.unlink()
        code, _, err = run_cli(["slurm", path, "--gpus-per-node", "0", "--sbatch-arg=--dependency=singleton",
                                "--sbatch-arg=--job-name=other"], capfd)
        assert_clean_error(code, err, "is in use by another run")
        assert not record.exists()
    finally:
        release.set()
        holder.join(60)


def test_slurm_warns_of_a_data_file_this_machine_lacks(capsys, make_config, tmp_path):
    """(before a queue wait; a warning, not a refusal: the job's node may have a node-local path)"""
    path = make_config("causal_lm")
    code, out, err = run_cli(["slurm", path, "--dry-run", "data.eval=/nowhere/eval.jsonl"], capsys)
    assert code == 0 and out.startswith("sbatch ")
    assert "scaletune: warning: data.eval: /nowhere/eval.jsonl is not a file on this machine" in err
    code, out, err = run_cli(["slurm", path, "--dry-run"], capsys)
    assert code == 0 and "warning" not in err
