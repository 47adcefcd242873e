"""Building datasets: labels and their alignment, max_length, missing columns, data.columns, the
held-out split and tokenising in processes. Readers, the cache, chat formats and prompts: test_data_*.py."""

from __future__ import annotations

import pytest

from scaletune.data import build_datasets
from scaletune.data.encode import _workers
from scaletune.data.readers import WHERE
from scaletune.errors import DataError
from scaletune.model import load_tokenizer
from scaletune.tasks import IGNORE, get_task

from stutil import alpaca_records, cls_records, ner_records, write_jsonl
from stutil import data_config as _cfg


def test_token_cls_labels_first_subtoken_only(tmp_path, tiny_bert):
    data = write_jsonl(tmp_path / "n.jsonl", [{"tokens": ["Zyxwv", "lives", "in", "Paris"],
                                               "tags": ["B-PER", "O", "O", "B-LOC"]}] * 2)
    cfg = _cfg(tmp_path, tiny_bert, task="token_cls", data=data)
    tok = load_tokenizer(cfg)
    sets = build_datasets(cfg, get_task("token_cls"), tok)
    ex = sets["train"][0]
    labels = sets["labels"]
    enc = tok(["Zyxwv", "lives", "in", "Paris"], is_split_into_words=True)
    assert len(enc.word_ids()) > 6  # the made-up word splits into several sub-tokens
    kept = [labels[lab] for lab in ex["labels"] if lab != IGNORE]
    assert kept == ["B-PER", "O", "O", "B-LOC"]
    first = [i for i, w in enumerate(enc.word_ids()) if w is not None and (i == 0 or enc.word_ids()[i - 1] != w)]
    assert [i for i, lab in enumerate(ex["labels"]) if lab != IGNORE] == first


@pytest.mark.parametrize("records,match", [
    ([{"tokens": ["a", "b"], "tags": ["O"]}], r"2 tokens but 1 tags"),
    ([{"tokens": [], "tags": []}], "empty sentence"),
    ([{"tokens": ["a", "b"], "tags": ["B-", "O"]}], "tag 'B-' in column 'tags' has a scheme prefix but no entity"),
    ([{"tokens": ["a", "b"], "tags": ["O", ""]}], "the tag in column 'tags' is empty"),
])
def test_token_cls_bad_rows(tmp_path, tiny_bert, records, match):
    data = write_jsonl(tmp_path / "n.jsonl", records)
    cfg = _cfg(tmp_path, tiny_bert, task="token_cls", data=data)
    with pytest.raises(DataError, match=match):
        build_datasets(cfg, get_task("token_cls"), load_tokenizer(cfg))


def test_seq_cls_label_problems(tmp_path, tiny_bert):
    data = write_jsonl(tmp_path / "s.jsonl", [{"text": "a b", "label": 1}, {"text": "c", "label": "x"}])
    cfg = _cfg(tmp_path, tiny_bert, task="seq_cls", data=data)
    with pytest.raises(DataError, match="mixes label types"):
        build_datasets(cfg, get_task("seq_cls"), load_tokenizer(cfg))
    csv = tmp_path / "s.csv"  # an empty cell: a missing label, not a class ""
    csv.write_text("text,label\ngood,pos\nbad,neg\nlonely,\n")
    cfg = _cfg(tmp_path, tiny_bert, task="seq_cls", data=str(csv))
    with pytest.raises(DataError, match=r"s.csv:4: the label in column 'label' is empty"):
        build_datasets(cfg, get_task("seq_cls"), load_tokenizer(cfg))
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    evalf = write_jsonl(tmp_path / "e.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "maybe"}])
    cfg = _cfg(tmp_path, tiny_bert, task="seq_cls", data=train, eval=str(evalf))
    with pytest.raises(DataError, match=r"e.jsonl:2: label 'maybe' is not in the label set \['neg', 'pos'\]"):
        build_datasets(cfg, get_task("seq_cls"), load_tokenizer(cfg))


def test_examples_without_targets_are_counted_and_reported(tmp_path, tiny_llama, caplog):
    """An example whose response lies wholly past max_length has nothing to train on; it is skipped, but
    said so (the log and run.json's stats), not silently."""
    long_prompt = " ".join(["word"] * 400)
    records = [{"instruction": "Say hi", "input": "", "output": "hi there"}] * 3
    records += [{"instruction": long_prompt, "input": "", "output": "lost"}] * 2
    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "a.jsonl", records), max_length=64)
    with caplog.at_level("WARNING", logger="scaletune"):
        built = build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))
    assert len(built["train"]) == 3 and built["stats"]["dropped"] == {"train": 2, "eval": 0}
    assert "data.train: 2 example(s) skipped: no target tokens within data.max_length=64" in caplog.text


