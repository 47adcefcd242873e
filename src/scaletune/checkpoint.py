"""Atomic, verifiable, world-size-agnostic checkpoints.

A checkpoint is a directory `checkpoints/step-N/` with:
  trainable.safetensors   every trainable parameter, gathered, float32, by name
  optimizer.safetensors   its optimizer state tensors (`name::exp_avg`, ...), gathered
  state.json              step, scheduler, optimizer scalars, counters, fp16 loss scaler, the run config
  method_state.safetensors  (AdaLoRA only) state the method keeps outside parameters and optimizer
  adapter/                the adapter in plain peft format (a usable snapshot)
  manifest.json           written last: every file with size and sha256, the config fingerprint

Because parameters and optimizer state are stored whole and by name, a checkpoint written by 2
ranks under ZeRO-3 resumes on 1 rank without DeepSpeed, and the reverse. The directory is built
under a temporary name and renamed into place, then `latest` is replaced atomically: a kill at any
moment leaves either the old or the new checkpoint as latest, never a partial one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import faults
from .errors import UserError
from .fileutil import replace_dir, sha256_file

log = logging.getLogger("scaletune")
STEP_RE = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
REQUIRED_FILES = ("trainable.safetensors", "optimizer.safetensors", "state.json")
METHOD_STATE = "method_state.safetensors"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(root: Path, step: int, fingerprint: str) -> None:
    files = {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (root / MANIFEST).write_text(json.dumps({"step": step, "config_fingerprint": fingerprint, "files": files},
                                            indent=1))


def verify(root: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    mf = root / MANIFEST
    if not mf.is_file():
        return "no manifest (incomplete write)"
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        return f"unreadable manifest ({exc})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(m, dict) for m in files.values()):
        return "malformed manifest (no file list)"
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        return f"manifest lists no {', '.join(missing)}"
    for rel, meta in files.items():
        path = root / rel
        if not path.is_file():
            return f"missing file {rel}"
        if path.stat().st_size != meta.get("size") or sha256_file(path) != meta.get("sha256"):
            return f"file {rel} does not match its hash"
    return None


def check_same_config(path: Path, fingerprint: str, allow_config_change: bool,
                      changes: Callable[[dict, dict | None], list[str]] | None = None) -> None:
    """Refuse a (verified) checkpoint written by a different run config unless told the change is meant.
    `changes(saved_config, saved_paths)` lists what differs, for the message (checkpoints since 2026-12 keep
    their config; since 2026-12-04 the real paths its path keys named)."""
    theirs = json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("config_fingerprint")
    if theirs == fingerprint or allow_config_change:
        return
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    saved, paths = state.get("config"), state.get("paths")
    diff = changes(saved, paths if isinstance(paths, dict) else None) \
        if changes is not None and isinstance(saved, dict) else None
    if diff == []:
        return  # the same run by its saved config: only the fingerprint's recipe changed (a key made resume-free)
    if diff is None and changes is not None:
        # (its fingerprint's recipe was an older scaletune's, so the same config may hash otherwise now)
        raise UserError(f"checkpoint {path} was written by an older scaletune that did not save its run config, and "
                        f"its config fingerprint differs from this config's ({theirs} vs {fingerprint}): the config "
                        "changed, or only how scaletune computes the fingerprint did",
                        hint="if the config is the one the run started with, pass --allow-config-change; otherwise "
                             "resume with the original config or use a new output_dir")
    what = f"changed: {'; '.join(diff[:8])}{f'; and {len(diff) - 8} more' if len(diff) > 8 else ''}" if diff \
        else f"fingerprint {theirs} vs {fingerprint}"
    raise UserError(f"checkpoint {path} was written by a different run config ({what})",
                    hint="resume with the original config, use a new output_dir, or pass --allow-config-change "
                         "if the change is intended")


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Completed checkpoint directories, newest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def find_resumable(output_dir: Path, fingerprint: str, allow_config_change: bool = False,
                   changes: Callable[[dict, dict | None], list[str]] | None = None) -> Path | None:
    """Newest checkpoint that verifies; skips corrupt ones with a warning, refuses foreign ones. None if there
    is no checkpoint; a UserError if there are some but none verifies (starting afresh would overwrite them)."""
    found = checkpoint_dirs(output_dir)
    problems = []
    for path in found:
        problem = verify(path)
        if problem:
            log.warning("skipping checkpoint %s: %s", path, problem)
            problems.append(f"{path.name}: {problem}")
            continue
        check_same_config(path, fingerprint, allow_config_change, changes)
        return path
    if found:
        raise UserError(f"--resume auto: none of the checkpoints in {output_dir / 'checkpoints'} can be resumed "
                        f"({'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''})",
                        hint="a fresh start would overwrite them: repair or move them, or start again in a new "
                             "output_dir (or with --overwrite, which keeps the old run until the new one finishes)")
    return None


def set_aside_newer(output_dir: Path, resumed: Path, step: int) -> Path | None:
    """Resuming `output_dir` from an older checkpoint (to go back past a divergence, say) starts another path
    from there: move the checkpoints after it into `checkpoints/.abandoned-<time>/`, where neither
    `--resume auto` nor the new run's saves of the same step numbers will take them for its own.

    A checkpoint that is not `checkpoints/step-<step>` (one in a left path's `.abandoned-*` folder, a copy
    under another name) sets aside that step's too, and is copied in as `checkpoints/step-<step>`: a save
    of that step would keep the one there as this run's, and a requeue killed before the first save would
    resume whatever else `checkpoints/` holds. It is copied before anything is moved, so a failed copy (an
    OSError: a full disk) leaves `checkpoints/` as it was. Returns the folder things were moved to, or None.
    Main process only."""
    root = output_dir / "checkpoints"
    own = root / f"step-{step}"
    inside = _same_dir(resumed, own)
    tmp = root / f".step-{step}.tmp"
    if not inside:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            shutil.copytree(resumed, tmp, symlinks=False)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    newer = [p for p in checkpoint_dirs(output_dir) if int(STEP_RE.match(p.name).group(1)) >= step + inside
             and not _same_dir(p, resumed)]  # (the resumed one, under another name inside checkpoints/, stays)
    aside = None
    if newer:
        aside = root / f".abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while aside.exists():
            aside, n = aside.with_name(f"{aside.name.split('~')[0]}~{n}"), n + 1
        aside.mkdir()
        # (a damaged one is what `--resume auto` skipped to get here: not another path, just unusable)
        names = [p.name + (" (damaged)" if verify(p) else "") for p in reversed(newer)]
        for path in newer:
            os.rename(path, aside / path.name)
        log.warning("resuming from %s: the checkpoints %s (%s) are not this run's path; moved to %s "
                    "(delete it when you no longer need them)", resumed.name if inside else resumed,
                    "after it" if inside else "from its step on", ", ".join(names), aside)
    if not inside:
        tmp.rename(own)
    if newer or not inside:
        _write_latest(output_dir, own)
    return aside


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # (one of them does not exist)
        return False


def save_checkpoint(accelerator: Any, output_dir: Path, step: int, *, trainable: dict, optimizer_state: dict,
                    state: dict, save_adapter: Any, fingerprint: str, keep: int | None,
                    method_tensors: dict | None = None, replace: bool = False) -> Path:
    """Write checkpoint `step` atomically (collective: every rank calls it, rank 0 writes); `replace`: also over a
    verified one of that step."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    root = output_dir / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    # A run resumed at step N and stopped again before its next step would re-save the same state:
    # keep the verified copy rather than delete-and-rewrite the only checkpoint there may be.
    error: UserError | None = None
    if accelerator.is_main_process and (replace or not (final.is_dir() and verify(final) is None)):
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".step-*.tmp"):  # left by a process killed mid-write
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
            save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
            if faults.armed("kill-in-checkpoint", step):
                faults.kill_now()
            if faults.armed("enospc", step):
                raise OSError(errno.ENOSPC, "No space left on device")
            save_file({k: v.contiguous() for k, v in optimizer_state.items()}, str(tmp / "optimizer.safetensors"))
            if method_tensors:
                save_file(method_tensors, str(tmp / METHOD_STATE))
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            save_adapter(tmp / "adapter")
            write_manifest(tmp, step, fingerprint)
            _fsync_tree(tmp)
            # an existing step-N (an unverifiable leftover of a killed write, or with `replace` a good one) is set
            # aside and deleted after the rename, not before: a kill while deleting it must not leave no step-N.
            # (Aside under a .tmp name: a kill between the renames leaves it to the stale sweep above.)
            replace_dir(tmp, final, aside=root / f".step-{step}.old.tmp")
            _write_latest(output_dir, final)
            _prune(output_dir, keep)
        except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
            shutil.rmtree(tmp, ignore_errors=True)
            reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
            error = UserError(f"could not write checkpoint step {step} to {root}: {reason}",
                              hint="the previous checkpoint is intact; free disk space or fix permissions, then "
                                   "resume with --resume auto")
    from .distributed import raise_main_rank_failure

    raise_main_rank_failure(accelerator, error, f"checkpoint step {step} to {root}",
                            hint="the previous checkpoint is intact; resume with --resume auto once fixed")
    return final


