"""Kill harness shared by test_kills.py and test_kills_zero3.py: start a run, interrupt it after random
delays, resume with --resume auto until it finishes, and compare with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from scaletune import runlock
from scaletune.checkpoint import verify
from scaletune.errors import UserError

import forking
from stutil import alpaca_records, tiny_lora_run, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40  # more steps than kills: each attempt trains at least one step before its kill
KILLS = 20
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SCALETUNE_NO_PROGRESS": "1"}


def base_config(root: Path, model_dir: Path) -> dict:
    """40-step tiny LoRA run (dropout on, so the RNG state must resume too), a checkpoint every step."""
    data = write_jsonl(root / "train.jsonl", alpaca_records(96))
    return tiny_lora_run(model_dir, data, peft={"lora_dropout": 0.1},
                         train={"max_steps": STEPS, "save_every": 1, "save_total_limit": 2, "warmup_ratio": 0.1})


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


def start(path: Path, env: dict, launcher: Callable[[], list[str]] | None = None) -> subprocess.Popen | forking.Forked:
    """A resumable run of `path`: forked by the zygote, or launched afresh by the command `launcher()` gives
    (`accelerate launch ...`, called per launch: a rendezvous port of its own each time)."""
    if launcher:
        return subprocess.Popen(command(path, launcher()), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    return forking.start(command(path)[3:], env, path.with_suffix(".stderr"))


def kill_group(proc: subprocess.Popen | forking.Forked, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def wait_unlocked(out: Path, timeout: float = 120) -> None:
    """Until no process of an interrupted attempt holds the run's lock (runlock.py), which the next attempt
    needs, else it is refused (exit 2). A killed launcher's ranks live on, in sessions of their own, until they
    have checkpointed: `communicate` waits for them only because they write to the launcher's stderr pipe."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            runlock.check_free(out, hint="")
            return
        except UserError as exc:
            assert time.monotonic() < deadline, f"the interrupted attempt still holds the lock: {exc}"
            time.sleep(0.1)


def _lines(metrics: Path, sig: int) -> int:
    """Complete lines of metrics.jsonl so far; for SIGINT only the train steps' (see run_with_interruptions)."""
    lines = metrics.read_text().split("\n")[:-1] if metrics.exists() else []  # (the last may be half written)
    return sum(sig != signal.SIGINT or '"event": "train"' in line for line in lines)


def run_with_interruptions(path: Path, out: Path, delays: list[float], sig: int,
                           launcher: Callable[[], list[str]] | None = None,
                           faults: dict[int, str] | None = None) -> int:
    """Start, interrupt after each delay (seconds after training started), resume, until done.
    Returns how many interruptions landed while the run was still going."""
    landed = 0
    attempt = 0
    while True:
        env = dict(ENV)
        if faults and attempt in faults:
            env["SCALETUNE_FAULT"] = faults[attempt]
        proc = start(path, env, launcher)
        if attempt < len(delays):
            deadline = time.monotonic() + 240
            metrics = out / "metrics.jsonl"
            seen = _lines(metrics, sig)
            # wait until this attempt trains (a new metrics line), then the random delay. Ctrl-C waits for a trained
            # step: a resumed run logs "resume" before its loop catches Ctrl-C (until then it interrupts, exit 130)
            while proc.poll() is None and time.monotonic() < deadline:
                if _lines(metrics, sig) > seen:
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
        wait_unlocked(out)
        assert_latest_complete(out)
        if proc.returncode == 0:
            return landed
        graceful = sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT) and attempt < len(delays)
        assert proc.returncode in (-9, 124, 1) or graceful, err[-3000:]
        if sig != signal.SIGKILL and attempt < len(delays) and not launcher:
            assert proc.returncode in (124, 0), err[-3000:]  # graceful stop = checkpoint + exit 124
        attempt += 1
        assert attempt < len(delays) + 3, "run never finished"
