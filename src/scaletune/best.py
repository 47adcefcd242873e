"""`train.best_metric` and early stopping: the adapter of the best eval so far in OUTPUT_DIR/best_adapter/,
and the end of a run whose evals stopped getting better. What they remember lives in the run's counters,
which a checkpoint keeps, so a resumed run picks and stops as the uninterrupted one would."""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from typing import Any

from .checkpoint import verify
from .config import lower_is_better
from .distributed import raise_main_rank_failure
from .errors import UserError
from .fileutil import restore_replaced
from .outdir import abandoned_path
from .saving import write_adapter
from .train import Run

BEST_DIR = "best_adapter"


class BestAdapter:
    """Watches each eval's `train.best_metric` (does nothing without one)."""

    def __init__(self, run: Run, mlog: Any) -> None:
        t = run.cfg.train
        self.run, self.mlog, self.metric = run, mlog, t.best_metric
        self.patience, self.threshold = t.early_stopping_patience, t.early_stopping_threshold
        self.lower = bool(self.metric) and lower_is_better(self.metric)
        self.scored_over = scored_over(run.cfg, self.metric)
        # what the eval files hold (the same path edited, records appended to data.train with eval_fraction: other
        # examples scored under the same words)
        self.contents = run.data.get("eval_digest")
        path_best = run.counters.get("best")  # the path this run continues: its best, of whichever metric
        changed = bool(path_best and self.metric and path_best["metric"] != self.metric)
        # (a record from before "over" or "contents" was kept is taken as scored over what is asked now)
        rescored = bool(path_best and self.metric and not changed
                        and path_best.get("over", self.scored_over) != self.scored_over)
        edited = bool(path_best and self.metric and not changed and not rescored
                      and path_best.get("contents", self.contents) != self.contents)
        if changed:  # the old values are of another metric. (With best_metric off the record stays, unused:
            # a later resume still knows which best_adapter/ is this path's.)
            mlog.write(f"train.best_metric is now {self.metric} (was {path_best['metric']}): the best adapter is "
                       "picked anew from the next eval")
        elif rescored:  # a value over other examples (or other answers' lengths) is no bar to beat
            mlog.write(f"the best {self.metric} so far ({path_best['value']:.4g}, step {path_best['step']}) was scored "
                       f"over {path_best['over']}, the evals now over {self.scored_over}: the best adapter is picked "
                       "anew from the next eval")
        elif edited:
            what = "data.eval" if run.cfg.data.eval else "data.train (its held-out fraction is scored)"
            mlog.write(f"the best {self.metric} so far ({path_best['value']:.4g}, step {path_best['step']}) was scored "
                       f"over {self.scored_over} as it was then: {what} has changed since, so the best adapter is "
                       "picked anew from the next eval")
        rescored = rescored or edited
        if changed or rescored:
            run.counters.pop("best")
            run.counters.pop("evals_since_best", None)
        stopped = run.counters.get("stopped_early")
        if stopped and not (self.patience and run.counters.get("evals_since_best", 0) >= self.patience):
            # early stopping turned off, given more patience, or counting another metric on resume: the run
            # goes on from its checkpoint
            run.counters.pop("stopped_early")
            why = (f"train.best_metric is now {self.metric}" if changed and self.patience
                   else "the eval examples' contents changed" if edited and self.patience
                   else f"the evals are now over {self.scored_over}" if rescored and self.patience
                   else f"train.early_stopping_patience is now {'null' if self.patience is None else self.patience}")
            mlog.write(f"continuing the run that stopped early at step {stopped}: {why}")
        error, hint = None, "nothing was deleted; fix the cause, then run the same command again"
        if run.accelerator.is_main_process:
            try:
                self._check_on_disk(path_best)
            except UserError as exc:
                error = exc
            except OSError as exc:
                error = UserError(f"could not set {run.output_dir / BEST_DIR} aside: {exc.strerror or exc}", hint=hint)
        # (the other ranks would wait in the first step's collective for a main rank that has exited)
        raise_main_rank_failure(run.accelerator, error, f"{run.output_dir / BEST_DIR}", hint=hint)

    def _check_on_disk(self, path_best: dict | None) -> None:
        """best_adapter/ not written by this path's best eval: written after the resumed checkpoint (the steps
        about to be redone write it again), on a path left by resuming another checkpoint, or lost. It is
        moved aside, and this path's best restored; with best_metric off, another path's is only moved aside."""
        restore_replaced(self.run.output_dir / BEST_DIR)  # (a run killed while it wrote a new best)
        on_disk = best_record(self.run.output_dir / BEST_DIR)
        if self.metric and not _same(on_disk, self.run.counters.get("best")):
            self._recover(self.run.counters.get("best"), on_disk)
        elif not self.metric and on_disk is not None and not _same(on_disk, path_best):
            self._set_aside(on_disk, "the path this run continues did not write it")

    def _set_aside(self, on_disk: dict | None, why: str) -> None:
        out = self.run.output_dir
        step = f"step{on_disk['step']}" if on_disk else "unrecorded"
        aside = abandoned_path(out, f"{BEST_DIR}-{step}")
        os.rename(out / BEST_DIR, aside)
        written = f"written at step {on_disk['step']}" if on_disk else "with no record of its eval"
        self.mlog.write(f"{out / BEST_DIR} ({written}) is not this run's best so far ({why}): moved to {aside}")

    def _recover(self, best: dict | None, on_disk: dict | None) -> None:
        """Make best_adapter/ the best eval's of the path this run continues: one from elsewhere is moved
        aside (as `--resume` moves later checkpoints), and the best's is copied from its step's checkpoint
        (written after that eval: the same weights) if it was kept."""
        out = self.run.output_dir
        missing = not (out / BEST_DIR).exists()
        if not missing:
            same_step = best is not None and on_disk is not None and on_disk["step"] == best["step"]
            self._set_aside(on_disk, "none yet" if best is None else "another path's eval of the same step"
                            if same_step else f"that is step {best['step']}'s")
        if best is None:
            return
        # That step's checkpoint, if it is this path's (its counters hold this best, by id): beside the resumed
        # one (which may lie outside checkpoints/), in checkpoints/ (which can hold a left path's steps too),
        # or in a left path's folder there (this path may have come back from one).
        name = f"step-{best['step']}"
        where = [*([self.run.resumed_from.parent / name] if self.run.resumed_from else []),
                 out / "checkpoints" / name, *sorted((out / "checkpoints").glob(f".abandoned-*/{name}"), reverse=True)]
        snapshot = next((d / "adapter" for d in where if (d / "adapter" / "adapter_config.json").is_file()
                         and _same(_counted_best(d), best) and verify(d) is None), None)
        if snapshot is None:
            self.mlog.write(f"warning: {out / BEST_DIR} is {'missing' if missing else 'set aside'}, and no kept "
                            f"checkpoint holds the best eval's adapter (step {best['step']}): it is written again "
                            f"only by an eval that beats {best['value']:.4g}")
            return
        tmp = out / f".{BEST_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(snapshot, tmp)
        try:
            meta = json.loads((tmp / "scaletune.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # (a verified checkpoint's snapshot says what it is; an older one may not)
            meta = {}
        (tmp / "scaletune.json").write_text(json.dumps({**(meta if isinstance(meta, dict) else {}), "best": best},
                                                       indent=1))
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
        if not math.isfinite(value):  # (a correlation over constant answers or predictions, a reward with no example
            # of its kind): never a best, said so, or a run whose every eval is so ends without best_adapter/ unsaid
            self.mlog.write(f"warning: step {step}: eval {self.metric} is {value} (undefined over this eval set), "
                            f"not a best: train.best_metric picks no adapter by it"
                            + ("" if best is None else f" (the best stays step {best['step']}'s)"))
        if better:
            # the id tells this eval's adapter from another path's best of the same step and value
            counters["best"] = best = {"metric": self.metric, "value": value, "step": step, "id": uuid.uuid4().hex[:16],
                                       "over": self.scored_over, "contents": self.contents}
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
        self.mlog.write(f"step {step}: stopping early: {since} evals in a row without beating the best {self.metric} "
                        f"by more than {self.threshold:g} (best {was}"
                        + (f"; its adapter is in {where})" if where.is_dir() else ")"))
        return True

    def _beats(self, value: float, best: float, margin: float) -> bool:
        return value < best - margin if self.lower else value > best + margin


def scored_over(cfg: Any, metric: str | None) -> str:
    """What an eval's `metric` is a value over, in words: the eval examples (data.eval, or the held-out
    fraction of data.train) and, for the generated answers' scores, how many were generated and how long
    each could grow. A resume may change these (they change no training); a best over others is no bar."""
    from .identity import real_paths
    from .rules import GENERATED_METRICS

    d, t = cfg.data, cfg.train
    # (by what the path names: the same file written otherwise, or from another directory, is the same eval)
    # (a held-out fraction is drawn from data.train by train.seed: another source or seed holds out others)
    train = real_paths({"data": {"train": d.train}})["data.train"]
    over = f"data.eval {real_paths({'data': {'eval': d.eval}})['data.eval']}" if d.eval else \
        f"data.eval_fraction {d.eval_fraction} of data.train {train} (train.seed {t.seed})"
    if d.max_samples is not None:  # (the first N of data.eval, or of data.train before the split: other examples)
        over += f" (data.max_samples {d.max_samples})"
    if metric in GENERATED_METRICS:
        answers = "every eval example" if t.eval_generate is True else f"the first {t.eval_generate} eval examples"
        over += f", answers to {answers} of at most {t.eval_max_new_tokens} tokens"
    return over


def best_record(directory: Any) -> dict | None:
    """The record of the eval that wrote this best_adapter/ (None: there is none, or it says nothing)."""
    try:
        best = json.loads((directory / "scaletune.json").read_text(encoding="utf-8"))["best"]
        return best if _key(best) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _counted_best(checkpoint: Any) -> dict | None:
    """The best record in a checkpoint's counters (None: none, or unreadable)."""
    try:
        return json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))["counters"].get("best")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _key(best: Any) -> tuple | None:
    try:
        return best["metric"], int(best["step"]), float(best["value"])
    except (KeyError, TypeError, ValueError):
        return None


def _same(a: dict | None, b: dict | None) -> bool:
    """Whether two best records are one eval's: by id (two paths' bests can share step and value), or by
    metric, step and value for records written before ids."""
    if a is None or b is None:
        return a is None and b is None
    if "id" in a and "id" in b:
        return a["id"] == b["id"]
    return _key(a) == _key(b)
