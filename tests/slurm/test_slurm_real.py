"""The REAL sbatch templates running the REAL trainer on the local two-node cluster (slurm/cluster.sh).

Nothing is stubbed: the jobs run srun -> ``scaletune launch`` (one per node) -> accelerate ->
``python -m scaletune train CONFIG --resume auto`` on a tiny Llama (CPU, float32), and the results are
compared with the same config run directly (no Slurm, one process):

* ``scancel --signal=USR1 --batch`` mid-run, on a 1-node and on a 2-node job: the ranks checkpoint,
  the template requeues, the job resumes (``--resume auto``) and ends with the loss curve and adapter
  of an uninterrupted run (exactly for 1 node; <= 1e-4 relative / 1e-5 for 2 ranks, whose reductions
  add in another order) -- so a single-node job runs `scaletune launch` and writes the adapter of the
  run you get without Slurm;
* the same with ``scancel --signal=USR1`` to the job's steps alone (no --batch: the batch shell never hears it);
* a job with a bad config value ends with exit code 2 and the config error, no traceback, no requeue.

To keep the wall time down (the jobs are mostly Python start-up), one module fixture builds the model
and data once, submits all jobs at once, starts the reference run next to them, and sends the
preemption signals; each test then only waits for its own job.

    sudo -E .venv/bin/python -m pytest tests/slurm/test_slurm_real.py -m slurm -v
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "slurm"
SHORT_STEPS = 4  # the base config (the bad-config job never trains)
LONG_STEPS = 60  # the preempted jobs: long enough to be signalled mid-run
SIGNAL_AFTER = 3  # logged steps before the USR1
JOB_TIMEOUT = 420  # generous: only hit on failure (the machine may be shared and slow)
RTOL_CURVE = 1e-4
ATOL_ADAPTER = 1e-6
ATOL_ADAPTER_2RANKS = 1e-5

import stutil as helpers  # noqa: E402  (tests/ is on sys.path via tests/conftest.py)

# ------------------------------------------------------------------------------------------------
# helpers


def _env(cluster_env: dict[str, str]) -> dict[str, str]:
    """Environment for sbatch (exported to the job by --export=ALL) and for the reference runs."""
    env = {k: v for k, v in cluster_env.items() if not (k.startswith("SLURM_") and k != "SLURM_CONF")}
    for var in ("PYTHONPATH", "SCALETUNE_VENV", "SCALETUNE_PREEMPT_MARKER",
                "SCALETUNE_PROCS_PER_NODE", "SCALETUNE_MASTER_PORT", "SCALETUNE_FAULT", "RANK", "WORLD_SIZE",
                "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED",
                "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_CONFIG_FILE", "CUDA_VISIBLE_DEVICES"):
        env.pop(var, None)
    env.update(SCALETUNE_PYTHON=sys.executable, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               SCALETUNE_NO_PROGRESS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    return env


def _read(p: Path, tail: int = 6000) -> str:
    return p.read_text(errors="replace")[-tail:] if p.exists() else f"<no {p.name}>"


def _in_queue(job_id: str, env) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id], env=env, capture_output=True, text=True)
    # once the job is purged squeue errors with "Invalid job id"
    return out.returncode == 0 and out.stdout.strip() != ""


def _train_events(out_dir: Path, event: str = "train") -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written right now
            continue
    return [r for r in rows if r.get("event") == event]


def _losses(out_dir: Path) -> dict[int, float]:
    """step -> loss (a resumed run appends; the last record of a step wins)."""
    return {r["step"]: r["loss"] for r in _train_events(out_dir)}


def _assert_same_curve(ref: dict[int, float], got: dict[int, float], steps: int, context: str) -> None:
    assert sorted(got) == list(range(1, steps + 1)), f"logged steps {sorted(got)}\n{context}"
    assert sorted(ref) == list(range(1, steps + 1)), f"reference logged steps {sorted(ref)}"
    bad = {s: (ref[s], got[s]) for s in ref if abs(got[s] - ref[s]) > RTOL_CURVE * abs(ref[s])}
    assert not bad, f"loss differs from the single-process run (step: (ref, got)): {bad}"


def _adapter(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out_dir / "adapter" / "adapter_model.safetensors"))


class Job:
    """One sbatch submission of a real template."""

    def __init__(self, js: SimpleNamespace, name: str, nodes: int, cfg: Path, overrides: list[str],
                 env: dict[str, str] | None = None):
        self.env, self.name, self.nodes = env or js.env, name, nodes
        self.out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")))
        template = TEMPLATES / ("multi_node.sbatch" if nodes > 1 else "single_node.sbatch")
        cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--nodes={nodes}", "--time=00:30:00",
               str(template), str(cfg), *overrides]
        res = subprocess.run(cmd, cwd=js.root, env=self.env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}{res.stderr}"
        self.id = res.stdout.strip().split(";")[0]
        self.log = js.root / "logs" / f"{name}-{self.id}.out"
        self.submitted = time.monotonic()
        self.finished: float | None = None

    def alive(self) -> bool:
        return _in_queue(self.id, self.env)

    def describe(self) -> str:
        sq = subprocess.run(["squeue", "-j", self.id, "-o", "%i %T %r %N"], env=self.env, capture_output=True,
                            text=True)
        return (f"job {self.id} ({self.name}, {self.nodes} node(s)) squeue: {sq.stdout.strip() or sq.stderr.strip()}"
                f"\n--- log tail ---\n{_read(self.log)}\n--- metrics tail ---\n{_read(self.out / 'metrics.jsonl', 1500)}")

    def wait(self, timeout: float = JOB_TIMEOUT) -> str:
        deadline = self.submitted + timeout
        while self.alive():
            if time.monotonic() > deadline:
                info = self.describe()
                subprocess.run(["scancel", self.id], env=self.env)
                pytest.fail(f"still queued {timeout:.0f}s after submission\n{info}")
            time.sleep(1)
        if self.finished is None:
            self.finished = time.monotonic()
        return _read(self.log, 10**7)


class Reference:
    """The same config run directly (`python -m scaletune train`), one process, no Slurm."""

    def __init__(self, js: SimpleNamespace, cfg: Path, overrides: list[str]):
        self.out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")))
        self.stderr = js.root / f"{self.out.name}.stderr"
        self.cmd = [sys.executable, "-m", "scaletune", "train", str(cfg), *overrides]
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(self.cmd, cwd=js.root, env=js.env, stdout=err, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.started = time.monotonic()

    def wait(self, timeout: float = JOB_TIMEOUT) -> Path:
        try:
            rc = self.proc.wait(timeout=max(1.0, self.started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"reference run did not finish in {timeout:.0f}s: {' '.join(self.cmd)}\n{_read(self.stderr)}")
        assert rc == 0, f"reference run failed (exit {rc}): {' '.join(self.cmd)}\n{_read(self.stderr)}"
        return self.out

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait()


def _signal_when_training(js: SimpleNamespace, jobs: list[Job]) -> None:
    """Send USR1 to each job's batch shell once it has logged SIGNAL_AFTER steps.

    Problems are recorded (js.signal_errors[job name]), not raised: the other tests must still run."""
    waiting = list(jobs)
    while waiting:
        for job in list(waiting):
            steps = [r["step"] for r in _train_events(job.out)]
            if len(steps) >= SIGNAL_AFTER and steps[-1] < LONG_STEPS:
                # (to the batch shell, as Slurm's --signal=B:USR1 does; the steps-only job's to its steps alone)
                where = [] if job.name in js.steps_only else ["--batch"]
                res = subprocess.run(["scancel", "--signal=USR1", *where, job.id], env=js.env, capture_output=True,
                                     text=True)
                if res.returncode != 0:
                    js.signal_errors[job.name] = f"scancel --signal=USR1 failed: {res.stderr}\n{job.describe()}"
                js.signalled_after[job.name] = steps[-1]
            elif time.monotonic() > job.submitted + JOB_TIMEOUT or not job.alive() or steps[-1:] == [LONG_STEPS]:
                js.signal_errors[job.name] = (f"could not signal the job mid-run (never saw {SIGNAL_AFTER} steps "
                                              f"before it ended)\n{job.describe()}")
            else:
                continue
            waiting.remove(job)
        time.sleep(0.2)


def _signal_at_start(js: SimpleNamespace, job: Job) -> None:
    """USR1 to the job's batch shell as soon as its node's launcher is being started (its `node_rank=` line):
    the launcher ignores USR1 until it handles it (a python wrapper that sleeps first widens that window).
    Problems are recorded in js.signal_errors, as `_signal_when_training` does."""
    deadline = job.submitted + JOB_TIMEOUT
    while "node_rank=0" not in _read(job.log, 10**6):
        if time.monotonic() > deadline or not job.alive():
            js.signal_errors[job.name] = f"never saw the launcher start\n{job.describe()}"
            return
        time.sleep(0.1)
    res = subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], env=js.env, capture_output=True, text=True)
    if res.returncode != 0:
        js.signal_errors[job.name] = f"scancel --signal=USR1 failed: {res.stderr}\n{job.describe()}"


def _assert_preempted_and_resumed(jobs: SimpleNamespace, job: Job, world: int, atol: float) -> None:
    """The job was stopped by the USR1 with a checkpoint, requeued once, and ended in the uninterrupted
    run's curve and adapter."""
    import torch

    assert jobs.signal_errors.get(job.name) is None, jobs.signal_errors[job.name]
    text = job.wait()
    info = job.describe()
    # (a USR1 to the steps alone never reaches the batch shell: the ranks' marker names it)
    assert ("caught SIGUSR1" in text) == (job.name not in jobs.steps_only) and "requeueing job" in text, info
    assert "restart_count=1" in text, info
    assert text.rstrip().endswith("training step exited rc=0"), info
    preempted = _train_events(job.out, "preempted")
    assert len(preempted) == 1, (preempted, info)
    stop_step = preempted[0]["step"]
    assert jobs.signalled_after[job.name] <= stop_step < LONG_STEPS, (jobs.signalled_after, preempted, info)
    ckpt_dir = Path(preempted[0]["checkpoint"])
    assert ckpt_dir.name == f"step-{stop_step}", preempted
    run = json.loads((job.out / "run.json").read_text())
    assert run["world_size"] == world and run["resumed_from"] == str(ckpt_dir), run
    state = json.loads((job.out / "checkpoints" / f"step-{LONG_STEPS}" / "state.json").read_text())
    assert state["step"] == LONG_STEPS, state
    # nothing lost or repeated: the resumed run continues the uninterrupted run's curve and ends in its adapter
    ref = jobs.ref_long.wait()
    _assert_same_curve(_losses(ref), _losses(job.out), LONG_STEPS, info)
    a, b = _adapter(job.out), _adapter(ref)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


