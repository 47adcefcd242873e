"""Classification claims across 2 CPU processes (DDP over gloo), through the product CLI as in test_scale_out.py:

* train.class_weights: the step's loss is sum(w_y * loss) / sum(w_y) over every micro-batch *and rank*. A seq_cls
  run weighted 'balanced' on imbalanced data under `scaletune launch --nproc 2` (accumulation 2) reproduces the
  single-process run's (accumulation 4, same global batch) per-step loss and final adapter, though the ranks' shares
  of a step's weight differ (a rank normalising by its own share would not);
* `scaletune eval --predictions FILE` under `accelerate launch` (2 processes) writes the file once, complete, in the
  eval file's order, with the single-process lines and metrics.

One 2-process launch each; the single-process runs are forked from tests/zygote.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.distributed

# the CLI runners of test_scale_out.py (importing it skips this module where DeepSpeed is missing, as it skips)
from test_scale_out import (  # noqa: E402
    LAUNCH_TIMEOUT,
    REPO,
    _check,
    _env,
    _kill_tree,
    _scaletune,
    assert_same_curve,
    losses,
    run_forked,
    run_launched,
)

import forking  # noqa: E402
import stutil as helpers  # noqa: E402  (tests/ is on sys.path via tests/conftest.py)

STEPS = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """Tiny BERT, imbalanced seq_cls data (4 'pos' in 32) and a run config weighted 'balanced'."""
    from scaletune.demo.tiny import build_model_dir

    root = tmp_path_factory.mktemp("cls_scale_out")
    model = build_model_dir(root / "bert", helpers.corpus(), arch="bert", hidden=32, layers=2, heads=2,
                            vocab_size=256)
    records = helpers.cls_records(64)
    pos, neg = [r for r in records if r["label"] == "pos"], [r for r in records if r["label"] == "neg"]
    train = helpers.write_jsonl(root / "train.jsonl", pos[:4] + neg[:28])
    # 13 examples: 7 micro-batches of 2 (the last of 1) dealt over 2 ranks, the second of which has a padding round
    ns = SimpleNamespace(root=root, cache=root / "cache", timings=[],
                         eval=helpers.write_jsonl(root / "eval.jsonl", helpers.cls_records(13, seed=1)))
    raw = helpers.tiny_lora_run(model, train, task="seq_cls",
                                train={"max_steps": STEPS, "seed": 7, "class_weights": "balanced"},
                                output_dir=str(root / "unused"))
    ns.cfg = root / "balanced.yaml"
    ns.cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    yield ns
    print("\ncls scale-out launch timings (s):", *(f"  {t:6.1f}  {c}" for c, t in ns.timings), sep="\n")


@pytest.fixture(scope="module")
def single(world) -> Path:
    out = world.root / "single"
    run_forked(world, ["train", str(world.cfg), f"output_dir={out}"])
    return out


def test_weighted_loss_curve_and_adapter_match_single_process(world, single):
    from safetensors.torch import load_file

    out = world.root / "ddp"
    run_launched(world, _scaletune("launch", str(world.cfg), f"output_dir={out}", "--nproc", "2",
                                   "--master-port", str(helpers.free_port())))
    runs = [json.loads((run / "run.json").read_text()) for run in (single, out)]
    assert [(r["world_size"], r["grad_accum"]) for r in runs] == [(1, 4), (2, 2)]
    assert runs[0]["class_weights"] == runs[1]["class_weights"] == {"neg": 32 / 56, "pos": 4.0}
    want, have = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (single, out))
    assert sorted(have) == sorted(want) and any("classifier" in k for k in want)
    for name, w in want.items():
        # (atol: 1e-3 of the step Adam takes at lr 1e-2; float32 sums in another order move a near-zero
        # lora_B entry ~3e-6, a rank normalising by its own weight ~4e-2)
        torch.testing.assert_close(have[name], w, rtol=1e-4, atol=1e-5, msg=name)
    assert sorted(losses(single)) == list(range(1, STEPS + 1))
    assert_same_curve(losses(single), losses(out), range(1, STEPS + 1))



def _eval_argv(world: SimpleNamespace, run: Path, predictions: Path) -> list[str]:
    return ["eval", str(world.cfg), f"output_dir={run}", "--data", str(world.eval), "--predictions", str(predictions)]


def _launch_eval(world: SimpleNamespace, argv: list[str]) -> tuple[str, str]:
    """`accelerate launch --config_file launch/cpu_2proc.yaml -m scaletune <argv>` (`scaletune launch` starts
    `train` only); (stdout, stderr) apart: stdout is the metrics document."""
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
           str(REPO / "launch" / "cpu_2proc.yaml"), "--main_process_port", str(helpers.free_port()),
           "-m", "scaletune", *argv]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(world), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        _kill_tree(proc)
    world.timings.append(("accelerate launch -m scaletune eval", round(time.perf_counter() - t0, 1)))
    _check(proc, out + err, cmd)
    return out, err


def test_eval_predictions_under_two_processes_equal_one_process(world, single):
    """13 examples dealt over 2 ranks in length-sorted micro-batches of 2 (one rank gets a padding round): the file
    is written once, by the main process, one line per example in the eval file's order, the lines and the single
    printed metrics document those of 1 process (scores and loss up to float32 sums in another order)."""
    one, two = world.root / "predictions_1.jsonl", world.root / "predictions_2.jsonl"
    res = forking.run(_eval_argv(world, single, one), _env(world), world.root / "eval_1.log", timeout=LAUNCH_TIMEOUT)
    _check(res, res.stdout + res.stderr, ["scaletune", *_eval_argv(world, single, one)])
    out, err = _launch_eval(world, _eval_argv(world, single, two))
    assert "on 13 example(s) of" in err and "(2 processes)" in err, err[-3000:]
    assert err.count("13 example line(s) written to") == 1, err[-3000:]
    want, got = (json.loads(res.stdout), json.loads(out))  # (one document: every rank printed it before)
    assert got.pop("loss") == pytest.approx(want.pop("loss"), rel=1e-6)
    assert got == want
    lines = [[json.loads(line) for line in path.read_text().splitlines()] for path in (one, two)]
    assert [ln["line"] for ln in lines[1]] == [f"{world.eval}:{i}" for i in range(1, 14)]
    scores = [ln.pop("score") for ln in lines[0]]
    assert max(scores) - min(scores) > 1e-5  # (else lines swapped between examples would go unnoticed)
    assert [ln.pop("score") for ln in lines[1]] == pytest.approx(scores, abs=1e-6)
    assert lines[1] == lines[0]
