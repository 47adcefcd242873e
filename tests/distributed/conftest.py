"""Shared setup for tests/distributed: import path and the `distributed` marker."""

from __future__ import annotations

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:  # allow running from a checkout without `pip install -e .`
    sys.path.insert(0, str(SRC))


def pytest_configure(config) -> None:  # noqa: ANN001 - pytest hook signature
    config.addinivalue_line(
        "markers", "distributed: spawns several processes (accelerate/torchrun, CPU gloo); slow"
    )
