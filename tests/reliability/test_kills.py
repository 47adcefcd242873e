"""Kill it anywhere: SIGKILL at random moments (and mid-checkpoint), SIGTERM/SIGUSR1, and under
2-process ZeRO-3 — every interrupted run, resumed with --resume auto, ends with exactly the adapter
and step count of an uninterrupted run, and `latest` never points at a partial checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from scaletune.checkpoint import verify

from stutil import alpaca_records, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40  # more steps than kills: each attempt trains at least one step before its kill
KILLS = 20
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SCALETUNE_NO_PROGRESS": "1"}


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("kills")
    data = write_jsonl(root / "train.jsonl", alpaca_records(96))
    return {
        "task": "causal_lm",
        "model": {"name_or_path": str(tiny_llama), "dtype": "float32"},
        "peft": {"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "all-linear"},
        "data": {"train": str(data), "max_length": 160, "cache": False},
        "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": STEPS, "learning_rate": 1e-2,
                  "mixed_precision": "no", "log_every": 1, "eval_every": None, "save_every": 1,
                  "save_total_limit": 2, "report_to": [], "warmup_ratio": 0.1},
    }


def write_cfg(base: dict, out: Path, steps: int = STEPS, **distributed) -> Path:
    raw = {**base, "output_dir": str(out), "train": {**base["train"], "max_steps": steps}}
    if distributed:
        raw["distributed"] = distributed
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


def command(path: Path, launcher: list[str] | None = None) -> list[str]:
    if launcher:
        return [*launcher, "-m", "scaletune", "train", str(path), "--resume", "auto"]
    return [sys.executable, "-m", "scaletune", "train", str(path), "--resume", "auto"]


def adapter(out: Path) -> dict:
    return load_file(str(out / "adapter/adapter_model.safetensors"))


def assert_same_run(out: Path, ref: Path, steps: int = STEPS) -> None:
    a, b = adapter(out), adapter(ref)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    state = json.loads((out / f"checkpoints/step-{steps}/state.json").read_text())
    assert state["step"] == steps


def assert_latest_complete(out: Path) -> None:
    latest = out / "checkpoints" / "latest"
    if latest.exists():
        target = out / "checkpoints" / latest.read_text().strip()
        assert target.is_dir() and verify(target) is None, f"latest -> {target} is partial"


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run_with_interruptions(path: Path, out: Path, delays: list[float], sig: int, launcher=None,
                           faults: dict[int, str] | None = None) -> int:
    """Start, interrupt after each delay (seconds after training started), resume, until done.
    Returns how many interruptions landed while the run was still going."""
    landed = 0
    attempt = 0
    while True:
        env = dict(ENV)
        if faults and attempt in faults:
            env["SCALETUNE_FAULT"] = faults[attempt]
        proc = subprocess.Popen(command(path, launcher), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        if attempt < len(delays):
            deadline = time.monotonic() + 240
            metrics = out / "metrics.jsonl"
            seen = metrics.read_text().count("\n") if metrics.exists() else 0
            # wait until this attempt trains (a new metrics line), then the random delay
            while proc.poll() is None and time.monotonic() < deadline:
                if metrics.exists() and metrics.read_text().count("\n") > seen:
                    break
                time.sleep(0.05)
            time.sleep(delays[attempt])
            if proc.poll() is None:
                kill_group(proc, sig)
                landed += 1
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            kill_group(proc, signal.SIGKILL)
            raise
        assert_latest_complete(out)
        if proc.returncode == 0:
            return landed
        graceful = sig in (signal.SIGTERM, signal.SIGUSR1) and attempt < len(delays)
        assert proc.returncode in (-9, 124, 1) or graceful, err[-3000:]
        if sig != signal.SIGKILL and attempt < len(delays) and not launcher:
            assert proc.returncode in (124, 0), err[-3000:]  # graceful stop = checkpoint + exit 124
        attempt += 1
        assert attempt < len(delays) + 3, "run never finished"


@pytest.fixture(scope="module")
def reference(base_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    res = subprocess.run(command(write_cfg(base_cfg, out)), env=ENV, capture_output=True, text=True, timeout=600)
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
# tests/distributed/test_scale_out.py and by the real `scancel --signal=USR1` in tests/slurm.
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["SIGTERM"])
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


@pytest.mark.distributed
def test_sigkills_under_two_process_zero3(base_cfg, tmp_path):
    """Two SIGKILLs of a 2-process ZeRO-3 job (12 steps: each DeepSpeed start costs far more than a step)."""
    steps = 12
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "launch/cpu_2proc_zero3.yaml"), "--main_process_port", "29533"]
    ref = tmp_path / "ref"
    res = subprocess.run(command(write_cfg(base_cfg, ref, steps, zero_stage=3), launcher), env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    times = [json.loads(line)["time"] for line in (ref / "metrics.jsonl").read_text().splitlines()]
    rng = random.Random(3)
    out = tmp_path / "run"
    landed = run_with_interruptions(write_cfg(base_cfg, out, steps, zero_stage=3), out,
                                    [rng.uniform(0, 3 * (max(times) - min(times)) / steps) for _ in range(2)],
                                    signal.SIGKILL,
                                    launcher=launcher)
    assert landed >= 1
    assert_same_run(out, ref, steps)
