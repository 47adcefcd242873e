"""Small file helpers shared by the checkpoint manifest and the data-cache fingerprint."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path


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
