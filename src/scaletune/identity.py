"""A run's identity for resume: the config fingerprint a checkpoint records, and what changed since."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from .config import RunConfig

# Keys that may change between a run and its resume without making the checkpoint foreign.
# (Not data.eval_fraction: it decides which examples are trained on, so a change would move trained
# examples into the eval set; nor data.max_samples, which decides it too.)
_RESUME_FREE_KEYS = {"train": {"max_steps", "epochs", "eval_every", "save_every", "log_every", "save_total_limit",
                               "evals_per_epoch", "saves_per_epoch",
                               "report_to", "on_nonfinite", "max_nonfinite_skips", "release_cpu_memory",
                               "best_metric", "early_stopping_patience", "early_stopping_threshold",
                               "eval_generate", "eval_max_new_tokens", "eval_batch_size"},
                     "data": {"num_workers", "num_proc", "cache", "eval"}, "distributed": {"zero_stage",
                               "offload", "backend", "timeout_s"}, "output_dir": True}


# The config keys that name files or directories (a train source may be a {path, weight} item or a pattern): compared
# by what they name at a resume, and made absolute by `scaletune train OUTPUT_DIR` (config_file.read_run_dir), which
# a resume from another directory must then find the same.
PATH_KEYS = (("data", "train"), ("data", "eval"), ("data", "chat_template"), ("model", "name_or_path"),
             ("model", "init_adapter"))


def real_paths(d: dict) -> dict:
    """{'data.train': ..., 'model.name_or_path': ...} of a resolved config (`RunConfig.to_dict()`): what each
    path key names, as a real path where it names an existing file or directory or is a pattern that matches
    files (relative ones read from the working directory, as training reads them); hub ids, `hub:` sources and built-in template names
    as written."""
    import glob

    from .fileutil import map_paths

    def real(path: str) -> str:
        # (a pattern that matches files: its real directory, so that `train RUN_DIR --resume auto` from another
        # directory, which makes data/*.jsonl absolute, names the files the checkpoint's pattern named)
        if path and (os.path.exists(path) or not path.startswith("hub:") and glob.has_magic(path)
                     and glob.glob(path, recursive=True)):
            return os.path.realpath(path)
        return path

    return {f"{section}.{key}": map_paths(d[section][key], real) for section, key in PATH_KEYS
            if isinstance(d.get(section), dict) and key in d[section]}


def _trajectory(d: dict) -> dict:
    """A resolved config (`RunConfig.to_dict()`) without the keys a resume may change."""
    d = json.loads(json.dumps(d, default=str))  # a deep copy, and the types a checkpoint's JSON holds
    for section, keys in _RESUME_FREE_KEYS.items():
        if keys is True:
            d.pop(section, None)
        else:
            for k in keys:
                d.get(section, {}).pop(k, None)
    return d


def config_fingerprint(cfg: RunConfig) -> str:
    """Hash of everything that determines the training trajectory: the resolved config without output_dir
    and the other keys a resume may change (logging, saving, scale-out; `_RESUME_FREE_KEYS`). Paths are in
    it as written (the same text gives the same answer on every node, whatever its mounts); a path written
    otherwise is compared by what it names (`config_changes`)."""
    return hashlib.sha256(json.dumps(_trajectory(cfg.to_dict()), sort_keys=True).encode()).hexdigest()[:16]


def config_changes(saved: dict, cfg: RunConfig, saved_paths: dict | None = None) -> list[str]:
    """'key: old -> new' for each trajectory key in which `cfg` differs from a checkpoint's saved config.
    A path written otherwise (from another working directory, through a link) that names what the
    checkpoint's did (`saved_paths`: its `real_paths`) is no change."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "peft" else {prefix + k: v})
        return out

    old, new = flat(_trajectory(saved)), flat(_trajectory(cfg.to_dict()))
    if old.get("peft") != new.get("peft"):  # one entry per peft key, as the config spells them
        old.update({f"peft.{k}": v for k, v in old.pop("peft", {}).items()})
        new.update({f"peft.{k}": v for k, v in new.pop("peft", {}).items()})
    missing = "(not set)"
    # A key the checkpoint's scaletune did not have yet, left at its default, is what that version did.
    defaults = _section_defaults()
    unchanged = {k for k, v in new.items() if k not in old and v == defaults.get(k, missing)}
    now_paths = real_paths(cfg.to_dict()) if saved_paths else {}
    unchanged |= {k for k, v in (saved_paths or {}).items() if k in now_paths and now_paths[k] == v}

    def shown(value: Any, real: Any) -> str:  # a path as written, and what it named where that differs
        text = json.dumps(value, ensure_ascii=False)
        return text if real in (None, value) else f"{text} ({json.dumps(real, ensure_ascii=False)[1:-1]})"

    def now(k: str) -> str:
        if k in new:
            return shown(new[k], now_paths.get(k))
        if "." in k and not k.startswith("peft.") and k not in defaults:  # a key of a newer scaletune
            return f"{missing}: this scaletune has no such key, the checkpoint is from a newer version"
        return json.dumps(missing, ensure_ascii=False)

    return [f"{k}: {shown(old.get(k, missing), (saved_paths or {}).get(k))} -> {now(k)}"
            for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing) and k not in unchanged]


def _section_defaults() -> dict:
    """'section.key' -> default, for every key of the config's sections (as to_dict() writes them)."""
    import dataclasses
    import typing

    from .config import _default

    hints = typing.get_type_hints(RunConfig)
    out = {}
    for section in dataclasses.fields(RunConfig):
        tp = hints[section.name]
        if dataclasses.is_dataclass(tp):
            out.update({f"{section.name}.{f.name}": json.loads(json.dumps(_default(f), default=str))
                        for f in dataclasses.fields(tp)})
    return out
