"""Run records: metrics.jsonl, run.json, accelerate trackers and the progress bar (main process only)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import RESUME_AFTER_WRITE, failed_write, write_error
from .progress import sized_terminal

log = logging.getLogger("scaletune")

_PACKAGES = ("scaletune", "torch", "transformers", "accelerate", "peft", "datasets", "deepspeed", "bitsandbytes")


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: Path) -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


LAUNCH_ARGV = "SCALETUNE_LAUNCH_ARGV"


def command_line() -> list[str]:
    """The command that started this run: `scaletune launch ...` (set for its ranks in $SCALETUNE_LAUNCH_ARGV)
    rather than the `-m scaletune train ...` each rank was given, else this process's argv."""
    try:
        argv = json.loads(os.environ.get(LAUNCH_ARGV, "null"))
    except ValueError:
        argv = None
    return argv if isinstance(argv, list) and argv else list(sys.argv)


def duration(seconds: float) -> str:
    """`seconds` as 42s, 3m07s or 2h05m09s."""
    minutes, sec = divmod(round(seconds), 60)
    if minutes >= 60:
        return f"{minutes // 60}h{minutes % 60:02d}m{sec:02d}s"
    return f"{minutes}m{sec:02d}s" if minutes else f"{sec}s"


def run_summary(cfg: Any, facts: dict) -> str:
    """One line saying what this run trains, on how much data, for how long and where it writes: `facts` is
    what run.json records of this start. The step lines alone left a newcomer guessing at epochs (SST-2's
    400 steps are a fifth of one) and at where the adapter would go."""
    trainable, total = facts["trainable_params"], facts["total_params"]
    share = f"{100 * trainable / total:.2g}%" if total else "?"
    rows = "packed rows" if facts.get("packed_rows") else "examples"
    batch = f"{cfg.train.global_batch_size} {rows}"
    if facts["grad_accum"] > 1 or facts["world_size"] > 1:
        batch += (f" = {cfg.train.micro_batch_size} x {facts['grad_accum']} accumulation"
                  + (f" x {facts['world_size']} ranks" if facts["world_size"] > 1 else ""))
    epochs = facts["total_steps"] / max(1, facts["steps_per_epoch"])
    held = facts["eval_examples"]
    return (f"training {cfg.task} with {cfg.peft_method} on {cfg.model.name_or_path}: {trainable:,} of {total:,} "
            f"parameters trainable ({share}); {facts['train_examples']:,} training examples, "
            + (f"{held:,} for eval" if held else "no eval set")
            + f"; {facts['total_steps']:,} steps of {batch} ({epochs:.3g} epoch{'' if epochs == 1 else 's'}); "
            f"writing to {cfg.output_dir}")


