"""token_cls with data.too_long: split: a sentence longer than data.max_length is cut at word boundaries into
windows, each an example; eval scores each sentence whole (its windows' words stitched), `predict` tags a long
line window by window, and nothing is cut or reported as truncated."""

from __future__ import annotations

import json

import pytest
import torch
from test_ner_truncation import Oracle

from scaletune.config import from_dict
from scaletune.data import build_datasets
from scaletune.model import load_tokenizer
from scaletune.tasks import IGNORE, get_task
from scaletune.tasks.token_cls import tokenise_words, word_windows

from stutil import run_cli, task_config_problems, write_jsonl

MAX_LENGTH = 8  # [CLS] + 6 sub-tokens + [SEP]
FILLER = ["alpha", "bravo", "charlie", "delta", "echo"]
RECORDS = [
    # 8 words of one sub-token: "Bob" ends the first window, "Carol" starts the second
    {"tokens": [*FILLER, "Bob", "Carol", "golf"], "tags": ["O"] * 5 + ["B-PER", "I-PER", "O"]},
    # "Erin" (4 sub-tokens) does not fit beside the first 6 words; the oracle gets it wrong ("O")
    {"tokens": [*FILLER, "Dave", "Erin", "Paris"], "tags": ["O"] * 5 + ["B-PER", "I-PER", "B-LOC"]},
    {"tokens": ["Dave", "golf", "Oslo"], "tags": ["B-PER", "O", "B-LOC"]},
]
LONG_WORD = "supercalifragilistic"  # 16 sub-tokens of the tiny WordPiece vocabulary: more than a window holds


def _config(tmp_path, tiny_bert, records, **data):
    path = write_jsonl(tmp_path / "ner.jsonl", records)
    cfg = from_dict({"task": "token_cls", "model": {"name_or_path": str(tiny_bert), "dtype": "float32"},
                     "data": {"train": str(path), "eval": str(path), "max_length": MAX_LENGTH, "cache": False,
                              "too_long": "split", **data},
                     "train": {"mixed_precision": "no"}, "output_dir": str(tmp_path / "out")})
    return cfg, load_tokenizer(cfg)


def _sub_tokens(tok, word: str) -> int:
    return len(tok(word, add_special_tokens=False)["input_ids"])


def _test_windows(tok, words: list[str]) -> list[list[str]]:
    """The windows, worked out here from each word's sub-token count: greedy, at most MAX_LENGTH - 2 a window."""
    out: list[list[str]] = [[]]
    used = 0
    for word in words:
        size = _sub_tokens(tok, word)
        if used and used + size > MAX_LENGTH - 2:
            out.append([])
            used = 0
        out[-1].append(word)
        used += size
    return out


def test_windows_hold_each_word_whole_once_within_max_length(tmp_path, tiny_bert):
    """Each window is at most max_length ids; read in order, the windows' ids and labels (special tokens left
    out) are the unsplit sentence's, so every word keeps its ids and its label place, in exactly one window. A
    word longer than a window is one of its own with its first sub-tokens, labelled on the first."""
    words = ["Alice", "Anglo", *FILLER, "Dana", "Bob", "\u200b", "Carol", "Erin", "golf", "Paris"]
    tags = ["B-PER", "B-LOC", "O", "O", "O", "O", "O", "B-PER", "B-PER", "I-PER", "I-PER", "I-PER", "O", "B-LOC"]
    records = [{"tokens": words, "tags": tags},
               {"tokens": ["Oslo", LONG_WORD, "golf"], "tags": ["B-LOC", "B-PER", "O"]},
               {"tokens": ["Dave", "golf"], "tags": ["B-PER", "O"]}]
    cfg, tok = _config(tmp_path, tiny_bert, records)
    assert _sub_tokens(tok, LONG_WORD) > MAX_LENGTH and _sub_tokens(tok, "Erin") > 1
    sets = build_datasets(cfg, get_task("token_cls"), tok)
    labels = sets["labels"]
    assert sets["stats"]["too_long"] == {"train": 2, "eval": 2}
    assert sets["stats"]["truncated"] == {"train": 1, "eval": 1}  # (the long word's window)
    ev = sets["eval"]
    assert all(len(ids) <= MAX_LENGTH for ids in ev["input_ids"])
    assert ev["input_ids"] == sets["train"]["input_ids"]
    starts = [i for i, k in enumerate(ev["window"]) if k == 0]
    assert len(starts) == 3 and len(ev) > 4

    enc, (word_ids,) = tokenise_words(tok, [words], None)
    whole = enc["input_ids"][0]
    wanted_labels = [IGNORE if w is None or (i and word_ids[i - 1] == w) else labels.index(tags[w])
                     for i, w in enumerate(word_ids)]
    first = ev[starts[0]:starts[1]]
    assert [t for ids in first["input_ids"] for t in ids[1:-1]] == whole[1:-1]
    assert [t for labs in first["labels"] for t in labs[1:-1]] == wanted_labels[1:-1]
    assert {(ids[0], ids[-1]) for ids in first["input_ids"]} == {(whole[0], whole[-1])}  # [CLS] ... [SEP] each
    # each word in exactly one window, windows consecutive (the zero-width space, no sub-token, in one too)
    windows = word_windows(tok, words, MAX_LENGTH)
    assert [(a, b) for a, b, *_ in windows] == list(zip([0] + [b for _, b, *_ in windows[:-1]],
                                                        [b for _, b, *_ in windows]))
    assert windows[0][0] == 0 and windows[-1][1] == len(words)
    assert [sum(1 for x in labs if x != IGNORE) for labs in first["labels"]] == [
        sum(1 for w in range(a, b) if words[w] != "\u200b") for a, b, *_ in windows]
    assert [[words[w] for w in range(a, b)] for a, b, *_ in windows] == _test_windows(tok, words)

    long_one = ev[starts[1]:starts[2]]
    long_ids = tok(LONG_WORD, add_special_tokens=False)["input_ids"]
    assert long_one["input_ids"][1] == [whole[0], *long_ids[:MAX_LENGTH - 2], whole[-1]]
    assert long_one["labels"][1] == [IGNORE, labels.index("B-PER")] + [IGNORE] * (MAX_LENGTH - 2)
    assert len(long_one["input_ids"]) == 3  # Oslo | the long word | golf
    assert ev["cut_tags"] == [[]] * len(ev)


