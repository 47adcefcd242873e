"""The output directory of `scaletune train`: whether a run may write into it, and how `--overwrite`
replaces an earlier run without losing it before the new one has finished (the old one waits in a
hidden sibling and is deleted when the new run completes, here or in a later `--resume`)."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
from pathlib import Path

from .config import RunConfig
from .errors import ConfigError, UserError
from .fileutil import shortened
from .runlock import LOCK_NAME

log = logging.getLogger("scaletune")


def check_output_dir(cfg: RunConfig, resume: str | None, overwrite: bool, resume_from: Path | None = None) -> bool:
    """Refuse to write into a non-empty output_dir unless resuming its run or told to overwrite it.

    `resume` is the --resume option, `resume_from` the checkpoint it found (None: nothing to resume, so
    this is a fresh start even with --resume auto). Returns whether the old directory must be replaced;
    the caller does that only after data and model have loaded, so a bad input never costs the user the
    previous run."""
    out = Path(cfg.output_dir)
    if resume not in (None, "none") and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: --resume continues the run in "
                          "output_dir, --overwrite replaces it; pass one")
    try:
        existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte
        why = getattr(exc, "strerror", None) or exc  # (an OSError's text repeats the whole name)
        raise ConfigError(f"output_dir: {shortened(cfg.output_dir)!r} is not a usable path ({why})") from None
    try:
        str(out.absolute()).encode()
    except UnicodeEncodeError as exc:  # (bytes that are not UTF-8, kept by Python as surrogates)
        # the tokenizer's (Rust) save refuses such a path: the run failed at its first checkpoint, steps lost
        bad = os.fsencode(exc.object[exc.start:exc.end])
        raise ConfigError(f"output_dir: {shortened(str(out))!r} is not valid UTF-8 (byte {bad[:1].hex()} at "
                          f"character {exc.start}), which the tokenizer cannot be saved under; name it in UTF-8") from None
    if out.is_symlink() and not out.exists():  # (making it failed with "File exists")
        raise ConfigError(f"output_dir: {out} is a symbolic link to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a directory")
    if out.is_dir() and (links := planted_links(out)):
        raise ConfigError(f"output_dir: {out} holds symbolic links where a run writes its own files "
                          f"({', '.join(links)}): written through, they would change the files they name, outside "
                          "output_dir", hint="remove them (a run directory copied from someone else may hold "
                                             "such links); a link for checkpoints/ to a directory is fine")
    if not existing.is_dir():
        raise ConfigError(f"output_dir: {out} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {out} cannot be written ({existing} is not writable by this user)")
    if (out / ".abandoned").exists() and not (out / ".abandoned").is_dir():  # before a resume moves anything
        raise _not_a_directory(out / ".abandoned")
    if _has_content(out) and resume is None:
        if not overwrite:
            # (given the run's own directory for its config, --overwrite would delete that config: not offered)
            own = cfg.source_file is not None and Path(cfg.source_file).is_dir()
            if own:
                raise ConfigError(f"output_dir: {out} is not empty; resume it with --resume auto (the run directory "
                                  "given for the config is this run's: a new run needs a YAML config, or another "
                                  "output_dir=...)")
            if not any((out / name).exists() for name in RUN_MARKERS):
                # (--resume auto and --overwrite both refuse a directory of other files: offering them sent the
                # user from one refusal to the next)
                raise ConfigError(f"output_dir: {out} is not empty and not a scaletune run's output "
                                  f"({_foreign(out)}); scaletune neither resumes nor replaces it: pick a new "
                                  "output_dir, or clear it yourself")
            raise ConfigError(f"output_dir: {out} is not empty; resume it with --resume auto, " + _way_out(cfg, out))
        why_not = _not_replaceable(cfg, out)
        if why_not:
            raise ConfigError(f"output_dir: --overwrite would delete {out}, but {why_not}; pick another "
                              "output_dir or clear it yourself")
        return True
    if resume is not None and _has_content(out):
        from .checkpoint import checkpoint_dirs

        if resume_from is not None and not resume_from.resolve().is_relative_to(out.resolve()) \
                and checkpoint_dirs(out):
            raise ConfigError(f"output_dir: {out} has checkpoints of its own, so continuing {resume_from} there "
                              "would mix two runs; resume into a new output_dir, or --resume auto to continue "
                              f"the run in {out}")
        why_not = _not_fresh_start(out) if resume_from is None or not checkpoint_dirs(out) else None
        if why_not:
            what = "has no checkpoint to resume, and a run starting" if resume_from is None else \
                f"is not empty, and continuing {resume_from}"
            raise ConfigError(f"output_dir: {out} {what} in it would overwrite what is there: {why_not}; "
                              + _way_out(cfg, out, " (instead of --resume)", said=why_not))
    return False


def _way_out(cfg: RunConfig, out: Path, instead: str = "", said: str | None = None) -> str:
    """A refusal's advice: --overwrite only where it would replace `out`. It refuses a directory holding the
    user's own files, which the refusals of a plain start and of --resume auto offered it for all the same."""
    why_not = _not_only_a_run(out, run_json_required=True) or _not_replaceable(cfg, out)
    if why_not is None:
        return f"pick a new output_dir, or pass --overwrite{instead} to replace it"
    return "pick a new output_dir (--overwrite would not replace it either" + ("" if why_not == said else
                                                                               f": {why_not}") + ")"


