"""seq_cls multi-label: a label column of lists trains sigmoid classes with BCE, scores them as scikit-learn
does, predicts label lists, and keeps problem_type in the model config."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score

from scaletune.cli import main
from scaletune.config import load_config
from scaletune.loop import fit
from scaletune.train import StopFlag, setup

from stutil import WORDS, read_metrics, write_jsonl

KEYWORDS = {"alpha": "a", "bravo": "b", "charlie": "c"}  # a word in the text -> its class


def multi_records(n: int, seed: int = 0) -> list[dict]:
    """Each class is present where its keyword is (each with probability 1/2, so some examples have none)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS[3:], rng.randint(2, 6))
        present = [word for word in KEYWORDS if rng.random() < 0.5]
        for word in present:
            words.insert(rng.randrange(len(words) + 1), word)
        out.append({"text": " ".join(words), "label": [KEYWORDS[w] for w in present]})
    return out


def _multi_config(make_config, tmp_path, n: int = 96, **train):
    path = make_config("seq_cls", n=8, train={"global_batch_size": 16, "micro_batch_size": 8, "max_steps": 2,
                                              "learning_rate": 2e-2, **train})
    write_jsonl(tmp_path / "data" / "train.jsonl", multi_records(n))
    write_jsonl(tmp_path / "data" / "eval.jsonl", multi_records(24, seed=1))
    return path


def _forward(run, examples):
    batch = run.task.collate(examples, run.tokenizer.pad_token_id)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return batch, inputs


def test_a_batch_loss_is_the_bce_mean_over_examples_and_classes(make_config, tmp_path):
    """loss_sum / count_targets is torch's BCEWithLogitsLoss mean and transformers' own multi-label loss, so the
    loop's normalisation (summed losses over the step's counted targets) trains what plain transformers would."""
    run, _ = setup(load_config(_multi_config(make_config, tmp_path)))
    assert run.data["labels"] == ["a", "b", "c"] and run.task.multi_label
    assert run.model.config.problem_type == "multi_label_classification"
    batch, inputs = _forward(run, [run.data["train"][i] for i in range(6)])
    assert batch["labels"].shape == (6, 3) and batch["labels"].dtype == torch.float32
    loss_sum, logits = run.task.loss_sum(run.model, batch)
    n = run.task.count_targets(batch)
    assert n == 18  # examples x classes
    expected = torch.nn.BCEWithLogitsLoss()(logits.float(), batch["labels"])
    assert (loss_sum / n).item() == pytest.approx(expected.item(), rel=1e-6)
    assert (loss_sum / n).item() == pytest.approx(run.model(**inputs, labels=batch["labels"]).loss.item(), rel=1e-5)


