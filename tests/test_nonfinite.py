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


def _fp16_loss_scaling_on_cpu(monkeypatch, overflow_at: set[int]):
    """What accelerate builds for mixed_precision fp16 (which needs CUDA), on this CPU: a GradScaler on the
    Accelerator, which scales the loss in backward, unscales for the clip and steps through the scaler.
    The scaled gradients overflow (one of them inf) at the optimizer steps in `overflow_at`."""
    import accelerate

    class Fp16ScaledAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu")  # accelerate's (and torch's) start: 2**16

        def unscale_gradients(self, optimizer=None):  # accelerate's does this for native fp16 only
            for opt in self._optimizers:
                self.scaler.unscale_(opt.optimizer)

        def backward(self, loss, **kwargs):
            loss.register_hook(lambda g: g * math.inf if self.step_now in overflow_at else g)
            super().backward(loss, **kwargs)

    monkeypatch.setattr(accelerate, "Accelerator", Fp16ScaledAccelerator)
    return Fp16ScaledAccelerator


def _fit_counting_steps(run):
    """fit, with the accelerator told which optimizer step each backward belongs to."""
    run.accelerator.step_now = 0
    real = run.accelerator.backward

    def backward(loss, **kwargs):
        run.accelerator.step_now = run.step + 1
        return real(loss, **kwargs)

    run.accelerator.backward = backward
    return fit(run, StopFlag())


def test_fp16_loss_scale_overflows_are_the_scalers_not_a_stop(make_config, monkeypatch, tmp_path):
    """fp16's GradScaler starts at 2**16 and halves on each overflowed step, skipping its update; that is
    how it finds its scale. With on_nonfinite: stop (the default) such a step used to stop the run, and
    with `skip` the next step's unscale_ raised (the scaler never saw its update()). Now the run trains
    on: each overflow is logged, the scale halves, and the weights are those of a run that skips exactly
    those updates. The checkpoint keeps the scale, and a resumed run starts from it."""
    path = make_config("causal_lm", n=48, train={"max_steps": 6, "log_every": 6, "save_every": 3,
                                                 "save_total_limit": None})
    _fp16_loss_scaling_on_cpu(monkeypatch, {1, 2, 5})
    run, _ = setup(load_config(path))
    _fit_counting_steps(run)
    assert run.step == 6 and run.accelerator.scaler.get_scale() == 2.0 ** 13
    overflows = read_metrics(tmp_path / "run", "overflow")
    assert [(r["step"], r["loss_scale"]) for r in overflows] == [(1, 2.0 ** 15), (2, 2.0 ** 14), (5, 2.0 ** 13)]
    assert read_metrics(tmp_path / "run", "nonfinite") == []
    assert run.counters["overflow_skips"] == 3 and run.counters["nonfinite_skips"] == 0
    (logged,) = read_metrics(tmp_path / "run", "train")
    assert math.isfinite(logged["loss"])
    from scaletune.report import _event_notes, load_run

    assert "3 fp16 loss-scale overflow(s) (update skipped, scale halved), last at step 5" in \
        _event_notes(load_run(tmp_path / "run", "r"))
    scaled = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}

    # the step-3 checkpoint holds the scale then (2**14), and a run resumed from it ends the same
    _fp16_loss_scaling_on_cpu(monkeypatch, {5})
    resumed, _ = setup(load_config(path), resume=str(tmp_path / "run" / "checkpoints" / "step-3"))
    assert resumed.accelerator.scaler.get_scale() == 2.0 ** 14
    _fit_counting_steps(resumed)
    again = dict(resumed.model.named_parameters())
    for name, w in scaled.items():
        torch.testing.assert_close(again[name].detach(), w, rtol=0, atol=0, msg=name)

    # the same updates skipped without a scaler (non-finite losses at those steps): the same weights
    monkeypatch.undo()
    ref = make_config("causal_lm", n=48, output_dir=str(tmp_path / "ref"),
                      train={"max_steps": 6, "on_nonfinite": "skip"})
    _, skipped, _ = _train(ref, monkeypatch, "nan@1,nan@2,nan@5", host=True)
    for name, w in scaled.items():
        torch.testing.assert_close(w, skipped[name], rtol=0, atol=0, msg=name)


