"""benchmarks/cls_bench.py --smoke: scaletune and both HF Trainer baselines train a tiny BERT on generated
seq_cls and token_cls data, on the same examples, and report one table per task."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="the benchmarks run with the bench extra: pip install -e '.[bench]'")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "cls_bench.py"


@pytest.mark.slow
def test_cls_bench_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    summary_path = tmp_path / "summary.json"
    # the data folders point nowhere: smoke mode must not need any data file or model download
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--sst2", str(tmp_path / "none"), "--conll",
                           str(tmp_path / "none"), "--workdir", str(tmp_path / "work"), "--json", str(summary_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [line for line in proc.stdout.splitlines() if re.match(r"^\| (?!tool |---)", line)]
    assert len(rows) == 6, proc.stdout  # 3 tools x 2 tasks
    for row in rows:
        cells = [float(c) for c in row.strip("|").split("|")[1:]]
        assert all(n > 0 for n in cells[:-1]) and cells[-1] >= 0, row  # (a dev score may be 0 after 2 steps)
    summary = json.loads(summary_path.read_text())
    assert set(summary) == {"seq_cls", "token_cls"}
    for task, tools in summary.items():
        assert set(tools) == {"scaletune", "hf_trainer", "hf_grouped"}
        # every tool trained on the same examples and labelled targets (first sub-tokens for NER) for 2 steps
        assert {(s["examples"], s["targets"], s["steps"]) for s in tools.values()} == {
            (16, 16 if task == "seq_cls" else tools["scaletune"]["targets"], 2)}, tools
        # and logs the same loss: the step's mean over its targets (from nearly the same start)
        losses = [s["final_loss"] for s in tools.values()]
        assert max(losses) < 1.15 * min(losses), (task, losses)
    assert sum("scaletune / HF Trainer" in line and "examples/s x" in line for line in proc.stdout.splitlines()) == 4