def test_multi_label_trains_scores_as_sklearn_predicts_lists_and_merges(make_config, tmp_path, capsys):
    path = _multi_config(make_config, tmp_path, max_steps=150, eval_every=150)
    run, _ = setup(load_config(path))
    fit(run, StopFlag())
    losses = [r["loss"] for r in read_metrics(run.output_dir, "train")]
    assert sum(losses[-10:]) / 10 < 0.8 * losses[0], losses  # (from ln 2: a coin per class)
    metrics = read_metrics(run.output_dir, "eval")[-1]

    # the eval's scores are scikit-learn's on the (sigmoid > 0.5) predictions of the trained model
    evalset = run.data["eval"]
    batch, inputs = _forward(run, [evalset[i] for i in range(len(evalset))])
    run.model.eval()
    with torch.no_grad():
        logits = run.model(**inputs).logits
    y_pred, y_true = (logits.sigmoid() > 0.5).int().numpy(), batch["labels"].int().numpy()
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))  # exact match of the label set
    assert metrics["micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro"))
    assert metrics["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))  # all classes occur
    for j, name in enumerate(["a", "b", "c"]):
        assert metrics["per_class"][name]["f1-score"] == pytest.approx(f1_score(y_true[:, j], y_pred[:, j]))
        assert metrics["per_class"][name]["support"] == int(y_true[:, j].sum())
    assert metrics["loss"] == pytest.approx(F.binary_cross_entropy_with_logits(logits, batch["labels"]).item(),
                                            rel=1e-5)

    # predict: each line's label list is the classes whose sigmoid exceeds 0.5, with their scores best first
    texts = ["golf alpha hotel charlie", "kilo lima", "bravo mike"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    capsys.readouterr()
    assert main(["predict", str(path), "--input", str(tmp_path / "in.txt")]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    enc = run.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = run.model(**enc).logits.sigmoid()
    for line, p in zip(lines, probs):
        expected = [name for name, v in zip(["a", "b", "c"], p.tolist()) if v > 0.5]
        assert line["labels"] == expected and "label" not in line
        assert [s["label"] for s in line["scores"]] == sorted(expected, key=lambda n: -p[ord(n) - ord("a")])
    assert any(line["labels"] for line in lines)
    assert main(["predict", str(path), "--input", str(tmp_path / "in.txt"), "--top-k", "all"]) == 0
    every = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert all(len(line["scores"]) == 3 for line in every)

    # eval --threshold T scores the classes whose sigmoid exceeds T (the default: 0.5, as training's evals)
    assert main(["eval", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["micro_f1"] == pytest.approx(metrics["micro_f1"])
    low = (logits.sigmoid() > 0.3).int().numpy()
    assert (low != y_pred).any()  # (the threshold changes some decisions: the test can tell)
    assert main(["eval", str(path), "--threshold", "0.3", "--predictions", str(tmp_path / "low.jsonl")]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["micro_f1"] == pytest.approx(f1_score(y_true, low, average="micro"))
    assert scored["accuracy"] == pytest.approx(accuracy_score(y_true, low))
    written = [json.loads(x)["predicted"] for x in (tmp_path / "low.jsonl").read_text().splitlines()]
    assert written == [[name for name, on in zip(["a", "b", "c"], row) if on] for row in low.tolist()]

    # the merged model scores with sigmoids in plain transformers
    assert main(["merge", str(path), "--out", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert config["id2label"] == {"0": "a", "1": "b", "2": "c"}


@pytest.mark.parametrize("train,evals,message", [
    ([{"text": "alpha golf", "label": ["a"]}, {"text": "bravo", "label": ["b"]}, {"text": "kilo", "label": "a"}],
     None, "train.jsonl:3: label 'a' is a single label, but the label at {d}/train.jsonl:1 is a list of labels"),
    ([{"text": "alpha golf", "label": ["a"]}, {"text": "bravo", "label": ["a", "b"]}],
     [{"text": "kilo", "label": "b"}], "eval.jsonl:1: label 'b' must be a list of labels: the training data is "
                                       "multi-label"),
    ([{"text": "alpha golf", "label": "pos"}, {"text": "bravo", "label": "neg"}],
     [{"text": "kilo", "label": ["pos"]}], "eval.jsonl:1: label ['pos'] is a list, but the training data has one "
                                           "label an example"),
    ([{"text": "alpha golf", "label": ["a", "z"]}, {"text": "bravo", "label": ["b"]}],
     [{"text": "kilo", "label": ["a", "q"]}], "eval.jsonl:1: label 'q' is not in the label set ['a', 'b', 'z']"),
    ([{"text": "alpha golf", "label": []}, {"text": "bravo", "label": []}],  # (was "has a single label []")
     None, "column 'label' has no label at all (every list is empty); need at least 2 classes"),
])
def test_label_shapes_that_do_not_fit_are_refused_with_file_and_line(make_config, tmp_path, capsys, train, evals,
                                                                      message):
    path = make_config("seq_cls", n=8)
    write_jsonl(tmp_path / "data" / "train.jsonl", train)
    write_jsonl(tmp_path / "data" / "eval.jsonl", evals or train)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert message.format(d=tmp_path / "data") in err, err
    assert "Traceback" not in err


def test_single_label_metrics_keep_their_meaning_and_add_micro_f1():
    """One label an example: accuracy and macro F1 as before; micro F1 (which best_metric may name for either kind
    of run) is the accuracy there."""
    from scaletune.tasks import get_task

    task = get_task("seq_cls")
    preds = [(0, 0), (1, 1), (1, 0), (2, 2), (0, 2)]
    metrics = task.metrics(preds, 2.0, 5, ["x", "y", "z"])
    y_pred, y_true = [p for p, _ in preds], [t for _, t in preds]
    assert metrics["accuracy"] == metrics["micro_f1"] == pytest.approx(0.6)
    assert metrics["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert "confusion_matrix" in metrics and not task.multi_label


def test_multi_label_metrics_average_only_classes_that_occur():
    """A class no eval example has and nothing predicted is left out of macro F1 (as single-label's is); an
    example with no class predicted as none counts as an exact match."""
    from scaletune.tasks.seq_cls import multi_label_metrics

    preds = [([1, 0, 0], [1, 0, 0]), ([0, 0, 0], [0, 0, 0]), ([1, 1, 0], [1, 0, 0])]
    metrics = multi_label_metrics(preds, 0.1, ["a", "b", "c"])
    y_pred, y_true = np.array([p for p, _ in preds]), np.array([t for _, t in preds])
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro"))
    assert metrics["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=[0, 1]))
    assert metrics["per_class"]["c"]["support"] == 0


def test_eval_of_a_multi_label_adapter_refuses_a_single_label_file(make_config, tmp_path, capsys):
    """`scaletune eval --data` reads the file as the adapter was trained (multi-label), as training's eval does:
    a file of single labels was scored with softmax argmax on the sigmoid classes, exit 0."""
    path = _multi_config(make_config, tmp_path)
    fit(setup(load_config(path))[0], StopFlag())
    write_jsonl(tmp_path / "single.jsonl", [{"text": "alpha golf", "label": "a"}, {"text": "bravo", "label": "b"}])
    capsys.readouterr()
    assert main(["eval", str(path), "--data", str(tmp_path / "single.jsonl")]) == 2
    assert "single.jsonl:1: label 'a' must be a list of labels: the training data is multi-label" in \
        capsys.readouterr().err


def _setup_task(records: list[dict], label_column=None, labels=None):
    from types import SimpleNamespace

    from scaletune.tasks import get_task

    task = get_task("seq_cls")
    data = SimpleNamespace(text_column=None, text_pair_column=None, label_column=label_column, label_separator=None,
                           labels=labels, max_length=32)
    names = task.setup(records, SimpleNamespace(data=data), "t.jsonl")
    return task, names, {name: i for i, name in enumerate(names)}


def test_multi_label_ids_are_named_by_data_labels_and_float_flags_are_read():
    """Lists of integer ids (HF datasets' multi-label ClassLabel sequences) are named by data.labels in id order;
    class columns holding floats (parquet and pandas write 1.0 / 0.0) and booleans read as their flags."""
    from scaletune.tasks.base import WHERE

    ids = [{"text": "x y", "label": [0, 2], WHERE: "t.jsonl:1"}, {"text": "y z", "label": [], WHERE: "t.jsonl:2"}]
    task, names, label2id = _setup_task(ids, labels=["sports", "politics", "tech"])
    assert task.multi_label and names == ["sports", "politics", "tech"]
    assert task.encode(ids[0], _tokenizer(), _cfg(), label2id)["labels"] == [1, 0, 1]
    columns = [{"text": "x y", "toxic": 1.0, "insult": 0.0, "threat": True, WHERE: "t.jsonl:1"},
               {"text": "y z", "toxic": 0.0, "insult": 1.0, "threat": False, WHERE: "t.jsonl:2"}]
    task, names, label2id = _setup_task(columns, label_column=["toxic", "insult", "threat"])
    assert task.multi_label and names == ["toxic", "insult", "threat"]
    assert [task.encode(rec, _tokenizer(), _cfg(), label2id)["labels"] for rec in columns] == [[1, 0, 1], [0, 1, 0]]


def _tokenizer():
    from scaletune.demo.tiny import train_tokenizer

    return train_tokenizer(["x y z a b c"] * 4, "wordpiece", 60)


def _cfg():
    from types import SimpleNamespace

    return SimpleNamespace(data=SimpleNamespace(max_length=32))


def test_multi_label_predict_marks_the_lines_max_length_cut():
    """A multi-label line the model saw only the start of says so ("truncated": true), as a single-label
    line does; a line that fits does not."""
    from types import SimpleNamespace

    from scaletune.labelling import classify

    class Sigmoids(torch.nn.Module):
        config = SimpleNamespace(problem_type="multi_label_classification")
        device = torch.device("cpu")

        def forward(self, input_ids, attention_mask, **_):
            return SimpleNamespace(logits=torch.tensor([[2.0, -2.0]]).expand(len(input_ids), 2))

    lines = classify(Sigmoids(), _tokenizer(), ["a", "b"], 6, [("x y z " * 10, None), ("x y", None)])
    assert [line.get("truncated") for line in lines] == [True, None]
    assert [line["labels"] for line in lines] == [["a"], ["a"]]


def _write_csv(path, records: list[dict], sep: str) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for rec in records:
            writer.writerow([rec["text"], sep.join(rec["label"])])


def test_a_csv_label_text_split_at_label_separator_is_multi_label(make_config, tmp_path, capsys):
    """data.label_separator splits a CSV cell's text ("a; c", "" for none) into labels: the run is multi-label
    and trains on exactly the examples the same records give as JSON lists; `scaletune eval` reads such a CSV
    file the same way."""
    records = multi_records(48)
    assert any(not r["label"] for r in records) and any(len(r["label"]) > 1 for r in records)
    path = _multi_config(make_config, tmp_path, n=48)
    as_json, _ = setup(load_config(path, ["output_dir=" + str(tmp_path / "json")]))
    _write_csv(tmp_path / "data" / "train.csv", records, " ; ")
    _write_csv(tmp_path / "data" / "eval.csv", multi_records(24, seed=1), ";")
    args = [f"data.train={tmp_path / 'data' / 'train.csv'}", f"data.eval={tmp_path / 'data' / 'eval.csv'}",
            "data.label_separator=;", "output_dir=" + str(tmp_path / "csv")]
    run, _ = setup(load_config(path, args))
    assert run.task.multi_label and run.data["labels"] == ["a", "b", "c"]
    assert run.model.config.problem_type == "multi_label_classification"
    for split in ("train", "eval"):
        assert run.data[split]["labels"] == as_json.data[split]["labels"]
        assert run.data[split]["input_ids"] == as_json.data[split]["input_ids"]
    fit(run, StopFlag())
    capsys.readouterr()
    code = main(["eval", str(path), *args, "--adapter", str(tmp_path / "csv" / "adapter")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["accuracy"] == read_metrics(tmp_path / "csv", "eval")[-1]["accuracy"]


@pytest.mark.parametrize("separator", [None, ","])
def test_a_list_written_as_csv_text_is_refused_not_read_as_labels(make_config, tmp_path, capsys, separator):
    """pandas writes a list column to CSV as "['a', 'b']": read as one label it would train a class per label
    combination, split at "," classes named "['a'"; either is refused naming the file:line, exit 2."""
    train = tmp_path / "listed.csv"
    train.write_text("text,label\nalpha echo,['a']\nbravo golf,\"['a', 'b']\"\ncharlie kilo,[]\n")
    path = make_config("seq_cls", data={"train": str(train), "eval": None,
                                        **({"label_separator": separator} if separator else {})},
                       train={"eval_every": None})
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "listed.csv:2: label \"['a']\" in column 'label' is a list written as text" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.label_separator=''"], "data.label_separator: '': give the text between two labels"),
    (["data.label_separator=;", "data.label_column=[a, b]"], "there is no label text to split"),
])
def test_label_separator_problems_are_config_errors(make_config, tmp_path, capsys, overrides, message):
    path = _multi_config(make_config, tmp_path)
    assert main(["train", str(path), *overrides]) == 2
    assert message in capsys.readouterr().err


def test_eval_threshold_is_for_multi_label_adapters(make_config, tmp_path, capsys):
    """A single-label adapter (or another task) has no per-class decisions: eval --threshold is refused, exit 2."""
    path = make_config("seq_cls", train={"max_steps": 1})
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["eval", str(path), "--threshold", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "--threshold: the adapter at" in err and "is single-label" in err


def test_label_separator_is_for_seq_cls_only(make_config, capsys):
    path = make_config("token_cls")
    assert main(["train", str(path), "data.label_separator=;"]) == 2
    assert "data.label_separator: only read by task seq_cls, not token_cls" in capsys.readouterr().err


def test_label_separator_splits_text_only():
    """data.label_separator splits a text cell into its labels, stripped, empty parts left out; a list stays as
    it is and another value (a JSON number) is one label."""
    from scaletune.tasks import get_task

    task = get_task("seq_cls")
    task.separator = ";"
    assert task._labels_of(" a ; ;c;") == ["a", "c"]
    assert task._labels_of("") == []
    assert task._labels_of(["a b"]) == ["a b"]
    assert task._labels_of(3) == [3]