def _write_latest(output_dir: Path, final: Path) -> None:
    tmp = output_dir / "checkpoints" / ".latest.tmp"
    tmp.unlink(missing_ok=True)  # (a link left there, in a run directory from someone else, would be written through)
    tmp.write_text(final.name + "\n")
    os.replace(tmp, output_dir / "checkpoints" / "latest")


def _prune(output_dir: Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in checkpoint_dirs(output_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(trainable params, optimizer tensors, state) of a verified checkpoint, on CPU; the method's own tensors,
    if it saved any, are in state["method_tensors"]."""
    from safetensors.torch import load_file

    trainable = load_file(str(path / "trainable.safetensors"))
    optimizer_state = load_file(str(path / "optimizer.safetensors"))
    state = json.loads((path / "state.json").read_text())
    state["method_tensors"] = load_file(str(path / METHOD_STATE)) if (path / METHOD_STATE).is_file() else {}
    return trainable, optimizer_state, state


def label_change(path: Path, state: dict, labels: list[str] | None) -> str | None:
    """Why checkpoint `path` cannot continue a run whose data gives `labels`, or None: a classifier head's rows
    are the checkpoint's labels in its order, so other labels (a fixed typo, a class added, another sort) would
    train the wrong rows, or fail with a bare shape error. Older checkpoints keep them in adapter/scaletune.json."""
    from .adapter_record import adapter_meta

    saved = state.get("labels")
    if saved is None:  # (the checkpoint is verified against its manifest: its scaletune.json reads)
        saved = adapter_meta(path / "adapter").get("labels")
    if saved is None or labels is None or list(saved) == list(labels):
        return None

    def shown(names: list) -> str:
        return str(list(names)) if len(names) <= 20 else f"{list(names)[:20]} ... ({len(names)} labels)"

    return (f"checkpoint {path} was trained with the labels {shown(saved)}, this run's data gives {shown(labels)}: "
            f"its classifier rows are those labels, in that order. To continue it, set data.labels to the "
            f"checkpoint's list (a label the data no longer has stays a class); else start a new run")