# ------------------------------------------------------------------------------------------------
# the shared fixture: data, jobs, reference runs


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory):
    from scaletune.demo.tiny import build_model_dir

    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("slurm_real")
    (root / "logs").mkdir()
    model = build_model_dir(root / "model", helpers.corpus(), arch="llama", hidden=32, layers=2, heads=2,
                            vocab_size=256)
    train = helpers.write_jsonl(root / "train.jsonl", helpers.alpaca_records(64))
    raw = helpers.tiny_lora_run(model, train, train={"max_steps": SHORT_STEPS, "warmup_ratio": 0.1},
                                output_dir=str(root / "unused"))
    cfg = root / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    js = SimpleNamespace(root=root, env=_env(slurm_cluster), cfg=cfg, signal_errors={}, signalled_after={},
                         timings={"setup_s": 0.0}, steps_only={"st-steps"})
    long = [f"train.max_steps={LONG_STEPS}"]
    started: list = []
    try:
        # the preempted jobs first (they have the longest path: run, signal, requeue, resume), then the short
        # ones; the 2-node job waits for both nodes
        js.preempt = Job(js, "st-preempt", 1, cfg, [*long, f"output_dir={root / 'preempt'}"])
        started.append(js.preempt)
        js.multi = Job(js, "st-multi", 2, cfg, [*long, f"output_dir={root / 'multi'}"])
        started.append(js.multi)
        js.steps = Job(js, "st-steps", 1, cfg, [*long, f"output_dir={root / 'steps'}"])
        started.append(js.steps)
        js.bad = Job(js, "st-bad", 1, cfg, ["train.learning_rate=fast", f"output_dir={root / 'bad'}"])
        started.append(js.bad)
        slow = root / "slow_python.sh"  # (the launcher, USR1 ignored, starts 8 s late)
        slow.write_text(f"#!/bin/bash\nsleep 8\nexec {sys.executable} \"$@\"\n")
        slow.chmod(0o755)
        js.early = Job(js, "st-early", 1, cfg, [f"output_dir={root / 'early'}"], env={**js.env, "SCALETUNE_PYTHON": str(slow)})
        started.append(js.early)
        early = threading.Thread(target=_signal_at_start, args=(js, js.early), daemon=True)
        early.start()
        js.ref_long = Reference(js, cfg, [*long, f"output_dir={root / 'ref_long'}"])
        started.append(js.ref_long)
        js.timings["setup_s"] = round(time.monotonic() - t0, 1)
        _signal_when_training(js, [js.preempt, js.multi, js.steps])
        early.join(JOB_TIMEOUT)
        yield js
    finally:
        for item in started:
            if isinstance(item, Job):
                if item.alive():
                    subprocess.run(["scancel", item.id], env=js.env)
            else:
                item.kill()
        print("\n[slurm-real timings] " + json.dumps({
            **js.timings,
            **{j.name: round(j.finished - j.submitted, 1) for j in started if isinstance(j, Job) and j.finished},
        }))


