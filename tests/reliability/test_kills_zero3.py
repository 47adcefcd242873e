"""SIGKILL a 2-process ZeRO-3 job at random moments: resumed with --resume auto, it ends with exactly the
adapter and step count of an uninterrupted 2-process run."""

from __future__ import annotations

import json
import random
import signal
import sys

import pytest

import forking
from killing import ENV, ROOT, assert_same_run, base_config, command, run_with_interruptions, write_cfg
from stutil import free_port


@pytest.mark.distributed
def test_sigkills_under_two_process_zero3(tiny_llama, tmp_path):
    """Two SIGKILLs of a 2-process ZeRO-3 job (12 steps: each DeepSpeed start costs far more than a step)."""
    steps = 12
    base_cfg = base_config(tmp_path, tiny_llama)

    def launcher() -> list[str]:
        # a port free now, for this launch alone (one port for all launches lay unbound between them, minutes in
        # all, for another test's free_port() or a connection to take)
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "launch/cpu_2proc_zero3.yaml"), "--main_process_port", str(free_port())]

    ref = tmp_path / "ref"
    # (the uninterrupted run's ranks forked: the same ranks, ~10 s less import each; the killed runs are real launches)
    res = forking.launch(command(write_cfg(base_cfg, ref, steps, zero_stage=3), launcher()), ENV, tmp_path, ROOT,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:]
    times = [json.loads(line)["time"] for line in (ref / "metrics.jsonl").read_text().splitlines()]
    rng = random.Random(3)
    out = tmp_path / "run"
    landed = run_with_interruptions(write_cfg(base_cfg, out, steps, zero_stage=3), out,
                                    [rng.uniform(0, 3 * (max(times) - min(times)) / steps) for _ in range(2)],
                                    signal.SIGKILL,
                                    launcher=launcher)
    assert landed >= 1
    assert_same_run(out, ref, steps)
