"""scaletune from Python: `train`, `evaluate`, `predict` and `merge` do what the commands of the same names do,
with the same config loading, checks and functions, but return their results instead of printing them and raise
`scaletune.errors.UserError` (ConfigError, DataError) instead of exiting, their options named as these functions'
arguments: for notebooks, sweeps and pipelines.

In-process differences from the CLI: logging is left to the caller's configuration where there is one (else
scaletune's own lines go to stderr through one handler, added once); the stop signals (SIGTERM, SIGUSR1, Ctrl-C
during the loop) stop a run gracefully only when it is called from the main thread, and their handlers are put
back afterwards; accelerate's per-process state is reset after each call, so calls with different settings follow
one another, and nothing of a run (model, optimizer) stays referenced once a call returns, nor by the error a
failed call raises (its traceback's frames keep no locals); calls from several threads run one at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import logging
import os
import re
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, UserError

__all__ = ["TrainResult", "train", "evaluate", "predict", "merge"]


# The CLI's words in an error, as this module's arguments: an error told a caller to "pass --allow-config-change".
# Backquoted text (a shell command to run, e.g. `hf download NAME`) is kept as it is.
_PYTHON_WORDS = {"--resume auto": 'resume="auto"', "--overwrite": "overwrite=True",
                 "--allow-config-change": "allow_config_change=True", "--resume": "resume", "--adapter": "adapter",
                 "--data": "data", "--predictions": "predictions", "--threshold": "threshold", "--out": "out_dir",
                 "--max-new-tokens": "max_new_tokens", "--temperature": "temperature", "--top-p": "top_p",
                 "--top-k": "top_k", "--seed": "seed", "--generate": "generate=True", "command-line override": "override"}
_CLI_WORD = re.compile("|".join(re.escape(w) + (r"(?![\w-])" if w.startswith("--") else "")
                                for w in sorted(_PYTHON_WORDS, key=len, reverse=True)))


def _python_words(text: str | None) -> str | None:
    """`text` with the CLI's option names outside backquotes said as this module's arguments."""
    if text is None:
        return None
    parts = text.split("`")
    parts[::2] = [_CLI_WORD.sub(lambda m: _PYTHON_WORDS[m.group(0)], part) for part in parts[::2]]
    return "`".join(parts)


def _in_python_words(call: Callable) -> Callable:
    """`call`, raising its UserErrors (same type) in this module's words rather than the CLI's."""

    @functools.wraps(call)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except BaseException as exc:
            _drop_locals(exc)
            if isinstance(exc, UserError):
                exc.problems = [_python_words(p) for p in exc.problems]
                exc.title, exc.hint = _python_words(exc.title), _python_words(exc.hint)
                exc.args = (exc.render(),)
            raise

    return wrapped


def _drop_locals(exc: BaseException) -> None:
    """The finished frames of `exc`'s tracebacks (and of the errors it was raised from) without their locals, and
    the memory those held freed. A failed run's error (an out-of-memory, a second Ctrl-C) kept the run's model,
    optimizer and batches alive through those frames for as long as the error was kept: by a notebook as its
    last error, by a sweep that logs it; its next call (a smaller batch after an out-of-memory) found the memory
    still taken. The tracebacks still show where each error came from."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    _free_memory()


@dataclass(frozen=True)
class TrainResult:
    """What `train` left in output_dir."""

    output_dir: Path
    adapter: Path | None  # OUTPUT_DIR/adapter; None when the run was stopped before its end
    checkpoint: Path | None  # the newest checkpoint (what resume="auto" continues from)
    steps: int  # the optimizer step the run reached
    finished: bool  # False: stopped by a signal or Ctrl-C at a checkpoint
    eval_metrics: dict | None  # the last eval's metrics in metrics.jsonl (None: no eval data)
    eval_step: int | None  # the step they were computed at


