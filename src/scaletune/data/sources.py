"""`data.train` as one source or a list of them, each with a weight: the files read and concatenated, and
the training examples each contributes (weight 2: every example twice; 0.5: a seeded half). data.max_samples
keeps each source's (and data.eval's) first N records as it is read."""

from __future__ import annotations

import glob
import logging
import math
import os
import random
from typing import Any

from .readers import read_records

log = logging.getLogger("scaletune")


def train_sources(train: Any) -> list[tuple[str, float]]:
    """(spec, weight) of every training source in `data.train` (a spec, or a list of specs and
    {path, weight} items; validated by the config rules), a glob pattern as the files it matches."""
    return [(spec, weight) for spec, weight, _ in _expanded(train)]


def train_keyed_sources(train: Any) -> list[tuple[str, str]]:
    """(the config key, spec) of every training source, a pattern's matches each under its item's key."""
    return [(key, spec) for spec, _, key in _expanded(train)]


def _items(train: Any) -> list[tuple[str, str, float]]:
    """(the config key, spec as written, weight) of each data.train item."""
    items = train if isinstance(train, list) else [train]
    return [(f"data.train[{i}]" if isinstance(train, list) else "data.train",
             *((item["path"], float(item.get("weight", 1.0))) if isinstance(item, dict) else (item, 1.0)))
            for i, item in enumerate(items)]


def _expanded(train: Any) -> list[tuple[str, float, str]]:
    """(spec, weight, the config key it comes from) of every source: a pattern (data/*.jsonl, shards/part-?.csv)
    that names no file itself stands for the files it matches, in sorted order (the same every run), each with
    the item's weight; one matching nothing is kept as written, for the reader's "file not found"."""
    return [(spec, weight, key) for key, written, weight in _items(train)
            for spec in (_matching_files(written) or [written])]


def _holding_eval(train: Any, eval_spec: str | None) -> list[tuple[str, str, str]]:
    """(key, spec as written, file) of each training file that is data.eval's own file."""
    if not eval_spec or eval_spec.startswith("hub:") or not os.path.isfile(eval_spec):
        return []
    target = os.path.realpath(eval_spec)
    return [(key, written, spec) for key, written, _ in _items(train)
            for spec in (_matching_files(written) or [written])
            if not spec.startswith("hub:") and os.path.realpath(spec) == target]


def eval_file_problems(train: Any, eval_spec: str | None) -> list[str]:
    """A pattern item of data.train that matches data.eval's own file (data/*.jsonl beside data/eval.jsonl):
    the run would train on the examples it is scored on, and nothing in the log but a file name would say so."""
    return [f"{key}: the pattern {written} matches {match}, data.eval's file: the run would train on the examples "
            "it is scored on; narrow the pattern or move the eval file elsewhere"
            for key, written, match in _holding_eval(train, eval_spec) if match != written]


def eval_among_train(train: Any, eval_spec: str | None) -> str | None:
    """The data.train key whose file is data.eval's own (the same file named twice), else None: scoring on
    trained examples is sometimes meant (a check that a run can fit its data), so it is said, not refused."""
    return next((key for key, _, _ in _holding_eval(train, eval_spec)), None)


def _matching_files(spec: str) -> list[str]:
    """The regular files a glob pattern matches, sorted; [] for a hub dataset, an existing path or no pattern."""
    if spec.startswith("hub:") or not glob.has_magic(spec) or os.path.lexists(spec):
        return []
    return sorted(path for path in glob.glob(spec, recursive=True) if os.path.isfile(path))


def missing_files(d: Any) -> list[str]:
    """A line for each file data section `d` names (data.train's sources, data.eval) that this machine does not
    have: what `plan` and `slurm` warn of before a queue wait (not refused: a job may read node-local paths).
    Only existence is looked at; the reader checks the rest when the run starts."""
    named = [(key, spec) for spec, _, key in _expanded(d.train)] + ([("data.eval", d.eval)] if d.eval else [])
    return [f"{key}: {spec} " + ("" if os.path.isabs(spec) else f"({os.path.abspath(spec)}) ")
            + ("matches no file" if glob.has_magic(spec) else "is not a file") + " on this machine"
            for key, spec in named if not spec.startswith("hub:") and not os.path.isfile(spec)]


