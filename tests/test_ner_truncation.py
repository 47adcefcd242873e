"""token_cls words past data.max_length: eval scores them as predicted "O" (recall counts their entities as
missed), says how many were cut, and `predict` marks the lines it cut."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
import torch

from scaletune.config import from_dict
from scaletune.data import build_datasets
from scaletune.model import load_tokenizer
from scaletune.tasks import get_task

from stutil import write_jsonl

MAX_LENGTH = 8  # [CLS] + 6 words of one sub-token + [SEP]
FILLER = ["alpha", "bravo", "charlie", "delta", "echo"]
RECORDS = [
    # Paris (an entity) lies past the cut, with foxtrot
    {"tokens": ["Alice", *FILLER, "foxtrot", "Paris"], "tags": ["B-PER"] + ["O"] * 6 + ["B-LOC"]},
    # "Bob Carol" straddles the cut: only "Bob" is in the window
    {"tokens": [*FILLER, "Bob", "Carol"], "tags": ["O"] * 5 + ["B-PER", "I-PER"]},
    {"tokens": ["Dave", "golf", "Oslo"], "tags": ["B-PER", "O", "B-LOC"]},
]


class Oracle(torch.nn.Module):
    """Predicts each word's gold tag from its first sub-token: perfect on every word the model sees, so
    whatever eval misses is what max_length cut."""

    device = torch.device("cpu")

    def __init__(self, table: dict[int, int], n_labels: int):
        super().__init__()
        self.table, self.n_labels = table, n_labels

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, self.n_labels)
        for token, label in self.table.items():
            logits[..., label] += (input_ids == token).float()
        return SimpleNamespace(logits=logits)


def _setup(tmp_path, tiny_bert, **data):
    path = write_jsonl(tmp_path / "ner.jsonl", RECORDS)
    cfg = from_dict(
        {
            "task": "token_cls",
            "model": {"name_or_path": str(tiny_bert), "dtype": "float32"},
            "data": {"train": str(path), "eval": str(path), "max_length": MAX_LENGTH, "cache": False, **data},
            "train": {"mixed_precision": "no"},
            "output_dir": str(tmp_path / "out"),
        }
    )
    tok = load_tokenizer(cfg)
    return cfg, tok


def _oracle(tok, labels: list[str]) -> Oracle:
    table: dict[int, int] = {}
    for rec in RECORDS:
        for word, tag in zip(rec["tokens"], rec["tags"]):
            first = tok(word, add_special_tokens=False)["input_ids"][0]
            assert table.setdefault(first, labels.index(tag)) == labels.index(tag), word
    return Oracle(table, len(labels))


def _window_words(tok, words: list[str]) -> set[int]:
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=MAX_LENGTH)
    return {w for w in enc.word_ids() if w is not None}


def test_eval_scores_words_cut_by_max_length_as_O(tmp_path, tiny_bert):
    """Recall's denominator holds every gold entity, cut or not; the numbers equal seqeval's on the full
    gold sequences with "O" predicted for the cut words."""
    from accelerate import Accelerator
    from seqeval.metrics import f1_score, precision_score, recall_score

    from scaletune.evaluate import evaluate

    cfg, tok = _setup(tmp_path, tiny_bert)
    assert [_window_words(tok, r["tokens"]) for r in RECORDS] == [set(range(6)), set(range(6)), set(range(3))]
    task = get_task("token_cls")
    sets = build_datasets(cfg, task, tok)
    labels = sets["labels"]
    # micro-batches of 2: a batch mixes a sentence with 2 cut words and one with 1
    got = evaluate(Accelerator(cpu=True), _oracle(tok, labels), task, sets["eval"], labels, 2, tok.pad_token_id)

    y_true = [r["tags"] for r in RECORDS]
    y_pred = [[t if i in _window_words(tok, r["tokens"]) else "O" for i, t in enumerate(r["tags"])] for r in RECORDS]
    assert got["recall"] == pytest.approx(recall_score(y_true, y_pred)) == pytest.approx(3 / 5)
    assert got["precision"] == pytest.approx(precision_score(y_true, y_pred)) == pytest.approx(3 / 4)
    assert got["f1"] == pytest.approx(f1_score(y_true, y_pred))
    assert got["per_type"]["PER"]["support"] == 3 and got["per_type"]["LOC"]["support"] == 2
    assert got["per_type"]["LOC"]["recall"] == pytest.approx(1 / 2)  # Paris, past the cut, is missed
    assert got["token_accuracy"] == pytest.approx(16 / 18)  # Carol and Paris: gold entity, scored as "O"
    assert (got["sentences_truncated"], got["words_truncated"], got["entities_truncated"]) == (2, 3, 2)


def test_cut_words_are_reported_once_per_dataset_build(tmp_path, tiny_bert, caplog, monkeypatch):
    """The warning comes from the built eval set, so a run that loads it from the cache warns as well."""
    monkeypatch.setenv("SCALETUNE_CACHE", str(tmp_path / "cache"))
    cfg, tok = _setup(tmp_path, tiny_bert, cache=True)
    wanted = (
        f"token_cls: 2 of 3 eval sentences exceed data.max_length={MAX_LENGTH} sub-tokens; their 3 words "
        'beyond it are scored as "O", so 2 gold entities that reach past it count as missed (raise '
        "data.max_length to score them)"
    )
    for build in ("encoded", "cached"):
        task = get_task("token_cls")
        if build == "cached":  # nothing is encoded again: the warning is read from the stored eval set
            monkeypatch.setattr(task, "encode", lambda *a: pytest.fail("encoded again, not loaded from the cache"))
        caplog.clear()
        with caplog.at_level("WARNING", logger="scaletune"):
            build_datasets(cfg, task, tok)
        assert [r.getMessage() for r in caplog.records if "token_cls:" in r.getMessage()] == [wanted]


def test_predict_marks_lines_with_cut_words(tmp_path, tiny_bert, caplog, monkeypatch):
    """One tag per input word, cut words "O", and the line says how many were cut; a sentence that ends
    in a word the tokenizer drops (zero-width space) but fits is not marked."""
    import scaletune.infer as infer

    cfg, tok = _setup(tmp_path, tiny_bert)
    labels = ["B-LOC", "B-PER", "I-PER", "O"]
    monkeypatch.setattr(infer, "load_trained", lambda *a: (_oracle(tok, labels), tok, None, labels, tmp_path))
    lines = [json.dumps({"tokens": r["tokens"]}) for r in RECORDS[:2]]
    lines += ["Dave golf Oslo", json.dumps({"tokens": ["Dave", "\u200b"]})]
    out = io.StringIO()
    with caplog.at_level("WARNING", logger="scaletune"):
        infer.run_predict(cfg, None, None, 4, out=out, stdin=io.StringIO("\n".join(lines)))
    got = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [len(g["tags"]) for g in got] == [8, 7, 3, 2]
    assert got[0]["tags"] == ["B-PER"] + ["O"] * 7 and got[0]["truncated_words"] == 2
    assert got[1]["tags"] == ["O"] * 5 + ["B-PER", "O"] and got[1]["truncated_words"] == 1
    assert got[2]["tags"] == ["B-PER", "O", "B-LOC"] and got[3]["tags"] == ["B-PER", "O"]
    assert "truncated_words" not in got[2] and "truncated_words" not in got[3]
    assert (
        f"predict: 2 of 4 input(s) have words beyond data.max_length={MAX_LENGTH} sub-tokens (first: <stdin>:1)"
        in caplog.text
    )


def test_eval_scores_words_with_no_sub_token_in_place_as_predict_tags_them(tmp_path, tiny_bert, monkeypatch):
    """A word the tokenizer drops (zero-width space) in the middle of a sentence is scored in its place, tagged
    from its neighbours: eval's numbers equal seqeval's on the full gold sequences against `predict`'s output.
    An entity with such a word inside is found whole (it used to be split in two, both wrong); a dropped word
    that is an entity of its own is missed."""
    from accelerate import Accelerator
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    import scaletune.infer as infer
    from scaletune.evaluate import evaluate

    zwsp = "\u200b"
    records = [
        # the entity "Dave <zwsp> Oslo" has a word the model never sees: it is bridged
        {"tokens": ["Dave", zwsp, "Oslo", "golf"], "tags": ["B-PER", "I-PER", "I-PER", "O"]},
        # a gold entity made only of a dropped word, before words that fit and one cut by max_length
        {"tokens": ["Alice", zwsp, *FILLER, "Paris"], "tags": ["B-PER", "B-LOC"] + ["O"] * 5 + ["B-LOC"]},
        {"tokens": ["golf", "Bob", zwsp], "tags": ["O", "B-PER", "O"]},
    ]
    path = write_jsonl(tmp_path / "blank.jsonl", records)
    cfg, tok = _setup(tmp_path, tiny_bert, train=str(path), eval=str(path))
    assert tok(zwsp, add_special_tokens=False)["input_ids"] == []  # the premise: it has no sub-token
    task = get_task("token_cls")
    sets = build_datasets(cfg, task, tok)
    labels = sets["labels"]
    table = {}
    for rec in records:
        for word, tag in zip(rec["tokens"], rec["tags"]):
            if word != zwsp:
                table[tok(word, add_special_tokens=False)["input_ids"][0]] = labels.index(tag)
    oracle = Oracle(table, len(labels))
    got = evaluate(Accelerator(cpu=True), oracle, task, sets["eval"], labels, 2, tok.pad_token_id)

    monkeypatch.setattr(infer, "load_trained", lambda *a: (oracle, tok, None, labels, tmp_path))
    out = io.StringIO()
    lines = "\n".join(json.dumps({"tokens": r["tokens"]}) for r in records)
    infer.run_predict(cfg, None, None, 4, out=out, stdin=io.StringIO(lines))
    y_pred = [json.loads(line)["tags"] for line in out.getvalue().splitlines()]
    y_true = [r["tags"] for r in records]
    assert y_pred[0] == ["B-PER", "I-PER", "I-PER", "O"]
    assert y_pred[1][:3] == ["B-PER", "O", "O"] and y_pred[2] == ["O", "B-PER", "O"]
    assert got["precision"] == pytest.approx(precision_score(y_true, y_pred)) == pytest.approx(3 / 3)
    assert got["recall"] == pytest.approx(recall_score(y_true, y_pred)) == pytest.approx(3 / 5)
    assert got["f1"] == pytest.approx(f1_score(y_true, y_pred))
    assert got["token_accuracy"] == pytest.approx(accuracy_score(y_true, y_pred)) == pytest.approx(13 / 15)
    assert got["per_type"]["LOC"]["support"] == 2 and got["per_type"]["LOC"]["recall"] == 0
    assert (got["sentences_truncated"], got["words_truncated"]) == (1, 1)  # the dropped words are not "cut"


def _io(tag: str) -> str:
    return tag[2:] if tag != "O" else tag  # B-PER -> PER: IO tagging


def test_io_tags_are_scored_as_entities_of_their_type(tmp_path, tiny_bert):
    """Tags without B-/I- prefixes (IO tagging) get per-type scores under their own names; seqeval alone
    would read "PER" as prefix "P" + type "ER"."""
    from accelerate import Accelerator

    from scaletune.evaluate import evaluate

    io_records = [{"tokens": r["tokens"], "tags": [_io(t) for t in r["tags"]]} for r in RECORDS[2:]]
    path = write_jsonl(tmp_path / "io.jsonl", io_records)
    cfg, tok = _setup(tmp_path, tiny_bert, train=str(path), eval=str(path), max_length=64)
    task = get_task("token_cls")
    sets = build_datasets(cfg, task, tok)
    labels = sets["labels"]
    assert labels == ["LOC", "O", "PER"]
    table = {tok(w, add_special_tokens=False)["input_ids"][0]: labels.index(t)
             for r in io_records for w, t in zip(r["tokens"], r["tags"])}
    got = evaluate(Accelerator(cpu=True), Oracle(table, len(labels)), task, sets["eval"], labels, 2,
                   tok.pad_token_id)
    assert set(got["per_type"]) == {"PER", "LOC"} and got["f1"] == 1.0
    assert got["per_type"]["PER"]["support"] == 1


def test_integer_tags_need_names_and_map_through_data_labels(tmp_path, tiny_bert):
    """HF datasets' ner_tags are ids: without names every entity score would be 0, so that is refused with
    the fix; with data.labels naming the ids, each id trains as the label of that name."""
    from scaletune.errors import DataError

    names = ["O", "B-PER", "I-PER", "B-LOC"]
    ids = [{"tokens": r["tokens"], "ner_tags": [names.index(t) for t in r["tags"]]} for r in RECORDS]
    path = write_jsonl(tmp_path / "ids.jsonl", ids)
    cfg, tok = _setup(tmp_path, tiny_bert, train=str(path), eval=None)
    with pytest.raises(DataError, match=r"ids.jsonl: the tags in column 'ner_tags' are integer ids \(0, 1, 2, 3\); "
                                        r"entity scores need the tag names: set data.labels"):
        build_datasets(cfg, get_task("token_cls"), tok)
    cfg, tok = _setup(tmp_path, tiny_bert, train=str(path), eval=None, labels=names, max_length=64)
    sets = build_datasets(cfg, get_task("token_cls"), tok)
    assert sets["labels"] == names
    for rec, ex in zip(RECORDS, sets["train"]):
        firsts = [lab for lab in ex["labels"] if lab != -100]
        assert [names[i] for i in firsts] == rec["tags"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["a"], "ner_tags": [7]}])
    cfg, tok = _setup(tmp_path, tiny_bert, train=str(bad), eval=None, labels=names)
    with pytest.raises(DataError, match=r"bad.jsonl:1: tag 7 is not an id of data.labels \(0..3\)"):
        build_datasets(cfg, get_task("token_cls"), tok)
