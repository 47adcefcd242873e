"""The sbatch templates and `scaletune slurm`'s sbatch command, without a cluster (the jobs themselves
run on a real local cluster in test_slurm_real.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PKG_TEMPLATES = REPO / "src" / "scaletune" / "resources" / "slurm"
REPO_TEMPLATES = REPO / "slurm"


def _slurm_module():
    # load by path: keeps these tests independent of the rest of the package
    spec = importlib.util.spec_from_file_location("_scaletune_slurm", REPO / "src" / "scaletune" / "slurm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------- no cluster needed


@pytest.mark.parametrize("name", ["single_node.sbatch", "multi_node.sbatch"])
def test_repo_templates_are_copies_of_packaged_ones(name):
    assert (REPO_TEMPLATES / name).read_bytes() == (PKG_TEMPLATES / name).read_bytes(), (
        f"slurm/{name} must be an identical copy of src/scaletune/resources/slurm/{name}"
    )


@pytest.mark.parametrize("name", ["single_node.sbatch", "multi_node.sbatch"])
def test_template_contract(name):
    text = (PKG_TEMPLATES / name).read_text()
    subprocess.run(["bash", "-n", str(PKG_TEMPLATES / name)], check=True)
    for needle in [
        "#SBATCH --signal=B:USR1@",
        "#SBATCH --requeue",
        "#SBATCH --output=logs/%x-%j.out",
        "#SBATCH --export=ALL",
        'scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n1',
                "--resume auto",
        'scontrol requeue "${SLURM_JOB_ID}"',
        '-m scaletune launch',
        '--node-rank "$SLURM_NODEID"',
        'trap "" USR1',
    ]:
        assert needle in text, needle
    assert "#SBATCH --partition" not in text and "#SBATCH --account" not in text


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="cluster.sh runs as root only")
@pytest.mark.parametrize("made_by", ["another user", "a link", "writable by others"])
def test_cluster_sh_refuses_a_state_dir_it_does_not_own_alone(tmp_path, made_by):
    """cluster.sh runs its daemons as root from $SCALETUNE_SLURM_DIR (default: a fixed name in /tmp): root
    wrote slurm.conf into, and later killed the pids named in, a directory another local user made first. It
    stops before it installs, writes or starts anything. (Stubs on PATH are a safety net: none is reached.)"""
    state = tmp_path / "state"
    if made_by == "a link":
        (tmp_path / "theirs").mkdir()
        state.symlink_to(tmp_path / "theirs", target_is_directory=True)
    else:
        state.mkdir()
        if made_by == "another user":
            os.chown(state, 65534, 65534)
        else:
            state.chmod(0o777)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("munged", "slurmctld", "slurmd", "sbatch", "apt-get", "hostname", "scontrol", "runuser"):
        (stubs / name).write_text("#!/bin/sh\nexit 1\n")
        (stubs / name).chmod(0o755)
    env = {**os.environ, "SCALETUNE_SLURM_DIR": str(state), "PATH": f"{stubs}:{os.environ['PATH']}"}
    for command in ("up", "down"):
        done = subprocess.run(["bash", str(REPO_TEMPLATES / "cluster.sh"), command], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 1 and "is not a directory of root's alone" in done.stderr, done.stderr
    assert not list(state.iterdir())


def test_render_sbatch_command():
    m = _slurm_module()
    cmd = m.render_sbatch_command("cfg.yaml", 2, 4, "01:00:00", "gpu", "proj", ["lr=1e-4"])
    assert cmd[:2] == ["sbatch", "--nodes=2"]
    assert "--gres=gpu:4" in cmd and "--time=01:00:00" in cmd
    assert "--partition=gpu" in cmd and "--account=proj" in cmd
    assert cmd[-3].endswith("multi_node.sbatch")
    assert cmd[-2] == str(Path("cfg.yaml").resolve()) and cmd[-1] == "lr=1e-4"
    cmd1 = m.render_sbatch_command("cfg.yaml", 1, 0, None, None, None, [])
    assert cmd1[-2].endswith("single_node.sbatch")
    assert not any(a.startswith(("--gres", "--partition", "--account", "--time")) for a in cmd1)
    with pytest.raises(ValueError):
        m.render_sbatch_command("cfg.yaml", 0, 0, None, None, None, [])


def test_the_job_name_is_read_in_every_form_sbatch_takes():
    from scaletune.slurm import job_name

    assert job_name(["--job-name=a"]) == "a" and job_name(["-J", "b"]) == "b" and job_name(["-Jc"]) == "c"
    assert job_name(["--job-name", "d", "--qos=high"]) == "d" and job_name(["--job-name=e", "-J", "f"]) == "f"
