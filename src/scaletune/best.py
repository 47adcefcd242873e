"""`train.best_metric` and early stopping: the adapter of the best eval so far in OUTPUT_DIR/best_adapter/,
and the end of a run whose evals stopped getting better. What they remember lives in the run's counters,
which a checkpoint keeps, so a resumed run picks and stops as the uninterrupted one would."""

from __future__ import annotations

import json
import math
import shutil
from typing import Any

from .config import EVAL_METRICS
from .train import Run, write_adapter

BEST_DIR = "best_adapter"


class BestAdapter:
    """Watches each eval's `train.best_metric` (does nothing without one)."""

    def __init__(self, run: Run, mlog: Any) -> None:
        t = run.cfg.train
        self.run, self.mlog, self.metric = run, mlog, t.best_metric
        self.patience, self.threshold = t.early_stopping_patience, t.early_stopping_threshold
        self.lower = EVAL_METRICS.get(run.cfg.task, {}).get(self.metric) == "min"
        best = run.counters.get("best")
        if best and best["metric"] != self.metric:  # changed on resume: the old values are of another metric
            if self.metric:
                mlog.write(f"train.best_metric is now {self.metric} (was {best['metric']}): the best adapter is "
                           "picked anew from the next eval")
            run.counters.pop("best")
            run.counters.pop("evals_since_best", None)
        on_disk = _written_at(run.output_dir / BEST_DIR)
        best = run.counters.get("best")
        if self.metric and on_disk is not None and on_disk > run.step:
            # resumed from before it was written: the same steps redone write it again; another path (an
            # older checkpoint given to --resume) replaces it only with an eval better than its own best
            mlog.write(f"{run.output_dir / BEST_DIR} is from step {on_disk}, past this resume's step {run.step}: "
                       "an eval that beats this run's best from here on replaces it")
        elif self.metric and best and on_disk != best["step"] and run.accelerator.is_main_process:
            self._recover(best, on_disk)

    def _recover(self, best: dict, on_disk: int | None) -> None:
        """best_adapter/ is not the best eval's (deleted, or lost with the disk): the checkpoint of that step,
        if kept, holds the same weights (it is written after the eval)."""
        out = self.run.output_dir
        snapshot = out / "checkpoints" / f"step-{best['step']}" / "adapter"
        was = "missing" if on_disk is None else f"from step {on_disk}"
        if not (snapshot / "adapter_config.json").is_file():
            self.mlog.write(f"warning: {out / BEST_DIR} is {was}, not the best eval's (step {best['step']}), whose "
                            "checkpoint is gone too: it is written again only by an eval that beats "
                            f"{best['value']:.4g}")
            return
        tmp = out / f".{BEST_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(snapshot, tmp)
        meta = json.loads((tmp / "scaletune.json").read_text(encoding="utf-8"))
        (tmp / "scaletune.json").write_text(json.dumps({**meta, "best": best}, indent=1))
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)
        tmp.rename(out / BEST_DIR)
        self.mlog.write(f"{out / BEST_DIR} was {was}: restored from {snapshot.parent} (the best eval's step)")

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


def _written_at(directory: Any) -> int | None:
    """The step whose eval wrote this best_adapter/ (None: there is none, or it says nothing)."""
    try:
        return int(json.loads((directory / "scaletune.json").read_text(encoding="utf-8"))["best"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