@_in_python_words
def train(config: str | Path | Mapping[str, Any], overrides: list[str] | Mapping[str, Any] | None = None, *,
          resume: str | Path | None = None, overwrite: bool = False, allow_config_change: bool = False) -> TrainResult:
    """`scaletune train CONFIG OVERRIDES...`: train an adapter into the config's output_dir. `config`: a YAML
    file or a dict of the same keys; `overrides`: ["train.max_steps=10", ...] or {"train.max_steps": 10}.
    `resume`: "auto" or a checkpoint dir, as --resume."""
    if resume is not None and not (isinstance(resume, (str, Path)) and str(resume).strip()):
        # (resume=True failed as a TypeError deep in the checkpoint code; "" named the working directory)
        raise UserError(f'resume: expected "auto", a checkpoint directory or None, got {resume!r}')
    resume = _text(resume)
    _check("train", resume=resume, overwrite=overwrite)
    cfg = _load(config, overrides, check_peft=True)
    from .checkpoint import checkpoint_dirs
    from .stopflag import StopFlag
    from .train import train as train_run

    with _call():
        stop = StopFlag()
        try:
            result, steps = train_run(cfg, resume=resume, overwrite=overwrite,
                                      allow_config_change=allow_config_change, stop=stop)
        finally:
            stop.restore()
    out = Path(cfg.output_dir)
    newest = next(iter(checkpoint_dirs(out)), None)
    metrics, at = _last_eval(out / "metrics.jsonl")
    done = result != "preempted"
    return TrainResult(out, out / "adapter" if done else None, newest, steps, done, metrics, at)


@_in_python_words
def evaluate(config: str | Path | Mapping[str, Any], overrides: list[str] | Mapping[str, Any] | None = None, *,
             adapter: str | Path | None = None, data: str | Path | None = None,
             predictions: str | Path | None = None, threshold: float | None = None, generate: bool = False,
             max_new_tokens: int | None = None) -> dict:
    """`scaletune eval`: the metrics dict it prints as JSON. `adapter`, `data`, `predictions`, `threshold`,
    `generate`, `max_new_tokens` (None: 128): as --adapter, --data, --predictions, --threshold, --generate,
    --max-new-tokens."""
    from .cli import threshold_option
    from .infer import run_eval

    threshold = _option("threshold", threshold_option, threshold)
    data, predictions = _text(data), _text(predictions)
    _check("eval", data=data, predictions=predictions, generate=generate, max_new_tokens=max_new_tokens)
    cfg = _load(config, overrides)
    with _call():
        return run_eval(cfg, _text(adapter), data, predictions, threshold, generate, max_new_tokens)


@_in_python_words
def predict(config: str | Path | Mapping[str, Any], inputs: Iterable[str | Mapping[str, Any]],
            overrides: list[str] | Mapping[str, Any] | None = None, *, adapter: str | Path | None = None,
            max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
            top_k: int | str | None = None, threshold: float | None = None) -> list[dict]:
    """`scaletune predict`: one dict per input, in order, each the JSON line the command writes ("line": its
    position from 1). An input is a str (plain text) or a dict (a JSON line's object, e.g. {"text": ...,
    "text_pair": ...} or {"prompt": ...}). The options are predict's --max-new-tokens ... --threshold."""
    from .cli import sampling, threshold_option, top_k_option
    from .infer import run_predict
    from .predict_input import given_inputs

    top_k = _option("top_k", top_k_option, top_k)
    threshold = _option("threshold", threshold_option, threshold)
    args = _check("predict", input=None, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  seed=seed)
    items = given_inputs(inputs)
    cfg = _load(config, overrides)
    with _call(), open(os.devnull, "w", encoding="utf-8") as discard:
        return run_predict(cfg, _text(adapter), None, max_new_tokens, out=discard, sampling=sampling(args),
                           top_k=top_k, threshold=threshold, items=items)


@_in_python_words
def merge(config: str | Path | Mapping[str, Any], out_dir: str | Path,
          overrides: list[str] | Mapping[str, Any] | None = None, *, adapter: str | Path | None = None) -> Path:
    """`scaletune merge --out OUT_DIR`: the adapter folded into the base weights; returns OUT_DIR."""
    from .merge import run_merge

    _check("merge", out=str(out_dir))
    cfg = _load(config, overrides)
    with _call():
        return run_merge(cfg, _text(adapter), str(out_dir))


def _check(command: str, **options: Any) -> argparse.Namespace:
    """The CLI's checks of the command's options (cli.check_args), before anything is loaded or written."""
    from .cli import check_args

    args = argparse.Namespace(command=command, **options)
    check_args(args)
    return args


def _option(name: str, parse: Callable[[str], Any], value: Any) -> Any:
    """`value` checked as the CLI's option parser checks it; None stays None."""
    if value is None:
        return None
    try:
        return parse(str(value))
    except argparse.ArgumentTypeError as exc:
        raise UserError(f"{name}: {exc}") from None