@pytest.mark.parametrize("task", ["causal_lm", "seq_cls", "token_cls"])
def test_examples_cut_by_max_length_are_counted_and_reported(tmp_path, tiny_llama, tiny_bert, task, caplog):
    """An example longer than max_length trains (or is scored) on its start only: say how many, per split,
    fresh and from the cache."""
    long = " ".join(["word"] * 150)
    if task == "causal_lm":
        records = [{"instruction": "Say hi", "input": "", "output": "hi"}] * 3
        records += [{"instruction": "Say it", "input": "", "output": long}] * 2  # the answer's end is cut
    elif task == "seq_cls":
        records = [{"text": "short", "label": "neg"}] * 3 + [{"text": long, "label": "pos"}] * 2
    else:
        records = [{"tokens": ["a", "b"], "tags": ["O", "B-PER"]}] * 3
        records += [{"tokens": long.split(), "tags": ["O"] * 150}] * 2
    data = write_jsonl(tmp_path / "d.jsonl", records)
    evaldata = write_jsonl(tmp_path / "e.jsonl", records[:4])
    model = tiny_llama if task == "causal_lm" else tiny_bert
    cfg = _cfg(tmp_path, model, task=task, data=data, eval=str(evaldata), max_length=64, cache=True)
    for _ in ("fresh", "cached"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="scaletune"):
            built = build_datasets(cfg, get_task(task), load_tokenizer(cfg))
        assert built["stats"]["truncated"] == {"train": 2, "eval": 1}
        # what only scoring reads is kept with the eval split, not carried through every training batch
        assert not set(get_task(task).eval_only_columns) & set(built["train"].column_names)
        assert set(get_task(task).eval_only_columns) - {"window"} <= set(built["eval"].column_names)  # (window: split)
        assert "data.train: 2 of 5 example(s) are longer than data.max_length=64 tokens and were cut" in caplog.text
        if task == "token_cls":  # its own eval warning says it (what the cut words count as), said once
            assert "1 of 4 eval sentences exceed" in caplog.text and "data.eval: 1 of 4" not in caplog.text
        else:
            assert "data.eval: 1 of 4 example(s)" in caplog.text


def test_truncation_without_a_rust_tokenizer_counts_examples_that_fill_max_length(tiny_bert):
    from transformers import AutoTokenizer

    from scaletune.tasks.base import overflowed

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    enc = tok("word " * 40, truncation=True, max_length=16)
    assert overflowed(enc, 16) and not overflowed(tok("word", truncation=True, max_length=16), 16)
    # a tokenizer that keeps no overflow record returns plain ids: filling max_length is taken as cut
    assert overflowed({"input_ids": enc["input_ids"]}, 16) and not overflowed({"input_ids": [2, 5, 3]}, 16)


def test_max_length_is_lowered_to_what_the_tokenizer_accepts(tmp_path, tiny_bert, caplog):
    """BERT-family models have 512 learned positions: a longer max_length (the default is 1024) would
    crash the first long example, so the tokenizer's model_max_length caps it, with a warning."""
    from transformers import AutoTokenizer

    capped = tmp_path / "bert512"
    import shutil

    shutil.copytree(tiny_bert, capped)
    tok = AutoTokenizer.from_pretrained(capped)
    tok.model_max_length = 24
    tok.save_pretrained(capped)
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(["a"] * 100), "label": "pos"},
                                              {"text": "b", "label": "neg"}])
    cfg = _cfg(tmp_path, capped, task="seq_cls", data=data, max_length=200)
    with caplog.at_level("WARNING", logger="scaletune"):
        tok = load_tokenizer(cfg)
    assert cfg.data.max_length == 24 and "data.max_length=200 is above what" in caplog.text
    built = build_datasets(cfg, get_task("seq_cls"), tok)
    assert max(len(ids) for ids in built["train"]["input_ids"]) == 24
    cfg = _cfg(tmp_path, tiny_bert, task="seq_cls", data=data, max_length=200)
    load_tokenizer(cfg)
    assert cfg.data.max_length == 200  # within the 512 positions and no tokenizer limit: left alone


