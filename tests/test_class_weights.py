"""train.class_weights: the weighted loss of a step split into accumulation micro-batches is torch's weighted
loss over the whole batch at once; 'balanced' is scikit-learn's, computed once and kept for a resume; eval's loss
stays unweighted; bad weights are config errors naming the key."""

from __future__ import annotations

import json
import logging
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from scaletune import loop
from scaletune.class_weights import recorded, resolve
from scaletune.cli import main
from scaletune.config import from_dict, load_config
from scaletune.errors import ConfigError
from scaletune.evaluate import evaluate
from scaletune.train import StopFlag, setup

from stutil import cls_records, write_jsonl


def multi_records(n: int, seed: int = 0) -> list[dict]:
    """Multi-label examples: each of classes a, b, c where its word is in the text."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        present = [c for c in "abc" if rng.random() < 0.5]
        words = rng.sample(["one", "two", "three", "four", "five"], 3) + [{"a": "alpha", "b": "bravo", "c": "charlie"}[c]
                                                                          for c in present]
        out.append({"text": " ".join(words), "label": present})
    return out


STEP = {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 1, "max_grad_norm": None, "warmup_ratio": 0.0}


def _step_of(run, monkeypatch) -> tuple[list[dict], float, list[torch.Tensor]]:
    """Run one optimizer step of `fit`; returns its micro-batches, its logged mean loss and the accumulated
    gradients (before the update), with the trainable weights put back to where the step started."""
    params = [p for p in run.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    batches, seen = [], {}
    train_loss_sum = type(run.task).train_loss_sum

    def recording(task, model, batch):
        batches.append({k: v.clone() for k, v in batch.items()})
        return train_loss_sum(task, model, batch)

    def clip_and_norm(acc, trainable, max_norm, loss_sum, n_global):
        seen["grads"] = [p.grad.detach().clone() for p in trainable]
        out = clip_and_norm_of_loop(acc, trainable, max_norm, loss_sum, n_global)
        seen["loss"] = out[1].item()
        return out

    clip_and_norm_of_loop = loop.clip_and_norm
    monkeypatch.setattr(type(run.task), "train_loss_sum", recording)  # (the task's own attributes are saved)
    monkeypatch.setattr(loop, "clip_and_norm", clip_and_norm)
    loop.fit(run, StopFlag())
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    return batches, seen["loss"], seen["grads"]


def _reference(run, batches, loss_fn) -> tuple[float, list[torch.Tensor]]:
    """torch's loss over every example of `batches` at once, and its gradients."""
    params = [p for p in run.model.parameters() if p.requires_grad]
    run.model.zero_grad(set_to_none=True)
    logits, labels = [], []
    for batch in batches:
        out = run.task.loss_sum(run.model, batch)[1]
        logits.append(out.float().reshape(-1, out.shape[-1]))
        labels.append(batch["labels"].reshape(-1, *batch["labels"].shape[2:]) if batch["labels"].dim() > 1
                      and not getattr(run.task, "multi_label", False) else batch["labels"])
    loss = loss_fn(torch.cat(logits), torch.cat(labels))
    loss.backward()
    return loss.item(), [p.grad.detach().clone() for p in params]


def _ner_config(make_config, weights):
    return make_config("token_cls", n=8, train={**STEP, "class_weights": weights})


def _imbalanced_cls_config(make_config, tmp_path, weights, n_pos=3, n=8):
    path = make_config("seq_cls", n=n, train={**STEP, "class_weights": weights})
    records = cls_records(2 * n)
    pos = [r for r in records if r["label"] == "pos"][:n_pos]
    write_jsonl(tmp_path / "data" / "train.jsonl", pos + [r for r in records if r["label"] == "neg"][:n - n_pos])
    return path


