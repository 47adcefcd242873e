"""Non-finite steps: never apply their update, count them, stop when the config says so, all without
making the host wait for the GPU every step.

Deciding on the host whether a step's loss and gradient norm are finite means copying them to the host
before `optimizer.step()`, so the GPU runs dry while the CPU queues the next step's kernels (on an H100
a 1B LoRA step ran 7% faster without it). torch's fused AdamW can skip its own update on
the device instead (the `found_inf` input GradScaler uses), so with it the host reads the values only
where it needs them anyway: at a logged step, before a checkpoint and at the end. A non-finite step is
then reported (and, with `on_nonfinite: stop`, the run stops) at that next boundary, naming its step;
nothing after it is saved, so the last checkpoint is still the last good one.

Optimizers without that input, or whose update must be decided on the host, are checked every step:
bitsandbytes' 8-bit AdamW, fp16 with a GradScaler (which sets `found_inf` itself) and AdaLoRA (its budget
update after the step reads the gradients). DeepSpeed steps inside accelerate's backward, before the
guard sees the step: its own overflow check skips a non-finite update (shown under ZeRO-2 and ZeRO-3 in
tests/distributed/test_scale_out_zero.py), and the guard counts, logs and stops as for the others.

fp16's dynamic loss scaling overflows by design: it starts high (2**16), halves its scale on a step whose
scaled gradients reached inf (skipping that update) and tries a higher scale again every few thousand
steps. Such a step, finite loss with non-finite gradients, is the loss scaler's to handle, not a
numerical problem of the run: it is logged as an "overflow" event and counted apart, and only a long
unbroken series of them (no scale helps: the gradients themselves are not finite) stops the run.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import methods
from .errors import UserError

# fp16 overflow steps in a row that end the run: by then the scale has been halved this many times
# (GradScaler: 2**16 -> 2**-9), so it is the gradients, not the scale
MAX_OVERFLOW_STREAK = 25


def device_skipping_optimizer(acc: Any, optimizer: Any, model: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer that can skip a non-finite update on the device, or None where the host decides."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if (acc.distributed_type.value == "DEEPSPEED" or getattr(acc, "scaler", None) is not None
            or methods.is_adalora(model)):
        return None
    if isinstance(inner, torch.optim.Adam) and inner.defaults.get("fused") and inner._step_supports_amp_scaling:
        return inner
    return None


# What DeepSpeed's dynamic loss scaler learns while training: its scale, the step counter its growth window
# counts from, the last overflow's step and the hysteresis left. Its checkpoint pickles the whole object;
# ours keeps these, so a resumed fp16 run does not start over at 2**16 and overflow its way down again.
_DS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _deepspeed_loss_scaler(acc: Any, model: Any) -> Any | None:
    """DeepSpeed's dynamic (fp16) loss scaler of this run, or None (no DeepSpeed, or bf16's fixed scale)."""
    from .trainable_state import deepspeed_engine

    engine = deepspeed_engine(acc, model)
    scaler = getattr(getattr(engine, "optimizer", None), "loss_scaler", None)
    return scaler if getattr(scaler, "dynamic", False) else None


def loss_scale_state(acc: Any, model: Any) -> dict[str, Any]:
    """The fp16 loss scaler's state for a checkpoint: accelerate's GradScaler or DeepSpeed's (empty if none)."""
    if (scaler := getattr(acc, "scaler", None)) is not None:
        return {"loss_scaler": scaler.state_dict()}
    if (ds := _deepspeed_loss_scaler(acc, model)) is not None:
        return {"deepspeed_loss_scaler": {k: getattr(ds, k) for k in _DS_SCALER_FIELDS}}
    return {}


def load_loss_scale_state(acc: Any, model: Any, state: dict[str, Any]) -> None:
    """Restore what `loss_scale_state` saved, where this run scales its loss the same way (a resume from
    bf16 to fp16 starts at the scaler's initial scale)."""
    if (scaler := getattr(acc, "scaler", None)) is not None and state.get("loss_scaler"):
        scaler.load_state_dict(state["loss_scaler"])
    elif (ds := _deepspeed_loss_scaler(acc, model)) is not None and state.get("deepspeed_loss_scaler"):
        for key, value in state["deepspeed_loss_scaler"].items():
            setattr(ds, key, value)


def current_loss_scale(acc: Any, model: Any) -> float | None:
    """The fp16 loss scale in use now, or None where the loss is not scaled."""
    if (scaler := getattr(acc, "scaler", None)) is not None:
        return float(scaler.get_scale())
    ds = _deepspeed_loss_scaler(acc, model)
    return float(ds.cur_scale) if ds is not None else None