def test_max_length_above_a_rotary_models_positions_is_kept_with_a_warning(tmp_path, tiny_llama, caplog):
    """Llama's rotary positions are computed, not looked up: past max_position_embeddings (512 in the tiny
    model) it runs, on distances it was not trained on; that is worth a warning, not a cut (long-context
    fine-tuning does exactly this)."""
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "input": "", "output": "hi"}] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=1024)
    with caplog.at_level("WARNING", logger="scaletune"):
        load_tokenizer(cfg)
    assert cfg.data.max_length == 1024
    assert "data.max_length=1024 is above the 512 positions" in caplog.text and "kept" in caplog.text


@pytest.mark.parametrize("model_type,extra,limit", [
    ("bert", {}, (512, True)),
    ("gpt2", {"n_positions": 1024}, (1024, True)),
    ("roberta", {"max_position_embeddings": 514, "pad_token_id": 1}, (512, True)),  # ids start after padding
    ("deberta-v2", {"relative_attention": True, "position_biased_input": False}, (512, False)),  # DeBERTa-v3
    ("esm", {"position_embedding_type": "absolute"}, (1026, True)),  # has a rope_theta, but it is unused
    ("llama", {"max_position_embeddings": 8192}, (8192, False)),
    ("t5", {}, (None, False)),
])
def test_position_limit_by_kind_of_positions(model_type, extra, limit):
    from transformers import AutoConfig

    from scaletune.seqlen import position_limit

    assert position_limit(AutoConfig.for_model(model_type, **extra)) == limit


def test_numeric_labels_get_the_same_order_from_csv_and_json():
    """CSV/TSV give "10" as a string, JSON gives 10: both must map class index i to the same label."""
    from scaletune.tasks.base import collect_labels

    ints = [{"label": i} for i in (11, 2, 0, 10, 1)]
    strs = [{"label": str(r["label"])} for r in ints]
    assert collect_labels(ints, "label", is_list=False) == collect_labels(strs, "label", is_list=False) \
        == ["0", "1", "2", "10", "11"]
    assert collect_labels([{"label": "b"}, {"label": "10"}, {"label": "a"}], "label", is_list=False) == ["10", "a", "b"]


def test_predicted_tags_stay_on_their_words(tiny_bert):
    """A word the tokenizer turns into nothing (zero-width space) gets "O"; the words after it keep
    their own tags (they used to shift one word left)."""
    from transformers import AutoTokenizer

    from scaletune.labelling import word_tags

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    words = ["alpha", "\u200b", "beta", "gamma"]
    enc = tok(words, is_split_into_words=True)
    ids = enc.word_ids()
    assert 1 not in ids  # the premise: word 1 has no sub-token
    labels = ["O", "B-X", "B-Y", "B-Z"]
    wanted = {0: 1, 2: 2, 3: 3}  # label index per word
    pred = [wanted.get(w, 0) if w is not None else 0 for w in ids]
    assert word_tags(ids, pred, labels, len(words)) == ["B-X", "O", "B-Y", "B-Z"]


def test_predicted_tag_of_a_split_word_is_its_first_sub_tokens(tiny_bert):
    """A word of several sub-tokens is tagged by its first sub-token's prediction, as training labels it and
    eval scores it; predict must not take a later sub-token's (the last one's used to win)."""
    from transformers import AutoTokenizer

    from scaletune.labelling import word_tags

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    words = ["alpha", "Parisian", "bravo"]
    ids = tok(words, is_split_into_words=True).word_ids()
    assert ids.count(1) >= 2  # the premise: word 1 is split into several sub-tokens
    labels = ["O", "B-PER", "I-PER", "B-LOC"]
    first = ids.index(1)
    # word 1: B-PER on its first sub-token, B-LOC on every later one; the other words "O"
    pred = [(1 if pos == first else 3) if w == 1 else 0 for pos, w in enumerate(ids)]
    assert word_tags(ids, pred, labels, len(words)) == ["O", "B-PER", "O"]