def _foreign(out: Path) -> str:
    """What `out` holds, a few names of it, for a message."""
    names = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    return "it holds " + ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _has_content(out: Path) -> bool:
    """Whether `out` is a directory with anything in it but the lock of the run about to use it."""
    return out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir())


RUN_MARKERS = ("run.json", "metrics.jsonl", "checkpoints", "adapter")
# Everything a run (its trackers, `scaletune report` with the default --out) writes into output_dir.
RUN_FILES = {*RUN_MARKERS, "run.json.tmp", ".adapter.tmp", "best_adapter", ".best_adapter.tmp",
             ".adapter.old", ".best_adapter.old", "scaletune", "wandb", "mlruns", "report.html", ".replaced_run",
             ".abandoned", "generations", LOCK_NAME}  # (generations/: train.eval_generate's answers)


# What a run may find as a link in output_dir: storage put elsewhere (checkpoints -> /scratch/...), a directory
# the run only adds entries to. Any other name a run writes at, as a link, would be written through to what it
# names: metrics.jsonl -> ~/.bashrc in a run directory from someone else had a resume append to that file.
LINKABLE_DIRS = ("checkpoints", "wandb", "mlruns")


def planted_links(out: Path) -> list[str]:
    """`name -> target` for each of RUN_FILES in `out` that is a symbolic link a run must not write through."""
    return [f"{name} -> {os.readlink(out / name)}" for name in sorted(RUN_FILES)
            if (out / name).is_symlink() and not (name in LINKABLE_DIRS and (out / name).is_dir())]


def set_aside_metrics(out: Path) -> Path | None:
    """A fresh start where an earlier attempt died before its first checkpoint (`--resume auto` with nothing
    to resume): move that attempt's metrics.jsonl to `.abandoned/` (returned), or the new run's log, and
    `scaletune report`, would carry on from the dead attempt's steps. Main process only."""
    old = out / "metrics.jsonl"
    if not old.exists():
        return None
    aside = abandoned_path(out, "metrics", ".jsonl")
    os.replace(old, aside)
    return aside


def abandoned_path(out: Path, name: str, suffix: str = "") -> Path:
    """A new path `OUTPUT_DIR/.abandoned/<name>-<time><suffix>` to move something a run sets aside to (an
    earlier attempt's metrics, another path's best_adapter/) rather than delete it; `.abandoned/` is created
    if missing. Nanoseconds in the name: two set-asides within a second must not meet. Main process only."""
    aside = out / ".abandoned"
    try:
        aside.mkdir(exist_ok=True)
    except FileExistsError:  # a file of that name: nothing of the user's is moved or overwritten
        raise _not_a_directory(aside) from None
    return aside / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}{suffix}"


def _not_a_directory(aside: Path) -> ConfigError:
    return ConfigError(f"output_dir: {aside} is not a directory: scaletune moves what a run sets aside there",
                       hint="rename or remove that file, then run the same command again")


