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
bitsandbytes' 8-bit AdamW, DeepSpeed (it steps itself), fp16 with a GradScaler (which sets `found_inf`
itself) and AdaLoRA (its budget update after the step reads the gradients).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import methods
from .errors import UserError


def device_skipping_optimizer(acc: Any, optimizer: Any, model: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer that can skip a non-finite update on the device, or None where the host decides."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if (acc.distributed_type.value == "DEEPSPEED" or getattr(acc, "scaler", None) is not None
            or methods.is_adalora(model)):
        return None
    if isinstance(inner, torch.optim.Adam) and inner.defaults.get("fused") and inner._step_supports_amp_scaling:
        return inner
    return None


class NonfiniteGuard:
    """Applies each optimizer step only if its gradient norm and loss are finite; reports the skipped ones."""

    def __init__(self, acc: Any, optimizer: Any, model: Any, train_cfg: Any, counters: dict, mlog: Any):
        self.t, self.counters, self.mlog = train_cfg, counters, mlog
        self.on_device = device_skipping_optimizer(acc, optimizer, model)
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, [grad_norm, loss]) not yet looked at
        self.last = (math.nan, math.nan)

    def step(self, optimizer: Any, model: Any, step: int, norm_loss: torch.Tensor) -> None:
        """Optimizer step number `step` (1-based), given its [grad_norm, loss] as a device tensor."""
        if self.on_device is not None:
            self.on_device.found_inf = (~torch.isfinite(norm_loss).all()).float()
            optimizer.step()
        else:
            norm_loss = norm_loss.cpu()  # waits for the GPU: this optimizer cannot skip by itself
            if bool(torch.isfinite(norm_loss).all()):
                optimizer.step()
                methods.after_step(model, step - 1)  # AdaLoRA budget (reads the gradients)
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
            if math.isfinite(norm) and math.isfinite(loss):
                # the logged loss is the mean since the last log; kept in the counters (a checkpoint's
                # state) so a run resumed mid-interval logs what the uninterrupted run would have
                self.counters["interval_loss_sum"] = self.counters.get("interval_loss_sum", 0.0) + loss
                self.counters["interval_steps"] = self.counters.get("interval_steps", 0) + 1
                continue
            self.counters["nonfinite_skips"] += 1
            self.mlog.log("nonfinite", step, {"loss": loss, "grad_norm": norm})
            if self.t.on_nonfinite == "stop" or self.counters["nonfinite_skips"] > self.t.max_nonfinite_skips:
                self.mlog.close()
                raise UserError(
                    f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step} "
                    f"(loss={loss}, grad_norm={norm})",
                    hint="likely causes: learning rate too high, fp16 overflow (use bf16), or bad data in this "
                         "step. The last good checkpoint is kept; resume with a lower learning rate or "
                         "train.on_nonfinite: skip")
        self.last = (values[-1][0], values[-1][1])
        return self.last

    def interval_loss(self) -> float:
        """Mean loss of the finite steps settled since the last call (nan if none); starts a new interval.
        A single step's loss swings with its examples (the demo's run between 0.3 and 4.7), so a log line
        every N steps shows the mean of those N, as HF Trainer's does."""
        n = self.counters.pop("interval_steps", 0)
        total = self.counters.pop("interval_loss_sum", 0.0)
        return total / n if n else math.nan