def test_fp16_overflows_at_every_scale_stop_the_run(make_config, monkeypatch, tmp_path):
    """Gradients that overflow whatever the scale (not finite themselves) end the run after
    MAX_OVERFLOW_STREAK steps in a row, naming fp16, instead of training nothing to the end."""
    monkeypatch.setattr(nonfinite, "MAX_OVERFLOW_STREAK", 3)
    path = make_config("causal_lm", n=48, train={"max_steps": 8})
    _fp16_loss_scaling_on_cpu(monkeypatch, {2, 3, 5, 6, 7})
    run, _ = setup(load_config(path))
    with pytest.raises(UserError, match="fp16: the gradients overflowed at every loss scale, 3 steps in a row up "
                                        "to step 7"):
        _fit_counting_steps(run)
    assert [r["step"] for r in read_metrics(tmp_path / "run", "overflow")] == [2, 3, 5, 6, 7]


def test_fp16_non_finite_loss_is_still_a_non_finite_step(make_config, monkeypatch, tmp_path):
    """A non-finite loss under fp16 is the run's problem (train.on_nonfinite), not the scaler's; the scaler
    still sees the step (its scale backs off) so the next step unscales and trains."""
    monkeypatch.setenv("SCALETUNE_FAULT", "nan@2")
    faults._plan.cache_clear()
    path = make_config("causal_lm", n=48, train={"max_steps": 4, "on_nonfinite": "skip"})
    _fp16_loss_scaling_on_cpu(monkeypatch, set())
    run, _ = setup(load_config(path))
    try:
        _fit_counting_steps(run)
    finally:
        faults._plan.cache_clear()
    assert run.step == 4 and run.counters["nonfinite_skips"] == 1 and not run.counters.get("overflow_skips")
    assert [r["step"] for r in read_metrics(tmp_path / "run", "nonfinite")] == [2]
    assert run.accelerator.scaler.get_scale() == 2.0 ** 15


def test_deepspeeds_fp16_loss_scale_survives_a_checkpoint(monkeypatch):
    """DeepSpeed's dynamic loss scaler (ZeRO under fp16, which needs CUDA: here its real class on its own)
    goes through a checkpoint's JSON state: a resumed run's scaler halves and grows its scale at the same
    steps as the uninterrupted one's. Without its counters the growth window restarts and the scale
    starts over at 2**16."""
    import json

    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

    monkeypatch.setattr("deepspeed.comm.get_rank", lambda: 0)  # its log lines ask; no process group here

    def make():
        return CreateLossScaler(torch.half, 0, True, {"init_scale": 2.0 ** 16, "scale_window": 4, "min_scale": 1,
                                                      "delayed_shift": 2, "consecutive_hysteresis": False})

    overflows = [True, False, True, True, False, False, True, False, False, False, False, False, False, False]
    acc = SimpleNamespace(scaler=None)  # no GradScaler: DeepSpeed scales the loss itself
    first = make()
    for overflow in overflows[:5]:
        first.update_scale(overflow)
    monkeypatch.setattr(nonfinite, "_deepspeed_loss_scaler", lambda a, m: first)
    state = json.loads(json.dumps(nonfinite.loss_scale_state(acc, None)))
    assert nonfinite.current_loss_scale(acc, None) == first.cur_scale < 2.0 ** 16

    resumed = make()
    monkeypatch.setattr(nonfinite, "_deepspeed_loss_scaler", lambda a, m: resumed)
    nonfinite.load_loss_scale_state(acc, None, state)
    trajectory = {"first": [], "resumed": []}
    for overflow in overflows[5:]:
        for name, scaler in (("first", first), ("resumed", resumed)):
            scaler.update_scale(overflow)
            trajectory[name].append(scaler.cur_scale)
    assert trajectory["resumed"] == trajectory["first"]
    assert len(set(trajectory["first"])) > 1  # the window grew the scale again after the overflow


