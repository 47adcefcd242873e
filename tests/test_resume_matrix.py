"""Resume exactness across tasks, methods and data options: a run stopped mid-epoch at a step that is no
multiple of save_every and resumed with `--resume auto` ends with the adapter, per-step losses and lrs of
the uninterrupted run. One representative case per place a resume could lose state (RNG streams: dropout,
NEFTune, data order and sampling; the sampler's position; optimizer groups; method state)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from scaletune.config import load_config
from scaletune.loop import fit
from scaletune.train import StopFlag, setup

from stutil import StopAt, alpaca_records, cls_records, method_keys, read_metrics, write_jsonl

pytestmark = pytest.mark.slow

DROPOUT = {"lora_dropout": 0.1}
# (id, task, peft: method name or peft keys, train, data (its "model": model keys), n examples, steps,
#  stop at (a tuple: stop again after the resume))
# Global batch 8 in micro-batches of 4 (accumulation 2) unless a case says otherwise; save_every 3.
CASES = [
    # the sampler's position: the stop in the 2nd epoch, at an epoch's end, after step 1; accumulation 4
    ("causal-lora-dropout-2nd-epoch", "causal_lm", DROPOUT, {"micro_batch_size": 2}, {}, 24, 7, 5),
    ("causal-stop-at-epoch-end", "causal_lm", DROPOUT, {}, {}, 24, 7, 3),
    ("causal-stop-after-step-1-and-4", "causal_lm", DROPOUT, {}, {}, 48, 6, (1, 4)),
    # methods (LoRA and AdaLoRA on causal_lm are in test_train.py / test_methods.py)
    ("causal-ia3", "causal_lm", "ia3", {}, {}, 48, 6, 4),
    ("causal-vera", "causal_lm", "vera", {}, {}, 48, 6, 4),
    ("causal-ln_tuning", "causal_lm", "ln_tuning", {}, {}, 48, 6, 4),
    ("causal-dora", "causal_lm", "dora", {}, {}, 48, 6, 4),
    ("causal-prompt_tuning", "causal_lm", "prompt_tuning", {}, {}, 48, 6, 4),
    ("causal-prefix_tuning", "causal_lm", "prefix_tuning", {}, {}, 48, 6, 4),
    ("causal-p_tuning-encoder-dropout", "causal_lm", {"method": "p_tuning", "num_virtual_tokens": 4,
                                                      "encoder_hidden_size": 16, "encoder_dropout": 0.1},
     {}, {}, 48, 6, 4),
    ("causal-bottleneck", "causal_lm", "bottleneck_adapter", {}, {}, 48, 6, 4),
    ("seq_cls-loha-ungrouped", "seq_cls", "loha", {}, {"group_by_length": False}, 48, 6, 4),
    ("seq_cls-adalora", "seq_cls", "adalora", {}, {}, 48, 8, 5),
    ("token_cls-oft-class-weights", "token_cls", "oft", {"class_weights": "balanced"}, {}, 48, 6, 4),
    # optimizer groups, schedules, RNG streams other than dropout, precision, unfused paths
    ("causal-loraplus-weight-decay", "causal_lm", {}, {"loraplus_lr_ratio": 8.0, "weight_decay": 0.1}, {}, 48, 6, 4),
    ("causal-cosine-min-lr-warmup-ratio", "causal_lm", DROPOUT,
     {"lr_scheduler": "cosine_with_min_lr", "min_lr_ratio": 0.1, "warmup_steps": None, "warmup_ratio": 0.3},
     {}, 48, 6, 4),
    ("causal-neftune", "causal_lm", {}, {"neftune_noise_alpha": 5.0}, {}, 48, 6, 4),
    ("causal-bf16-autocast", "causal_lm", DROPOUT, {"mixed_precision": "bf16"}, {}, 48, 6, 4),
    ("causal-bf16-weights", "causal_lm", DROPOUT, {"mixed_precision": "bf16"}, {"model": {"dtype": "bfloat16"}},
     48, 6, 4),
    ("causal-unfused-unchunked-unclipped", "causal_lm", DROPOUT,
     {"max_grad_norm": None, "chunked_loss": False, "fused_lora": False}, {}, 48, 6, 4),
    ("token_cls-gradient-checkpointing", "token_cls", DROPOUT, {}, {"model": {"gradient_checkpointing": True}}, 48, 6, 4),
    # data
    ("causal-packing-2nd-epoch", "causal_lm", DROPOUT, {}, {"packing": True}, 40, 7, 5),
    ("causal-weighted-sources", "causal_lm", DROPOUT, {}, "weighted", 40, 6, 4),
    ("causal-cached-data-workers", "causal_lm", DROPOUT, {}, {"cache": True, "num_workers": 1}, 48, 6, 4),
    ("seq_cls-label-smoothing-eval-fraction", "seq_cls", DROPOUT, {"label_smoothing": 0.1, "eval_every": 2},
     {"eval_fraction": 0.25, "eval": None}, 64, 6, 4),
    ("seq_cls-multi-label-class-weights", "seq_cls", DROPOUT, {"class_weights": "balanced"}, "multi", 48, 6, 4),
    ("seq_regression-lora", "seq_regression", DROPOUT, {}, {}, 48, 6, 4),
    # token_cls sentences cut into windows (too_long: split), evaluated stitched at steps 2, 4 and 6
    ("token_cls-too-long-split", "token_cls", DROPOUT, {"eval_every": 2}, {"too_long": "split", "max_length": 8},
     48, 6, 3),
    # evaluation, best adapter and early stopping (both runs stop early at step 4), per-epoch schedules
    ("seq_cls-early-stopping", "seq_cls", DROPOUT,
     {"eval_every": 1, "best_metric": "loss", "early_stopping_patience": 3, "early_stopping_threshold": 1.0},
     {}, 48, 6, 3),
    ("causal-saves-evals-per-epoch", "causal_lm", DROPOUT,
     {"save_every": None, "saves_per_epoch": 2, "evals_per_epoch": 3}, {}, 48, 9, 5),
]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one state per process: a bf16 case must not meet a float32 one's."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _config(make_config, tmp_path: Path, task: str, peft, train: dict, data, n: int, steps: int) -> dict:
    """The raw run config shared by the uninterrupted and the split run (each gets its own output_dir)."""
    train = {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": steps, "save_every": 3,
             "lr_scheduler": "cosine", "warmup_steps": 2, **train}
    raw = yaml.safe_load(make_config(task, n=n, train=train).read_text())
    if isinstance(peft, str):
        raw["peft"] = method_keys(peft, task)
    elif "method" in peft:
        raw["peft"] = peft
    else:
        raw["peft"].update(peft)
    if data == "weighted":  # a seeded half of one file, every example of another twice
        other = write_jsonl(tmp_path / "data" / "other.jsonl", _records(task, 8, seed=2))
        raw["data"]["train"] = [{"path": raw["data"]["train"], "weight": 0.5}, {"path": str(other), "weight": 2}]
    elif data == "multi":
        from test_multi_label import multi_records

        write_jsonl(Path(raw["data"]["train"]), multi_records(n))
        write_jsonl(Path(raw["data"]["eval"]), multi_records(16, seed=1))
    else:
        data = dict(data)
        raw["model"].update(data.pop("model", {}))  # (a case's model settings ride with its data's)
        raw["data"].update(data)
    return raw


def _records(task: str, n: int, seed: int) -> list[dict]:
    return alpaca_records(n, seed=seed) if task == "causal_lm" else cls_records(n, seed=seed)


def _write(raw: dict, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**raw, "output_dir": str(tmp_path / name)}, sort_keys=False))
    return path


def _assert_same_run(a: Path, b: Path, steps: int, log_every: int = 1) -> None:
    """Same adapter tensors and the same per-step logged loss, lr, gradient norm and padding (the same data),
    and the same evals, to 1e-6."""
    from safetensors.torch import load_file

    ma, mb = read_metrics(a), read_metrics(b)
    # (steps: the run's length, or an early stop's step)
    logged = [s for s in range(1, steps + 1) if s % log_every == 0 or s == steps]
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == logged
    for key in ("loss", "lr", "grad_norm", "padding_ratio", "epoch"):
        _assert_same_values(ma, mb, key)
    ea, eb = read_metrics(a, "eval"), read_metrics(b, "eval")
    assert [r["step"] for r in ea] == [r["step"] for r in eb]
    for key in (k for k in ea[0] if isinstance(ea[0][k], float) and k != "time") if ea else ():
        _assert_same_values(ea, eb, key)
    wa = load_file(str(a / "adapter/adapter_model.safetensors"))
    wb = load_file(str(b / "adapter/adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def _assert_same_values(whole: list[dict], resumed: list[dict], key: str) -> None:
    torch.testing.assert_close(torch.tensor([r[key] for r in resumed], dtype=torch.float64),
                               torch.tensor([r[key] for r in whole], dtype=torch.float64), rtol=0, atol=1e-6,
                               msg=lambda m: f"logged {key}: {m}")


@pytest.mark.parametrize("task,peft,train,data,n,steps,stop", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_stopped_and_resumed_run_equals_uninterrupted(make_config, tmp_path, task, peft, train, data, n, steps,
                                                      stop):
    raw = _config(make_config, tmp_path, task, peft, train, data, n, steps)
    full, split = _write(raw, tmp_path, "full"), _write(raw, tmp_path, "split")
    run, _ = setup(load_config(full))
    assert fit(run, StopFlag()) == "done"
    run, _ = setup(load_config(split))
    for at in stop if isinstance(stop, tuple) else (stop,):
        assert fit(run, StopAt(run, at)) == "preempted"
        run, used = setup(load_config(split), resume="auto")
        assert used.name == f"step-{at}" and run.step == at
    assert fit(run, StopFlag()) == "done"
    assert run.step == (4 if train.get("early_stopping_patience") else steps)
    _assert_same_run(tmp_path / "full", tmp_path / "split", run.step)


def _as_killed_after(run_dir: Path, copy: Path, step: int) -> None:
    """`copy` as a SIGKILL after `run_dir`'s checkpoint `step` leaves it: no later checkpoint, no final
    adapter, no metrics past that step, `latest` naming that checkpoint."""
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "adapter")
    for ckpt in (copy / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    (copy / "checkpoints/latest").write_text(f"step-{step}\n")
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    (copy / "metrics.jsonl").write_text("".join(f"{line}\n" for line in kept))


@pytest.mark.parametrize("task,peft,data,n,log_every", [("causal_lm", DROPOUT, {}, 24, 1),
                                                        ("token_cls", DROPOUT, {"group_by_length": False}, 48, 2)],
                         ids=["causal-2nd-epoch", "token_cls-ungrouped-log-every-2"])
def test_resume_from_a_periodic_checkpoint_of_a_killed_run(make_config, tmp_path, task, peft, data, n, log_every):
    """The kill path: what a SIGKILL after the step-3 checkpoint leaves, resumed, ends as the whole run (logging
    every 2 steps, the loss logged at step 4 is still the mean of steps 3 and 4)."""
    raw = _config(make_config, tmp_path, task, peft, {"log_every": log_every}, data, n, 7)
    run, _ = setup(load_config(_write(raw, tmp_path, "full")))
    assert fit(run, StopFlag()) == "done"
    _as_killed_after(tmp_path / "full", tmp_path / "split", 3)
    run, used = setup(load_config(_write(raw, tmp_path, "split")), resume="auto")
    assert used.name == "step-3" and run.step == 3
    assert fit(run, StopFlag()) == "done"
    _assert_same_run(tmp_path / "full", tmp_path / "split", 7, log_every)