@pytest.mark.parametrize("task", ["seq_cls", "token_cls", "multi_label"])
def test_a_step_split_in_two_micro_batches_is_torchs_weighted_loss_over_the_whole_batch(
        make_config, tmp_path, monkeypatch, task):
    """The numerator is summed per micro-batch and the denominator is the summed target weight of the whole
    step: mean per micro-batch would weigh the micro-batch with less total weight up. (-100 tokens weigh 0.)"""
    if task == "seq_cls":
        path = _imbalanced_cls_config(make_config, tmp_path, {"pos": 3.5})  # 3 pos in 8: the halves differ
    elif task == "token_cls":
        path = _ner_config(make_config, {"B-PER": 4.0, "B-LOC": 0.25})
    else:
        path = make_config("seq_cls", n=8, train={**STEP, "class_weights": {"a": 3.0, "c": 0.5}})
        write_jsonl(tmp_path / "data" / "train.jsonl", multi_records(8))
        write_jsonl(tmp_path / "data" / "eval.jsonl", multi_records(4, seed=1))
    run, _ = setup(load_config(path))
    assert run.accum == 2
    weights = torch.tensor(list(run.class_weights.values()))
    batches, loss, grads = _step_of(run, monkeypatch)
    assert len(batches) == 2
    if task == "multi_label":
        assert run.class_weights == {"a": 3.0, "b": 1.0, "c": 0.5}
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=weights)
    else:
        shares = [run.task.step_weight([b]) for b in batches]
        assert shares[0] != shares[1]  # (else a per-micro-batch mean would pass too)
        assert shares[0] != run.task.count_targets(batches[0])  # the weights are in the denominator
        loss_fn = torch.nn.CrossEntropyLoss(weight=weights)  # (ignore_index -100 is its default)
    expected, expected_grads = _reference(run, batches, loss_fn)
    assert abs(loss - expected) <= 1e-6
    for got, want in zip(grads, expected_grads, strict=True):
        assert (got - want).abs().max().item() <= 1e-6
    # the logs count targets, not weights
    assert run.counters["tokens_seen"] == sum(run.task.count_targets(b) for b in batches)


def test_balanced_weights_are_sklearns_from_the_training_labels():
    """Single-label and token_cls: n / (n_classes x count) of the classes that occur (ignored tokens left out,
    an absent class 1); multi-label: negatives / positives per class."""
    class Cfg:
        class train:
            class_weights = "balanced"

    single = [{"labels": y} for y in [0, 0, 0, 1, 2, 2]]
    want = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=np.array([0, 0, 0, 1, 2, 2]))
    assert list(resolve(Cfg, ["x", "y", "z"], single, False).values()) == pytest.approx(want.tolist())
    tokens = [{"labels": [-100, 0, 0, -100, 2]}, {"labels": [0, 2, 2, -100]}]
    want = compute_class_weight("balanced", classes=np.array([0, 2]), y=np.array([0, 0, 0, 2, 2, 2]))
    assert resolve(Cfg, ["O", "B-X", "B-Y"], tokens, False) == pytest.approx(
        {"O": want[0], "B-X": 1.0, "B-Y": want[1]})
    multi = [{"labels": [1, 0, 1]}, {"labels": [0, 0, 1]}, {"labels": [1, 0, 1]}, {"labels": [0, 1, 1]}]
    assert resolve(Cfg, ["a", "b", "c"], multi, True) == {"a": 1.0, "b": 3.0, "c": 1.0}  # c: never negative