def _text(value: str | Path | None) -> str | None:
    return None if value is None else str(value)


def _load(config: str | Path | Mapping[str, Any], overrides: list[str] | Mapping[str, Any] | None,
          check_peft: bool = False) -> Any:
    """The validated RunConfig of a YAML file or a dict (validated alike), with the overrides applied."""
    from .config import configure, load_config

    # first: loading a config imports peft, hence bitsandbytes, whose import-time warning (a 4-bit kernel it
    # could not fetch from the hub) the filters this adds drop; added after, the first call printed it
    _logging()
    if isinstance(overrides, Mapping):  # a value as a command line would write it: str as given, else JSON
        overrides = [f"{k}={v if isinstance(v, str) else json.dumps(v, default=str)}" for k, v in overrides.items()]
    if isinstance(overrides, (str, bytes)):  # (a str would be iterated: one override per character)
        raise ConfigError(f"overrides: expected a list of 'key=value' strings or a dict, got one "
                          f"{type(overrides).__name__}: wrap it in a list")
    overrides = list(overrides or [])
    if isinstance(config, Mapping):
        return configure(copy.deepcopy(dict(config)), overrides, check_peft=check_peft)
    if not isinstance(config, (str, Path)):
        raise UserError(f"config: expected a YAML file's path or a dict, got {type(config).__name__}")
    return load_config(config, overrides, check_peft=check_peft)


def _last_eval(path: Path) -> tuple[dict | None, int | None]:
    """The last "eval" record of metrics.jsonl: its metrics and step."""
    last = None
    with contextlib.suppress(OSError), path.open(encoding="utf-8") as fh:
        for line in fh:
            with contextlib.suppress(json.JSONDecodeError):  # (a line a full disk cut short)
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == "eval":
                    last = record
    if last is None:
        return None, None
    return {k: v for k, v in last.items() if k not in ("event", "step", "time")}, last["step"]


_handler: logging.Handler | None = None  # scaletune's own stderr handler, while the caller configured none


def _logging() -> None:
    """scaletune's INFO lines (the run summary, evals, where things were written) as the CLI shows them, unless
    the caller configured logging (a root handler): then the caller's configuration alone decides."""
    global _handler
    from .console_log import LOG_DATEFMT, LOG_FORMAT, quiet_libraries

    quiet_libraries(keep_levels=True)
    log = logging.getLogger("scaletune")
    if logging.getLogger().handlers:
        if _handler is not None:  # (added by an earlier call, before the caller configured logging)
            log.removeHandler(_handler)
            log.setLevel(logging.NOTSET)
            _handler = None
        return
    if _handler is None:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
        log.addHandler(_handler)
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)


# What a run sets in the environment for itself (tracking.start_trackers: MLflow's store inside its output_dir, W&B
# offline without a key), unless the caller set it: left set, a sweep's later runs all logged to MLflow in the
# first run's output_dir
_RUN_ENVIRONMENT = ("MLFLOW_TRACKING_URI", "WANDB_MODE")


# Calls from several threads (a sweep's thread pool) run one after another: a run uses the process's one accelerate
# state (reset by each call's end, under another's run) and its random generators (seeded by each run's start); two
# at once trained other models than the same calls one after another, silently
_one_at_a_time = threading.RLock()


@contextlib.contextmanager
def _call() -> Iterator[None]:
    """Around each call: logging, then the process left as a next call needs it, and as the caller had it."""
    from transformers.utils import logging as hf_logging

    with _one_at_a_time:
        _logging()
        bars = hf_logging.is_progress_bar_enabled()
        environment = {name: os.environ.get(name) for name in _RUN_ENVIRONMENT}
        try:
            yield
        finally:
            for name, value in environment.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            # (train turns transformers' progress bars off for the whole process: the caller's own
            # from_pretrained and Trainer runs afterwards showed none)
            if bars and not hf_logging.is_progress_bar_enabled():
                hf_logging.enable_progress_bar()
            _reset_process_state()


def _reset_process_state() -> None:
    """accelerate keeps one state per process (its mixed precision among it: a second call with another was
    refused); a run's objects are collected now, not at some later collection, so their memory is free."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):  # (a launched rank keeps it)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    _free_memory()


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
