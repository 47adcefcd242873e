"""Slurm templates end-to-end on a real local two-node cluster (see slurm/cluster.sh).

The jobs run the real template path (srun -> accelerate launch -> trainer); only the
trainer is replaced by tests/slurm/fake_trainer.py through SCALETUNE_ENTRY.

    sudo -E .venv/bin/python -m pytest tests/slurm -m slurm -v
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE_TRAINER = Path(__file__).resolve().parent / "fake_trainer.py"
PKG_TEMPLATES = REPO / "src" / "scaletune" / "resources" / "slurm"
REPO_TEMPLATES = REPO / "slurm"
JOB_TIMEOUT = 240


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
        "NODE_RANK=${SLURM_NODEID}",
        "--resume auto",
        'scontrol requeue "${SLURM_JOB_ID}"',
        "launch-args",
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


# ----------------------------------------------------------------- real cluster


def _job_env(cluster_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in cluster_env.items() if not (k.startswith("SLURM_") and k != "SLURM_CONF")}
    env.pop("PYTHONPATH", None)
    env.pop("SCALETUNE_VENV", None)
    env["SCALETUNE_PYTHON"] = sys.executable
    env["SCALETUNE_ENTRY"] = str(FAKE_TRAINER)
    return env


def _submit(tmp_path: Path, env, cfg: dict, nodes: int, overrides=()) -> tuple[str, Path]:
    m = _slurm_module()
    (tmp_path / "logs").mkdir(exist_ok=True)
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(json.dumps(cfg))
    cmd = m.render_sbatch_command(
        cfg_path,
        nodes=nodes,
        gpus_per_node=0,
        time="00:30:00",
        partition=None,
        account=None,
        extra=list(overrides),
        sbatch_args=["--parsable", "--job-name=sttest"],
        template=REPO_TEMPLATES / m.template_name(nodes),
    )
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    return job_id, tmp_path / "logs" / f"sttest-{job_id}.out"


def _in_queue(job_id: str, env) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id], env=env, capture_output=True, text=True)
    # once the job is purged squeue errors with "Invalid job id"
    return out.returncode == 0 and out.stdout.strip() != ""


def _wait_gone(job_id: str, env, log: Path, timeout=JOB_TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _in_queue(job_id, env):
            break
        time.sleep(1)
    else:
        subprocess.run(["scancel", job_id], env=env)
        pytest.fail(f"job {job_id} still queued after {timeout}s; log:\n{_read(log)}")
    return _read(log)


def _read(p: Path) -> str:
    return p.read_text() if p.exists() else "<no log>"


@pytest.mark.slurm
def test_single_node_job_completes(slurm_cluster, tmp_path):
    env = _job_env(slurm_cluster)
    out = tmp_path / "out"
    job_id, log = _submit(tmp_path, env, {"out_dir": str(out), "steps": 3, "step_sleep": 0.1}, 1, ["lr=0.5"])
    text = _wait_gone(job_id, env, log)
    assert "training step exited rc=0" in text, text
    assert "restart_count=0" in text
    done = json.loads((out / "done.json").read_text())
    assert done == {"steps": 3, "restart": 0}
    info = json.loads((out / "rank0.r0.json").read_text())
    assert info["world_size"] == 1
    assert info["argv"][1:3] == ["--resume", "auto"] and info["argv"][-1] == "lr=0.5"
    assert info["cfg"]["lr"] == 0.5


@pytest.mark.slurm
def test_preemption_requeue_resume(slurm_cluster, tmp_path):
    env = _job_env(slurm_cluster)
    out = tmp_path / "out"
    steps = 16
    job_id, log = _submit(tmp_path, env, {"out_dir": str(out), "steps": steps, "step_sleep": 0.5}, 2)
    steps_log = out / "steps.log"
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        if steps_log.exists() and len(steps_log.read_text().splitlines()) >= 3:
            break
        if not _in_queue(job_id, env):
            pytest.fail(f"job ended before it could be signalled:\n{_read(log)}")
        time.sleep(0.25)
    else:
        pytest.fail(f"job never reached step 3:\n{_read(log)}")
    # what Slurm does at --signal=B:USR1@N: signal only the batch shell
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    text = _wait_gone(job_id, env, log)

    assert "caught SIGUSR1" in text and "requeueing job" in text, text
    assert "restart_count=1" in text, text
    assert text.rstrip().endswith("training step exited rc=0"), text
    # two ranks, one launcher per node, one rendezvous (the gloo all-reduce sums 1 + 2)
    infos = [json.loads((out / f"rank{r}.r0.json").read_text()) for r in (0, 1)]
    assert sorted(i["rank"] for i in infos) == [0, 1] and all(i["world_size"] == 2 for i in infos)
    assert all(i["allreduce"] == 3.0 for i in infos), infos
    assert {i["slurm_node"] for i in infos} == {"n1", "n2"} and {i["node_id"] for i in infos} == {"0", "1"}
    assert infos[0]["master"] == infos[1]["master"] and infos[0]["master"].startswith("n1:")
    # the signal reached the python trainer on both nodes
    for r in (0, 1):
        assert (out / f"signal.rank{r}.r0").read_text().split() == ["SIGUSR1"], r
    # every step ran exactly once; the first restart resumed from the saved counter
    rows = [tuple(map(int, line.split())) for line in steps_log.read_text().splitlines()]
    assert [s for s, _ in rows] == list(range(steps)), rows
    saved = max(s for s, r in rows if r == 0) + 1
    assert 3 <= saved < steps
    assert all(r == 1 for s, r in rows if s >= saved), rows
    assert json.loads((out / "done.json").read_text()) == {"steps": steps, "restart": 1}
    assert f"rank 0 resumed from step {saved}" in text