@pytest.mark.parametrize("tags,filled", [
    (["B-PER", None, "I-PER"], ["B-PER", "I-PER", "I-PER"]),  # John <zwsp> Smith: one person
    (["B-PER", None, None, "E-PER"], ["B-PER", "I-PER", "I-PER", "E-PER"]),
    (["B-PER", None, "B-PER"], ["B-PER", "O", "B-PER"]),  # a new entity starts after it
    (["B-PER", None, "I-LOC"], ["B-PER", "O", "I-LOC"]),
    (["O", None, "I-PER"], ["O", "O", "I-PER"]),
    (["B-PER", None], ["B-PER", "O"]),
    ([None, "I-PER"], ["O", "I-PER"]),
    (["PER", None, "PER"], ["PER", "PER", "PER"]),  # IO tagging
    (["PER", None, "LOC"], ["PER", "O", "LOC"]),
])
def test_words_without_sub_tokens_are_tagged_from_their_neighbours(tags, filled):
    from scaletune.tasks.token_cls import fill_blank_words

    assert fill_blank_words(tags) == filled


def test_eval_file_that_max_length_empties_is_an_error(tmp_path, tiny_llama):
    """It used to be dropped with a 'skipped' warning, and the run trained without any evaluation."""
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "q", "output": "a"}] * 2)
    evalf = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "word " * 200, "output": "a"}] * 3)
    cfg = _cfg(tmp_path, tiny_llama, data=train, eval=str(evalf), max_length=96)
    with pytest.raises(DataError, match=r"data.eval: no usable examples in .*e.jsonl \(3 had no target tokens "
                                        r"within data.max_length=96\)"):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


def test_a_missing_field_is_called_missing_not_null(tmp_path, tiny_llama, tiny_bert):
    """A record without its `output` said "field 'output' must be a string, got NoneType", one without its
    label "label None must be a string or an integer": as if the file held a null."""
    lm = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say bye"}])
    cfg = _cfg(tmp_path, tiny_llama, data=lm)
    with pytest.raises(DataError, match=r"a.jsonl:2: field 'output' is missing \(the record has: 'instruction'\)"):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))
    cls = write_jsonl(tmp_path / "c.jsonl", [{"text": "good", "label": "pos"}, {"text": "no label here"}])
    cfg = _cfg(tmp_path, tiny_bert, task="seq_cls", data=cls)
    with pytest.raises(DataError, match=r"c.jsonl:2: the label column 'label' is missing \(the record has: 'text'\)"):
        build_datasets(cfg, get_task("seq_cls"), load_tokenizer(cfg))


def test_the_held_out_split_alone_says_nothing_of_the_training_split(tmp_path, tiny_bert, caplog):
    """`scaletune eval` with data.eval_fraction builds both splits to find the held-out one; it told the user
    to raise max_length "to train on" the training split's cut examples."""
    records = [{"text": " ".join(["word"] * 40), "label": ["neg", "pos"][i % 2]} for i in range(20)]
    cfg = _cfg(tmp_path, tiny_bert, task="seq_cls", data=write_jsonl(tmp_path / "c.jsonl", records), max_length=16,
               eval_fraction=0.25)
    with caplog.at_level("WARNING", logger="scaletune"):
        built = build_datasets(cfg, get_task("seq_cls"), load_tokenizer(cfg), for_eval=True)
    assert len(built["eval"]) == 5 and "data.train" not in caplog.text and "data.eval" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="scaletune"):
        build_datasets(cfg, get_task("seq_cls"), load_tokenizer(cfg))  # training: both are said
    assert "data.train: 15 of 15 example(s) are longer than data.max_length=16" in caplog.text


