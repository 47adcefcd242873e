"""The sbatch templates and `scaletune slurm`'s sbatch command, without a cluster (the jobs themselves
run on a real local cluster in test_slurm_real.py)."""

from __future__ import annotations

import importlib.util
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