def _reference(model, tok, records) -> tuple[list[list[str]], dict]:
    """Each sentence's predicted tags: its windows (worked out here) given to the model as sentences of their
    own, each word tagged by its first sub-token, the windows' tags joined."""
    labels = model.labels
    out = []
    for rec in records:
        tags: list[str] = []
        for words in _test_windows(tok, rec["tokens"]):
            enc = tok(words, is_split_into_words=True, return_tensors="pt")
            pred = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.argmax(-1)[0]
            ids = enc.word_ids()
            tags += [labels[pred[ids.index(w)]] for w in range(len(words))]
        out.append(tags)
    return out


class _Random(torch.nn.Module):
    """The tiny BERT with a fresh token-classification head: arbitrary but fixed predictions."""

    def __init__(self, tiny_bert, labels):
        super().__init__()
        from transformers import AutoModelForTokenClassification

        torch.manual_seed(0)
        self.inner = AutoModelForTokenClassification.from_pretrained(str(tiny_bert), num_labels=len(labels))
        self.inner.eval()
        self.device = torch.device("cpu")

    def forward(self, **kw):
        return self.inner(**kw)


@pytest.mark.parametrize("which", ["oracle", "random"])
def test_eval_scores_each_sentence_whole_from_its_windows(tmp_path, tiny_bert, which):
    """Eval's metrics equal seqeval's on each sentence's stitched window predictions (worked out here from the
    model's outputs on each window): "Bob | Carol" across a boundary is one entity, found; "Dave | Erin" with
    Erin wrong is one entity missed (scored per window, both would count as found). Nothing is truncated."""
    from accelerate import Accelerator
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    from scaletune.evaluate import evaluate

    cfg, tok = _config(tmp_path, tiny_bert, RECORDS)
    task = get_task("token_cls")
    sets = build_datasets(cfg, task, tok)
    labels = sets["labels"]
    assert [len(_test_windows(tok, r["tokens"])) for r in RECORDS] == [2, 2, 1]
    if which == "oracle":
        table = {tok(w, add_special_tokens=False)["input_ids"][0]: labels.index("O" if w == "Erin" else t)
                 for r in RECORDS for w, t in zip(r["tokens"], r["tags"])}
        model = Oracle(table, len(labels))
    else:
        model = _Random(tiny_bert, labels)
    model.labels = labels
    with torch.no_grad():
        y_pred = _reference(model, tok, RECORDS)
    y_true = [r["tags"] for r in RECORDS]
    # micro-batches of 2, longest first: a sentence's windows are scored in different batches
    got = evaluate(Accelerator(cpu=True), model, task, sets["eval"], labels, 2, tok.pad_token_id)
    assert got["precision"] == pytest.approx(precision_score(y_true, y_pred, zero_division=0))
    assert got["recall"] == pytest.approx(recall_score(y_true, y_pred, zero_division=0))
    assert got["f1"] == pytest.approx(f1_score(y_true, y_pred, zero_division=0))
    assert got["token_accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    assert {k: v["support"] for k, v in got["per_type"].items()} == {
        k: v["support"] for k, v in report.items() if "avg" not in k}
    assert (got["sentences_truncated"], got["words_truncated"], got["entities_truncated"]) == (0, 0, 0)
    if which == "oracle":
        assert y_pred[0] == RECORDS[0]["tags"] and y_pred[1][5:] == ["B-PER", "O", "B-LOC"]
        assert (got["precision"], got["recall"]) == (pytest.approx(4 / 5), pytest.approx(4 / 5))
        assert got["per_type"]["PER"]["support"] == 3


