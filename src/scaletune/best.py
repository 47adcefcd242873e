"""`train.best_metric` and early stopping: the adapter of the best eval so far in OUTPUT_DIR/best_adapter/,
and the end of a run whose evals stopped getting better. What they remember lives in the run's counters,
which a checkpoint keeps, so a resumed run picks and stops as the uninterrupted one would."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Any

from .config import EVAL_METRICS
from .outdir import abandoned_dir
from .train import Run, write_adapter

BEST_DIR = "best_adapter"


class BestAdapter:
    """Watches each eval's `train.best_metric` (does nothing without one)."""

    def __init__(self, run: Run, mlog: Any) -> None:
        t = run.cfg.train
        self.run, self.mlog, self.metric = run, mlog, t.best_metric
        self.patience, self.threshold = t.early_stopping_patience, t.early_stopping_threshold
        self.lower = EVAL_METRICS.get(run.cfg.task, {}).get(self.metric) == "min"
        path_best = run.counters.get("best")  # the path this run continues: its best, of whichever metric
        changed = path_best and path_best["metric"] != self.metric
        if changed:  # the old values are of another metric
            if self.metric:
                mlog.write(f"train.best_metric is now {self.metric} (was {path_best['metric']}): the best adapter is "
                           "picked anew from the next eval")
            run.counters.pop("best")
            run.counters.pop("evals_since_best", None)
        stopped = run.counters.get("stopped_early")
        if stopped and not (self.patience and run.counters.get("evals_since_best", 0) >= self.patience):
            # early stopping turned off, given more patience, or counting another metric on resume: the run
            # goes on from its checkpoint
            run.counters.pop("stopped_early")
            why = (f"train.best_metric is now {self.metric}" if changed and self.patience
                   else f"train.early_stopping_patience is now {self.patience}")
            mlog.write(f"continuing the run that stopped early at step {stopped}: {why}")
        on_disk = _written_by(run.output_dir / BEST_DIR)
        if not run.accelerator.is_main_process:
            return
        # best_adapter/ not written by this path's best eval (same metric, step and value): written after its
        # checkpoint (the steps about to be redone write it again), on a path left by resuming another
        # checkpoint, or lost. With best_metric off, another path's is only set aside.
        if self.metric and on_disk != _key(run.counters.get("best")):
            self._recover(run.counters.get("best"), on_disk)
        elif not self.metric and on_disk is not None and on_disk != _key(path_best):
            self._set_aside(on_disk, "the path this run continues did not write it")

    def _set_aside(self, on_disk: tuple | None, why: str) -> None:
        out = self.run.output_dir
        step = f"step{on_disk[1]}" if on_disk else "unrecorded"
        # (nanoseconds: two set-asides of the same step within a second must not meet)
        aside = abandoned_dir(out) / f"{BEST_DIR}-{step}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}"
        os.rename(out / BEST_DIR, aside)
        written = f"written at step {on_disk[1]}" if on_disk else "with no record of its eval"
        self.mlog.write(f"{out / BEST_DIR} ({written}) is not this run's best so far ({why}): moved to {aside}")

    def _recover(self, best: dict | None, on_disk: tuple | None) -> None:
        """Make best_adapter/ the best eval's of the path this run continues: one from elsewhere is moved
        aside (as `--resume` moves later checkpoints), and the best's is copied from its step's checkpoint
        (written after that eval: the same weights) if it was kept."""
        out = self.run.output_dir
        if (out / BEST_DIR).exists():
            self._set_aside(on_disk, "none yet" if best is None else f"that is step {best['step']}'s")
        if best is None:
            return
        # that step's checkpoint: beside the resumed one (which may lie outside checkpoints/), else in them
        where = [d / f"step-{best['step']}" / "adapter" for d in (
            *([self.run.resumed_from.parent] if self.run.resumed_from else []), out / "checkpoints")]
        snapshot = next((d for d in where if (d / "adapter_config.json").is_file()), None)
        if snapshot is None:
            self.mlog.write(f"warning: {out / BEST_DIR} is not the best eval's (step {best['step']}), whose checkpoint "
                            f"is gone too: it is written again only by an eval that beats {best['value']:.4g}")
            return
        tmp = out / f".{BEST_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(snapshot, tmp)
        meta = json.loads((tmp / "scaletune.json").read_text(encoding="utf-8"))
        (tmp / "scaletune.json").write_text(json.dumps({**meta, "best": best}, indent=1))
        tmp.rename(out / BEST_DIR)
        self.mlog.write(f"{out / BEST_DIR}: restored from {snapshot.parent} (the best eval's step)")

    def after_eval(self, step: int, metrics: dict) -> bool:
        """Note this eval; write best_adapter/ if it beats the best so far (every rank calls this: the write
        gathers under ZeRO-3). Returns True when the run should stop early."""
        if not self.metric:
            return False
        value, counters = float(metrics[self.metric]), self.run.counters
        best = counters.get("best")
        # The threshold is patience's alone (as in HF's early stopping): any better eval is the best adapter.
        better = math.isfinite(value) and (best is None or self._beats(value, best["value"], 0.0))
        enough = math.isfinite(value) and (best is None or self._beats(value, best["value"], self.threshold))
        counters["evals_since_best"] = 0 if enough else counters.get("evals_since_best", 0) + 1
        if better:
            counters["best"] = best = {"metric": self.metric, "value": value, "step": step}
            path = write_adapter(self.run, BEST_DIR, extra_meta={"best": best})
            self.mlog.log("best", step, {self.metric: value})
            self.mlog.write(f"step {step}: best {self.metric} so far ({value:.4g}): adapter in {path}")
        since = counters["evals_since_best"]
        if not self.patience or since < self.patience:
            return False
        counters["stopped_early"] = step
        was = f"{best['value']:.4g} at step {best['step']}" if best else "none finite"
        where = self.run.output_dir / BEST_DIR
        self.mlog.log("early_stop", step, {"evals_without_better": since, "best_step": best and best["step"]})
        self.mlog.write(f"step {step}: stopping early: {since} evals in a row without a {self.metric} better than "
                        f"the best by more than {self.threshold:g} (best {was}"
                        + (f"; its adapter is in {where})" if where.is_dir() else ")"))
        return True

    def _beats(self, value: float, best: float, margin: float) -> bool:
        return value < best - margin if self.lower else value > best + margin


def _written_by(directory: Any) -> tuple | None:
    """(metric, step, value) of the eval that wrote this best_adapter/ (None: there is none, or it says
    nothing). The value tells two paths' bests of the same step apart."""
    try:
        best = json.loads((directory / "scaletune.json").read_text(encoding="utf-8"))["best"]
        return best["metric"], int(best["step"]), float(best["value"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _key(best: dict | None) -> tuple | None:
    return None if best is None else (best["metric"], int(best["step"]), float(best["value"]))