def _built_in_pieces(monkeypatch, cfg, task_name, chunk, procs):
    """build_datasets with pieces of `chunk` records over `procs` processes; also returns the pool sizes used."""
    import scaletune.data.encode as data_mod

    used, real = [], _workers
    monkeypatch.setattr(data_mod, "CHUNK", chunk)
    monkeypatch.setattr(data_mod, "_workers", lambda n: used.append(n) or real(n))
    cfg.data.num_proc = procs
    return build_datasets(cfg, get_task(task_name), load_tokenizer(cfg)), used


@pytest.mark.parametrize("task_name", ["causal_lm", "seq_cls", "token_cls"])
def test_tokenising_in_pieces_over_processes_gives_the_same_datasets(tmp_path, tiny_llama, tiny_bert, monkeypatch,
                                                                     task_name):
    """Pieces of 7 records over 2 forked processes: the same examples, in the same order, with the same
    types and counts as one piece in this process. token_cls: a word with no sub-token in one piece only
    (the other pieces' lists of such words are all empty, so untyped)."""
    records = {"causal_lm": alpaca_records, "seq_cls": cls_records, "token_cls": ner_records}[task_name](40)
    if task_name == "token_cls":
        records[9]["tokens"][1] = "\u200b"
    data = write_jsonl(tmp_path / "d.jsonl", records)
    model, cut = (tiny_llama, 130) if task_name == "causal_lm" else (tiny_bert, 8)
    one, used_one = _built_in_pieces(monkeypatch, _cfg(tmp_path, model, task_name, data, eval=str(data),
                                                       max_length=cut), task_name, 10**6, 1)
    pieces, used = _built_in_pieces(monkeypatch, _cfg(tmp_path, model, task_name, data, eval=str(data),
                                                      max_length=cut), task_name, 7, 2)
    assert used_one == [1, 1] and used == [2, 2]  # (train, eval)
    for split in ("train", "eval"):
        assert pieces[split].features == one[split].features
        assert pieces[split].to_dict() == one[split].to_dict()
    assert pieces["stats"] == one["stats"] and pieces["stats"]["truncated"]["train"] > 0  # (max_length cut some)
    if task_name == "token_cls":
        assert sum(map(len, one["eval"]["blank_at"])) == 1


def test_a_bad_record_met_by_a_worker_is_named_as_in_one_process(tmp_path, tiny_llama, monkeypatch):
    records = alpaca_records(30)
    records[20]["output"] = ["not", "a", "string"]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    errors = []
    for chunk, procs in ((10**6, 1), (7, 2)):
        with pytest.raises(DataError) as caught:
            _built_in_pieces(monkeypatch, _cfg(tmp_path, tiny_llama, data=data), "causal_lm", chunk, procs)
        errors.append(caught.value)
    assert "d.jsonl:21" in str(errors[0])
    assert str(errors[1]) == str(errors[0]) and errors[1].problems == errors[0].problems


