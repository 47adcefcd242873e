"""Text classification outputs beyond the top label: `predict --top-k` and eval's confusion matrix."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from scaletune.cli import main

from stutil import write_jsonl

LABELS = {"alpha": "pos", "bravo": "neg", "charlie": "mid"}  # a sentence's class: the keyword it holds


def _records(n: int, classes: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    filler = ["delta", "echo", "golf", "hotel", "india", "kilo", "lima", "mike"]
    out = []
    for i in range(n):
        keyword = classes[i % len(classes)]
        words = rng.sample(filler, rng.randint(1, 5))
        words.insert(rng.randrange(len(words) + 1), keyword)
        out.append({"text": " ".join(words), "label": LABELS[keyword]})
    return out


def _cli(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_top_k_scores_and_confusion_matrix_of_a_trained_adapter(capsys, make_config, tmp_path):
    """Three classes, so two of them are a real choice: --top-k 2 lists the two best, best first, led by the
    line's label and score; `all` lists every class (a distribution); no flag leaves the line as it was. The
    eval's confusion matrix is the count of (gold, predicted) pairs of the same adapter's predictions, with a
    row for the class the eval file lacks."""
    train = write_jsonl(tmp_path / "train.jsonl", _records(48, ["alpha", "bravo", "charlie"], seed=0))
    evalf = write_jsonl(tmp_path / "eval.jsonl", _records(10, ["alpha", "bravo"], seed=1))  # no "mid"
    path = make_config("seq_cls", data={"train": str(train), "eval": str(evalf)},
                       train={"max_steps": 3, "learning_rate": 0.05})
    code, _, err = _cli(["train", path], capsys)
    assert code == 0, err
    labels = json.loads((tmp_path / "run" / "adapter" / "scaletune.json").read_text())["labels"]
    assert sorted(labels) == ["mid", "neg", "pos"]

    code, out, err = _cli(["predict", path, "--input", evalf, "--top-k", "2"], capsys)
    assert code == 0, err
    got = _lines(out)
    assert len(got) == 10
    for line in got:
        scores = line["scores"]
        assert len(scores) == 2 and scores[0]["score"] >= scores[1]["score"], line
        assert scores[0] == {"label": line["label"], "score": line["score"]}
        assert scores[0]["label"] != scores[1]["label"] and {s["label"] for s in scores} <= set(labels)

    code, out, err = _cli(["predict", path, "--input", evalf, "--top-k", "all"], capsys)
    assert code == 0, err
    for line in _lines(out):
        assert sorted(s["label"] for s in line["scores"]) == sorted(labels)
        assert sum(s["score"] for s in line["scores"]) == pytest.approx(1.0, abs=1e-5)
        assert [s["score"] for s in line["scores"]] == sorted((s["score"] for s in line["scores"]), reverse=True)

    code, out, err = _cli(["predict", path, "--input", evalf], capsys)
    assert code == 0, err
    plain = _lines(out)
    assert all("scores" not in line for line in plain)
    assert [(p["label"], p["score"]) for p in plain] == [(g["label"], g["score"]) for g in got]

    code, out, err = _cli(["eval", path, "--data", evalf], capsys)
    assert code == 0, err
    metrics = json.loads(out)
    matrix = metrics["confusion_matrix"]
    assert matrix["labels"] == labels
    gold = [json.loads(line)["label"] for line in Path(evalf).read_text().splitlines()]
    by_hand = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, plain, strict=True):
        by_hand[labels.index(g)][labels.index(p["label"])] += 1
    assert matrix["counts"] == by_hand
    assert sum(map(sum, matrix["counts"])) == 10 and sum(matrix["counts"][labels.index("mid")]) == 0
    diagonal = sum(matrix["counts"][i][i] for i in range(len(labels)))
    assert diagonal / 10 == pytest.approx(metrics["accuracy"])


def test_confusion_matrix_counts_gold_rows_and_predicted_columns():
    """Rows are the gold class, columns the predicted one, every class in label order (one the eval lacks
    too); the matrix is JSON as it is (plain ints), for metrics.jsonl and the eval output."""
    from scaletune.tasks import get_task

    # (predicted id, gold id) pairs, as SeqCls.predictions gives them
    preds = [(0, 0), (0, 0), (1, 0), (1, 1), (0, 1), (2, 1)]
    metrics = get_task("seq_cls").metrics(preds, 1.0, 6, ["neg", "pos", "neutral"])
    assert metrics["confusion_matrix"] == {"labels": ["neg", "pos", "neutral"],
                                           "counts": [[2, 1, 0], [1, 1, 1], [0, 0, 0]]}
    assert json.loads(json.dumps(metrics["confusion_matrix"])) == metrics["confusion_matrix"]
    # a class neither gold nor predicted keeps its row and column: the counts still line up with "labels"
    unseen = get_task("seq_cls").metrics([(0, 0), (2, 0), (2, 2)], 1.0, 3, ["neg", "mixed", "pos"])
    assert unseen["confusion_matrix"]["counts"] == [[1, 0, 1], [0, 0, 0], [0, 0, 1]]
    # N^2 cells on every eval's metrics line: given up to CONFUSION_MAX_CLASSES classes, not for 3,000 intents
    from scaletune.tasks.seq_cls import CONFUSION_MAX_CLASSES

    for n, shown in ((CONFUSION_MAX_CLASSES, True), (CONFUSION_MAX_CLASSES + 1, False)):
        names = [f"intent{i}" for i in range(n)]
        many = get_task("seq_cls").metrics([(i, i) for i in range(n)], 1.0, n, names)
        assert ("confusion_matrix" in many) == shown and many["accuracy"] == 1.0


@pytest.mark.parametrize("task", ["token_cls", "causal_lm"])
def test_top_k_is_refused_for_tasks_without_class_scores(capsys, make_config, task):
    """Refused before anything is loaded (no adapter was trained here), in one line naming the option."""
    code, out, err = _cli(["predict", make_config(task), "--top-k", "2"], capsys)
    assert code == 2 and not out and "Traceback" not in err
    assert f"--top-k: {task} has no class scores per input; only seq_cls" in err, err


@pytest.mark.parametrize("value,message", [("0", "must be >= 1 (or 'all'), got 0"),
                                           ("-3", "must be >= 1 (or 'all'), got -3"),
                                           ("two", "must be a whole number >= 1 or 'all', got 'two'"),
                                           ("1.5", "must be a whole number >= 1 or 'all', got '1.5'")])
def test_top_k_below_one_or_not_a_number_is_a_usage_error(capsys, make_config, value, message):
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(make_config("seq_cls")), "--top-k", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    # argparse's usage, then the error on one line of its own
    assert err.strip().splitlines()[-1] == f"scaletune predict: error: argument --top-k: {message}"
    assert "Traceback" not in err