def write_run_json(output_dir: Path, cfg: Any, extra: dict, config: dict | None = None) -> None:
    """run.json: the resolved config (`config`: as given, before loading lowered data.max_length to what the
    model takes, which is what a checkpoint records, so `train OUTPUT_DIR --resume` reads the config its
    checkpoints were written by), versions and this start's facts. A resumed run keeps its first start's
    `started` and `argv` and adds this start to `resumes` (time, checkpoint, command line)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    argv = command_line()
    info = {"config": config if config is not None else cfg.to_dict(), "versions": package_versions(),
            "git_commit": git_commit(Path.cwd()), "argv": argv, "cwd": os.getcwd(),  # (relative paths: from cwd)
            "started": now, **extra}
    if extra.get("resumed_from"):
        try:
            before = json.loads((output_dir / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            before = None
        if isinstance(before, dict):
            info["started"], info["argv"] = before.get("started", now), before.get("argv", argv)
            for key in ("wandb_project", "wandb_entity"):  # (where the W&B run lives: see start_trackers)
                if key in before:
                    info[key] = before[key]
            info["cwd"] = before.get("cwd", info["cwd"])
            info["resumes"] = [*(before.get("resumes") or []),
                               {"time": now, "from": extra["resumed_from"], "argv": argv, "cwd": os.getcwd(),
                                "world_size": extra.get("world_size")}]
    try:
        _replace_json(output_dir / "run.json", info)
    except OSError as exc:
        if failed_write(exc):
            raise write_error(exc, output_dir / "run.json", RESUME_AFTER_WRITE) from None
        raise


def _replace_json(path: Path, info: dict) -> None:
    """`info` as `path`'s JSON, written aside and moved over it (a reader never sees half of it); the file
    aside is removed if that fails, and the OSError raised."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)  # (a link left there would be written through, outside output_dir)
        tmp.write_text(json.dumps(info, indent=1, default=str))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def start_trackers(accelerator: Any, cfg: Any, output_dir: Path, start_step: int = 0) -> None:
    """Start the train.report_to trackers with the resolved config as their hyper-parameters, writing
    inside output_dir: W&B's and MLflow's own defaults are the current directory (./wandb, ./mlruns),
    which put one run's logs beside every other's. A user's WANDB_DIR / MLFLOW_TRACKING_URI still wins.
    A run that starts at `start_step` (a resume) has TensorBoard drop what earlier attempts logged past
    it: a resume from an older checkpoint, or after a stop, would otherwise draw two curves in one."""
    trackers = cfg.train.report_to or []
    init_kwargs: dict[str, dict] = {}
    run_id = _run_id(output_dir) if accelerator.is_main_process else None
    if "tensorboard" in trackers:
        init_kwargs["tensorboard"] = {"purge_step": start_step + 1}
    if "wandb" in trackers:
        if not os.environ.get("WANDB_API_KEY") and not _wandb_login_saved():
            os.environ.setdefault("WANDB_MODE", "offline")  # no key: log locally instead of failing the run
        init_kwargs["wandb"] = {"dir": os.environ.get("WANDB_DIR") or str(output_dir),
                                "name": os.environ.get("WANDB_NAME") or output_dir.name}
        if run_id:  # the same W&B run on every resume (its first start's id), not a new run per start
            init_kwargs["wandb"].update(id=run_id, resume="allow")
    if "mlflow" in trackers and not os.environ.get("MLFLOW_TRACKING_URI"):
        # an SQLite store: MLflow 3 refuses its old ./mlruns file store unless told to allow it; made by
        # the rank that logs (another node's output_dir may be a local directory, not the shared one)
        if accelerator.is_main_process:
            (output_dir / "mlruns").mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(output_dir / 'mlruns' / 'mlflow.db').resolve()}"
    continued = None  # MLflow makes its own run ids: a resume finds its run again by our tag (set below)
    if "mlflow" in trackers:
        # named like W&B's: MLflow's own random names repeat across runs (set_seed seeds their generator)
        init_kwargs["mlflow"] = {"run_name": output_dir.name}
        if run_id and start_step and (continued := _mlflow_run(run_id)):
            init_kwargs["mlflow"]["run_id"] = continued
    config = flat_config(cfg.to_dict())
    wandb_kwargs = init_kwargs.pop("wandb", None)
    accelerator.init_trackers("scaletune", config=None if continued else config, init_kwargs=init_kwargs)
    if continued:
        # MLflow refuses to change a parameter once logged (a resume may change max_steps, eval_every...):
        # the continued run keeps its first start's parameters; the other trackers get this start's
        for tracker in accelerator.trackers:
            if tracker.name != "mlflow":
                tracker.store_init_configuration(config)
    if wandb_kwargs is not None and accelerator.is_main_process:
        # accelerate gives every tracker init_trackers' project name, which is also TensorBoard's directory
        # (output_dir/scaletune): W&B's own tracker takes the user's WANDB_PROJECT, as W&B users expect (every
        # run of every project went to one W&B project "scaletune"); WANDB_NAME likewise names the run
        from accelerate.tracking import WandBTracker

        project, entity = _wandb_place(output_dir)
        # (an entity of None leaves W&B its default; a recorded one wins over a changed WANDB_ENTITY)
        tracker = WandBTracker(project, **wandb_kwargs, **({"entity": entity} if entity else {}))
        tracker.start()
        tracker.store_init_configuration(config)
        accelerator.trackers.append(tracker)
    for tracker in getattr(accelerator, "trackers", []) if run_id else []:
        if tracker.name == "mlflow":  # (set after start: a user's MLFLOW_TAGS replaces the tags given to it)
            import mlflow

            mlflow.MlflowClient().set_tag(tracker.tracker.info.run_id, MLFLOW_TAG, run_id)


def _wandb_place(output_dir: Path) -> tuple[str, str | None]:
    """The W&B project and entity: those the run's first start used (recorded in run.json), else $WANDB_PROJECT
    (default "scaletune") and $WANDB_ENTITY (default: W&B's own, the API key's). A resume must log where its W&B
    run is: under another project or entity (changed since, a requeued job's environment) W&B starts a second
    run there and the history splits."""
    asked = {"project": os.environ.get("WANDB_PROJECT") or "scaletune", "entity": os.environ.get("WANDB_ENTITY") or None}
    path = output_dir / "run.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return asked["project"], asked["entity"]
    if not isinstance(info, dict):
        return asked["project"], asked["entity"]
    if not info.get("wandb_project"):  # the first start: record where it logs (an unset entity as null)
        info["wandb_project"], info["wandb_entity"] = asked["project"], asked["entity"]
        try:
            _replace_json(path, info)
        except OSError as exc:  # (a full disk: the run's first checkpoint will say so; this record can wait)
            log.warning("W&B: could not record the project in %s (%s)", path, exc.strerror or exc)
        return asked["project"], asked["entity"]
    recorded = {"project": info["wandb_project"], "entity": info.get("wandb_entity", asked["entity"])}
    for what, value in recorded.items():
        if value != asked[what]:
            now = os.environ.get(f"WANDB_{what.upper()}")
            given = f"WANDB_{what.upper()}={now!r}" if now else f"WANDB_{what.upper()} unset"
            started = repr(value) if value else "W&B's default (WANDB_ENTITY was unset)"
            log.warning("W&B: the run goes on in %s %s, where it started (%s is for new runs)", what, started, given)
    if recorded["entity"] is None:  # (W&B would take WANDB_ENTITY: the run started under the default one)
        os.environ.pop("WANDB_ENTITY", None)
    return recorded["project"], recorded["entity"]