def _not_fresh_start(out: Path) -> str | None:
    """Why a run may not start from scratch (--resume with nothing to resume) in the non-empty `out`, or None.

    A run that stopped before its first checkpoint (a requeued Slurm job killed early) leaves only its
    run.json and metrics.jsonl: starting again there is what --resume means. Anything else would be
    overwritten or mixed with the new run: another tool's files, or a finished run's adapter/ whose
    checkpoints were deleted to save space."""
    if (out / "adapter").exists():
        return "its adapter/ is a finished run's (whose checkpoints are gone)"
    return _not_only_a_run(out, run_json_required=False)


def _not_only_a_run(out: Path, run_json_required: bool) -> str | None:
    """Why `out` holds more than a scaletune run's files (another tool's, the user's own), or a run.json
    that scaletune did not write; None if it holds only a run's."""
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES and p.suffix != ".png")
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        return f"it holds files scaletune did not write ({', '.join(foreign[:5])}{more})"
    if not (out / "run.json").exists():
        return "it has no run.json (not a scaletune run's output)" if run_json_required else None
    try:
        info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or "config_fingerprint" not in info:
        return "its run.json was not written by scaletune"
    return None


def _not_replaceable(cfg: RunConfig, out: Path) -> str | None:
    """Why --overwrite must not replace `out` (all of it goes once the new run finishes): it must be an earlier
    run's output, nothing else (a directory that only has a checkpoints/ or adapter/ of some tool, a home or
    project directory, is not), and hold none of this run's inputs nor the working directory."""
    if not any((out / name).exists() for name in RUN_MARKERS):
        return f"it is not a scaletune run's output (none of {', '.join(RUN_MARKERS)} is in it)"
    root = out.resolve()
    from .data.sources import train_keyed_sources

    inputs = {"data.eval": cfg.data.eval, "model.name_or_path": cfg.model.name_or_path, "the working directory": ".",
              "model.init_adapter": cfg.model.init_adapter,
              "the run config": cfg.source_file,
              "data.chat_template": cfg.data.chat_template if cfg.data.chat_template not in ("default", "chatml")
              else None}
    # (a list: a pattern's item has one key for all the files it matches, and each is checked)
    for key, value in [*inputs.items(), *train_keyed_sources(cfg.data.train)]:
        if value and Path(value).exists() and Path(value).resolve().is_relative_to(root):
            return f"{key} ({value}) is inside it"
    return _not_only_a_run(out, run_json_required=True)


# In a replacing run's output_dir: the replaced runs set aside (one path a line), deleted when this run finishes.
REPLACED_RECORD = ".replaced_run"


def set_aside(out: Path) -> None:
    """Rename the output_dir --overwrite replaces to a hidden sibling instead of deleting it, so a new run
    that fails, is interrupted or preempted costs nothing; `discard_replaced` deletes it once this run
    finishes. Then create `out` afresh, with the record of what was set aside (a UserError if it cannot
    be written: see `_unrecorded`). Main process only."""
    if out.is_symlink():  # (runs -> /scratch/runs): the directory it names is set aside, the link stays
        out = out.resolve()
    kept = replaced_runs(out)  # if `out` is an unfinished replacement itself, what it kept stays kept
    aside: Path | None = _aside_path(out)
    try:
        out.rename(aside)  # a sibling: the same filesystem, so this is atomic
        kept.append(aside)
    except OSError as exc:  # e.g. the parent is not writable: clear `out` itself, as before
        aside = None
        log.warning("--overwrite: cannot move %s aside (%s); deleting its contents instead", out, exc)
        for child in out.iterdir():
            if child.name == LOCK_NAME:
                continue  # held by this run
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if kept:
        try:
            (out / REPLACED_RECORD).write_text("".join(f"{p}\n" for p in kept), encoding="utf-8")
        except OSError as exc:
            raise _unrecorded(out, aside, kept, exc) from None


