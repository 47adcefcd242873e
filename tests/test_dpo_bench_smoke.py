"""benchmarks/dpo_bench.py --smoke: scaletune task dpo and TRL's DPOTrainer train a tiny model on generated pairs
and report one table: same pairs, same answer tokens, same steps, both losses starting at log 2; with --task reward
scaletune task reward and TRL's RewardTrainer, with the same losses step by step."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="the benchmark compares against TRL: pip install -e '.[bench]'")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "dpo_bench.py"


def _smoke(tmp_path: Path, *extra: str) -> tuple[list[str], dict, str]:
    """(the table's two rows, the JSON summary, stdout) of one --smoke run."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    summary_path = tmp_path / "summary.json"
    # --data points nowhere: smoke mode must not need any data file
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", *extra, "--data", str(tmp_path / "missing.json"),
                           "--workdir", str(tmp_path / "work"), "--json", str(summary_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [line for line in proc.stdout.splitlines() if re.match(r"^\| (?!tool |---)", line)]
    assert len(rows) == 2, proc.stdout
    assert "scaletune" in rows[0] and "TRL" in rows[1]
    for row in rows:
        numbers = [float(c) for c in row.strip("|").split("|")[1:]]
        assert len(numbers) == 10 and all(n > 0 for n in numbers), row
    summary = json.loads(summary_path.read_text())["summary"]
    assert set(summary) == {"scaletune", "trl"}
    # the same pairs, tokens and steps
    assert len({(s["pairs"], s["answer_tokens"], s["steps"]) for s in summary.values()}) == 1, summary
    assert any(line.startswith("scaletune / TRL: pairs/s x") for line in proc.stdout.splitlines())
    return rows, summary, proc.stdout


@pytest.mark.slow
def test_dpo_bench_smoke(tmp_path: Path) -> None:
    _, summary, _ = _smoke(tmp_path)
    for s in summary.values():  # both start at log 2 (a zero adapter: policy = reference)
        assert s["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
        assert s["final_loss"] == pytest.approx(summary["trl"]["final_loss"], abs=1e-3)


@pytest.mark.slow
def test_reward_bench_smoke(tmp_path: Path) -> None:
    """--task reward: scaletune task reward vs TRL RewardTrainer, both loading one saved score head."""
    rows, summary, _ = _smoke(tmp_path, "--task", "reward")
    assert "task: reward" in rows[0] and "RewardTrainer" in rows[1]
    a, b = summary["scaletune"], summary["trl"]
    for x, y in zip(a["losses"], b["losses"], strict=True):  # the same head, the same rows: the same losses
        assert x == pytest.approx(y, abs=1e-4)