def test_split_trains_evaluates_and_predicts_whole_sentences(make_config, tmp_path, tiny_bert, capsys):
    """A run with split: trained and evaluated; `eval --predictions` writes one line per sentence with no
    truncated_words, and its metrics are seqeval's on those lines; `predict` tags a long line as the stitch of
    its windows given as lines of their own, with no truncated_words."""
    from seqeval.metrics import f1_score

    path = make_config("token_cls", data={"too_long": "split", "max_length": MAX_LENGTH},
                       train={"max_steps": 2, "eval_every": 2})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["too_long_examples"]["train"] > 0 and info["too_long_examples"]["eval"] > 0
    evalf = tmp_path / "data" / "eval.jsonl"
    records = [json.loads(line) for line in evalf.read_text().splitlines()]
    code, out, err = run_cli(["eval", path, "--predictions", tmp_path / "p.jsonl"], capsys)
    assert code == 0, err
    metrics = json.loads(out[out.index("{"):])
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [ln["tokens"] for ln in lines] == [r["tokens"] for r in records]
    assert [ln["tags"] for ln in lines] == [r["tags"] for r in records]
    assert not any("truncated_words" in ln for ln in lines) and metrics["sentences_truncated"] == 0
    assert metrics["f1"] == pytest.approx(f1_score([ln["tags"] for ln in lines], [ln["predicted"] for ln in lines],
                                                   zero_division=0))

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    long = [*FILLER, "Bob", "Carol", "Erin", "golf", LONG_WORD, "Paris", "Oslo"]
    parts = _test_windows(tok, long)
    assert len(parts) >= 3
    inp = write_jsonl(tmp_path / "in.jsonl", [{"tokens": long}] + [{"tokens": p} for p in parts])
    code, out, err = run_cli(["predict", path, "--input", inp], capsys)
    assert code == 0, err
    got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert "truncated_words" not in got[0] and len(got[0]["tags"]) == len(long)
    assert got[0]["tags"] == [t for line in got[1:] for t in line["tags"]]
    assert "beyond data.max_length" not in err


def test_too_long_split_is_for_causal_lm_and_token_cls():
    assert task_config_problems("token_cls", data={"too_long": "split"}) == []
    assert any("data.too_long: drop is for task causal_lm" in p
               for p in task_config_problems("token_cls", data={"too_long": "drop"}))
    assert any("data.too_long: split is for tasks causal_lm (plain text) and token_cls" in p
               for p in task_config_problems("seq_cls", data={"too_long": "split"}))


def test_a_sentence_past_the_tokenizers_model_max_length_is_no_indexing_error(tiny_bert):
    """A sentence is tokenised whole before it is cut into windows: one longer than the tokenizer's
    model_max_length (BERT's 512, a document-level NER sentence) is no sequence that will "result in indexing
    errors", as transformers warned on every split run that met one; its windows are within max_length."""
    import logging

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_bert), model_max_length=MAX_LENGTH)
    heard: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: heard.append(record.getMessage())
    lib = logging.getLogger("transformers")  # (it does not pass records on to the root logger, caplog's)
    lib.addHandler(handler)
    try:
        windows = word_windows(tok, FILLER * 4, MAX_LENGTH)
        said = list(heard)
        tok(FILLER * 4, is_split_into_words=True)  # (what transformers says of a sequence that long, alone)
    finally:
        lib.removeHandler(handler)
    assert len(windows) == 4 and all(len(ids) <= MAX_LENGTH for _, _, ids, _, _ in windows)
    assert said == [] and len(heard) == 1 and "indexing errors" in heard[0], heard


def test_predict_tags_a_long_sentence_as_its_windows(tmp_path, tiny_bert):
    """`predict`'s tagging (labelling.tag with split) of long sentences, in one batch with a short one, equals the
    model's tags of each window given as a sentence of its own, joined, with a head whose tags vary (the trained
    run above tags every word "O", so its predict check alone would pass whatever the order of the windows)."""
    from scaletune.labelling import tag

    labels = ["B-LOC", "B-PER", "I-PER", "O"]
    model = _Random(tiny_bert, labels)
    model.labels = labels
    _, tok = _config(tmp_path, tiny_bert, RECORDS)
    records = [{"tokens": [*FILLER, "Bob", "Carol", "Erin", "golf", LONG_WORD, "Paris", "Oslo", *FILLER]},
               {"tokens": ["Dave", "golf"]}, {"tokens": [*reversed(FILLER), "Dave", "Erin", "Paris"]}]
    with torch.no_grad():
        want = _reference(model, tok, records)
        got = tag(model, tok, labels, MAX_LENGTH, [r["tokens"] for r in records], split=True)
    assert [len(_test_windows(tok, r["tokens"])) for r in records] == [5, 1, 2]
    assert [line["tags"] for line in got] == want
    assert len(set(want[0])) > 2 and not any("truncated_words" in line for line in got)
