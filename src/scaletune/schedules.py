"""The learning-rate schedule `train.lr_scheduler` names, built over the run's optimizer.

Every schedule is a torch LambdaLR (lr = learning_rate x lambda(step)), as transformers builds its own: a resume
restores the position and keeps this config's peak (train.restore), whatever the curve. reduce_lr_on_plateau is
one too: its lambda is the warmup times factor ** (the drops so far), an object whose counters LambdaLR's
state_dict keeps, so a checkpoint carries the plateau's best and its count of evals without a better one. (Its
settings come from the config on a resume, as every schedule's do: `restored`.)
"""

from __future__ import annotations

import math
from typing import Any

from .config import lower_is_better

# torch's ReduceLROnPlateau's default test of a better eval: by more than this fraction of the best
_PLATEAU_REL_THRESHOLD = 1e-4


class PlateauLambda:
    """reduce_lr_on_plateau's lambda: linear warmup, then factor ** drops. `observe` is given each eval's
    metric and adds a drop when it has not bettered the best for more than `patience` evals in a row (torch's
    ReduceLROnPlateau's count). Only plain numbers as attributes: LambdaLR saves and restores them, and the
    checkpoint keeps them as JSON."""

    SETTINGS = ("warmup", "factor", "patience", "lower", "metric", "over", "contents")

    def __init__(self, warmup: int, factor: float, patience: int, lower: bool, metric: str = "loss",
                 over: str = "", contents: str = "") -> None:
        # `metric`: the eval metric watched; `over`: what its evals are a value over (best.scored_over); `contents`:
        # those files' digest (build_datasets' eval_digest: the same path edited holds other examples)
        self.warmup, self.factor, self.patience, self.lower = warmup, factor, patience, lower
        self.metric, self.over, self.contents = metric, over, contents
        self.best: float | None = None
        self.bad_evals = 0
        self.drops = 0

    def __call__(self, step: int) -> float:
        warm = step / self.warmup if step < self.warmup else 1.0
        return warm * self.factor ** self.drops

    def observe(self, value: float, step: int | None = None) -> bool:
        """Count an eval's metric (at optimizer step `step`); returns whether it drops the learning rate. An eval
        during warmup may set the best but counts no plateau: the rate is still rising to learning_rate, which
        the run is to reach (a flat loss at a near-zero rate dropped it before it got there)."""
        if not math.isfinite(value):  # (a non-finite eval betters nothing)
            better = False
        elif self.best is None:
            better = True
        elif self.lower:
            better = value < self.best - _PLATEAU_REL_THRESHOLD * abs(self.best)
        else:
            better = value > self.best + _PLATEAU_REL_THRESHOLD * abs(self.best)
        if better:
            self.best, self.bad_evals = value, 0
            return False
        if step is not None and step <= self.warmup:  # (no step has trained at the peak yet)
            return False
        self.bad_evals += 1
        if self.bad_evals <= self.patience:
            return False
        self.drops, self.bad_evals = self.drops + 1, 0
        return True


def make_scheduler(t: Any, optimizer: Any, warmup: int, total: int, over: str = "", contents: str = "") -> Any:
    """The LambdaLR for train section `t` over `total` steps, `warmup` of them warming up (`over`: what the
    evals are a value over, best.scored_over, for reduce_lr_on_plateau)."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_scheduler

    if t.lr_scheduler == "reduce_lr_on_plateau":
        return LambdaLR(optimizer, PlateauLambda(warmup, t.plateau_factor, t.plateau_patience,
                                                 lower_is_better(plateau_metric(t)), plateau_metric(t), over,
                                                 contents))
    extra = {"min_lr_rate": t.min_lr_ratio} if t.lr_scheduler == "cosine_with_min_lr" else None
    if t.lr_scheduler == "warmup_stable_decay":  # (the decay fits in what warmup leaves; at least one step)
        extra = {"num_decay_steps": max(1, min(round(t.decay_ratio * total), total - warmup)),
                 "min_lr_ratio": t.min_lr_ratio}
    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                         scheduler_specific_kwargs=extra)


def plateau_metric(t: Any) -> str:
    """The eval metric reduce_lr_on_plateau watches: best_metric's, else the loss (as HF Trainer)."""
    return t.best_metric or "loss"


def after_eval(scheduler: Any, optimizer: Any, t: Any, metrics: dict) -> float | None:
    """Show reduce_lr_on_plateau an eval's `metrics`; on a drop, the optimizer takes the lowered rate at once
    (it already holds the next step's) and the new rate is returned. Other schedules: None."""
    fn = scheduler.lr_lambdas[0]
    if not isinstance(fn, PlateauLambda) or not fn.observe(float(metrics[plateau_metric(t)]), scheduler.last_epoch):
        return None
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    scheduler._last_lr = lrs  # what get_last_lr() reports until the next step
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    return lrs[0]


def restored(scheduler: Any, state: dict) -> str | None:
    """Load a checkpoint's schedule `state` into `scheduler`, keeping this config's settings: a plateau's
    factor, patience and warmup as given now, its counters from the checkpoint, unless it watched another
    metric or evals over other examples (its best is then no bar: counted anew, as the best adapter's). Returns
    a line saying so, or None."""
    fn = scheduler.lr_lambdas[0]
    now = {k: getattr(fn, k) for k in PlateauLambda.SETTINGS} if isinstance(fn, PlateauLambda) else None
    if now is None:  # (a plateau's counters would ride along in another schedule's state, back to a later plateau)
        scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(state.get("lr_lambdas") or [])})
        return None
    scheduler.load_state_dict(dict(state))
    # (a checkpoint from before "contents" was kept: taken as the same files)
    saved = {k: getattr(fn, k, None) for k in ("metric", "over", "contents")}
    saved["contents"] = saved["contents"] or now["contents"]
    fn.__dict__.update(now)
    if fn.best is None or saved == {k: now[k] for k in saved}:
        return None
    fn.best, fn.bad_evals = None, 0
    edited = " (its files edited since)" if {**saved, "contents": now["contents"]} == {k: now[k] for k in saved} else ""
    return (f"reduce_lr_on_plateau: its best {saved['metric']} was over {saved['over']}, the evals now watch "
            f"{now['metric']} over {now['over']}{edited}: counted anew from the next eval (the rate stays where it is)")