def test_a_tokenising_process_that_dies_fails_the_run_with_a_message(tmp_path, tiny_llama, monkeypatch):
    """A worker killed mid-way (the out-of-memory killer's SIGKILL) ends the build with a UserError naming
    data.num_proc, rather than leaving the main process waiting for its piece forever."""
    import contextlib
    import os
    import signal
    import time

    import psutil

    from scaletune.errors import UserError

    data = write_jsonl(tmp_path / "d.jsonl", alpaca_records(800))
    task = get_task("causal_lm")
    encode = task.encode

    def dies_at_line_20(rec, *args):
        if rec["__where__"].endswith(":30"):
            os.kill(os.getpid(), signal.SIGKILL)
        return encode(rec, *args)

    processes = []

    @contextlib.contextmanager
    def workers(n):  # the real pool, its processes kept for a look afterwards
        with _workers(n) as pool:
            processes.extend(pool._processes.values())
            yield pool

    monkeypatch.setattr(task, "encode", dies_at_line_20)
    monkeypatch.setattr("scaletune.data.encode.CHUNK", 200)  # (a piece's ids outgrow a pipe's 64 KiB buffer)
    monkeypatch.setattr("scaletune.data.encode._workers", workers)
    cfg = _cfg(tmp_path, tiny_llama, data=data, num_proc=2)
    with pytest.raises(UserError) as caught:
        build_datasets(cfg, task, load_tokenizer(cfg))
    # the surviving worker used to block writing its finished pieces into a pipe nobody read, and the
    # interpreter's exit then waited for it forever (SIGTERM and Ctrl-C did not end it: workers ignore them)
    assert len(processes) == 2

    def running(pid):  # (not is_alive(): the pool's own thread may have reaped it, which is_alive misreads)
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 20
    while any(running(p.pid) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(running(p.pid) for p in processes)
    assert "a process tokenising the data died" in str(caught.value)
    assert "set data.num_proc lower (it was 2; 1 tokenises in the main process)" in str(caught.value)


def test_a_revision_of_a_local_model_directory_is_refused(tmp_path, tiny_llama):
    """transformers ignores `revision` for a local directory: `revision: no-such-branch` trained."""
    from scaletune.errors import ConfigError

    cfg = _cfg(tmp_path, tiny_llama, data=tmp_path / "t.jsonl")
    cfg.model.revision = "no-such-branch"
    with pytest.raises(ConfigError, match=r"model.revision: 'no-such-branch' names a version of a hub model, but "
                                          r"model.name_or_path .* is a local directory"):
        load_tokenizer(cfg)
    load_tokenizer(cfg, str(tiny_llama))  # eval/predict (an adapter's tokenizer): a hub run's local snapshot


@pytest.mark.parametrize("task", ["seq_cls", "token_cls"])
def test_an_eval_record_without_the_trained_columns_is_named(task):
    """An eval file of another shape (an Alpaca file beside CoNLL training data) was reported as
    "'tokens' and 'tags' must be lists" / "column 'text' must be a non-empty string, got None"."""
    t = get_task(task)
    if task == "seq_cls":
        t.text, t.pair, t.label = "text", None, "label"
    else:
        t.tokens, t.tags = "tokens", "tags"
    record = {"instruction": "a", "output": "b", WHERE: "e.jsonl:1"}
    wanted = f"e.jsonl:1: no column '{'text' if task == 'seq_cls' else 'tokens'}'; the record has 'instruction', 'output'"
    with pytest.raises(DataError, match=wanted):
        t.encode(record, None, None, {})


def test_data_columns_read_another_datas_names_as_a_formats_fields(tmp_path, tiny_llama):
    """Data whose columns are not a format's (question/answer, LLaMA-Factory's `columns:` mapping) was refused
    ("cannot tell the data format") with no way round but rewriting the file. `data.columns` reads them as the
    format's fields: the same tokens as the file written with alpaca's names, in training and in predict."""
    from scaletune.errors import ConfigError
    from scaletune.infer import _task_input

    ours = alpaca_records(6)
    theirs = [{"question": r["instruction"], "answer": r["output"], **({"context": r["input"]} if r.get("input") else {})}
              for r in ours]
    columns = {"instruction": "question", "output": "answer", "input": "context"}
    plain = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "ours.jsonl", ours))
    mapped = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "theirs.jsonl", theirs), columns=columns)
    tok = load_tokenizer(plain)
    want, got = (build_datasets(c, get_task("causal_lm"), tok)["train"] for c in (plain, mapped))
    assert [ex["input_ids"] for ex in got] == [ex["input_ids"] for ex in want]
    assert [ex["labels"] for ex in got] == [ex["labels"] for ex in want]
    with pytest.raises(DataError, match="cannot tell the data format"):
        build_datasets(_cfg(tmp_path, tiny_llama, data=tmp_path / "theirs.jsonl"), get_task("causal_lm"), tok)
    item = {"question": ours[0]["instruction"], WHERE: "in.jsonl:1"}
    assert _task_input(mapped, get_task("causal_lm"), tok, item)[0] == \
        _task_input(plain, get_task("causal_lm"), tok, {"instruction": ours[0]["instruction"], WHERE: "in.jsonl:1"})[0]
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, tiny_llama, data=tmp_path / "theirs.jsonl", columns={"instrucion": "question", "output": "question"})
    text = "\n".join(err.value.problems)
    assert "data.columns.instrucion: not a field any causal_lm format reads" in text and "'instruction'?" in text
    assert "data.columns: column 'question' is named for more than one field" in text
    from scaletune.tasks.causal_lm import rename_columns

    swapped = [{"instruction": "Q", "output": "A"}]  # (renamed one at a time, a swap lost a field)
    rename_columns(swapped, {"instruction": "output", "output": "instruction"})
    assert swapped == [{"instruction": "A", "output": "Q"}]


