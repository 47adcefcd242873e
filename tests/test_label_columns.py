"""seq_cls multi-label from one 0/1 column per class (Jigsaw's toxic, severe_toxic, ...: data.label_column as a
list), and predict's --threshold for multi-label runs."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from scaletune.cli import main
from scaletune.config import load_config
from scaletune.errors import ConfigError
from scaletune.loop import fit
from scaletune.train import StopFlag, setup

from stutil import WORDS, read_metrics

# a class column (in the config's order, not sorted) -> the word in the text that makes it 1
CLASSES = {"toxic": "alpha", "insult": "bravo", "obscene": "charlie"}
SPELLINGS = [("0", "1"), ("false", "true"), ("0.0", "1.0"), (" 0", "1 ")]  # as CSV files write a flag


def class_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows of comment_text and a flag column per class, flags spelled as the CSVs of the wild spell them."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS[3:], rng.randint(2, 6))
        no, yes = SPELLINGS[i % len(SPELLINGS)]
        row = {"id": f"c{i}", "comment_text": ""}
        for column, word in CLASSES.items():
            present = rng.random() < 0.5
            if present:
                words.insert(rng.randrange(len(words) + 1), word)
            row[column] = yes if present else no
        row["comment_text"] = " ".join(words)
        rows.append(row)
    return rows


def write_csv(path, rows: list[dict]):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _config(make_config, tmp_path, train_rows, eval_rows, **sections):
    train = write_csv(tmp_path / "train.csv", train_rows)
    evalf = write_csv(tmp_path / "eval.csv", eval_rows)
    data = {"train": str(train), "eval": str(evalf), "text_column": "comment_text",
            "label_column": list(CLASSES), **sections.pop("data", {})}
    return make_config("seq_cls", n=8, data=data, **sections)


def _cli(argv, capsys):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_class_columns_train_multi_label_score_as_sklearn_and_predict_at_a_threshold(make_config, tmp_path,
                                                                                     capsys):
    path = _config(make_config, tmp_path, class_rows(96), class_rows(24, seed=1),
                   train={"global_batch_size": 16, "micro_batch_size": 8, "max_steps": 40, "eval_every": 40,
                          "learning_rate": 2e-2})
    run, _ = setup(load_config(path))
    # the classes are the columns, in the config's order; the run is multi-label as a list column's is
    assert run.data["labels"] == list(CLASSES) and run.task.multi_label
    assert run.model.config.problem_type == "multi_label_classification"
    first = class_rows(1)[0]
    assert run.data["train"][0]["labels"] == [int(first[c].strip() in ("1", "true", "1.0")) for c in CLASSES]
    fit(run, StopFlag())
    metrics = read_metrics(run.output_dir, "eval")[-1]

    evalset = run.data["eval"]
    batch = run.task.collate([evalset[i] for i in range(len(evalset))], run.tokenizer.pad_token_id)
    run.model.eval()
    with torch.no_grad():
        logits = run.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    # the gold rows are the CSV's flags, whatever their spelling
    gold = [[int(r[c].strip() in ("1", "true", "1.0")) for c in CLASSES] for r in class_rows(24, seed=1)]
    assert batch["labels"].int().tolist() == gold
    y_pred = (logits.sigmoid() > 0.5).int().numpy()
    assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, y_pred))
    assert metrics["micro_f1"] == pytest.approx(f1_score(gold, y_pred, average="micro", zero_division=0))
    for j, name in enumerate(CLASSES):
        assert metrics["per_class"][name]["f1-score"] == pytest.approx(
            f1_score([g[j] for g in gold], y_pred[:, j], zero_division=0))

    # `scaletune eval` of the saved adapter reads the class columns as training did (the columns kept with it)
    code, out, err = _cli(["eval", path], capsys)
    assert code == 0, err
    assert json.loads(out)["micro_f1"] == pytest.approx(metrics["micro_f1"])

    # predict reads the text alone (no class columns); --threshold 0.01 picks every class above 0.01
    texts = ["golf alpha hotel charlie", "kilo lima", "bravo mike", "alpha bravo charlie"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    enc = run.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = run.model(**enc).logits.sigmoid().tolist()
    picked = {}
    for t in (None, 0.01, 0.99):
        code, out, err = _cli(["predict", path, "--input", tmp_path / "in.txt",
                               *(["--threshold", t] if t else [])], capsys)
        assert code == 0, err
        lines = [json.loads(x) for x in out.splitlines()]
        picked[t] = [line["labels"] for line in lines]
        assert picked[t] == [[c for c, p in zip(CLASSES, row) if p > (t or 0.5)] for row in probs]
        assert [[s["label"] for s in line["scores"]] for line in lines] == [
            sorted(labels, key=lambda c: -row[list(CLASSES).index(c)]) for labels, row in zip(picked[t], probs)]
    assert picked[0.01] != picked[None] != picked[0.99]  # (a real change both ways, not a no-op flag)
    assert sum(map(len, picked[0.01])) > sum(map(len, picked[None])) > sum(map(len, picked[0.99]))


@pytest.mark.parametrize("bad,where,message", [
    ("2", "train", "train.csv:4: column 'insult' holds '2'; a class column holds 0 or 1 (or true/false)"),
    ("", "train", "train.csv:4: column 'insult' holds ''"),
    ("yes", "eval", "eval.csv:4: column 'insult' holds 'yes'"),
    ("-1", "eval", "hint: drop the records whose classes are unknown (-1 in Jigsaw's test labels)"),
])
def test_a_class_column_value_other_than_0_or_1_is_refused_at_file_line(make_config, tmp_path, capsys, bad, where,
                                                                          message):
    rows = {"train": class_rows(8), "eval": class_rows(4, seed=1)}
    rows[where][2]["insult"] = bad  # the third record: line 4 after the header
    path = _config(make_config, tmp_path, rows["train"], rows["eval"])
    code, _, err = _cli(["train", path], capsys)
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err


def test_a_class_column_missing_from_the_data_is_named(make_config, tmp_path, capsys):
    rows = [{k: v for k, v in r.items() if k != "obscene"} for r in class_rows(8)]
    path = _config(make_config, tmp_path, rows, rows)
    code, _, err = _cli(["train", path], capsys)
    assert code == 2 and "train.csv:2: column 'obscene' (data.label_column) not found" in err, err


@pytest.mark.parametrize("data,message", [
    ({"labels": ["toxic", "obscene", "insult"]}, "data.labels: ['toxic', 'obscene', 'insult'] differs from "
                                                 "data.label_column"),
    ({"label_column": ["toxic"]}, "data.label_column: ['toxic']: one 0/1 column is a two-class label"),
    ({"label_column": ["toxic", "toxic"]}, "names a column twice"),
    ({"label_column": ["toxic", 3]}, "data.label_column: a list names one 0/1 column per class, as strings"),
    ({"text_column": "toxic"}, "data.text_column: column 'toxic' is also in data.label_column"),
])
def test_class_column_lists_that_cannot_work_are_config_errors(make_config, tmp_path, data, message):
    path = _config(make_config, tmp_path, class_rows(8), class_rows(4), data=data)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert message in str(exc.value)


def test_data_labels_equal_to_the_class_columns_is_accepted(make_config, tmp_path):
    path = _config(make_config, tmp_path, class_rows(8), class_rows(4), data={"labels": list(CLASSES)})
    assert load_config(path).data.label_column == list(CLASSES)


def test_threshold_is_refused_for_a_single_label_run(make_config, tmp_path, capsys):
    path = make_config("seq_cls", n=8, train={"max_steps": 1})
    code, _, err = _cli(["train", path], capsys)
    assert code == 0, err
    (tmp_path / "in.txt").write_text("alpha bravo\n")
    code, out, err = _cli(["predict", path, "--input", tmp_path / "in.txt", "--threshold", "0.3"], capsys)
    assert code == 2 and not out and "Traceback" not in err
    assert "--threshold: the adapter at" in err and "is single-label" in err, err


@pytest.mark.parametrize("task", ["token_cls", "causal_lm"])
def test_threshold_is_refused_for_tasks_without_classes(capsys, make_config, task):
    code, out, err = _cli(["predict", make_config(task), "--threshold", "0.3"], capsys)
    assert code == 2 and not out and "Traceback" not in err
    assert f"--threshold: {task} has no per-class decisions" in err, err


@pytest.mark.parametrize("value", ["0", "1", "1.5", "nan", "half"])
def test_threshold_outside_zero_to_one_is_a_usage_error(capsys, make_config, value):
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(make_config("seq_cls")), "--threshold", value])
    assert exc.value.code == 2
    assert "argument --threshold: must be" in capsys.readouterr().err
