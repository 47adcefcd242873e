"""Non-finite steps skipped on the device (fused AdamW's `found_inf`, the host looks only at logged and
checkpointed steps) behave exactly like steps checked on the host every step."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from scaletune import faults, nonfinite
from scaletune.checkpoint import checkpoint_dirs
from scaletune.config import load_config
from scaletune.errors import UserError
from scaletune.loop import fit
from scaletune.train import StopFlag, setup

from stutil import read_metrics


def _train(path, monkeypatch, fault: str, host: bool):
    """Train in this process with the given faults; `host` forces the every-step host check."""
    monkeypatch.setenv("SCALETUNE_FAULT", fault)
    faults._plan.cache_clear()
    with monkeypatch.context() as m:
        if host:
            m.setattr(nonfinite, "device_skipping_optimizer", lambda *a: None)
        run, _ = setup(load_config(path), overwrite=True)
        on_device = nonfinite.device_skipping_optimizer(run.accelerator, run.optimizer, run.model) is not None
        try:
            fit(run, StopFlag())
        finally:
            faults._plan.cache_clear()
    weights = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    return run, weights, on_device


def test_device_skip_equals_host_check(make_config, monkeypatch, tmp_path):
    """Steps 2 and 4 have a NaN loss; the host first looks at step 6. Same final weights, bit for bit,
    as checking every step on the host; both skipped steps counted and logged under their own numbers."""
    path = make_config("causal_lm", n=48, train={"max_steps": 6, "log_every": 6, "on_nonfinite": "skip",
                                                 "max_nonfinite_skips": 3})
    results, losses = {}, {}
    for host in (False, True):
        run, weights, on_device = _train(path, monkeypatch, "nan@2,nan@4", host)
        assert on_device is not host
        assert run.counters["nonfinite_skips"] == 2
        assert [r["step"] for r in read_metrics(tmp_path / "run", "nonfinite")] == [2, 4]
        (logged,) = read_metrics(tmp_path / "run", "train")
        losses[host] = logged["loss"]  # the mean of steps 1, 3, 5 and 6: the skipped ones are not in it
        results[host] = weights
    assert math.isfinite(losses[False]) and losses[False] == losses[True]
    _, clean, _ = _train(path, monkeypatch, "", host=False)
    for name, w in results[False].items():
        assert torch.equal(w, results[True][name]), name
    assert any(not torch.equal(w, clean[n]) for n, w in results[False].items())  # the skips changed the run


def test_deferred_stop_names_the_step_and_saves_nothing_after_it(make_config, monkeypatch, tmp_path):
    """on_nonfinite=stop with the NaN at step 3 and the next logged/checkpointed step at 4: the run stops
    there, naming step 3, before step 4's checkpoint is written; step 2's checkpoint is the last."""
    path = make_config("causal_lm", n=48, train={"max_steps": 6, "log_every": 6, "save_every": 2,
                                                 "save_total_limit": None})
    with pytest.raises(UserError, match="non-finite loss at step 3"):
        _train(path, monkeypatch, "nan@3", host=False)
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-2"]
    assert [r["step"] for r in read_metrics(tmp_path / "run", "nonfinite")] == [3]


def test_only_fused_torch_adam_skips_on_device():
    params = [torch.nn.Parameter(torch.ones(2))]
    plain = SimpleNamespace(distributed_type=SimpleNamespace(value="NO"), scaler=None)
    fused = torch.optim.AdamW(params, fused=True)
    assert nonfinite.device_skipping_optimizer(plain, SimpleNamespace(optimizer=fused), torch.nn.Linear(2, 2)) is fused
    assert nonfinite.device_skipping_optimizer(plain, torch.optim.AdamW(params, foreach=True), None) is None
    scaled = SimpleNamespace(distributed_type=SimpleNamespace(value="NO"), scaler=object())  # fp16 GradScaler
    assert nonfinite.device_skipping_optimizer(scaled, fused, None) is None
    ds = SimpleNamespace(distributed_type=SimpleNamespace(value="DEEPSPEED"), scaler=None)
    assert nonfinite.device_skipping_optimizer(ds, fused, None) is None
