"""`scaletune predict`: input lines are read as training read its data (columns, text pairs, tables,
CoNLL, raw text), refused by file:line, batched without changing an answer, and labelled by name."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from scaletune.cli import main

from stutil import assert_clean_error, cls_records, run_cli, write_jsonl


def test_predict_input_nested_too_deeply_is_named(capsys, make_config, tmp_path, monkeypatch):
    """A line of 100000 nested objects (`{"a": {"a": ...`) used to end in a RecursionError traceback; it is
    named by file and line."""
    import scaletune.infer as infer

    path = make_config("token_cls")
    # no adapter is needed: the inputs are read (and refused) before the model is used
    monkeypatch.setattr(infer, "load_trained", lambda *a: (None, None, None, ["O"], tmp_path))
    inp = tmp_path / "inputs.jsonl"
    inp.write_text('{"tokens": ["fine"]}\n' + '{"a": ' * 100_000 + "\n")
    code, out, err = run_cli(["predict", path, "--input", inp], capsys)
    assert_clean_error(code, err, f"{inp}:2: invalid JSON (nested too deeply)")
    assert out == ""


class Recorder(torch.nn.Module):
    """A stand-in classifier: records the input ids of every line; its logits are all zero (label 0)."""

    device = torch.device("cpu")

    def __init__(self, n_labels: int, per_token: bool):
        from types import SimpleNamespace

        super().__init__()
        self.n_labels, self.per_token, self.seen = n_labels, per_token, []
        self.config = SimpleNamespace(problem_type=None)  # (single-label, as predict reads a real model's config)

    def forward(self, input_ids, attention_mask=None, **_):
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        self.seen += [row[keep.bool()].tolist() for row, keep in zip(input_ids, mask)]  # each line, unpadded
        shape = (*input_ids.shape, self.n_labels) if self.per_token else (input_ids.shape[0], self.n_labels)
        return SimpleNamespace(logits=torch.zeros(shape))


def _fake_trained(monkeypatch, task_name: str, tokenizer_dir, task_state: dict | None, labels: list[str]):
    """load_trained -> a Recorder, the tiny model's tokenizer, and the task with the state an adapter's
    scaletune.json would give it (None: an adapter without one; the run config's data.* keys are used)."""
    from transformers import AutoTokenizer

    import scaletune.infer as infer
    from scaletune.tasks import get_task

    task = get_task(task_name)
    if task_state is not None:
        task.setup_cached({"task_state": task_state})
    model = Recorder(len(labels), per_token=task_name == "token_cls")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    monkeypatch.setattr(infer, "load_trained", lambda *a: (model, tok, task, labels, Path(tokenizer_dir)))
    return model, tok


def _predict(path, capsys, lines: list, *args):
    inp = Path(path).parent / "inputs.jsonl"
    inp.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    code, out, err = run_cli(["predict", path, "--input", inp, *args], capsys)
    return code, [json.loads(line) for line in out.splitlines()], err, inp


@pytest.mark.parametrize("state", [{"text": "premise", "pair": "hypothesis", "label": "label"}, None],
                         ids=["adapter-meta", "run-config"])
def test_predict_reads_the_trained_text_pair_columns(capsys, make_config, tiny_bert, monkeypatch, state):
    """A model trained on data.text_column: premise + data.text_pair_column: hypothesis gets both texts of a
    line (the hypothesis used to be dropped: only a key named `text_pair` was read), and the output echoes
    the pair; a line without the pair, or a plain-text line, is refused with its file:line."""
    path = make_config("seq_cls", data={"text_column": "premise", "text_pair_column": "hypothesis"})
    model, tok = _fake_trained(monkeypatch, "seq_cls", tiny_bert, state, ["neg", "pos"])
    lines = [{"premise": "alpha bravo", "hypothesis": "charlie"}, {"premise": "alpha bravo", "hypothesis": "delta"}]
    code, got, err, inp = _predict(path, capsys, lines)
    assert code == 0, err
    assert model.seen == [tok("alpha bravo", "charlie")["input_ids"], tok("alpha bravo", "delta")["input_ids"]]
    assert [(g["text"], g["text_pair"]) for g in got] == [("alpha bravo", "charlie"), ("alpha bravo", "delta")]
    code, _, err, inp = _predict(path, capsys, [lines[0], {"premise": "alpha bravo"}])
    assert_clean_error(code, err, f"{inp}:2: ", "'hypothesis'", "found keys ['premise']")
    code, _, err, inp = _predict(path, capsys, [lines[0], "alpha bravo charlie"])
    assert_clean_error(code, err, f"{inp}:2: a plain-text line, but the model classifies text pairs",
                       "'premise'", "'hypothesis'")


@pytest.mark.parametrize("state", [{"text": "text", "pair": None, "label": "label"}, None],
                         ids=["adapter-meta", "run-config"])
def test_predict_refuses_a_text_pair_for_a_single_text_classifier(capsys, make_config, tiny_bert, monkeypatch, state):
    """A line with `text_pair` for a classifier trained without data.text_pair_column would be scored on its
    `text` alone, the pair dropped without a word: it is refused naming its file:line, before any prediction."""
    path = make_config("seq_cls")
    model, _ = _fake_trained(monkeypatch, "seq_cls", tiny_bert, state, ["neg", "pos"])
    code, got, err, inp = _predict(path, capsys, ["alpha bravo", {"text": "alpha bravo", "text_pair": "charlie"}])
    assert_clean_error(code, err, f"{inp}:2: 'text_pair' given, but the model classifies single texts",
                       "data.text_pair_column")
    assert got == [] and model.seen == []
    code, got, err, _ = _predict(path, capsys, ["alpha bravo", {"text": "alpha bravo"}])  # without it: predicted
    assert code == 0 and len(got) == 2, err


def test_predict_reads_another_usual_text_column_where_training_detected_its_own(capsys, make_config, tiny_bert,
                                                                                monkeypatch):
    """Trained on a `text` file with no data.text_column (training takes the first usual name it finds), the
    classifier labels SST-2's `sentence` lines (they were refused: "expected key 'text'"), preferring the trained
    column where a line has both; a data.text_column named in the config stays the only column read."""
    state = {"text": "text", "pair": None, "label": "label"}
    model, tok = _fake_trained(monkeypatch, "seq_cls", tiny_bert, state, ["neg", "pos"])
    path = make_config("seq_cls")
    code, got, err, _ = _predict(path, capsys, [{"sentence": "alpha bravo"}, {"review": "x", "text": "charlie"}])
    assert code == 0, err
    assert model.seen == [tok("alpha bravo")["input_ids"], tok("charlie")["input_ids"]]
    path = make_config("seq_cls", data={"text_column": "text"})
    code, _, err, inp = _predict(path, capsys, [{"sentence": "alpha bravo"}])
    assert_clean_error(code, err, f"{inp}:1: no text to classify: expected key 'text'")


def test_predict_reads_the_pair_of_a_trained_adapter(capsys, make_config, tmp_path):
    """End to end: the adapter trained on premise/hypothesis scores a premise differently with different
    hypotheses (every line used to get the same score)."""
    rows = [{"premise": r["text"], "hypothesis": h, "label": r["label"]}
            for r, h in zip(cls_records(32), ["charlie delta", "echo golf"] * 16)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    path = make_config("seq_cls", data={"train": str(data), "eval": str(data), "text_column": "premise",
                                        "text_pair_column": "hypothesis"}, train={"max_steps": 2})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    lines = [{"premise": "bravo kilo", "hypothesis": h} for h in ("lima mike", "alpha", "oscar papa quebec")]
    code, got, err, _ = _predict(path, capsys, lines)
    assert code == 0, err
    assert [g["text_pair"] for g in got] == ["lima mike", "alpha", "oscar papa quebec"]
    assert len({g["score"] for g in got}) == 3, got


@pytest.mark.parametrize("task,data,line,fragments", [
    ("seq_cls", {"text_column": "text"}, {"review": "alpha bravo"},
     ["no text to classify: expected key 'text'; found keys ['review']"]),
    ("seq_cls", {}, {}, ["no text to classify", "found no keys"]),
    ("seq_cls", {}, {"text": ""}, ["'text' is empty"]),
    ("seq_cls", {}, {"text": 5}, ["'text' must be a string, got int"]),
    ("seq_cls", {"text_column": "sentence"}, {"review": "a"}, ["'sentence' (or 'text')", "found keys ['review']"]),
    ("token_cls", {"tokens_column": "words"}, {"tokens_x": ["Alice"]}, ["'words' (or 'tokens')", "['tokens_x']"]),
    ("token_cls", {}, {"tokens": []}, ["'tokens' is empty"]),
    ("token_cls", {}, {"text": ""}, ["'text' has no words"]),
    ("token_cls", {}, {"text": "   "}, ["'text' has no words"]),
    ("token_cls", {}, {"tokens": ["Alice", ""]}, ["'tokens'[1] is an empty string"]),
    ("token_cls", {}, {"tokens": "Alice went"}, ["'tokens' must be a list of strings"]),
    ("causal_lm", {}, {"question": "what"}, ["nothing to prompt with", "'instruction'", "found keys ['question']"]),
    ("causal_lm", {}, {"prompt": 5}, ["'prompt' must be a string or a non-empty list of messages, got int"]),
    ("causal_lm", {}, {"text": ""}, ["the prompt is empty"]),
    ("causal_lm", {}, {"instruction": " "}, ["the prompt is empty"]),
])
def test_predict_refuses_a_line_without_usable_input(capsys, make_config, tiny_bert, tiny_llama, monkeypatch,
                                                      task, data, line, fragments):
    """A line whose expected key is missing, empty or of the wrong type is refused naming its file:line, the
    keys expected and those found (it used to be predicted on an empty input, exit 0); nothing is written."""
    path = make_config(task, data=data)
    labels = ["neg", "pos"] if task == "seq_cls" else ["B-PER", "O"]
    _fake_trained(monkeypatch, task, tiny_llama if task == "causal_lm" else tiny_bert, None, labels)
    good = {"seq_cls": "alpha bravo", "token_cls": "Alice went", "causal_lm": "Reverse alpha bravo"}[task]
    code, got, err, inp = _predict(path, capsys, [good, line], "--max-new-tokens", "2")
    assert_clean_error(code, err, f"{inp}:2: ", *fragments)
    assert got == []  # every line is checked before the first prediction is written


def test_predict_reads_the_trained_tokens_column(capsys, make_config, tiny_bert, monkeypatch):
    """token_cls trained with data.tokens_column: words reads `words` (it used to print empty tokens and tags)."""
    path = make_config("token_cls", data={"tokens_column": "words"})
    for state in ({"tokens": "words", "tags": "tags", "id_names": None}, None):
        model, tok = _fake_trained(monkeypatch, "token_cls", tiny_bert, state, ["B-PER", "O"])
        code, got, err, _ = _predict(path, capsys, [{"words": ["Alice", "went", "to", "Paris"]}])
        assert code == 0, err
        assert got == [{"line": 1, "tokens": ["Alice", "went", "to", "Paris"], "tags": ["B-PER"] * 4,
                        "entities": [{"text": w, "type": "PER", "start": i, "end": i + 1}
                                     for i, w in enumerate(["Alice", "went", "to", "Paris"])]}]


def test_predicted_tags_are_grouped_into_entities_as_the_eval_scores_them():
    """A tagger's user wants the entities, not only BIO tags per word: grouped as seqeval groups them for the
    metrics (I- after O starts one; IO tags: a run of one type is one entity)."""
    from scaletune.tasks.token_cls import entities

    words = ["Angela", "Merkel", "met", "Emmanuel", "Macron", "in", "Paris", "."]
    bio = ["B-PER", "I-PER", "O", "B-PER", "I-PER", "O", "B-LOC", "O"]
    want = [{"text": "Angela Merkel", "type": "PER", "start": 0, "end": 2},
            {"text": "Emmanuel Macron", "type": "PER", "start": 3, "end": 5},
            {"text": "Paris", "type": "LOC", "start": 6, "end": 7}]
    assert entities(words, bio) == want
    assert entities(words, ["PER", "PER", "O", "PER", "PER", "O", "LOC", "O"])[2] == want[2]
    assert entities(["a", "b"], ["I-ORG", "I-ORG"]) == [{"text": "a b", "type": "ORG", "start": 0, "end": 2}]
    assert entities(["a", "b"], ["O", "O"]) == []


def test_predict_output_names_its_input_line(capsys, make_config, tiny_bert, monkeypatch):
    """Blank input lines are skipped; each output object carries the number of the line it answers."""
    path = make_config("seq_cls")
    _fake_trained(monkeypatch, "seq_cls", tiny_bert, {"text": "text", "pair": None, "label": "label"}, ["a", "b"])
    code, got, err, _ = _predict(path, capsys, ["", "alpha bravo", "  ", "", {"text": "charlie"}, "delta"])
    assert code == 0, err
    assert [(g["line"], g["text"]) for g in got] == [(2, "alpha bravo"), (5, "charlie"), (6, "delta")]
    assert list(got[0]) == ["line", "text", "label", "score"]


def test_predict_from_stdin_names_it(capsys, make_config, tiny_bert, monkeypatch):
    """Errors in input read from stdin (`--input -`, the default) say <stdin>:N (they said -:N)."""
    import io

    path = make_config("seq_cls")
    _fake_trained(monkeypatch, "seq_cls", tiny_bert, None, ["a", "b"])
    for args in (["--input", "-"], []):
        monkeypatch.setattr(sys, "stdin", io.StringIO('alpha\n{"text": 5}\n'))
        code, _, err = run_cli(["predict", path, *args], capsys)
        assert_clean_error(code, err, "<stdin>:2: 'text' must be a string")


def test_predict_plain_line_starting_with_a_brace_says_how_to_pass_it(capsys, make_config, tiny_bert, monkeypatch):
    """A plain-text line that starts with '{' is read as JSON; when it is not, the error says how to give
    such a text (as {"text": ...}), and that form predicts."""
    path = make_config("seq_cls")
    _fake_trained(monkeypatch, "seq_cls", tiny_bert, None, ["a", "b"])
    code, _, err, inp = _predict(path, capsys, ["alpha", "{curly} bravo"])
    assert_clean_error(code, err, f"{inp}:2: invalid JSON", 'plain text that starts with "{"', '{"text": "..."}')
    code, got, err, _ = _predict(path, capsys, ["alpha", {"text": "{curly} bravo"}])
    assert code == 0 and got[1]["text"] == "{curly} bravo", err


@pytest.mark.parametrize("task,base", [("seq_cls", "bert"), ("seq_cls", "llama"), ("token_cls", "bert")])
def test_predict_in_batches_labels_as_one_line_at_a_time(capsys, make_config, tiny_llama, monkeypatch, task, base):
    """Lines are labelled 32 per forward (padded on the right; a decoder classifies by its last real
    token), each window of lines batched by length: the same labels, scores and tags as one line per forward,
    across batch and window boundaries, with lines of very different lengths, and the lines in input order."""
    import random

    import scaletune.infer as infer

    from stutil import cls_records, ner_records

    extra = {"model": {"name_or_path": str(tiny_llama)}} if base == "llama" else {}
    path = make_config(task, train={"max_steps": 2}, **extra)
    assert run_cli(["train", path], capsys)[0] == 0
    rng = random.Random(0)
    if task == "seq_cls":
        lines = [{"text": " ".join([r["text"]] * rng.randint(1, 6))} for r in cls_records(40, seed=3)]
    else:
        lines = [{"tokens": r["tokens"] * rng.randint(1, 6)} for r in ner_records(40, seed=3)]
    monkeypatch.setattr(infer, "PREDICT_BATCH", 8)
    monkeypatch.setattr(infer, "PREDICT_WINDOW", 2)  # windows of 16 lines: 16, 16 and 8, each batched by length
    sizes, answer = [], infer._answer
    monkeypatch.setattr(infer, "_answer", lambda cfg, model, tok, labels, batch, *a:
                        sizes.append([infer._size(x) for x in batch]) or answer(cfg, model, tok, labels, batch, *a))
    code, batched, err, _ = _predict(path, capsys, lines)
    assert code == 0, err
    assert [len(b) for b in sizes] == [8, 8, 8, 8, 8]
    for first, second in (sizes[0:2], sizes[2:4]):  # (a batch of real sentences in input order was half padding)
        assert min(first) >= max(second)
    monkeypatch.setattr(infer, "PREDICT_BATCH", 1)
    code, single, err, _ = _predict(path, capsys, lines)
    assert code == 0, err
    assert [g["line"] for g in batched] == list(range(1, 41))
    for b, s in zip(batched, single):
        assert {k: v for k, v in b.items() if k != "score"} == {k: v for k, v in s.items() if k != "score"}
        if task == "seq_cls":
            assert b["score"] == pytest.approx(s["score"], abs=1e-5)


def test_data_labels_name_integer_labels_only_when_they_are_names():
    """data.labels names integer labels by id only where it lists names: integer labels given integer
    data.labels (`[1, 0]`, an order of the classes) are their own names, not ids into that list (label 0 is
    class "0", not "1"); labels that are names already are not ids; HF datasets' -1 (unlabelled) is an id."""
    from scaletune.tasks.base import id_names_for

    assert id_names_for(["0", "1"], [1, 0]) is None and id_names_for(["0", "1"], ["1", "0"]) is None
    assert id_names_for(["0", "1"], ["negative", "positive"]) == ["negative", "positive"]
    assert id_names_for(["-1", "0", "1"], ["negative", "positive"]) == ["negative", "positive"]
    assert id_names_for(["negative", "positive"], ["negative", "positive"]) is None
    assert id_names_for(["0", "1"], None) is None


def test_integer_class_ids_are_named_by_data_labels(make_config, tmp_path, capsys):
    """SST-2 and other HF ClassLabel data hold 0/1: data.labels [negative, positive] names them by id, as it
    names token_cls' integer ner_tags (it was refused: "label 0 is not in the label set"); eval on a file of ids
    and predict speak the names."""
    import json

    from stutil import cls_records, write_jsonl

    ids = [{"text": r["text"], "label": int(r["label"] == "pos")} for r in cls_records(64)]
    train = write_jsonl(tmp_path / "ids.jsonl", ids)
    evalf = write_jsonl(tmp_path / "ids_eval.jsonl", ids[:16])
    path = make_config("seq_cls", data={"train": str(train), "eval": str(evalf), "labels": ["negative", "positive"]},
                       train={"max_steps": 6, "learning_rate": 0.05})
    assert main(["train", str(path)]) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "run" / "adapter" / "scaletune.json").read_text())
    assert meta["labels"] == ["negative", "positive"]
    capsys.readouterr()
    assert main(["eval", str(path), "--data", str(evalf)]) == 0
    out = capsys.readouterr().out
    assert "negative" in out and "positive" in out, out
    code, got, err, _ = _predict(path, capsys, ["alpha bravo", "charlie delta"])
    assert code == 0, err
    assert {g["label"] for g in got} <= {"negative", "positive"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a b", "label": 2}])
    assert main(["eval", str(path), "--data", str(bad)]) == 2
    assert "label 2 is not an id of data.labels (0..1)" in capsys.readouterr().err
    # HF's -1 marks an unlabelled row (GLUE's test splits): that row is named, not a valid 0 blamed
    unlabelled = write_jsonl(tmp_path / "unlabelled.jsonl", [{"text": "a b", "label": 0}, {"text": "c", "label": -1}])
    assert main(["eval", str(path), "--data", str(unlabelled)]) == 2
    assert "unlabelled.jsonl:2: label -1 is not an id of data.labels (0..1)" in capsys.readouterr().err


def test_seq_cls_data_labels_listing_two_spellings_keeps_them_apart():
    """Labels that differ only in spaces are refused unless data.labels lists both (the refusal's own hint);
    that held until the label column was read for id naming with data.labels given too."""
    from types import SimpleNamespace as NS

    from scaletune.tasks.seq_cls import SeqCls

    data = NS(text_column=None, text_pair_column=None, label_column=None, label_separator=None, labels=["neg", "neg ", "pos"])
    recs = [{"text": "a", "label": "neg"}, {"text": "b", "label": "neg "}, {"text": "c", "label": "pos"}]
    assert SeqCls().setup(recs, NS(data=data), "f") == ["neg", "neg ", "pos"]


def test_predict_reads_table_and_conll_files_as_training_reads_them(capsys, make_config, tiny_bert, monkeypatch):
    """A TSV (header, label column) or a CoNLL file given to predict was read line by line as text: the header
    was labelled, each row's label stayed glued to its text, and a CoNLL file's tags and -DOCSTART- were tagged
    as words. They are read as training reads them; each output names the line its record starts on."""
    path = make_config("seq_cls")
    _fake_trained(monkeypatch, "seq_cls", tiny_bert, {"text": "sentence", "pair": None, "label": "label"},
                  ["neg", "pos"])
    tsv = Path(path).parent / "dev.tsv"
    tsv.write_text("sentence\tlabel\nalpha bravo\t1\ncharlie delta\t0\n")
    code, out, err = run_cli(["predict", path, "--input", tsv], capsys)
    assert code == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert [(g["line"], g["text"]) for g in got] == [(2, "alpha bravo"), (3, "charlie delta")]
    path = make_config("token_cls")
    _fake_trained(monkeypatch, "token_cls", tiny_bert, {"tokens": "tokens", "tags": "tags", "id_names": None},
                  ["B-PER", "O"])
    conll = Path(path).parent / "test.conll"
    conll.write_text("-DOCSTART- O\n\nAlice B-PER\nwent O\n\nBob B-PER\n")
    code, out, err = run_cli(["predict", path, "--input", conll], capsys)
    assert code == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert [(g["line"], g["tokens"]) for g in got] == [(3, ["Alice", "went"]), (6, ["Bob"])]


def test_predict_says_which_classified_lines_max_length_cut(capsys, make_config, tiny_bert, monkeypatch, caplog):
    """A text past data.max_length was labelled by its first tokens without a word (NER predict said so per line
    and in a warning; seq_cls did not): the line says "truncated": true and one warning counts them."""
    path = make_config("seq_cls", data={"max_length": 8})
    _fake_trained(monkeypatch, "seq_cls", tiny_bert, {"text": "text", "pair": None, "label": "label"}, ["neg", "pos"])
    with caplog.at_level("WARNING", logger="scaletune"):
        code, got, err, inp = _predict(path, capsys, ["alpha bravo", " ".join(["charlie"] * 30)])
    assert code == 0, err
    assert "truncated" not in got[0] and got[1]["truncated"] is True
    assert f"1 of 2 input(s) are longer than data.max_length=8 tokens (first: {inp}:2)" in caplog.text


@pytest.mark.parametrize("line", ["John Smith lives in Paris, France.", {"text": "John Smith lives in Paris, France."}],
                         ids=["plain", "json"])
def test_predict_splits_raw_text_like_ner_data_with_character_offsets(capsys, make_config, tiny_bert, monkeypatch,
                                                                       line):
    """Raw text is tagged as words split like CoNLL data ("Paris" ",", not "Paris,", which the tagger never
    saw), and each entity says where it is in the text: text[char_start:char_end] is its "text"."""
    text = "John Smith lives in Paris, France."
    words = ["John", "Smith", "lives", "in", "Paris", ",", "France", "."]
    path = make_config("token_cls")
    _fake_trained(monkeypatch, "token_cls", tiny_bert, None, ["B-PER", "O"])  # every word its own entity
    code, got, err, _ = _predict(path, capsys, [line])
    assert code == 0, err
    assert (got[0]["text"], got[0]["tokens"]) == (text, words)
    ents = got[0]["entities"]
    assert [e["text"] for e in ents] == words
    assert all(text[e["char_start"]:e["char_end"]] == e["text"] for e in ents)
    assert (ents[4]["char_start"], ents[4]["char_end"], ents[5]["char_start"]) == (20, 25, 25)
    _fake_trained(monkeypatch, "token_cls", tiny_bert, None, ["I-PER", "O"])  # the whole line one entity
    code, got, err, _ = _predict(path, capsys, [line])
    assert code == 0, err
    assert got[0]["entities"] == [{"text": text, "type": "PER", "start": 0, "end": 8, "char_start": 0,
                                   "char_end": len(text)}]  # as written, not "Paris , France ."


def test_a_character_level_chinese_tagger_tags_raw_text_one_character_a_word(capsys, make_config, tmp_path,
                                                                              caplog):
    """Trained on Chinese one character a word (as MSRA and Weibo NER are), the adapter records it, and raw
    text given to predict is split so (before, a run of characters was one word the tagger never saw); a tagger
    trained on segmented Chinese words is warned of instead."""
    chars = [{"tokens": list("我在北京工作"), "tags": ["O", "O", "B-LOC", "I-LOC", "O", "O"]},
             {"tokens": list("张三去上海"), "tags": ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]}] * 4
    path = make_config("token_cls", train={"max_steps": 1, "global_batch_size": 4})
    write_jsonl(tmp_path / "data" / "train.jsonl", chars)
    write_jsonl(tmp_path / "data" / "eval.jsonl", chars[:2])
    assert main(["train", str(path)]) == 0
    meta = json.loads((tmp_path / "run" / "adapter" / "scaletune.json").read_text())
    assert meta["task_state"]["cjk_chars"] is True
    capsys.readouterr()
    text = "李四在深圳，iPhone很好"
    code, got, err, _ = _predict(path, capsys, [text])
    assert code == 0, err
    assert got[0]["tokens"] == list("李四在深圳，iPhone很好")
    assert all(text[e["char_start"]:e["char_end"]] == e["text"] for e in got[0]["entities"])

    words = [{"tokens": ["我", "在", "北京", "工作"], "tags": ["O", "O", "B-LOC", "O"]}] * 8
    write_jsonl(tmp_path / "data" / "train.jsonl", words)
    write_jsonl(tmp_path / "data" / "eval.jsonl", words[:2])
    assert main(["train", str(path), "--overwrite"]) == 0
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="scaletune"):
        code, got, err, _ = _predict(path, capsys, [text])
    assert code == 0, err
    assert got[0]["tokens"] == ["李四在深圳", "，", "iPhone很好"]
    assert "trained on Chinese/Japanese text split into words" in caplog.text