# ------------------------------------------------------------------------------------------------
# tests


@pytest.mark.slurm
def test_real_two_node_job_is_preempted_requeued_and_matches_one_process(jobs):
    job = jobs.multi
    text = job.wait()
    assert "nodes=2 procs_per_node=1 num_processes=2" in text, text
    assert "node_rank=0" in text and "node_rank=1" in text, text  # one launcher per node
    run = json.loads((job.out / "run.json").read_text())
    assert run["grad_accum"] == 2, run  # 8 = 2 micro x 2 accumulation x 2 ranks
    _assert_preempted_and_resumed(jobs, job, world=2, atol=ATOL_ADAPTER_2RANKS)


@pytest.mark.slurm
def test_real_preemption_checkpoints_requeues_and_resumes_exactly(jobs):
    job = jobs.preempt
    text = job.wait()
    assert "nodes=1 procs_per_node=1 num_processes=1" in text, text
    assert "each node runs: scaletune launch" in text and " -m scaletune train " in text, text
    _assert_preempted_and_resumed(jobs, job, world=1, atol=ATOL_ADAPTER)


@pytest.mark.slurm
def test_real_preemption_signalled_to_the_steps_alone_requeues_too(jobs):
    """`scancel --signal=USR1 JOBID` without --batch signals the job's steps, not the batch shell: the ranks
    checkpointed and exited 124, and the job ended there, never requeued. The ranks now name the signal in the
    preemption marker, and the template requeues on it."""
    _assert_preempted_and_resumed(jobs, jobs.steps, world=1, atol=ATOL_ADAPTER)


