"""benchmarks/tokenise.py --smoke: three pieces of 2000 records, tokenised in this process and over 2
forked ones (the real pool, in a fresh process each), give the same examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tokenise.py"


@pytest.mark.slow
def test_tokenise_benchmark_smoke(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines()
            if line.startswith("| ") and "num_proc" not in line]
    assert [int(r[0]) for r in rows] == [1, 2] and {int(r[3]) for r in rows} == {4100}, proc.stdout
    assert "same examples in every build" in proc.stdout
