"""2-process CPU (gloo) <-> 1-process plain-torch round trips of the trainable state.

ZeRO-2: a 2-process run trains a tiny LoRA model for a few steps, gathers its state (full tensors,
identical on both ranks), then takes one more step. A fresh 1-process run without DeepSpeed loads that
state and must take the same step. The reverse direction (1 process -> 2 processes) is checked as well.
(ZeRO-3 round trips run through the real CLI in test_scale_out.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

import forking  # noqa: E402
import stutil  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKER = HERE / "ds_worker.py"
ATOL = 1e-5


def _launch_2proc(stage: int, *worker_args: str) -> None:
    """ds_worker.py as 2 torch.distributed ranks (forked from tests/zygote.py; the launcher is not what is
    tested here: the CLI's launch paths are, in test_scale_out.py)."""
    logs = Path(worker_args[worker_args.index("--out") + 1]).with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    forking.run_ranks(WORKER, ["--stage", str(stage), *worker_args], stutil.child_env(), 2, logs, timeout=240)


def _run_1proc(*worker_args: str) -> None:
    log = Path(worker_args[worker_args.index("--out") + 1]).with_suffix(".log")
    res = forking.run_script(WORKER, ["--stage", "0", *worker_args], stutil.child_env(), log, timeout=240)
    assert res.returncode == 0, res.stderr[-6000:]


def _assert_same_params(a: dict, b: dict, atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    assert a, "no trainable parameters gathered"
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def _check_saved_adapter(adapter_dir: Path, params: dict) -> None:
    """save_pretrained(state_dict=saved_adapter_state(...)) wrote the full, trained LoRA weights."""
    from safetensors.torch import load_file

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    expected = {k.replace(".default", ""): v for k, v in params.items()}
    assert saved.keys() == expected.keys()
    for k, v in expected.items():
        assert saved[k].numel() > 0
        torch.testing.assert_close(saved[k].float(), v, rtol=0, atol=1e-6)


@pytest.mark.distributed
# DDP state is plain torch (covered by the single-process resume tests); ZeRO-3 <-> 1 process runs through
# the real CLI in test_scale_out.py (test_zero3_world2_checkpoint_resumes_on_one_process and the reverse).
@pytest.mark.parametrize("stage", [2])
def test_zero_to_single_and_back(stage: int, tmp_path: Path) -> None:
    ds_dir, single_dir = tmp_path / "ds", tmp_path / "single"
    ds_resume, single_resume = tmp_path / "ds_resume", tmp_path / "single_resume"

    # 2 processes, ZeRO-<stage>: train, gather, one more step.
    _launch_2proc(stage, "--role", "train", "--out", str(ds_dir))
    r0 = torch.load(ds_dir / "rank0.pt")
    r1 = torch.load(ds_dir / "rank1.pt")
    # Full, non-empty tensors, identical on both ranks.
    assert len(r0["params"]) == 8  # 2 layers x (q, v) x (A, B)
    assert len(r0["opt"]) == 2 * len(r0["params"])
    assert r0["scalars"] == r1["scalars"] == {"step": 3}
    for k, v in r0["params"].items():
        assert v.numel() > 0 and v.abs().sum() > 0, k
        assert tuple(v.shape) in ((4, 32), (32, 4)), (k, v.shape)
    _assert_same_params(r0["params"], r1["params"], atol=0)
    _assert_same_params(r0["opt"], r1["opt"], atol=0)
    _check_saved_adapter(ds_dir / "adapter", r0["params"])

    # 1 process, no DeepSpeed: train its own reference run (for the reverse check) and, in the same
    # process, load the ZeRO state into a fresh model and take the same next step.
    _run_1proc("--role", "train", "--out", str(single_dir), "--then", f"resume:{ds_dir}:{single_resume}")
    _assert_same_params(torch.load(ds_dir / "next.pt")["params"], torch.load(single_resume / "next.pt")["params"])

    # Reverse: 1-process state loaded into a fresh 2-process ZeRO run.
    _launch_2proc(stage, "--role", "resume", "--load", str(single_dir), "--out", str(ds_resume))
    _assert_same_params(torch.load(single_dir / "next.pt")["params"], torch.load(ds_resume / "next.pt")["params"])
    # And both directions agree with each other (same data, same optimizer): a single trajectory.
    _assert_same_params(torch.load(ds_dir / "state.pt")["params"], torch.load(single_dir / "state.pt")["params"])
