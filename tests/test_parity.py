"""`eval` and `predict` compute what training's evals computed: the same LoRA forward (train.fused_lora),
the same autocast (train.mixed_precision) and, for causal_lm, the same loss (train.chunked_loss). A helper
found bf16 `eval` of a checkpoint 2.5 accuracy points off the value training logged for it, and `predict`
labelling without the autocast `eval` used."""

from __future__ import annotations

import io
import json

import pytest
import torch

from scaletune.cli import main
from scaletune.config import load_config

from stutil import read_metrics

BF16 = {"model": {"dtype": "bfloat16"}}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one mixed precision per process: these tests train and evaluate in bf16 and float32."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize(("task", "sections"), [
    ("seq_cls", {**BF16, "train": {"mixed_precision": "bf16"}}),
    ("token_cls", {**BF16, "train": {"mixed_precision": "bf16"}}),
    ("causal_lm", {**BF16, "train": {"mixed_precision": "bf16"}}),  # (fails without the chunked loss too)
    # a trained norm: its float32 copy was loaded into bf16 for eval (autocast leaves norms in their dtype)
    ("seq_cls", {**BF16, "train": {"mixed_precision": "bf16"}, "peft": {"modules_to_save": ["output.LayerNorm"]}}),
    # a trained embedding table: its float32 output failed BERT's bf16 LayerNorm ("mixed dtype") in training
    ("seq_cls", {**BF16, "train": {"mixed_precision": "bf16"}, "peft": {"modules_to_save": ["word_embeddings"]}}),
])
def test_eval_of_a_checkpoint_is_the_eval_training_logged_for_it(make_config, tmp_path, capsys, task, sections):
    train = {"max_steps": 4, "eval_every": 4, "learning_rate": 5e-2, **sections.get("train", {})}
    path = make_config(task, n=32, **{**sections, "train": train})
    assert main(["train", str(path)]) == 0, capsys.readouterr().err
    logged = read_metrics(tmp_path / "run", "eval")[-1]
    capsys.readouterr()
    assert main(["eval", str(path), "--adapter", str(tmp_path / "run" / "checkpoints" / "step-4")]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["loss"] == logged["loss"]  # (bit for bit: the same arithmetic in the same order)
    for key in ("accuracy", "f1", "perplexity"):
        assert got.get(key) == logged.get(key)


def test_predict_labels_under_the_autocast_eval_uses(make_config, tmp_path, capsys):
    from accelerate import Accelerator

    from scaletune.infer import load_trained, run_predict

    path = make_config("seq_cls", n=32, **BF16, train={"mixed_precision": "bf16", "max_steps": 4,
                                                       "learning_rate": 5e-2})
    assert main(["train", str(path)]) == 0, capsys.readouterr().err
    cfg = load_config(path)
    texts = [f"word{i} " * (1 + i % 7) for i in range(12)]
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(texts) + "\n")
    scores = [r["score"] for r in run_predict(cfg, None, str(inp), 8, out=io.StringIO())]
    model, tok, *_ = load_trained(cfg, None)
    enc = tok(texts, truncation=True, max_length=cfg.data.max_length, padding=True, return_tensors="pt")
    with torch.no_grad(), Accelerator(mixed_precision="bf16", cpu=True).autocast():
        under = model(**enc).logits.float().softmax(-1).max(-1).values.tolist()
    assert scores == under  # (without the autocast the scores differed; now the float32 head would not run)


def test_adalora_ranknum_stays_fixed_on_a_16bit_base(make_config):
    """peft 0.21 re-wraps AdaLoRA's `ranknum` (a fixed divisor of the update) as a trainable Parameter when
    it casts the adapter on a bf16 base: the optimizer moved it (4.0 -> 3.94..4.05), and the saved adapter,
    which does not hold it, was then evaluated with 4.0."""
    from scaletune.train import setup

    from stutil import method_keys

    path = make_config("causal_lm", n=16, model={"dtype": "bfloat16"}, peft=method_keys("adalora", "causal_lm"),
                       train={"mixed_precision": "bf16", "max_steps": 12})
    run, _ = setup(load_config(path, ["~peft.r"]), overwrite=True)  # (the suite's LoRA rank: AdaLoRA reads none)
    ranknums = [(n, p.requires_grad) for n, p in run.model.named_parameters() if "ranknum" in n.split(".")]
    assert ranknums and not any(trainable for _, trainable in ranknums)