def _run_id(output_dir: Path) -> str | None:
    """An id for this run, the same at every resume: from output_dir and run.json's first start time."""
    try:
        started = json.loads((output_dir / "run.json").read_text(encoding="utf-8"))["started"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return hashlib.sha256(f"{output_dir.resolve()}|{started}".encode()).hexdigest()[:16]


MLFLOW_TAG = "scaletune_run"


def _mlflow_run(run_id: str) -> str | None:
    """The MLflow run an earlier start of this run logged to (tagged with `run_id`), or None."""
    import mlflow

    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "scaletune")  # (accelerate's name for it, as there)
    try:
        runs = mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.{MLFLOW_TAG} = '{run_id}'",
                                  output_format="list", max_results=1)
    except mlflow.exceptions.MlflowException:  # (no such experiment yet: nothing to continue)
        return None
    return runs[0].info.run_id if runs else None


def _wandb_login_saved() -> bool:
    """Whether `wandb login` stored a key (in ~/.netrc; WANDB_API_KEY is the other way to give one)."""
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def flat_config(raw: dict, prefix: str = "") -> dict[str, Any]:
    """{"train.learning_rate": 2e-4, ...}: the form every tracker takes hyper-parameters in (TensorBoard's
    hparams accept only numbers, strings and booleans: None and lists become their text)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            out[prefix + key] = value
        else:
            out[prefix + key] = json.dumps(value)
    return out


NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def json_safe(value: Any) -> Any:
    """`value` with every non-finite number as the string "NaN" / "Infinity" / "-Infinity": Python's json
    would write bare NaN, which strict JSON readers (JavaScript, many tools) refuse. `report` reads them back."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return number if math.isfinite(number) else NONFINITE[str(number)]


def _ends_with_newline(path: Path) -> bool:
    """Whether appending to `path` starts a line: it is empty or missing, or its last byte is a newline."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return True
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"
    except OSError:
        return True


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl and forwards scalars to trackers."""

    def __init__(self, accelerator: Any, output_dir: Path, total_steps: int, start_step: int):
        self.acc = accelerator
        self.main = accelerator.is_main_process
        self.path = output_dir / "metrics.jsonl"
        self.bar = None
        self.total = total_steps
        self.began, self.first_step = time.monotonic(), start_step  # (the ETA's pace: this start's steps)
        quiet = os.environ.get("SCALETUNE_NO_PROGRESS") == "1"
        # Off a terminal (a Slurm .out file, CI, `| tee`) a redrawn bar is one ever-growing line of
        # carriage returns: log a plain line per logging interval instead. So too on a terminal of no
        # width (a pseudo-terminal nobody sized, as some exec and CI tools open), where tqdm draws nothing.
        self.lines = self.main and not quiet and not sized_terminal(sys.stderr)
        self._clean_end = not self.main or _ends_with_newline(self.path)
        if self.main and not quiet and not self.lines:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, event: str, step: int, values: dict) -> None:
        if not self.main:
            return
        record = {"event": event, "step": step, "time": round(time.time(), 3), **values}
        line = json.dumps(json_safe(record), default=float) + "\n"
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                if not self._clean_end:  # a write cut short (a full disk) left half a line: start a new one
                    fh.write("\n")
                    self._clean_end = True
                fh.write(line)
        except OSError as exc:
            self._clean_end = False
            if failed_write(exc):
                raise write_error(exc, self.path, RESUME_AFTER_WRITE) from None
            raise
        scalars = {f"{event}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.acc.trackers and scalars:
            self.acc.log(scalars, step=step)

    def progress(self, step: int, postfix: dict, ending: bool = False) -> None:
        """Show `step`'s values (`ending`: the run ends there, before its total: a stop, no time left to show)."""
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(shown, refresh=True)
        elif self.lines:
            # a log has no bar to show time left: the pace so far, evals and checkpoints included, gives it
            done, elapsed = step - self.first_step, time.monotonic() - self.began
            left = elapsed / done * (self.total - step) if done > 0 else None
            eta = f" elapsed={duration(elapsed)}" + (f" eta={duration(left)}" if left is not None and not ending else "")
            print(f"step {step}/{self.total} " + " ".join(f"{k}={v}" for k, v in shown.items()) + eta,
                  file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self.main:
            if self.bar is not None:
                self.bar.write(text)
            else:
                print(text, flush=True)

    def end_progress(self) -> None:
        """Take the bar off the screen's last line: what is written after it stays below it."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.end_progress()
        if self.acc.trackers:
            self.acc.end_training()
