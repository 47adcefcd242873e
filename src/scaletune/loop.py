"""The training loop: one flat function, read top to bottom.

Loss normalisation is the point to understand. Each micro-batch returns the *sum* of its per-target
losses; before the step we all-reduce the number of target tokens of the whole optimizer step (all
micro-batches, all ranks). Scaling each micro-batch's sum by accum * world / n_targets makes the
accumulated, rank-averaged gradient exactly the gradient of the mean over every target token of the
step, so micro 1 x accumulation 4 equals micro 4 x accumulation 1, at any world size. With
train.class_weights the sums are weighted and the count is the targets' summed weight (`Task.step_weight`): the
step's loss is sum(w_y * loss) / sum(w_y) over the whole step, as CrossEntropyLoss(weight=w) over it at once.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import send_to_device

from . import faults, methods, schedules
from .best import BestAdapter
from .data.batching import StepBatches
from .evaluate import EvalStopped, evaluate
from .generation_metrics import score_during_training
from .metrics import Throughput
from .nonfinite import NonfiniteGuard
from .outdir import replaced_note
from .saving import final_outputs, save_checkpoint
from .stopflag import StopFlag
from .tracking import MetricsLog
from .train import Run

log = logging.getLogger("scaletune")


def fit(run: Run, stop: StopFlag) -> str:
    """Train from `run.step` to `run.total_steps`; returns "done" or "preempted"."""
    acc, cfg, t = run.accelerator, run.cfg, run.cfg.train
    model, optimizer, scheduler, task = run.model, run.optimizer, run.scheduler, run.task
    world, rank = acc.num_processes, acc.process_index
    pad_id = run.tokenizer.pad_token_id
    # (a partial, not a lambda: DataLoader workers are spawned on macOS and Windows, which pickles it)
    batches = StepBatches(run.data["train"], functools.partial(task.collate, pad_id=pad_id),
                          global_batch=t.global_batch_size, micro=t.micro_batch_size, world=world, rank=rank, seed=t.seed,
                          group_by_length=cfg.data.group_by_length, num_workers=cfg.data.num_workers,
                          pin_memory=acc.device.type == "cuda")
    mlog = MetricsLog(acc, run.output_dir, run.total_steps, run.step)
    speed = Throughput(acc, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    guard = NonfiniteGuard(acc, optimizer, model, t, run.counters, mlog)
    if run.step:
        # from here on this run's records are the ones past this step: records before it with a later step
        # are another path's (a resume from an older checkpoint, after a non-finite stop) or were re-done
        mlog.log("resume", run.step, {})
    best = BestAdapter(run, mlog)
    end, redo = resume_point(run, mlog)
    model.train()
    stop.catch_interrupts()  # Ctrl-C from here on: a checkpoint at the next step boundary (see StopFlag)
    redone = -1  # the step whose checkpoint lacks the eval just redone (until a step is trained)
    if redo:
        try:
            if evaluate_step(run, best, mlog, speed, stop):
                end = run.step  # stopping early there
        except EvalStopped as exc:  # (eval_interrupted stays: the next resume tries again)
            return preempted(run, stop, guard, mlog, exc.signum, f" (during its eval, {EVAL_REDONE})")
        if run.step >= end:  # no later checkpoint will hold what the eval added (evaluated_step, best, an early
            with speed.paused():  # stop): final_outputs keeps this step's, so a resume of the done run redid it
                save_checkpoint(run, replace=True)
        redone = run.step
    for micro_batches in batches(run.step, end):
        # targets (counted for the logs) and the loss's denominator: the targets again, or with class weights
        # their summed weight (float), both over every micro-batch and rank
        n_global, weight_global, stopped_by = step_head(acc, sum(task.count_targets(b) for b in micro_batches), stop,
                                                        task.step_weight(micro_batches))
        if stopped_by is not None:  # (stopped right after a redone eval: its checkpoint is rewritten with it)
            return preempted(run, stop, guard, mlog, stopped_by, replace=run.step == redone)
        # Dropout etc. draw from (seed, step, rank): a resumed run replays exactly the same randomness.
        torch.manual_seed(t.seed + 1_000_003 * (run.step + 1) + rank)
        scale = run.accum * world / weight_global
        loss_sum = torch.zeros((), device=acc.device)
        for batch in micro_batches:
            speed.count(batch)
            batch = send_to_device(batch, acc.device, non_blocking=True)  # (pays off for pinned batches)
            run.batch_shape = tuple(batch["input_ids"].shape)  # for an out-of-memory message
            with acc.accumulate(model):
                loss = task.train_loss_sum(model, batch)[0]  # drop the logits now: they would outlive backward
                loss = faults.at_step(run.step + 1, loss)  # test-only failures; a no-op unless asked
                # accelerate (or DeepSpeed) divides by the accumulation steps; `scale` undoes that.
                # A per-step regulariser (AdaLoRA) is added unscaled: after that division its
                # micro-step shares sum to exactly one copy per optimizer step.
                reg = methods.extra_loss(model)
                acc.backward(loss * scale + (reg if reg is not None else 0.0))
                loss_sum += loss.detach().float()
                if acc.sync_gradients:
                    norm_loss = clip_and_norm(acc, trainable, t.max_grad_norm, loss_sum, weight_global)
                    # The lr this update applies (or would have, if skipped as non-finite): after
                    # scheduler.step() the optimizer holds the next step's. On resume, setup() restores it.
                    step_lr = optimizer.param_groups[0]["lr"]
                    guard.optimizer_step(optimizer, model, run.step + 1, norm_loss)  # skips a non-finite update
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        run.step += 1
        log_now = run.step % t.log_every == 0 or run.step == run.total_steps
        saving = run.save_every.due(run.step)
        # With fused AdamW the host looks at loss and gradient norm only here, at a logged or saved step
        # (a GPU sync); other optimizers were looked at in guard.optimizer_step. Raises if the run must stop.
        grad_norm, _ = guard.settle(boundary=log_now or saving)
        speed.add_step(n_global)
        run.counters["tokens_seen"] += n_global  # target tokens trained on, kept across resumes
        if log_now:
            log_train(run, guard, speed, mlog, step_lr, grad_norm)
        stop_early = False
        if run.data["eval"] is not None and (run.eval_every.due(run.step) or run.step == run.total_steps):
            try:
                stop_early = evaluate_step(run, best, mlog, speed, stop)  # writes best_adapter/ on a new best
            except EvalStopped as exc:  # (the checkpoint, without this eval: the resume does it first)
                run.counters["eval_interrupted"] = run.step
                return preempted(run, stop, guard, mlog, exc.signum, f" (during its eval, {EVAL_REDONE})")
        if stop_early and not log_now:
            # the run ends at this step: the steps since the last log are logged too (else an early stop
            # between two logs left its last steps' loss out of metrics.jsonl, the trackers and the progress)
            log_train(run, guard, speed, mlog, step_lr, guard.settle(boundary=True)[0], ending=True)
        if saving:
            with speed.paused():
                save_checkpoint(run)
        if stop_early:
            break  # final_outputs checkpoints this step, which records that the run stopped early
    final_outputs(run, mlog)  # (a Ctrl-C now lets the final save finish: the run is done then)
    stop.release_interrupts()
    mlog.close()
    return "done"


def resume_point(run: Run, mlog: MetricsLog) -> tuple[int, bool]:
    """(the step this run trains to, whether the checkpoint's eval is to be redone first), said where a resumed
    run has nothing left to train or its lr differs from the checkpoint's schedule."""
    # a run that stopped early is complete at its checkpoint's step: resuming it trains no further
    end = run.step if run.counters.get("stopped_early") else run.total_steps
    if run.schedule_note and run.step < end:
        log.warning("%s", run.schedule_note)
    # the checkpoint's step was stopped during its eval, or (a run ending at a mid-run checkpoint: max_steps lowered
    # to its step) has an end-of-run eval and best adapter never done there (a checkpoint from before
    # evaluated_step was kept: taken as evaluated)
    interrupted = run.counters.get("eval_interrupted") == run.step
    unevaluated_end = end == run.total_steps and run.counters.get("evaluated_step", run.step) != run.step
    redo = bool(run.step) and run.data["eval"] is not None and (interrupted or (run.step >= end and unevaluated_end))
    if run.step >= end:
        mlog.write(f"run already complete ({run.step}/{run.total_steps} steps"
                   # (a user who raised max_steps or epochs to go on is told what does: README "Best adapter")
                   + (", stopped early: train.early_stopping_patience=null, or a larger one, continues it)"
                      if end < run.total_steps else ")")
                   + (f"; its eval at step {run.step} and adapter are still to do" if redo else ""))
    return end, redo


EVAL_REDONE = "which the resumed run does first"


def log_train(run: Run, guard: NonfiniteGuard, speed: Throughput, mlog: MetricsLog, step_lr: float,
              grad_norm: float, ending: bool = False) -> None:
    """Log the train record of `run.step`: the mean loss of the steps since the last log, throughput, the lr
    that step's update used and its gradient norm (`ending`: the run stops early there)."""
    t = run.cfg.train
    values = {"loss": guard.interval_loss(), **speed.flush(), "lr": step_lr,
              "grad_norm": grad_norm, "epoch": run.step / max(1, len(run.data["train"]) // t.global_batch_size)}
    mlog.log("train", run.step, values)
    mlog.progress(run.step, {"loss": values["loss"], "lr": values["lr"], "tok/s": round(values.get("tokens_per_s", 0))},
                  ending)


def preempted(run: Run, stop: StopFlag, guard: NonfiniteGuard, mlog: MetricsLog, stopped_by: int,
              when: str = "", replace: bool = False) -> str:
    """Stop at `run.step` on signal `stopped_by` (every rank's): its checkpoint written, the preemption logged and
    marked for the batch script (`when`: said after the step; `replace`: over a verified checkpoint of the step)."""
    guard.settle(boundary=True)
    path = save_checkpoint(run, replace)
    how = signal.Signals(stopped_by).name + ("" if stop.signal == stopped_by else " (to another rank)")
    # (the name too: a number is the writing machine's, SIGUSR1 10 on Linux and 30 on macOS)
    mlog.log("preempted", run.step, {"signal": stopped_by, "signal_name": signal.Signals(stopped_by).name,
                                     "checkpoint": str(path)})
    mark_preempted(run.accelerator, path, stopped_by)
    kept = replaced_note(run.output_dir)
    mlog.write(f"stopped on {how} at step {run.step}{when}; checkpoint {path}" + (f"; {kept}" if kept else ""))
    mlog.close()
    stop.release_interrupts()
    return "preempted"


def evaluate_step(run: Run, best: BestAdapter, mlog: MetricsLog, speed: Throughput, stop: StopFlag) -> bool:
    """Evaluate at `run.step`, log it, and let the best adapter / early stopping see it; returns whether the
    run stops early. A stop signal heard (by any rank) during it raises EvalStopped: nothing of it is kept."""
    t = run.cfg.train

    def check() -> int | None:  # (polled between eval batches: a stop heard by any rank)
        return step_head(run.accelerator, 0, stop)[2]

    run.evaluating = True  # (left set by an error out of the eval: an out-of-memory message names its batch)
    faults.at_eval(run.step, run.accelerator.process_index, run.accelerator.num_processes)  # (tests only)
    with speed.paused():  # tokens/s is the training's
        metrics = evaluate(run.accelerator, run.model, run.task, run.data["eval"], run.data["labels"],
                           t.eval_batch_size or t.micro_batch_size, run.tokenizer.pad_token_id, check)
        if run.generation:  # train.eval_generate
            metrics.update(score_during_training(run, check))
        run.evaluating = False
        mlog.log("eval", run.step, metrics)
        mlog.write(f"step {run.step}: eval " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                          if isinstance(v, float)))
        run.counters["evaluated_step"] = run.step  # (saved with the checkpoint: a resume there knows)
        run.counters.pop("eval_interrupted", None)
        if (lr := schedules.after_eval(run.scheduler, run.optimizer, t, metrics)) is not None:
            mlog.log("lr_drop", run.step, {"lr": lr, "metric": schedules.plateau_metric(t)})
            mlog.write(f"step {run.step}: {schedules.plateau_metric(t)} has not improved for more than "
                       f"{t.plateau_patience} eval(s): learning rate now {lr:.3g} (reduce_lr_on_plateau)")
        return best.after_eval(run.step, metrics)


def mark_preempted(acc: Any, path: Any, signum: int | None) -> None:
    """Tell the batch script a resumable checkpoint exists: `accelerate launch` maps every non-zero
    exit to 1, so the exit code alone cannot carry it; the Slurm templates and `scaletune launch` read
    this file: the checkpoint's path, and on a second line the signal the ranks stopped on (`step_head`). The
    templates requeue on SIGUSR1 there too: `scancel --signal=USR1 JOBID`
    without --batch reaches the ranks, not the batch shell. The first process of every node writes it: the
    path is often node-local ($TMPDIR)."""
    marker = os.environ.get("SCALETUNE_PREEMPT_MARKER")
    if marker and acc.is_local_main_process:
        name = signal.Signals(signum).name if signum is not None else ""
        try:
            Path(marker).write_text(f"{path}\n{name}\n", encoding="utf-8")
        except OSError as exc:  # (the checkpoint is written: a resume finds it without the marker)
            print(f"scaletune: cannot write the preemption marker {marker} ({exc.strerror or exc})", file=sys.stderr)


# The stop signals in the order one outranks another where ranks heard different ones: a Ctrl-C or a cancel
# (TERM) is no preemption notice (USR1), which the Slurm templates answer with a requeue (SIGUSR1: POSIX only)
_STOP_ORDER = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


def step_head(acc: Any, n_local: int, stop: StopFlag, weight_local: float | None = None) -> tuple[int, float, int | None]:
    """The step's target count over all ranks, the loss's denominator over all ranks (`weight_local`: this
    rank's summed target weight under class weights; None: the target count) and the signal every rank stops on,
    or None (so every rank stops at the same boundary after SIGUSR1/SIGTERM/Ctrl-C on any of them, and all name
    the same signal: the preempted event's and the marker's, which decides a requeue): one small all-reduce, in
    float64 (exact for counts below 2**53, and for the float weights). A single process needs no device round
    trip, which on a GPU would wait for the previous step."""
    weight_local = float(n_local) if weight_local is None else weight_local
    if acc.num_processes == 1:
        return n_local, weight_local, stop.signal
    heard = [int(stop.signal == sig) for sig in _STOP_ORDER]
    head = acc.reduce(torch.tensor([n_local, weight_local, *heard], dtype=torch.float64, device=acc.device),
                      "sum").tolist()
    return round(head[0]), head[1], next((sig for sig, n in zip(_STOP_ORDER, head[2:]) if n > 0), None)


def clip_and_norm(acc: Any, params: list, max_norm: float | None, loss_sum: torch.Tensor,
                  weight_global: float) -> torch.Tensor:
    """Clip to `max_norm` (if set); return [global gradient norm, the step's mean loss] as one device
    tensor, the same on every rank (nothing here waits for the GPU). `weight_global`: the loss's denominator,
    step_head's (the step's target count, or their summed weight under class weights)."""
    loss = acc.reduce(loss_sum, "sum") / weight_global
    if acc.distributed_type.value == "DEEPSPEED":
        # DeepSpeed clips inside its step (config "gradient_clipping") and reports the norm after.
        norm = acc.deepspeed_engine_wrapped.get_global_grad_norm()
        norm = torch.as_tensor(norm if norm is not None else 0.0, device=loss.device)
    else:
        norm = acc.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    return torch.stack([norm.float(), loss.float()])
