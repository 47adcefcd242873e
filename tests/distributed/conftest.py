"""Shared setup for tests/distributed: make `src/` importable from a plain checkout."""

from __future__ import annotations

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:  # allow running from a checkout without `pip install -e .`
    sys.path.insert(0, str(SRC))