def test_a_column_data_columns_names_and_no_record_has_is_named(tmp_path, tiny_llama, caplog):
    records = [{"question": "q", "answer": "a"}] * 2
    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "qa.jsonl", records),
               columns={"instruction": "question", "output": "answr"})
    with caplog.at_level("WARNING", logger="scaletune"), pytest.raises(DataError):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))
    assert "data.train: no record has the column(s) 'answr' (for output) that data.columns names" in caplog.text
    # a record that lacks a mapped column: named by the data's name for it, not only the format's
    records = [{"question": "q", "answer": "a"}, {"question": "q2"}]
    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "qa2.jsonl", records),
               columns={"instruction": "question", "output": "answer"})
    with pytest.raises(DataError, match=r"qa2.jsonl:2: field 'output' \(column 'answer', data.columns\) is missing"):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


@pytest.mark.parametrize("n,fraction", [(10, 0.25), (37, 0.1), (5, 0.5)])
def test_eval_fraction_split_is_a_fixed_partition(n, fraction):
    """data.eval_fraction's split: held-out examples must never be trained on (the parts disjoint), none may be
    lost (together they are all records, each part in file order), the eval part has round(n * fraction)
    records, and every call (every rank, a resume, `scaletune eval`) gets the same split for the same seed."""
    from scaletune.data import split_eval

    records = [{"i": i} for i in range(n)]
    train, held = split_eval(records, fraction, seed=3)
    assert len(held) == max(1, round(n * fraction))
    assert not {r["i"] for r in train} & {r["i"] for r in held}
    assert sorted(r["i"] for r in train + held) == list(range(n))
    assert [r["i"] for r in train] == sorted(r["i"] for r in train)
    assert [r["i"] for r in held] == sorted(r["i"] for r in held)
    assert split_eval(records, fraction, seed=3) == (train, held)
    assert split_eval([dict(r) for r in records], fraction, seed=3) == (train, held)
    other = [split_eval(records, fraction, seed=s)[1] for s in range(4, 12)]
    assert any(o != held for o in other)  # the seed picks the split (not always the first records)


def test_eval_only_data_is_named_by_its_own_key(tmp_path, tiny_llama):
    """`scaletune eval --data FILE` sets up FILE as training sets up data.train: its problems named
    data.train (a file the user never gave under that key)."""
    from scaletune.data import build_eval_only

    both = write_jsonl(tmp_path / "both.jsonl", [{"instruction": "q", "output": "a"}, {"text": "q a"}])
    cfg = _cfg(tmp_path, tiny_llama, data=both)
    cfg.data.eval = str(both)
    with pytest.raises(DataError, match=f"--data: {both}:2 is a text record"):
        build_eval_only(cfg, get_task("causal_lm"), load_tokenizer(cfg), "--data")


def test_a_tokenisation_not_recorded_is_told_apart_from_another_version():
    """A checkpoint or adapter written before scaletune recorded its data version says so, rather than
    "data version None"; this scaletune's own version is no difference."""
    from scaletune.data import tokenisation, tokenised_differently

    assert tokenised_differently(tokenisation("seq_cls"), "seq_cls") is None
    assert "before scaletune recorded how it tokenises" in tokenised_differently(None, "seq_cls")
    assert "data version seq_cls-1, now" in tokenised_differently("seq_cls-1", "seq_cls")


