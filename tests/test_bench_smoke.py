"""benchmarks/bench.py --smoke: all three tools train a tiny model on generated data and report a table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="the benchmark compares against TRL: pip install -e '.[bench]'")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.mark.slow
def test_bench_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    summary_path = tmp_path / "summary.json"
    # --data points nowhere: smoke mode must not need any data file
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--data", str(tmp_path / "missing.json"),
                           "--workdir", str(tmp_path / "work"), "--json", str(summary_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [line for line in proc.stdout.splitlines() if re.match(r"^\| (?!tool |---)", line)]
    assert len(rows) == 3, proc.stdout
    names = " ".join(rows)
    assert "scaletune" in names and "HF Trainer" in names and "TRL" in names
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        numbers = [float(c) for c in cells[1:]]
        assert all(n > 0 for n in numbers), row
    summary = json.loads(summary_path.read_text())["summary"]
    assert set(summary) == {"scaletune", "hf_trainer", "trl_packed"}
    # every tool trained on the same examples: same number of target tokens, same number of steps
    assert len({s["target_tokens"] for s in summary.values()}) == 1, summary
    assert {s["steps"] for s in summary.values()} == {2}, summary
    assert any("scaletune" in line and "tok/s x" in line for line in proc.stdout.splitlines())