def describe(train: Any) -> str:
    """The training data for messages: the spec, or the specs joined with their weights."""
    sources = train_sources(train)
    if len(sources) == 1 and not isinstance(train, list):
        return sources[0][0]
    return " + ".join(spec if weight == 1.0 else f"{spec} (x{weight:g})" for spec, weight in sources)


def first_records(records: list[dict], max_samples: int | None, key: str, spec: str, *,
                  quiet: bool = False) -> list[dict]:
    """The first `max_samples` of one source's `records` in file order (data.max_samples; None: all of them),
    read before any weight, mix or eval_fraction split, as LLaMA-Factory's max_samples. A cut is logged
    (unless `quiet`: a second read of the same data): a trial's numbers are then not the whole file's."""
    if max_samples is None or len(records) <= max_samples:
        return records
    if not quiet:
        log.info("%s: first %d of %d records of %s (data.max_samples)", key, max_samples, len(records), spec)
    return records[:max_samples]


def read_capped(spec: str, *, key: str, conll: bool, conll_columns: list[int] | None = None,
                max_samples: int | None = None, quiet: bool = False) -> list[dict]:
    """`read_records` of one source, its first `max_samples` kept (`first_records`). The whole file is still
    read: its total is what the log line compares the cut with, and every record is checked as without a cap."""
    records = read_records(spec, key=key, conll=conll, conll_columns=conll_columns)
    return first_records(records, max_samples, key, spec, quiet=quiet)


def read_train_records(train: Any, *, conll: bool, conll_columns: list[int] | None = None,
                       max_samples: int | None = None, quiet: bool = False) -> tuple[list[dict], dict[int, int]]:
    """All sources' records, concatenated in order, and which source each record (by id) came from
    (`conll_columns`: data.conll_columns; `max_samples`: data.max_samples, applied to each data.train item:
    a pattern's files together, in their sorted order, as "the first N" of what the item names; `quiet`: the
    cut is not logged)."""
    source_of: dict[int, int] = {}
    by_item: dict[str, list[dict]] = {}  # (insertion order: the items' order)
    for i, (spec, _, key) in enumerate(_expanded(train)):
        part = read_records(spec, key=key, conll=conll, conll_columns=conll_columns)
        source_of.update((id(rec), i) for rec in part)
        by_item.setdefault(key, []).extend(part)
    written = {key: spec for key, spec, _ in _items(train)}
    records = [rec for key, part in by_item.items()
               for rec in first_records(part, max_samples, key, written[key], quiet=quiet)]
    kept = {id(rec) for rec in records}  # (a dropped record's id may be reused once it is freed)
    return records, {rid: i for rid, i in source_of.items() if rid in kept}


def weighted(records: list[dict], source_of: dict[int, int], train: Any, seed: int) -> list[dict]:
    """The training records with each source's weight applied: its whole part repeated int(weight) times,
    plus a random (seeded: the same every run and rank) fraction of it for the rest. Applied after an
    eval_fraction split, so no copy of a held-out example is trained on."""
    sources = _expanded(train)
    if all(weight == 1.0 for _, weight, _ in sources):
        return records
    out: list[dict] = []
    for i, (spec, weight, key) in enumerate(sources):
        part = [rec for rec in records if source_of[id(rec)] == i]
        whole, rest = divmod(weight, 1.0)
        extra = random.Random(seed * 1_000_003 + i).sample(part, math.floor(len(part) * rest + 0.5)) if rest else []
        if part and not (whole or extra):
            log.warning("%s: weight %g keeps none of the %d training example(s) of %s", key, weight, len(part), spec)
        out += part * int(whole) + extra
    return out