def test_classifier_labels_say_what_is_not_supported_and_how_to_give_the_label_set():
    """Day-one classifier data: STS-B-style float scores in a TSV trained one class per distinct value without a
    word (refused now, as JSON floats were, saying regression is not supported); a list of labels said only
    "must be a string or an integer" (how to make the run multi-label is named); a label only the eval data has points at
    data.labels (the label set is the training data's otherwise)."""
    from scaletune.tasks.base import collect_labels, unknown_label

    scores = [{"label": v, WHERE: f"t.tsv:{i}"} for i, v in enumerate(["0.0", "2.5", "3.8", "5.0"], start=2)]
    with pytest.raises(DataError, match=r"regression targets\? seq_cls trains classes") as err:
        collect_labels(scores, "label", is_list=False)
    assert "list them in data.labels" in err.value.hint
    assert collect_labels([{"label": v} for v in ["1", "2", "3"]], "label", is_list=False) == ["1", "2", "3"]
    with pytest.raises(DataError, match="a list of labels in every record makes the run multi-label"):
        collect_labels([{"label": ["a", "b"], WHERE: "t.jsonl:1"}], "label", is_list=False)
    with pytest.raises(DataError, match="regression targets are not supported"):
        collect_labels([{"label": 0.5, WHERE: "t.jsonl:1"}], "label", is_list=False)
    err = unknown_label("valid.txt:92", "tag", "I-LOC", {"O": 0, "B-LOC": 1})
    assert "a label the training data lacks: give the whole label set in data.labels" in str(err)
    # a misspelt label in the eval file was told to be added to data.labels (a class of the typo); the tag's
    # own scheme prefix is kept, so the I-LOC above (beside B-LOC) is not taken for a typo
    err = unknown_label("dev.tsv:2", "label", "postive", {"negative": 0, "positive": 1})
    assert "(a typo of 'positive'? correct it in the file)" in str(err)
    err = unknown_label("valid.txt:16", "tag", "B-PRE", {"O": 0, "B-PER": 1, "I-PER": 2, "B-ORG": 3})
    assert "(a typo of 'B-PER'? correct it in the file)" in str(err)
    assert "(a typo of 'O'?" in str(unknown_label("valid.txt:17", "tag", "0", {"O": 0, "B-PER": 1}))


def test_a_misspelt_column_beside_the_fields_own_column_is_named(caplog):
    """`data.columns: {instruction: questoin}` on data holding both `question` and an `instruction` column: the
    field was present, so no warning, and the run silently trained on the column the mapping meant to replace."""
    from scaletune.tasks.causal_lm import rename_columns

    records = [{"instruction": "system-wide note", "question": "q", "output": "a"}] * 2
    with caplog.at_level("WARNING", logger="scaletune"):
        rename_columns(records, {"instruction": "questoin"}, "data.train")
    assert "data.train: no record has the column(s) 'questoin' (for instruction) that data.columns names" \
        in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="scaletune"):  # one the data has: nothing to say
        rename_columns([{"instruction": "x", "question": "q"}], {"instruction": "question"}, "data.train")
    assert "no record has" not in caplog.text


@pytest.mark.parametrize("tags,want", [
    (["U-ORG", "U-ORG", "O"], [("ORG", 0, 1), ("ORG", 1, 2)]),  # two organisations side by side
    (["B-LOC", "L-LOC", "U-LOC"], [("LOC", 0, 2), ("LOC", 2, 3)]),
    (["S-ORG", "S-ORG"], [("ORG", 0, 1), ("ORG", 1, 2)]),  # IOBES: as it was
    (["PER", "PER", "O", "LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),  # IO
])
def test_bilou_entities_are_grouped_as_iobes_ones(tags, want):
    """seqeval's default mode knows S-/E- but not BILOU's U-/L-: `U-ORG U-ORG` was scored (and `predict`'s
    entities grouped) as one organisation."""
    from scaletune.tasks.token_cls import TokenCls, entities

    words = [f"w{i}" for i in range(len(tags))]
    assert [(e["type"], e["start"], e["end"]) for e in entities(words, tags)] == want
    labels = sorted(set(tags))
    gold = [labels.index(t) for t in tags]
    scores = TokenCls().metrics([(gold, gold, [])], 0.0, 1, labels)
    assert scores["f1"] == 1.0 and scores["per_type"][want[0][0]]["support"] == sum(w[0] == want[0][0] for w in want)
