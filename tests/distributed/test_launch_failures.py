"""`scaletune launch` when a rank fails: one screen and exit 2, as `scaletune train` ends (a real 2-process
launch on CPU/gloo through accelerate and torchrun)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import stutil

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_data_error_on_rank_0_ends_the_launch_with_one_screen(make_config):
    """Every example too long for data.max_length: rank 0 raises a DataError while the other rank waits for the
    data. Before, rank 1 printed a gloo "Connection closed by peer" traceback, torchrun added its
    ChildFailedError traceback (~90 lines) and the launch exited 1."""
    path = make_config("causal_lm")
    cmd = [sys.executable, "-m", "scaletune", "launch", str(path), "--nproc", "2",
           "--master-port", str(stutil.free_port()), "data.max_length=64"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=stutil.child_env())
    err = res.stderr
    assert res.returncode == 2, err
    assert "Traceback" not in err and "ChildFailedError" not in err
    assert err.count("error: data.train: no usable examples") == 1, err
    assert "rank 1: stopped by rank 0's error (rank 0 prints it)" in err or "rank 1 was stopped" in err, err
    # one summary line; which rank torchrun saw end first (and stopped the other) is a race
    summary = [line for line in err.splitlines() if line.startswith("scaletune launch:")]
    assert len(summary) == 1 and "exited with code 2" in summary[0], err
    assert len(err.splitlines()) <= 8, err


def test_node_0_of_the_raw_multi_node_config_gives_up_on_a_node_that_never_joins(tmp_path):
    """launch/multi_node_zero3.yaml run as its comment says, on node 0 of 2 while node 1 never starts: with the
    documented --rdzv_conf timeout (which the YAML cannot hold) torchrun gives up after it; without, node 0
    waited 600 s in silence."""
    import re
    import time

    repo = Path(__file__).resolve().parents[2]
    yaml_path = repo / "launch" / "multi_node_zero3.yaml"
    comment = " ".join(line.lstrip("# ").rstrip("\\ ") for line in yaml_path.read_text().splitlines()
                       if line.startswith("#"))
    timeout = re.search(r"--rdzv_conf (timeout=\d+)", comment)
    assert timeout, comment
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(yaml_path),
           "--num_machines", "2", "--num_processes", "2", "--machine_rank", "0",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(stutil.free_port()),
           "--rdzv_conf", "timeout=3", "-m", "scaletune", "train", str(tmp_path / "never-read.yaml")]
    start = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=stutil.child_env(), cwd=repo)
    assert res.returncode != 0 and time.monotonic() - start < 60, res.stderr[-2000:]
    assert "1/2 clients joined" in res.stderr, res.stderr[-2000:]