def test_balanced_is_computed_once_logged_recorded_and_kept_by_a_resume(make_config, tmp_path, caplog):
    """The weights go to run.json and the checkpoints; a resume trains with the checkpoint's even where the
    training file changed since (a recomputation would give others)."""
    caplog.set_level(logging.INFO, "scaletune")
    path = _imbalanced_cls_config(make_config, tmp_path, "balanced", n_pos=2)
    cfg = load_config(path, ["train.max_steps=2", "train.save_every=1"])
    run, _ = setup(cfg)
    assert run.class_weights == {"neg": pytest.approx(8 / 12), "pos": pytest.approx(2.0)}
    assert "train.class_weights (class weights): neg=0.6667, pos=2" in caplog.text
    assert json.loads((tmp_path / "run" / "run.json").read_text())["class_weights"] == run.class_weights
    stop = StopFlag()
    stop.signal = None
    run.total_steps = 1  # (stop after the first checkpoint, as a preempted run would)
    loop.fit(run, stop)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-1" / "state.json").read_text())
    assert state["class_weights"] == run.class_weights
    write_jsonl(tmp_path / "data" / "train.jsonl", cls_records(16))  # balanced now: weights 1 if recomputed
    resumed, _ = setup(load_config(path, ["train.max_steps=2", "train.save_every=1"]), resume="auto")
    assert resumed.step == 1 and resumed.class_weights == run.class_weights
    assert resumed.task._class_weights.tolist() == pytest.approx([8 / 12, 2.0])
    assert "from the checkpoint" in caplog.text


def test_eval_reports_the_unweighted_loss(make_config, tmp_path):
    """Eval's loss is the plain mean cross-entropy, comparable across runs with other (or no) weights and to
    `scaletune eval`'s, which has no training data to weigh by; training's is weighted."""
    run, _ = setup(load_config(_imbalanced_cls_config(make_config, tmp_path, {"pos": 5.0})))
    args = (run.accelerator, run.model, run.task, run.data["eval"], run.data["labels"], 4,
            run.tokenizer.pad_token_id)
    weighted = evaluate(*args)["loss"]
    batch = run.task.collate([run.data["eval"][i] for i in range(4)], run.tokenizer.pad_token_id)
    with torch.no_grad():
        assert run.task.train_loss_sum(run.model, batch)[0] != run.task.loss_sum(run.model, batch)[0]
    run.task.set_class_weights(None)
    assert evaluate(*args)["loss"] == weighted


def _problems(raw_train: dict, task: str = "seq_cls", **data) -> list[str]:
    raw = {"task": task, "model": {"name_or_path": "m"}, "data": {"train": "x.jsonl", **data}, "train": raw_train}
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    return err.value.problems


def test_bad_weights_are_config_errors_naming_the_key_reported_together():
    problems = _problems({"class_weights": {"pos": 0, "neg": "x", "other": 2}, "learning_rate": -1},
                         labels=["neg", "pos"])
    assert "train.class_weights.pos: a weight must be a finite number > 0, got 0" in problems
    assert "train.class_weights.neg: a weight must be a finite number > 0, got 'x'" in problems
    assert "train.class_weights.other: not a label of this run (neg, pos)" in problems
    assert any(p.startswith("train.learning_rate") for p in problems)
    assert _problems({"class_weights": "balance"}) == [
        "train.class_weights: 'balance' is not 'balanced' or a mapping {label: weight}"]
    assert _problems({"class_weights": "balanced"}, task="causal_lm") == [
        "train.class_weights: weights classes of seq_cls/token_cls; task causal_lm has none"]


def test_a_label_the_data_lacks_is_refused_at_setup_with_exit_2(make_config, capsys):
    """Without data.labels the label set is the training data's: the name is checked once it is read."""
    path = make_config("seq_cls", n=8, train={**STEP, "class_weights": {"positive": 2}})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.class_weights.positive: not a label of this run (neg, pos)" in err