def test_deepspeeds_loss_scale_at_its_minimum_stops_the_run_with_a_message(monkeypatch):
    """DeepSpeed halves its fp16 scale inside its own step (accelerate's backward) and raises a bare
    Exception at an overflow with the scale already at `min_loss_scale`; the run stops one step earlier,
    with the one-screen fp16 message, instead of ending in that traceback."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

    monkeypatch.setattr("deepspeed.comm.get_rank", lambda: 0)
    scaler = CreateLossScaler(torch.half, 0, True, {"init_scale": 2.0 ** 4, "scale_window": 1000, "min_scale": 1,
                                                    "delayed_shift": 2, "consecutive_hysteresis": False})
    monkeypatch.setattr(nonfinite, "_deepspeed_loss_scaler", lambda a, m: scaler)
    acc = SimpleNamespace(distributed_type=SimpleNamespace(value="DEEPSPEED"), scaler=None)
    logged = []
    mlog = SimpleNamespace(log=lambda kind, step, values: logged.append((kind, step, values)), close=lambda: None)
    cfg = SimpleNamespace(mixed_precision="fp16", on_nonfinite="stop", max_nonfinite_skips=0)
    guard = nonfinite.NonfiniteGuard(acc, SimpleNamespace(step=lambda: None), None, cfg, {"nonfinite_skips": 0},
                                     mlog)
    with pytest.raises(UserError, match=r"overflowed at every loss scale, 5 steps in a row up to step 5, down to "
                                        r"DeepSpeed's min_loss_scale 1 \(loss=2.5\)"):
        for step in range(1, 30):
            scaler.update_scale(True)  # what DeepSpeed's step did for this overflowed step
            guard.optimizer_step(None, None, step, torch.tensor([math.inf, 2.5]))
            guard.settle(boundary=False)
    with pytest.raises(Exception, match="Current loss scale already at minimum"):
        scaler.update_scale(True)  # the next overflow: DeepSpeed's own end
    assert [v["loss_scale"] for kind, _, v in logged if kind == "overflow"] == [16, 8, 4, 2, 1]


def test_a_host_checked_step_with_a_non_finite_loss_is_not_applied_and_the_logged_loss_is_the_mean():
    """Where the host decides (no fused AdamW): a step whose loss is not finite is not stepped even with a
    finite gradient norm, and counts against max_nonfinite_skips (the run stops once they are exceeded); the
    logged loss is the mean of the interval's finite steps."""
    acc = SimpleNamespace(distributed_type=SimpleNamespace(value="NO"), scaler=None)
    stepped, logged = [], []
    optimizer = SimpleNamespace(step=lambda: stepped.append(1))
    mlog = SimpleNamespace(log=lambda kind, step, values: logged.append((kind, step)), close=lambda: None)
    cfg = SimpleNamespace(mixed_precision="no", on_nonfinite="skip", max_nonfinite_skips=1)
    guard = nonfinite.NonfiniteGuard(acc, optimizer, None, cfg, {"nonfinite_skips": 0}, mlog)
    for step, loss in enumerate([1.0, math.nan, 3.0], start=1):
        guard.optimizer_step(optimizer, None, step, torch.tensor([0.5, loss]))
        guard.settle(boundary=False)
    assert len(stepped) == 2 and logged == [("nonfinite", 2)]
    assert guard.interval_loss() == pytest.approx(2.0)
    guard.optimizer_step(optimizer, None, 4, torch.tensor([0.5, math.inf]))
    with pytest.raises(UserError, match=r"non-finite loss at step 4"):
        guard.settle(boundary=False)
