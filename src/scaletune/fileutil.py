"""Small file helpers shared by the checkpoint manifest and the data-cache fingerprint."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def map_paths(spec: Any, fn: Callable[[str], Any]) -> Any:
    """`spec` (a path key's value: a path, a {path, weight} source, or a list of those) with `fn` applied
    to each path in it; anything else as it is."""
    if isinstance(spec, str):
        return fn(spec)
    if isinstance(spec, list):
        return [map_paths(s, fn) for s in spec]
    if isinstance(spec, dict) and isinstance(spec.get("path"), str):
        return {**spec, "path": fn(spec["path"])}
    return spec


def shortened(name: str) -> str:
    """A path as an error message shows it: whole up to 120 characters, else its ends and its length."""
    return name if len(name) <= 120 else f"{name[:60]}...{name[-40:]} ({len(name)} characters)"


def missing(path: str | Path) -> str:
    """Why `path`, which is no file, cannot be found: "file not found", or the link loop or too-long name that
    `Path.exists()` reports as missing too."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENAMETOOLONG):
            return exc.strerror.lower()
    return "file not found"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (data files and checkpoints can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def replaced_path(final: Path) -> Path:
    """Where `replace_dir` keeps the previous `final` between its two renames: `.<name>.old` beside it."""
    return final.with_name(f".{final.name}.old")


def replace_dir(tmp: Path, final: Path, aside: Path | None = None) -> None:
    """Put the finished directory `tmp` in place of `final`. Deleting `final` first (rmtree, then rename)
    left, to a kill in between, no `final` or a half-deleted one; here the old one is renamed to `aside`
    (default `replaced_path(final)`) first and deleted only after the new one is in place, and
    `restore_replaced` puts it back if a kill came between the two renames."""
    import shutil

    old = aside or replaced_path(final)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)  # (a kill during an earlier deletion of it; `final` is intact)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def restore_replaced(final: Path) -> None:
    """`final` as `replace_dir` left it: the previous copy back if a kill came between its two renames."""
    old = replaced_path(final)
    if old.is_dir() and not final.exists():
        os.rename(old, final)


# `merge --out DIR` into an existing directory writes into DIR/.merging first (merge.py); a merge killed or
# interrupted there leaves it behind, and it is the merge's own: not content that makes DIR "not empty" to a retry
MERGING = ".merging"


def merge_out_is_empty(out: Path) -> bool:
    """Whether the existing directory `out` holds nothing but an interrupted merge's leftover."""
    return all(p.name == MERGING for p in out.iterdir())