@pytest.mark.parametrize("task", ["seq_cls", "token_cls"])
def test_label_smoothing_with_class_weights_is_torchs_loss_over_the_whole_batch(make_config, tmp_path, monkeypatch,
                                                                                task):
    """train.label_smoothing is torch's CrossEntropyLoss(weight, label_smoothing) over the whole step, split in
    two micro-batches; eval's loss stays the plain cross-entropy."""
    if task == "seq_cls":
        path = _imbalanced_cls_config(make_config, tmp_path, {"pos": 3.5})
    else:
        path = _ner_config(make_config, {"B-PER": 4.0, "B-LOC": 0.25})
    run, _ = setup(load_config(path, ["train.label_smoothing=0.2"]))
    weights = torch.tensor(list(run.class_weights.values()))
    batches, loss, grads = _step_of(run, monkeypatch)
    expected, expected_grads = _reference(run, batches, torch.nn.CrossEntropyLoss(weight=weights,
                                                                                  label_smoothing=0.2))
    unsmoothed, _ = _reference(run, batches, torch.nn.CrossEntropyLoss(weight=weights))
    assert abs(expected - unsmoothed) > 1e-3  # (smoothing changes the loss: the test can tell)
    assert abs(loss - expected) <= 1e-6
    for got, want in zip(grads, expected_grads, strict=True):
        assert (got - want).abs().max().item() <= 1e-6
    plain = sum(run.task.loss_sum(run.model, b)[0].item() for b in batches) / sum(
        run.task.count_targets(b) for b in batches)
    assert plain == pytest.approx(_reference(run, batches, torch.nn.CrossEntropyLoss())[0], rel=1e-6)


@pytest.mark.parametrize(("task", "value", "message"), [
    ("seq_cls", "1.0", "train.label_smoothing: 1 is outside [0, 1)"),
    ("seq_cls", "-0.1", "train.label_smoothing: -0.1 is outside [0, 1)"),
    ("causal_lm", "0.1", "train.label_smoothing: smooths seq_cls/token_cls class targets; task causal_lm has none"),
])
def test_bad_label_smoothing_is_a_config_error(make_config, capsys, task, value, message):
    assert main(["train", str(make_config(task)), f"train.label_smoothing={value}"]) == 2
    assert message in capsys.readouterr().err


def test_label_smoothing_is_refused_for_a_multi_label_run(make_config, tmp_path, capsys):
    path = make_config("seq_cls", n=8, train={**STEP, "label_smoothing": 0.1})
    write_jsonl(tmp_path / "data" / "train.jsonl", multi_records(8))
    write_jsonl(tmp_path / "data" / "eval.jsonl", multi_records(4, seed=1))
    assert main(["train", str(path)]) == 2
    assert "train.label_smoothing: this run is multi-label" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # (refused before the run wrote anything)


def test_an_infinite_or_nan_weight_is_a_config_error():
    problems = _problems({"class_weights": {"pos": float("inf"), "neg": float("nan")}}, labels=["neg", "pos"])
    assert "train.class_weights.pos: a weight must be a finite number > 0, got inf" in problems
    assert "train.class_weights.neg: a weight must be a finite number > 0, got nan" in problems


def test_yaml_true_and_false_keys_weigh_the_labels_named_true_and_false():
    """YAML reads `{true: 3}` with a boolean key; the data's labels are named `true`/`false`, as JSON writes them."""
    class Cfg:
        class train:
            class_weights = {True: 3.0}

    assert resolve(Cfg, ["false", "true"], [], False) == {"false": 1.0, "true": 3.0}
    assert _problems({"class_weights": {True: 3, False: 0}}, labels=["false", "true"]) == [
        "train.class_weights.false: a weight must be a finite number > 0, got 0"]


def test_a_resume_takes_the_checkpoints_weights_only_for_the_same_setting_and_labels():
    """A checkpoint's weights are kept while train.class_weights is the one it was started with and the labels
    are this run's; a setting changed with --allow-config-change, or another label set, starts from the config."""
    cfg = SimpleNamespace(train=SimpleNamespace(class_weights="balanced"))
    saved = {"neg": 0.5, "pos": 2.0}
    state = {"class_weights": saved, "config": {"train": {"class_weights": "balanced"}}}
    assert recorded(state, cfg, ["neg", "pos"]) == saved
    assert recorded(state, cfg, ["neg", "pos", "neutral"]) is None
    cfg.train.class_weights = {"pos": 3.0}
    assert recorded(state, cfg, ["neg", "pos"]) is None