def _unrecorded(out: Path, aside: Path | None, kept: list[Path], exc: OSError) -> UserError:
    """The error for a record of the set-aside runs that cannot be written (disk full, quota), after putting
    the run just set aside back in `out` where that works.

    Stop rather than carry on: without the record nothing says where the old run went (not the start or
    Ctrl-C messages) and nothing deletes it once this run finishes, so a hidden copy would fill the disk
    unseen; and a disk too full for a few bytes fails this run at its first checkpoint anyway."""
    problem = f"--overwrite: cannot write {out / REPLACED_RECORD} ({exc.strerror or exc})"
    if aside is not None:
        try:
            (out / REPLACED_RECORD).unlink(missing_ok=True)  # a partly written record
            out.rmdir()
            aside.rename(out)
            return UserError(f"{problem}; nothing was replaced: the previous run is back in {out}",
                             hint="free some space (or fix the permissions) and run again")
        except OSError:
            pass  # it stays aside: say where
    return UserError(f"{problem}; the replaced run is safe, kept at {', '.join(map(str, kept))}",
                     hint="free some space (or fix the permissions), move it back to "
                          f"{out} or delete it yourself, and run again")


def _aside_prefix(out: Path) -> Path:
    """`out`'s sibling `.<name>.replaced-`, which set-aside runs' names continue."""
    out = Path(os.path.abspath(out))  # a plain name or a trailing `..` has no usable parent/name otherwise
    # the name cut to 200 bytes: with the 25 added, a run named near the file system's 255 could not be replaced
    name = out.name.encode()[:200].decode(errors="ignore")
    return out.parent / f".{name}.replaced-"


def _aside_path(out: Path) -> Path:
    """A free sibling name for `out`: `.<name>.replaced-<YYYYmmdd-HHMMSS>[-N]`."""
    prefix = _aside_prefix(out)
    base = prefix.with_name(prefix.name + time.strftime('%Y%m%d-%H%M%S'))
    aside, n = base, 1
    while aside.exists() or aside.is_symlink():
        aside, n = base.with_name(f"{base.name}-{n}"), n + 1
    return aside


def replaced_runs(out: Path) -> list[Path]:
    """The replaced runs recorded in `out` that still exist. Only names `set_aside` gives are trusted: the
    record is a file a user can edit, and these paths get deleted."""
    try:
        lines = (out / REPLACED_RECORD).read_text(encoding="utf-8").splitlines()
    except OSError:  # none recorded (or unreadable: then nothing is deleted either)
        return []
    # `out`'s own siblings (of the directory a link names, too): the record goes with a copied run directory,
    # and a `.x.replaced-y` elsewhere is not this run's to delete
    prefixes = {_aside_prefix(out), _aside_prefix(out.resolve())}
    paths = [Path(os.path.abspath(line)) for line in lines if line.strip()]
    return [p for p in paths if any(p.parent == q.parent and p.name.startswith(q.name) for q in prefixes)
            and p.is_dir() and not p.is_symlink()]


def unrecorded_asides(out: Path) -> list[Path]:
    """Runs set aside for `out` (`.<name>.replaced-*` siblings) that its record does not name: an --overwrite
    killed between moving the old run aside and writing the record. Nothing will delete them."""
    prefix = _aside_prefix(out)
    recorded = set(replaced_runs(out))
    try:
        siblings = list(prefix.parent.glob(glob.escape(prefix.name) + "*"))
    except OSError:
        return []
    return sorted(p for p in siblings if p.is_dir() and not p.is_symlink() and p not in recorded)


def replaced_note(out: Path) -> str:
    """Where the replaced run waits (for the start, Ctrl-C and preemption messages); '' if none."""
    kept = replaced_runs(out)
    if not kept:
        return ""
    return f"the run --overwrite replaced is kept at {', '.join(map(str, kept))} until this run finishes"


def discard_replaced(out: Path) -> list[Path]:
    """This run has finished: delete the runs it replaced and their record. Returns what was deleted.
    Main process only. A failure to delete is a warning: the run itself succeeded."""
    deleted = []
    for aside in replaced_runs(out):
        try:
            shutil.rmtree(aside)
            deleted.append(aside)
        except OSError as exc:
            log.warning("could not delete the replaced run %s (%s); delete it yourself", aside, exc)
    (out / REPLACED_RECORD).unlink(missing_ok=True)
    return deleted
