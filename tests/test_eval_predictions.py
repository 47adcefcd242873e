"""`scaletune eval --predictions FILE`: one line per eval example, in the eval file's order, from the very
predictions the printed metrics were computed from; an existing file or a missing directory is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scaletune.cli import main

from stutil import alpaca_records, cls_records, ner_records, write_jsonl


def _run(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _trained(make_config, capsys, task: str, **sections) -> Path:
    path = make_config(task, train={"max_steps": 2}, **sections)
    code, _, err = _run(["train", path], capsys)
    assert code == 0, err
    return path


def _eval(path: Path, capsys, *args) -> tuple[dict, list[dict]]:
    """(the printed metrics, the lines of the --predictions file)."""
    target = path.parent / "predictions.jsonl"
    target.unlink(missing_ok=True)
    code, out, err = _run(["eval", path, "--predictions", target, *args], capsys)
    assert code == 0, err
    return json.loads(out), [json.loads(line) for line in target.read_text().splitlines()]


def test_seq_cls_lines_follow_the_file_and_give_the_metrics(make_config, capsys, tmp_path):
    from sklearn.metrics import f1_score

    path = _trained(make_config, capsys, "seq_cls")
    evalf = tmp_path / "data" / "eval.jsonl"
    records = cls_records(16, seed=1)
    metrics, lines = _eval(path, capsys)
    # the file's order, though eval batches go longest first (4 a batch)
    assert [ln["line"] for ln in lines] == [f"{evalf}:{i}" for i in range(1, 17)]
    assert [(ln["text"], ln["label"]) for ln in lines] == [(r["text"], r["label"]) for r in records]
    assert all(ln["correct"] == (ln["predicted"] == ln["label"]) and 0.5 <= ln["score"] <= 1 for ln in lines)
    assert sum(ln["correct"] for ln in lines) / len(lines) == metrics["accuracy"]
    gold, predicted = [ln["label"] for ln in lines], [ln["predicted"] for ln in lines]
    assert f1_score(gold, predicted, average="macro", zero_division=0) == metrics["macro_f1"]
    # the metrics are those of an eval without the file
    code, out, err = _run(["eval", path], capsys)
    assert code == 0 and json.loads(out) == metrics, err


def test_multi_label_lines_hold_label_lists(make_config, capsys, tmp_path):
    data = tmp_path / "ml.jsonl"
    write_jsonl(data, [{"text": r["text"], "label": [r["label"]] + (["long"] if len(r["text"]) > 30 else [])}
                       for r in cls_records(24)])
    path = _trained(make_config, capsys, "seq_cls", data={"train": str(data), "eval": str(data)})
    metrics, lines = _eval(path, capsys)
    # (each list in the label set's order: long, neg, pos)
    assert [ln["label"] for ln in lines] == [sorted(json.loads(x)["label"]) for x in data.read_text().splitlines()]
    assert all(ln["correct"] == (ln["predicted"] == ln["label"]) for ln in lines)
    assert sum(ln["correct"] for ln in lines) / len(lines) == metrics["accuracy"]


def test_token_cls_lines_give_seqeval_f1(make_config, capsys, tmp_path):
    from seqeval.metrics import accuracy_score, f1_score

    path = _trained(make_config, capsys, "token_cls")
    records = ner_records(16, seed=1)
    metrics, lines = _eval(path, capsys)
    assert [ln["line"] for ln in lines] == [f"{tmp_path / 'data' / 'eval.jsonl'}:{i}" for i in range(1, 17)]
    assert [(ln["tokens"], ln["tags"]) for ln in lines] == [(r["tokens"], r["tags"]) for r in records]
    assert all(len(ln["predicted"]) == len(ln["tokens"]) for ln in lines)
    assert all(ln["correct"] == (ln["predicted"] == ln["tags"]) for ln in lines)
    gold, predicted = [ln["tags"] for ln in lines], [ln["predicted"] for ln in lines]
    assert f1_score(gold, predicted, zero_division=0) == metrics["f1"]
    assert accuracy_score(gold, predicted) == metrics["token_accuracy"]


@pytest.mark.parametrize("chunked", [True, False])
def test_causal_lm_lines_give_the_loss_and_skip_dropped_records(make_config, capsys, tmp_path, chunked):
    path = _trained(make_config, capsys, "causal_lm")
    evalf = tmp_path / "data" / "eval.jsonl"
    records = alpaca_records(6, seed=1)
    records[2]["input"] = " ".join(["alpha"] * 400)  # no target token within data.max_length: no example
    write_jsonl(evalf, records)
    metrics, lines = _eval(path, capsys, f"train.chunked_loss={str(chunked).lower()}")
    assert [ln["line"] for ln in lines] == [f"{evalf}:{i}" for i in (1, 2, 4, 5, 6)]
    assert sum(ln["tokens"] for ln in lines) == metrics["target_tokens"]
    mean = sum(ln["loss"] * ln["tokens"] for ln in lines) / metrics["target_tokens"]
    assert mean == pytest.approx(metrics["loss"], rel=1e-5)
    assert len({round(ln["loss"], 6) for ln in lines}) > 1  # each example's own loss, not the mean


def test_an_existing_file_or_a_missing_directory_is_refused(make_config, capsys, tmp_path):
    path = make_config("seq_cls")
    kept = tmp_path / "kept.jsonl"
    kept.write_text("mine\n")
    code, _, err = _run(["eval", path, "--predictions", kept], capsys)
    assert code == 2 and kept.read_text() == "mine\n"
    assert f"error: --predictions {kept}: exists; choose a new file" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(["eval", path, "--predictions", tmp_path / "nope" / "p.jsonl"], capsys)
    assert code == 2 and f"directory {tmp_path / 'nope'} does not exist" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_held_out_split_gives_its_lines_from_the_training_file(make_config, capsys, tmp_path):
    """data.eval_fraction: the lines are the held-out training records, split as training split them (the
    metrics are plain eval's, which scores the split training cached), each named by its data.train line."""
    path = _trained(make_config, capsys, "seq_cls", data={"eval": None, "eval_fraction": 0.25})
    code, out, err = _run(["eval", path, "--json"], capsys)
    assert code == 0, err
    plain = json.loads(out)
    code, out, err = _run(["eval", path, "--json", "--predictions", tmp_path / "p.jsonl"], capsys)
    assert code == 0, err
    assert json.loads(out) == plain
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    train = tmp_path / "data" / "train.jsonl"
    assert len(lines) == 16 and all(ln["line"].startswith(f"{train}:") for ln in lines)  # (64 x 0.25)
    records = train.read_text().splitlines()
    assert all(json.loads(records[int(ln["line"].rsplit(":", 1)[1]) - 1])["text"] == ln["text"] for ln in lines)
    assert sum(ln["correct"] for ln in lines) / 16 == pytest.approx(plain["accuracy"])


def test_lines_of_a_text_pair_and_of_cut_words():
    """A seq_cls line gives the pair's second text; a token_cls line gives a word past max_length the "O" eval
    scored it as (and a word with no sub-token its neighbours' tag), so `predicted` has one tag a word, and says
    how many words were cut ("truncated_words", as predict does)."""
    from scaletune.tasks import get_task

    pair = get_task("seq_cls")
    pair.text, pair.pair = "premise", "hypothesis"
    line = pair.example_line((1, 0), 0.75, {"premise": "it rains", "hypothesis": "it is dry"}, ["no", "yes"])
    assert line == {"text": "it rains", "text_pair": "it is dry", "label": "no", "predicted": "yes", "score": 0.75,
                    "correct": False}
    ner = get_task("token_cls")
    ner.tokens = "tokens"
    words = ["John", "\u200b", "Smith", "in", "Paris"]
    tags = ["O", "B-PER", "I-PER", "B-LOC"]
    line = ner.example_line(([1, None, 2], [1, 2, 2], [0, 3]), None, {"tokens": words}, tags)
    assert line == {"tokens": words, "tags": ["B-PER", "I-PER", "I-PER", "O", "B-LOC"],
                    "predicted": ["B-PER", "I-PER", "I-PER", "O", "O"], "correct": False,
                    "truncated_words": 2}  # (as predict's line says: those two "O" are no prediction)
    whole = ner.example_line(([1, 3], [1, 3], []), None, {"tokens": ["John", "in"]}, tags)
    assert "truncated_words" not in whole and whole["correct"]


def test_a_file_that_appeared_since_the_check_is_not_replaced(tmp_path):
    """write_predictions opens its file exclusively: one written there after the arguments were checked stays."""
    from scaletune.errors import UserError
    from scaletune.infer import write_predictions

    kept = tmp_path / "p.jsonl"
    kept.write_text("mine\n")
    with pytest.raises(UserError, match="exists; choose a new file"):
        write_predictions(str(kept), None, None, [], [])
    assert kept.read_text() == "mine\n"


def test_per_example_scoring_leaves_the_task_as_it_was(make_config):
    """evaluate_examples makes the task keep per-example outputs only while it scores: a later evaluate (causal_lm's
    chunked loss would pay a pass per row) and the task's cache_meta see the class's default again."""
    from scaletune.config import load_config
    from scaletune.evaluate import evaluate_examples
    from scaletune.train import setup

    run, _ = setup(load_config(make_config("seq_cls")))
    meta = run.task.cache_meta()
    _, examples = evaluate_examples(run.accelerator, run.model, run.task, run.data["eval"], run.data["labels"], 4,
                                    run.tokenizer.pad_token_id)
    assert len(examples) == len(run.data["eval"])
    assert run.task.per_example is False and run.task.cache_meta() == meta


@pytest.mark.parametrize("stop", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_predictions_file_cut_short_is_removed_so_the_retry_can_write_it(tmp_path, stop):
    """A full disk or Ctrl-C half-way through the lines left the partial file, and the same `eval --predictions
    FILE` again was refused: "exists; choose a new file"."""
    from types import SimpleNamespace

    from scaletune.infer import write_predictions

    calls = []

    def example_line(pred, extra, record, labels):
        calls.append(pred)
        if len(calls) == 2:
            raise stop
        return {"pred": pred}

    target = tmp_path / "dev.pred.jsonl"
    with pytest.raises(type(stop)):
        write_predictions(str(target), SimpleNamespace(example_line=example_line), None, [{}, {}], [(0, {}), (1, {})])
    assert not target.exists()
