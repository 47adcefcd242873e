"""Fixtures for the Slurm tests: a real two-node local cluster (slurm/cluster.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "slurm" / "cluster.sh"


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs a real local Slurm cluster (root; started by slurm/cluster.sh)")


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the local cluster once per session; yields the env for sbatch/squeue/scancel.

    Skipped (not failed) when not root, when SCALETUNE_SKIP_SLURM=1, or when the Slurm daemons are
    not installed and cannot be (no apt-get, no package mirror: cluster.sh exits 3). Failed when the
    cluster does not start for any other reason. The reason and the tail of the cluster.sh output are
    in the message.
    """
    if os.environ.get("SCALETUNE_SKIP_SLURM") == "1":
        pytest.skip("SCALETUNE_SKIP_SLURM=1")
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("slurm tests need root (slurm/cluster.sh starts munged/slurmctld/slurmd)")
    if shutil.which("bash") is None:
        pytest.skip("bash not available")
    state = os.environ.get("SCALETUNE_SLURM_DIR", "/tmp/scaletune-slurm")
    env = dict(os.environ, SCALETUNE_SLURM_DIR=state)
    try:
        up = subprocess.run(["bash", str(CLUSTER_SH), "up"], env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        subprocess.run(["bash", str(CLUSTER_SH), "down"], env=env, capture_output=True, timeout=120)
        pytest.skip("slurm/cluster.sh up timed out")
    if up.returncode != 0:
        subprocess.run(["bash", str(CLUSTER_SH), "down"], env=env, capture_output=True, timeout=120)
        message = f"local Slurm cluster could not start:\n{(up.stdout + up.stderr)[-3000:]}"
        if up.returncode == 3:  # cluster.sh: Slurm is not installed and cannot be installed here
            pytest.skip(message)
        pytest.fail(message)  # installable (or installed), as root, and still not up: a defect of cluster.sh
    env["SLURM_CONF"] = os.path.join(state, "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "down"], env=env, capture_output=True, timeout=120)