@pytest.mark.slurm
def test_real_bad_config_ends_the_job_with_code_2_and_one_error(jobs):
    job = jobs.bad
    text = job.wait()
    assert "training step exited rc=2" in text, job.describe()
    assert "train.learning_rate" in text and "fast" in text, text  # the config error, naming key and value
    assert "Traceback" not in text, text
    assert "requeueing" not in text and "restart_count=1" not in text, text
    assert not (job.out / "run.json").exists(), "a run started despite the bad config"


@pytest.mark.slurm
def test_real_preemption_notice_while_the_launcher_starts_is_sent_again(jobs):
    """A USR1 that reached the node's launcher before it handled USR1 (the node script ignores it meanwhile:
    its default action would kill the launcher) was lost: no checkpoint, no requeue, and the job later killed at
    its time limit. The batch shell now sends it again until the checkpoint marker shows."""
    job = jobs.early
    assert jobs.signal_errors.get(job.name) is None, jobs.signal_errors[job.name]
    text = job.wait()
    info = job.describe()
    assert "caught SIGUSR1" in text and "sending SIGUSR1 again" in text and "requeueing job" in text, info
    assert text.rstrip().endswith("training step exited rc=0"), info
    assert len(_train_events(job.out, "preempted")) == 1, info
    assert json.loads((job.out / "checkpoints" / f"step-{SHORT_STEPS}" / "state.json").read_text())["step"] == SHORT_STEPS