class NonfiniteGuard:
    """Applies each optimizer step only if its gradient norm and loss are finite; reports the skipped ones."""

    def __init__(self, acc: Any, optimizer: Any, model: Any, train_cfg: Any, counters: dict, mlog: Any):
        self.t, self.counters, self.mlog = train_cfg, counters, mlog
        self.on_device = device_skipping_optimizer(acc, optimizer, model)
        self.scaler = getattr(acc, "scaler", None)  # fp16 without DeepSpeed: accelerate's GradScaler
        self.loss_scale = lambda: current_loss_scale(acc, model)
        self.ds_scaler = lambda: _deepspeed_loss_scaler(acc, model)
        self.loss_scaling = self.scaler is not None or train_cfg.mixed_precision == "fp16"  # (or DeepSpeed's)
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, [grad_norm, loss]) not yet looked at
        self.last = (math.nan, math.nan)

    def optimizer_step(self, optimizer: Any, model: Any, step: int, norm_loss: torch.Tensor) -> None:
        """`optimizer.step()` for optimizer step number `step` (1-based) unless its [grad_norm, loss] (a device
        tensor) is not finite: fused AdamW skips it on the device, other optimizers are not stepped (a
        GradScaler is, and skips it itself; DeepSpeed stepped already, inside backward)."""
        if self.on_device is not None:
            self.on_device.found_inf = (~torch.isfinite(norm_loss).all()).float()
            optimizer.step()
        else:
            norm_loss = norm_loss.cpu()  # waits for the GPU: this optimizer cannot skip by itself
            norm, loss = norm_loss.tolist()
            if math.isfinite(loss) and (math.isfinite(norm) or self.scaler is not None):
                # A GradScaler skips an overflowed update itself (it saw the inf while unscaling for the
                # clip) and has to see every step: its update() lowers the scale after an overflow.
                optimizer.step()
                if math.isfinite(norm):
                    methods.after_step(model, step - 1)  # AdaLoRA budget (reads the gradients)
            elif self.scaler is not None:
                self.scaler.update()  # no update for a non-finite loss; the scale still backs off
        self.pending.append((step, norm_loss))

    def settle(self, boundary: bool) -> tuple[float, float]:
        """Look at the pending steps (every step where the host decides, else only at a `boundary`):
        log and count the non-finite ones, raise where the run must stop. Returns the last looked-at
        step's (grad_norm, loss)."""
        if not self.pending or (self.on_device is not None and not boundary):
            return self.last
        values = torch.stack([v for _, v in self.pending]).tolist()  # one device->host copy for all
        steps = [s for s, _ in self.pending]
        self.pending.clear()
        for step, (norm, loss) in zip(steps, values):
            if math.isfinite(loss) and (math.isfinite(norm) or self.loss_scaling):
                # the logged loss is the mean since the last log; kept in the counters (a checkpoint's
                # state) so a run resumed mid-interval logs what the uninterrupted run would have
                self.counters["interval_loss_sum"] = self.counters.get("interval_loss_sum", 0.0) + loss
                self.counters["interval_steps"] = self.counters.get("interval_steps", 0) + 1
                if math.isfinite(norm):
                    self.counters["overflow_streak"] = 0
                else:
                    self._overflow(step, loss, norm)
                continue
            self.counters["nonfinite_skips"] += 1
            self.mlog.log("nonfinite", step, {"loss": loss, "grad_norm": norm})
            if self.t.on_nonfinite == "stop" or self.counters["nonfinite_skips"] > self.t.max_nonfinite_skips:
                self.mlog.close()
                raise UserError(
                    f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step} "
                    f"(loss={loss}, grad_norm={norm})",
                    hint="likely causes: learning rate too high, fp16 overflow (use bf16), or bad data in this "
                         "step. The last good checkpoint is kept: resume it (--resume auto) with "
                         "train.on_nonfinite=skip, or with a lower train.learning_rate and --allow-config-change")
        self.last = (values[-1][0], values[-1][1])
        return self.last

    def _overflow(self, step: int, loss: float, norm: float) -> None:
        """An fp16 loss-scale overflow at `step`: its update was skipped and the scale lowered by the
        GradScaler / DeepSpeed. Logged and counted; a long series of them stops the run."""
        self.counters["overflow_skips"] = self.counters.get("overflow_skips", 0) + 1
        self.counters["overflow_streak"] = streak = self.counters.get("overflow_streak", 0) + 1
        scale = {"loss_scale": s} if (s := self.loss_scale()) is not None else {}
        self.mlog.log("overflow", step, {"loss": loss, "grad_norm": norm, **scale})
        # DeepSpeed raises a bare Exception (a traceback) at an overflow with its scale already at the
        # minimum: stop at the step before, with this message, where that next overflow would do so.
        ds = self.ds_scaler()
        floor = ds is not None and ds.cur_scale <= ds.min_scale and (ds.delayed_shift == 1 or ds.cur_hysteresis == 1)
        if streak >= MAX_OVERFLOW_STREAK or floor:
            self.mlog.close()
            at_min = f", down to DeepSpeed's min_loss_scale {ds.min_scale:g}" if floor else ""
            raise UserError(f"fp16: the gradients overflowed at every loss scale, {streak} steps in a row up to "
                            f"step {step}{at_min} (loss={loss})",
                            hint="the gradients themselves are not finite: lower the learning rate, check this "
                                 "step's data, or use bf16. The last good checkpoint is kept")

    def interval_loss(self) -> float:
        """Mean loss of the finite steps settled since the last call (nan if none); starts a new interval.
        A single step's loss swings with its examples (the demo's run between 0.3 and 4.7), so a log line
        every N steps shows the mean of those N, as HF Trainer's does."""
        n = self.counters.pop("interval_steps", 0)
        total = self.counters.pop("interval_loss_sum", 0.0)
        return total / n if n else math.nan
