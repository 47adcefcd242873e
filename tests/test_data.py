"""Data readers and formats: errors name file:line; prompt masking; label alignment."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from scaletune.config import from_dict
from scaletune.data import _workers, build_datasets
from scaletune.data.formats import to_segments
from scaletune.data.readers import WHERE, read_records
from scaletune.errors import DataError
from scaletune.model import load_tokenizer
from scaletune.tasks import IGNORE, get_task

from stutil import alpaca_records, cls_records, ner_records, write_jsonl


def test_bad_json_line_named(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"text": broken}\n\n[1, 2]\n')
    with pytest.raises(DataError) as err:
        read_records(str(p))
    text = err.value.render()
    assert f"{p}:2: invalid JSON" in text and f"{p}:4: expected a JSON object" in text


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """Raw U+2028 / U+0085 / form feed inside a JSON string are data (json.dumps(ensure_ascii=False)
    writes them so); they neither break the record nor shift later line numbers. CRLF files read too."""
    p = tmp_path / "d.jsonl"
    good = [{"text": "a\u2028b"}, {"text": "c\x85d\x0ce"}]
    p.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in good) + "\r\n{bad\r\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_records(str(p))
    assert f"{p}:3: invalid JSON" in err.value.render() and ":1:" not in err.value.render()
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in good) + "\n", encoding="utf-8")
    assert [r["text"] for r in read_records(str(p))] == ["a\u2028b", "c\x85d\x0ce"]


def test_non_utf8_named_with_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid UTF-8"):
        read_records(str(p))


def test_csv_wrong_field_count_and_empty(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\nhello,1\nworld,0,extra\n")
    with pytest.raises(DataError, match=r"d.csv:3: 3 fields, header has 2"):
        read_records(str(p))
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="contains no examples"):
        read_records(str(empty))
    with pytest.raises(DataError, match="file not found"):
        read_records(str(tmp_path / "missing.jsonl"))
    os.mkfifo(tmp_path / "pipe.jsonl")  # (its open blocked for ever, deaf to SIGTERM at start-up)
    with pytest.raises(DataError, match=r"data.train: .*pipe.jsonl is not a regular file \(a pipe or a device\?\)"):
        read_records(str(tmp_path / "pipe.jsonl"))


def test_csv_records_are_named_by_the_line_they_start_on(tmp_path):
    """A quoted field may span lines: later records (and errors) name the physical line they start on, not
    the row count. U+2028, U+0085 and form feeds in a field are data, not line breaks (str.splitlines)."""
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"one\ntwo\nthree",pos\n"a\u2028b",neg\nc\x85d\x0ce,pos\r\n"x\r\ny",neg\n', encoding="utf-8",
                 newline="")
    recs = read_records(str(p))
    assert [r["text"] for r in recs] == ["one\ntwo\nthree", "a\u2028b", "c\x85d\x0ce", "x\r\ny"]
    assert [r["__where__"] for r in recs] == [f"{p}:{n}" for n in (2, 5, 6, 7)]
    p.write_text('text,label\n"one\ntwo",pos\nstray,neg,x\n')
    with pytest.raises(DataError, match=r"d.csv:4: 3 fields, header has 2 \(text, label\)$"):
        read_records(str(p))
    p.write_text('text,label\nok,pos\n"open,neg\nmore,pos\nlast,neg\n')  # a quote left open swallows the rest
    with pytest.raises(DataError, match=r"d.csv:3: 1 fields, header has 2 .*runs to line 5: is a quote left open"):
        read_records(str(p))
    t = tmp_path / "d.tsv"
    t.write_text("text\tlabel\na\u2028b\tpos\nc\tneg\tx\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d.tsv:3: 3 fields"):
        read_records(str(t))


@pytest.mark.parametrize("name,content,where", [
    ("d.jsonl", [{"instruction": "ok", "output": "y"}, {"instruction": "a\ud800b", "output": "y"}],
     "{p}:2: field 'instruction' holds a lone surrogate (\\ud800)"),
    ("d.jsonl", [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ["\udfff"]}]}],
     "{p}:1: field 'conversations[1].value[0]' holds a lone surrogate (\\udfff)"),
    ("d.jsonl", [{"text": "ok", "meta": {"k\udc80": 1}}], "{p}:1: field 'meta.k\\udc80' holds a lone surrogate"),
    ("d.json", [{"text": "ok"}, {"text": "x\udbff"}], "{p}[1]: field 'text' holds a lone surrogate (\\udbff)"),
])
def test_lone_surrogate_escapes_are_refused_at_read_time(tmp_path, name, content, where):
    """json.loads accepts "\ud800"; the tokenizer then fails with a TypeError traceback. A surrogate pair
    (an emoji written as two escapes) is valid text and still reads."""
    p = tmp_path / name
    body = json.dumps(content) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in content)
    assert "\\ud" in body  # the premise: json.dumps writes the lone surrogate as an escape
    p.write_text(body)
    with pytest.raises(DataError) as err:
        read_records(str(p))
    assert where.format(p=p) in err.value.render()
    err.value.render().encode("utf-8")  # the message itself is printable
    p.write_text(body.replace("\\ud800", "\\ud83d\\ude00").replace("\\udfff", "\\ud83d\\ude00")
                 .replace("\\udc80", "\\ud83d\\ude00").replace("\\udbff", "\\ud83d\\ude00"))
    assert "\U0001f600" in json.dumps([{k: v for k, v in r.items() if k != "__where__"} for r in read_records(str(p))],
                                      ensure_ascii=False)


def test_predict_reading_a_terminal_says_how_to_end_the_input(capsys):
    import io

    from scaletune.predict_input import read_inputs

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert [i["text"] for i in read_inputs(None, Terminal("Add 2 and 5.\n"))] == ["Add 2 and 5."]
    assert "one per line; Ctrl-D ends them" in capsys.readouterr().err
    read_inputs(None, io.StringIO("piped\n"))  # a pipe or file: nothing to say
    assert capsys.readouterr().err == ""


def test_predict_inputs_with_lone_surrogates_are_refused():
    """predict's input lines: a \\ud800 escape in a JSON line, or stdin bytes that the C locale decoded to
    surrogates (surrogateescape) in a plain line, end as a DataError naming the line."""
    import io

    from scaletune.predict_input import read_inputs

    assert [i["text"] for i in read_inputs(None, io.StringIO('plain\n{"text": "\\ud83d\\ude00"}\n'))] == \
        ["plain", "\U0001f600"]
    with pytest.raises(DataError, match=r"<stdin>:2: field 'instruction' holds a lone surrogate \(\\ud800\)"):
        read_inputs(None, io.StringIO('plain\n{"instruction": "a\\ud800"}\n'))
    with pytest.raises(DataError, match=r"<stdin>:1: field 'text' holds a lone surrogate \(\\udcff\)"):
        read_inputs(None, io.StringIO(b"caf\xff\n".decode("utf-8", "surrogateescape")))


def test_conll_reader_and_stray_columns(tmp_path):
    p = tmp_path / "d.conll"
    p.write_text("-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n")
    recs = read_records(str(p))
    assert [r["tokens"] for r in recs] == [["EU", "rejects"], ["Peter"]]
    assert [r["tags"] for r in recs] == [["B-ORG", "O"], ["B-PER"]]
    bad = tmp_path / "bad.conll"
    bad.write_text("EU NNP B-NP B-ORG\nrejects VBZ O\n")
    with pytest.raises(DataError, match=r"bad.conll:2: 3 columns, earlier lines have 4"):
        read_records(str(bad))


def _conll(path, text, columns=None):
    path.write_text(text, encoding="utf-8")
    return [(r["tokens"], r["tags"], r[WHERE].rsplit(":", 1)[1])
            for r in read_records(str(path), conll=True, conll_columns=columns)]


def test_conll_comment_lines_are_skipped_and_a_hash_word_is_kept(tmp_path):
    """A "#" line before a sentence was read as a word (or refused for its column count); where the word is the
    first column, "#" is also a word (CoNLL-2003's "# NN I-NP O", a tweet's hashtag) and must stay one."""
    text = ("# sent_id = 1\n# text = EU wins\nEU NNP B-NP B-ORG\nwins VBZ B-VP O\n\n"
            "#\thttp://example.org/x [2009-10-17]\n# NN I-NP O\nrise NN I-NP O\n# NN I-NP O\n")
    assert _conll(tmp_path / "c.conll", text) == [(["EU", "wins"], ["B-ORG", "O"], "3"),
                                                 (["#", "rise", "#"], ["O", "O", "O"], "7")]
    tweets = "#LiveMusic O\ntonight O\n\n# newdoc id = d2\n#NYC B-LOC\n"
    assert _conll(tmp_path / "t.conll", tweets) == [(["#LiveMusic", "tonight"], ["O", "O"], "1"),
                                                   (["#NYC"], ["B-LOC"], "5")]


def test_conll_columns_pick_the_word_and_tag_of_germeval_and_conllu_files(tmp_path):
    """GermEval 2014 (index word outer inner) and CoNLL-U (ID FORM ... MISC) were read with the index as the
    word and the last column as the tag; data.conll_columns picks them, counted from 1 or from the end."""
    germeval = ("#\thttp://de.wikipedia.org/wiki/Manfred_Korfmann [2009-10-17]\n1\tSchartau\tB-PER\tO\n"
                "2\tsagte\tO\tO\n\n#\thttp://x [2009-10-18]\n1\t#\tO\tO\n2\tDer\tB-ORG\tO\n")
    expected = [(["Schartau", "sagte"], ["B-PER", "O"], "2"), (["#", "Der"], ["O", "B-ORG"], "6")]
    assert _conll(tmp_path / "g.tsv", germeval, [2, 3]) == expected
    assert _conll(tmp_path / "g.tsv", germeval, [-3, -2]) == expected
    from scaletune.predict_input import read_inputs

    predicted = tmp_path / "g.conll"  # predict reads a CoNLL input by the run's data.conll_columns too
    predicted.write_text(germeval, encoding="utf-8")
    assert [item["tokens"] for item in read_inputs(str(predicted), None, [2, 3])] == [["Schartau", "sagte"], ["#", "Der"]]
    conllu = ("# newdoc id = d1\n# sent_id = 1\n# text = du chat\n1-2\tdu\t_\t_\t_\t_\t_\t_\t_\t_\n"
              "1\tde\tde\tADP\t_\t_\t2\tcase\t_\tO\n2\tle\tle\tDET\t_\t_\t3\tdet\t_\tO\n"
              "3\tchat\tchat\tNOUN\t_\t_\t0\troot\t_\tB-ANIM\n")
    assert _conll(tmp_path / "u.conllu", conllu, [2, 10]) == [(["de", "le", "chat"], ["O", "O", "B-ANIM"], "5")]
    # (data.format: conll reads any name: a CoNLL-U .txt's multiword "1-2 du" line is no word either)
    assert _conll(tmp_path / "u.txt", conllu, [2, 10]) == [(["de", "le", "chat"], ["O", "O", "B-ANIM"], "5")]
    with pytest.raises(DataError, match=r"u.conllu: a CoNLL-U file .* has no NER tag column: set "
                                        r"data.conll_columns: \[2, N\]"):
        read_records(str(tmp_path / "u.conllu"))



def test_conll_newdoc_comment_of_the_files_column_count_is_still_a_comment(tmp_path):
    """CoNLL-U's two-word keys ("# newdoc id = d1") are comments even where the line has the file's column
    count (five columns here), so a "#" before a sentence is not read as a word tagged "d1"."""
    text = "# newdoc id = d1\nEU NNP B-NP O B-ORG\nwins VBZ B-VP O O\n"
    assert _conll(tmp_path / "five.conll", text) == [(["EU", "wins"], ["B-ORG", "O"], "2")]


def test_conll_hash_line_inside_a_sentence_is_data_and_an_index_files_hash_line_a_comment(tmp_path):
    """Where the word is the first column, a "#" line inside a sentence is data (of the wrong shape here, so
    refused at its line, not dropped); where an index is, a "#" line is a comment even with the file's column
    count (GermEval's "#<TAB>url date" in a file of index, word and one tag)."""
    with pytest.raises(DataError, match=r"t.conll:3: 4 columns, earlier lines have 2"):
        _conll(tmp_path / "t.conll", "I O\nlove O\n# a stray note\nit O\n")
    germeval = "#\thttp://x [2009-10-17]\n1\tSchartau\tB-PER\n2\tsagte\tO\n"
    assert _conll(tmp_path / "g.tsv", germeval, [2, 3]) == [(["Schartau", "sagte"], ["B-PER", "O"], "2")]


def test_ten_columns_with_the_word_first_are_not_conllu(tmp_path):
    """Only an ID-first ten-column file is CoNLL-U, whose "1-2" and "8.1" lines are no words: where the word
    comes first, a score "3-1" or a number "2.5" is a word like any other."""
    rest = " _" * 8
    text = f"won{rest} O\n3-1{rest} O\nat{rest} O\n2.5{rest} O\n"
    assert _conll(tmp_path / "ten.conll", text) == [(["won", "3-1", "at", "2.5"], ["O"] * 4, "1")]


def test_word_column_counted_from_the_end_can_be_the_first(tmp_path):
    """data.conll_columns [-4, -1] of a four-column file picks the first column as [1, -1] does: its "#" is a
    word there too (CoNLL-2003's "# NN I-NP O"), not a comment."""
    text = "rise NN I-NP O\n# NN I-NP O\n"
    assert _conll(tmp_path / "c.conll", text, [-4, -1]) == [(["rise", "#"], ["O", "O"], "1")]


def test_a_bare_docstart_line_does_not_set_the_column_count(tmp_path):
    """A "-DOCSTART-" line of another column count than the data (alone on its line here) says nothing of the
    file's layout: the data lines are not refused as ragged against it."""
    text = "-DOCSTART-\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
    assert _conll(tmp_path / "d.conll", text) == [(["EU", "rejects"], ["B-ORG", "O"], "3")]

def test_conll_column_past_the_line_is_refused_naming_file_line_and_key(tmp_path):
    path = tmp_path / "g.conll"
    with pytest.raises(DataError, match=r"g.conll:2: data.conll_columns \[2, 5\]: this line has 4 column\(s\), "
                                        r"no column 5$"):
        _conll(path, "#\turl\n1 Schartau B-PER O\n", [2, 5])
    with pytest.raises(DataError, match=r"g.conll:1: data.conll_columns \[1, -1\]: the word and the tag are the "
                                        r"same column of this line's 1"):
        _conll(path, "Schartau\n", [1, -1])
    with pytest.raises(DataError, match=r"g.conll:1: expected 'token ... tag' columns"):
        _conll(path, "Schartau\n")  # (the default layout says what it always said)


def test_parquet_rows_are_read_and_named_by_their_row_index(tmp_path, tiny_bert):
    """No test read parquet at all: a good file's rows must become the training records, and a bad value must
    be named by its 0-based row (the index pandas and pyarrow show), not the row after it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = cls_records(6)
    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist(rows), good)
    recs = read_records(str(good))
    assert [{k: v for k, v in r.items() if k != WHERE} for r in recs] == rows
    assert [r[WHERE] for r in recs] == [f"{good}[row {i}]" for i in range(6)]
    cfg = _cfg(tmp_path, tiny_bert, "seq_cls", data=good)
    built = build_datasets(cfg, get_task("seq_cls"), load_tokenizer(cfg))
    assert len(built["train"]) == 6 and built["labels"] == ["neg", "pos"]
    rows[3]["text"] = ""
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), bad)
    cfg = _cfg(tmp_path, tiny_bert, "seq_cls", data=bad)
    with pytest.raises(DataError) as err:
        build_datasets(cfg, get_task("seq_cls"), load_tokenizer(cfg))
    assert f"{bad}[row 3]: column 'text' must be a non-empty string" in err.value.render()


def _cfg(tmp_path, model, task="causal_lm", data=None, **extra):
    raw = {"task": task, "model": {"name_or_path": str(model), "dtype": "float32"},
           "data": {"train": str(data), "max_length": 256, "cache": False, **extra},
           "train": {"mixed_precision": "no"}, "output_dir": str(tmp_path / "out")}
    return from_dict(raw)


def test_bos_leads_exactly_where_the_tokenizer_puts_it(tmp_path, tiny_llama):
    """Training, `predict` and a merged model's user calling `tokenizer(prompt)` see the same first token: BOS
    where the tokenizer adds it itself (Llama-style, as the suite's tiny one), none where it has a BOS it does
    not add (GPT-NeoX style). scaletune used to add BOS wherever the tokenizer had one."""
    import shutil

    from tokenizers import processors

    from scaletune.infer import prompt_ids, prompt_segments

    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "input": "", "output": "hi there"}] * 2)
    neox = tmp_path / "neox"  # the same model, its tokenizer no longer adding BOS
    shutil.copytree(tiny_llama, neox)
    tok = load_tokenizer(_cfg(tmp_path, neox, data=data))
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save_pretrained(neox)
    for model, leads in ((tiny_llama, True), (neox, False)):
        cfg = _cfg(tmp_path, model, data=data)
        tok = load_tokenizer(cfg)
        ids = build_datasets(cfg, get_task("causal_lm"), tok)["train"][0]["input_ids"]
        prompt = prompt_ids(tok, prompt_segments({"text": "Say hi"}, tok)[1])
        plain = tok(tok.decode(prompt, skip_special_tokens=True))["input_ids"]  # as a transformers user would
        assert (ids[0] == tok.bos_token_id) is leads and (prompt[0] == tok.bos_token_id) is leads, model
        assert plain == prompt and ids[:len(prompt)] == prompt, model


def _with_tokenizer(tmp_path, tiny_llama, name, pre_tokenizer, decoder, texts):
    """The tiny Llama with a BPE tokenizer of its own, trained on `texts` (tokenising tests only: its ids may
    pass the model's vocabulary)."""
    import shutil

    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    from stutil import corpus

    model = tmp_path / name
    shutil.copytree(tiny_llama, model)
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / file).unlink(missing_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoder
    tok.train_from_iterator(corpus() + texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                                                   show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(model)
    return model


def test_segments_tokenise_as_their_joined_text_with_a_sentencepiece_tokenizer(tmp_path, tiny_llama):
    """A Metaspace tokenizer (Llama 2, Mistral) starts each call with a word mark: answers tokenised apart
    from their prompt began with a stray '\u2581' that `predict` (the prompt in one call) never produces."""
    from tokenizers import decoders, pre_tokenizers

    spm = _with_tokenizer(tmp_path, tiny_llama, "spm", pre_tokenizers.Metaspace(prepend_scheme="first"),
                          decoders.Metaspace(prepend_scheme="first"),
                          ["### Instruction:\n### Response:\n Say hi there. Add 2 and 3: 5"])
    record = {"instruction": "Add 2 and 3.", "input": "", "output": "5", "history": [["Say hi", "hi there"]]}
    data = write_jsonl(tmp_path / "a.jsonl", [record] * 2)
    cfg = _cfg(tmp_path, spm, data=data)
    tok = load_tokenizer(cfg)
    task = get_task("causal_lm")
    ex = build_datasets(cfg, task, tok)["train"][0]
    text = "".join(t for t, _ in to_segments(task.format.convert(record), tok, "?"))
    assert ex["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    answers = [tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])]
    assert answers == ["hi there</s> 5</s>"] or answers == ["hi there</s>5</s>"], answers


@pytest.mark.parametrize("prompt", ["The capital of France is ", "Q: capital of France?\nA:", "Q:\n"])
def test_training_gives_the_model_predicts_prompt(tmp_path, tiny_llama, prompt):
    """What precedes an answer in training is what `predict` gives the model: a prompt ending in a space
    (one token with the answer's first word in the joined text) stays tokenised apart from its answer."""
    from tokenizers import decoders, pre_tokenizers

    from scaletune.infer import prompt_ids, prompt_segments

    # merges such as " Paris": with a space-ended prompt the joined text has one token across the two
    bpe = _with_tokenizer(tmp_path, tiny_llama, "bpe", pre_tokenizers.ByteLevel(add_prefix_space=False),
                          decoders.ByteLevel(), ["The capital of France is Paris"] * 50)
    record = {"prompt": prompt, "completion": "Paris"}
    cfg = _cfg(tmp_path, bpe, data=write_jsonl(tmp_path / "p.jsonl", [record] * 2))
    tok = load_tokenizer(cfg)
    ex = build_datasets(cfg, get_task("causal_lm"), tok)["train"][0]
    given = prompt_ids(tok, prompt_segments({"prompt": prompt}, tok, "prompt_completion")[1])
    assert ex["input_ids"][:len(given)] == given and all(lab == IGNORE for lab in ex["labels"][:len(given)])
    assert tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]) == "Paris</s>"


def test_alpaca_prompt_is_masked_and_response_trained(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "input": "", "output": "hi there"}] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    tok = load_tokenizer(cfg)
    task = get_task("causal_lm")
    ex = build_datasets(cfg, task, tok)["train"][0]
    ids, labels = ex["input_ids"], ex["labels"]
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    prompt = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE])
    assert trained == "hi there</s>"
    assert "Say hi" in prompt and "hi there" not in prompt
    cfg2 = _cfg(tmp_path, tiny_llama, data=data, train_on_prompt=True)
    ex2 = build_datasets(cfg2, get_task("causal_lm"), tok)["train"][0]
    assert sum(lab != IGNORE for lab in ex2["labels"]) == len(ids) - 1  # all but BOS


@pytest.mark.parametrize("fmt,record", [
    ("sharegpt", {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                                    {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}),
    ("messages", {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
                               {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                               {"role": "assistant", "content": "a2"}]}),
])
def test_chat_formats_train_only_assistant_turns(tmp_path, tiny_llama, fmt, record):
    data = write_jsonl(tmp_path / "c.jsonl", [record] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    tok = load_tokenizer(cfg)
    task = get_task("causal_lm")
    ex = build_datasets(cfg, task, tok)["train"][0]
    assert task.format.name == fmt
    trained = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    assert "a1" in trained and "a2" in trained and "q1" not in trained and "q2" not in trained


@pytest.mark.parametrize("template", [False, True])
def test_messages_weight_0_turn_is_context_not_target(tmp_path, tiny_llama, template):
    """OpenAI's fine-tuning format: an assistant turn with weight 0 is in the prompt but not trained."""
    record = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "weight": 0},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "weight": 1}]}
    data = write_jsonl(tmp_path / "c.jsonl", [record] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    tok = load_tokenizer(cfg)
    if template:
        tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    ex = build_datasets(cfg, get_task("causal_lm"), tok)["train"][0]
    trained = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    text = tok.decode(ex["input_ids"])
    assert "a1" in text and "a1" not in trained
    assert "a2" in trained and "q2" not in trained


@pytest.mark.parametrize("turns,message", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}],
     r"c.jsonl:1: messages\[1\].weight must be 0 or 1, got 0.5"),
    ([{"role": "user", "content": "q", "weight": 0}, {"role": "assistant", "content": "a"}],
     r"c.jsonl:1: messages\[0\].weight: only assistant turns are trained.*this one is user"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}],
     r"c.jsonl:1: every assistant turn has weight 0: nothing to learn from"),
])
def test_messages_weight_errors_name_the_line_and_turn(tmp_path, tiny_llama, turns, message):
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": turns}])
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    with pytest.raises(DataError, match=message):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


def test_chat_template_of_tokenizer_is_used(tmp_path, tiny_llama):
    tok = load_tokenizer(_cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}])))
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    from scaletune.data.formats import to_segments

    segs = to_segments({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                       tok, "x")
    assert segs == [("<|user|>q</s><|assistant|>", False), ("a</s>", True)]


def test_format_detection_error_lists_options(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    with pytest.raises(DataError, match=r"cannot tell the data format from columns \['answer', 'question'\]"):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


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


def test_tokenised_cache_is_reused(tmp_path, tiny_bert, monkeypatch, caplog):
    monkeypatch.setenv("SCALETUNE_CACHE", str(tmp_path / "cache"))
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b", "label": "pos"}, {"text": "b", "label": "neg"}] * 4)
    raw = {"task": "seq_cls", "model": {"name_or_path": str(tiny_bert), "dtype": "float32"},
           "data": {"train": str(train)}, "train": {"mixed_precision": "no"}}
    cfg = from_dict(raw)
    tok = load_tokenizer(cfg)
    with caplog.at_level("INFO", logger="scaletune"):  # (minutes of silence on a large file: say which)
        first = build_datasets(cfg, get_task("seq_cls"), tok)
        assert f"data: tokenising 8 example(s) of {train} (cached for later runs in " in caplog.text
        calls = []
        task = get_task("seq_cls")
        monkeypatch.setattr(task, "encode", lambda *a: calls.append(a))
        second = build_datasets(cfg, task, tok)
        assert f"data: tokenised {train} read from the cache" in caplog.text
    assert calls == [] and second["train"]["input_ids"] == first["train"]["input_ids"]
    assert second["labels"] == ["neg", "pos"] and task.label == "label"
    train.write_text(json.dumps({"text": "new", "label": "pos"}) + "\n" + json.dumps({"text": "x", "label": "neg"}))
    third = build_datasets(cfg, get_task("seq_cls"), tok)  # content changed -> new fingerprint
    assert len(third["train"]) == 2
    caplog.clear()
    with caplog.at_level("INFO", logger="scaletune"), pytest.raises(DataError, match="file not found"):
        build_datasets(from_dict({**raw, "data": {"train": str(tmp_path / "gone.jsonl")}}), get_task("seq_cls"), tok)
    assert "tokenising" not in caplog.text  # (it used to announce the reading of a file that is not there)


TEXTS = ["a b c d e f g h a b c d e f g h", "h g f e d c b a h g f e d c b a"]


def _cls_cache_setup(tmp_path, tiny_bert, monkeypatch, **data):
    monkeypatch.setenv("SCALETUNE_CACHE", str(tmp_path / "cache"))
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": TEXTS[0], "label": "pos"}, {"text": TEXTS[1], "label": "neg"}] * 4)
    cfg = from_dict({"task": "seq_cls", "model": {"name_or_path": str(tiny_bert), "dtype": "float32"},
                     "data": {"train": str(train), "max_length": 8, **data}, "train": {"mixed_precision": "no"}})
    return cfg, load_tokenizer(cfg)


def test_cache_key_follows_truncation_side_and_the_seed_only_for_a_split(tmp_path, tiny_bert, monkeypatch):
    """A tokenizer saved with truncation_side "left" keeps the other end of a cls text: it got the entry of
    the same vocabulary cut on the right, so it trained on ids predict never feeds it. The seed picks only
    data.eval_fraction's split: changing it re-tokenised the whole set for nothing."""
    from scaletune.data import fingerprint

    cfg, tok = _cls_cache_setup(tmp_path, tiny_bert, monkeypatch)
    right = build_datasets(cfg, get_task("seq_cls"), tok)["train"]["input_ids"]
    tok.truncation_side = "left"
    left = build_datasets(cfg, get_task("seq_cls"), tok)["train"]["input_ids"]
    assert left != right and left == tok(TEXTS * 4, truncation=True, max_length=8)["input_ids"]
    reseeded = from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "seed": 7}})
    assert fingerprint(reseeded, tok) == fingerprint(cfg, tok)
    split = from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "eval_fraction": 0.25}})
    resplit = from_dict({**split.to_dict(), "train": {**split.to_dict()["train"], "seed": 7}})
    assert fingerprint(resplit, tok) != fingerprint(split, tok)


# A changed value for every data.* key the cache key must follow (the base config: _cls_cache_setup's, with
# eval_fraction 0.1): each one changes what is read, split or encoded.
_DATA_CHANGES = {
    "train": lambda cfg, tmp: [{"path": cfg.data.train, "weight": 2.0}],  # the same file, another weight
    "eval": lambda cfg, tmp: str(write_jsonl(tmp / "e.jsonl", [{"text": TEXTS[0], "label": "pos"}])),
    "eval_fraction": lambda cfg, tmp: 0.2,
    "format": lambda cfg, tmp: "text",
    "max_length": lambda cfg, tmp: 16,
    "train_on_prompt": lambda cfg, tmp: True,
    "packing": lambda cfg, tmp: True,
    "columns": lambda cfg, tmp: {"instruction": "question"},
    "text_column": lambda cfg, tmp: "sentence",
    "text_pair_column": lambda cfg, tmp: "hypothesis",
    "label_column": lambda cfg, tmp: "y",
    "label_separator": lambda cfg, tmp: ";",
    "tokens_column": lambda cfg, tmp: "words",
    "tags_column": lambda cfg, tmp: "ner",
    "conll_columns": lambda cfg, tmp: [2, 3],
    "labels": lambda cfg, tmp: ["pos", "neg"],
}
# not in the key: how the data is loaded, not what it is; chat_template's text is in the tokenizer digest
_NOT_IN_CACHE_KEY = {"num_workers", "num_proc", "cache", "group_by_length", "chat_template"}


def test_every_data_key_is_covered_by_the_cache_key_test():
    """A new data.* key must be added to _DATA_CHANGES (or to the keys deliberately out of the cache key),
    so the test below checks that the tokenised-data cache follows it."""
    from dataclasses import fields

    from scaletune.config import DataConfig

    assert {f.name for f in fields(DataConfig)} == set(_DATA_CHANGES) | _NOT_IN_CACHE_KEY


@pytest.mark.parametrize("key", sorted(_DATA_CHANGES))
def test_cache_key_follows_every_data_key(tmp_path, tiny_bert, monkeypatch, key):
    """A data.* key left out of the cache key (max_length, the sources' weights, eval_fraction, ...) makes a
    run with the changed setting train on the tokenised data of the old one, without a word."""
    import copy

    from scaletune.data import fingerprint

    cfg, tok = _cls_cache_setup(tmp_path, tiny_bert, monkeypatch, eval_fraction=0.1)
    changed = copy.deepcopy(cfg)
    value = _DATA_CHANGES[key](cfg, tmp_path)
    assert value != getattr(cfg.data, key)
    setattr(changed.data, key, value)
    assert fingerprint(changed, tok) != fingerprint(cfg, tok)
    assert fingerprint(copy.deepcopy(cfg), tok) == fingerprint(cfg, tok)  # (a copy keeps the key)


def test_cache_key_follows_the_data_files_contents_edited_in_place(tmp_path, tiny_bert, monkeypatch):
    """data.eval (and data.train) edited in place, same path and suffix: the cache keyed by the path would
    evaluate (train) on the old examples' tokens."""
    from scaletune.data import fingerprint

    cfg, tok = _cls_cache_setup(tmp_path, tiny_bert, monkeypatch)
    cfg.data.eval = str(write_jsonl(tmp_path / "e.jsonl", [{"text": TEXTS[0], "label": "pos"}]))
    before = fingerprint(cfg, tok)
    write_jsonl(Path(cfg.data.eval), [{"text": TEXTS[1], "label": "pos"}])
    after_eval = fingerprint(cfg, tok)
    assert after_eval != before
    write_jsonl(Path(cfg.data.train), [{"text": TEXTS[1], "label": "neg"}] * 8)
    assert fingerprint(cfg, tok) != after_eval


def test_broken_cache_entries_are_rebuilt_and_replaced(tmp_path, tiny_bert, monkeypatch, caplog):
    """An entry with a truncated Arrow file or an empty meta.json crashed the run with pyarrow's or json's
    traceback; one without meta.json (a crash while it was written) was never replaced, and every run left
    a full copy of the data beside it (the rename onto the non-empty directory failed, silently)."""
    from scaletune.data import cache_root, fingerprint

    cfg, tok = _cls_cache_setup(tmp_path, tiny_bert, monkeypatch)
    fresh = list(build_datasets(cfg, get_task("seq_cls"), tok)["train"]["input_ids"])  # (read now: the entry is damaged below)
    entry = cache_root() / fingerprint(cfg, tok)
    arrow = next((entry / "train").glob("*.arrow"))
    calls: list = []
    for damage in ("truncate", "meta", "no-meta"):
        if damage == "truncate":
            arrow.write_bytes(arrow.read_bytes()[:100])
        elif damage == "meta":
            (entry / "meta.json").write_text("")
        else:
            (entry / "meta.json").unlink()
        caplog.clear()
        with caplog.at_level("WARNING", logger="scaletune"):
            again = list(build_datasets(cfg, get_task("seq_cls"), tok)["train"]["input_ids"])
        assert again == fresh, damage
        if damage != "no-meta":
            assert f"the tokenised-data cache entry {entry} cannot be read" in caplog.text, damage
        assert (entry / "meta.json").is_file() and sorted(p.name for p in entry.parent.iterdir()) == [entry.name]
        calls.clear()
        task = get_task("seq_cls")
        monkeypatch.setattr(task, "encode", lambda *a: calls.append(a))
        assert list(build_datasets(cfg, task, tok)["train"]["input_ids"]) == fresh and calls == []  # the repaired entry
        monkeypatch.undo()
        monkeypatch.setenv("SCALETUNE_CACHE", str(tmp_path / "cache"))


def test_the_cache_is_found_by_the_files_contents_and_read_mapped(tmp_path, tiny_bert, monkeypatch, capsys):
    """The cache key held data.train's path: the same file copied to scratch space was tokenised again. The
    first run trained on the pieces built in memory (~1.1 GB more at 300k Alpaca records) where later runs
    map the saved copy; 64-bit integer columns took a third more space than the ids need; and a long
    tokenisation showed nothing."""
    import shutil

    import scaletune.data as data
    from scaletune import progress

    monkeypatch.setattr(data, "CHUNK", 3)  # several pieces: progress lines
    monkeypatch.setattr(progress, "LINE_EVERY_S", -1.0)  # (a line per piece: stderr is no terminal here)
    monkeypatch.setenv("SCALETUNE_NO_PROGRESS", "0")
    cfg, tok = _cls_cache_setup(tmp_path, tiny_bert, monkeypatch)
    built = build_datasets(cfg, get_task("seq_cls"), tok)["train"]
    assert built.cache_files and "tokenising: 3/8 records" in capsys.readouterr().err
    assert {f.name: str(f.type) for f in built.data.schema} == {
        "input_ids": "list<item: int32>", "labels": "int32", "length": "int32"}
    copy = tmp_path / "scratch" / "copy.jsonl"
    copy.parent.mkdir()
    shutil.copy(cfg.data.train, copy)
    calls: list = []
    task = get_task("seq_cls")
    monkeypatch.setattr(task, "encode", lambda *a: calls.append(a))
    cfg.data.train = str(copy)
    assert list(build_datasets(cfg, task, tok)["train"]["input_ids"]) == list(built["input_ids"]) and calls == []
    # a second run that tokenised the same data meanwhile keeps the entry the first one trains from (deleting
    # its mapped files would pull them from under it on a network file system)
    entry = data.cache_root() / data.fingerprint(cfg, tok)
    arrow = next((entry / "train").glob("*.arrow"))
    inode = arrow.stat().st_ino
    data._save_atomically(entry, built, None, {"labels": ["neg", "pos"], "has_eval": False})
    assert arrow.stat().st_ino == inode and sorted(p.name for p in entry.parent.iterdir()) == [entry.name]
    as_csv = tmp_path / "scratch" / "copy.csv"  # the same bytes another reader reads: another entry
    shutil.copy(copy, as_csv)
    assert data.fingerprint(cfg, tok) != data.fingerprint(from_dict({**cfg.to_dict(), "data": {
        **cfg.to_dict()["data"], "train": str(as_csv)}}), tok)


def test_a_cache_that_cannot_be_written_is_named(tmp_path, tiny_bert, monkeypatch, caplog):
    cfg, tok = _cls_cache_setup(tmp_path, tiny_bert, monkeypatch)
    (tmp_path / "cache").write_text("a file, not a directory")
    with caplog.at_level("WARNING", logger="scaletune"):
        built = build_datasets(cfg, get_task("seq_cls"), tok)
    assert len(built["train"]) == 8
    assert "could not write the tokenised-data cache to " in caplog.text and "SCALETUNE_CACHE" in caplog.text


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
        assert set(get_task(task).eval_only_columns) <= set(built["eval"].column_names)
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


@pytest.mark.parametrize("record", [
    {"instruction": "Translate to French", "input": "hello", "system": "Be terse",
     "history": [["hi", "hello there"]], "output": "bonjour"},
    {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]},
    {"prompt": "2 + 2 =", "completion": " 4"},
])
def test_predict_prompts_the_way_training_rendered(tmp_path, tiny_llama, record):
    """`predict` feeds the model exactly the token prefix training put before the response (system,
    history, input included), for a record of the same shape with its answer removed."""
    from scaletune.infer import generate, prompt_segments
    from scaletune.tasks.base import IGNORE

    name = "sharegpt" if "conversations" in record else "prompt_completion" if "prompt" in record else "alpaca"
    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "a.jsonl", [record] * 2), format=name)
    tok = load_tokenizer(cfg)
    task = get_task("causal_lm")
    task.setup([record], cfg, "a.jsonl")
    enc = task.encode(record, tok, cfg, None)
    labels = enc["labels"]
    last_response = max(i for i in range(1, len(labels)) if labels[i] != IGNORE and labels[i - 1] == IGNORE)
    trained_prompt = enc["input_ids"][:last_response]  # everything before the final answer, history included
    query = {k: v for k, v in record.items() if k not in ("output", "completion")}
    if "conversations" in query:
        query["conversations"] = query["conversations"][:1]
    seen = {}

    class Model:
        device = torch.device("cpu")

        def generate(self, input_ids, **kw):
            seen["ids"] = input_ids[0].tolist()
            return input_ids

    generate(Model(), tok, prompt_segments(query, tok)[1], 3)
    assert seen["ids"] == trained_prompt


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


@pytest.mark.parametrize("records,expected", [
    ([{"instruction": "q", "output": "a", "label": True, "kto_tag": "x"}] * 3
     + [{"instruction": "q", "output": "a", "input": "i", "system": "s", "history": [], "label": None}],
     "data.train: fields ignored by format alpaca: kto_tag (3 records), label (3 records)"),
    ([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "s",
       "tools": "[]"}, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
     None),  # tools are read (ShareGPT tool data)
    ([{"prompt": "q", "completion": " a", "label": False}] * 2,
     "data.train: fields ignored by format prompt_completion: label (2 records)"),
    ([{"messages": [{"role": "user", "content": "q", "name": "ann"}, {"role": "assistant", "content": "a",
                                                                      "weight": 1, "name": "bot"}]},
      {"messages": [{"role": "user", "content": "q", "tool_calls": None}, {"role": "assistant", "content": "a"}]}],
     "data.train: fields ignored by format messages: messages[].name (1 record)"),
    ([{"conversations": [{"from": "human", "value": "q", "loss": True}, {"from": "gpt", "value": "a"}]}],
     "data.train: fields ignored by format sharegpt: conversations[].loss (1 record)"),
    ([{"instruction": "q", "input": "", "output": "a", "system": "s", "history": [["u", "v"]]}] * 2, None),
])
def test_fields_a_format_ignores_are_named_once(tmp_path, tiny_llama, caplog, monkeypatch, records, expected):
    """Converting keeps only the fields a format reads; the rest (a KTO label, ShareGPT tools) are named in
    one warning per dataset, with counts, and again when the tokenised cache is reused."""
    monkeypatch.setenv("SCALETUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "a.jsonl", records)
    cfg = _cfg(tmp_path, tiny_llama, data=data, cache=True)
    tok = load_tokenizer(cfg)
    for _ in range(2):  # built, then loaded from the cache
        caplog.clear()
        with caplog.at_level("WARNING", logger="scaletune"):
            build_datasets(cfg, get_task("causal_lm"), tok)
        notes = [r.getMessage() for r in caplog.records if "ignored by format" in r.getMessage()]
        assert notes == ([expected] if expected else [])


def test_ignored_fields_of_the_eval_file_are_named_too(tmp_path, tiny_llama, caplog):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}] * 2)
    evalf = write_jsonl(tmp_path / "e.jsonl", [{"text": "a b c", "source": "web"}] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=train, eval=str(evalf))
    with caplog.at_level("WARNING", logger="scaletune"):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))
    notes = [r.getMessage() for r in caplog.records if "ignored by format" in r.getMessage()]
    assert notes == ["data.eval: fields ignored by format text: source (2 records)"]


def test_conll_format_reads_any_suffix_and_keeps_no_break_spaces(tmp_path):
    """data.format: conll names the layout (a CoNLL file called .tsv); a token may hold a no-break space."""
    path = tmp_path / "ner.tsv"
    path.write_text("New\u00a0York B-LOC\nis O\n\nBob B-PER\n", encoding="utf-8")
    records = read_records(str(path), conll=True)
    assert [(r["tokens"], r["tags"]) for r in records] == [(["New\u00a0York", "is"], ["B-LOC", "O"]),
                                                          (["Bob"], ["B-PER"])]


def test_plain_text_in_a_txt_file_says_txt_is_read_as_conll(tmp_path, tiny_llama):
    ragged = tmp_path / "corpus.txt"
    ragged.write_text("the cat sat on the mat\nhello world\n")
    with pytest.raises(DataError, match=r"corpus.txt:2: 2 columns, earlier lines have 6 \(a .txt file is read as "
                                        r"CoNLL columns"):
        read_records(str(ragged))
    even = tmp_path / "even.txt"
    even.write_text("the cat\nhello world\n")
    cfg = _cfg(tmp_path, tiny_llama, data=even)
    with pytest.raises(DataError, match=r"columns \['tags', 'tokens'\] \(it was read as a CoNLL token/tag file"):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     r"c.jsonl:1: messages\[1\].content is empty \(nothing to learn from\)"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
     r"c.jsonl:1: conversations\[1\].value is empty \(nothing to learn from\)"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": ["x"]},
     r"c.jsonl:1: field 'system' must be a string, got list"),
])
def test_chat_records_with_empty_answers_or_bad_system_are_refused(tmp_path, tiny_llama, record, message):
    """As alpaca's empty output is: an empty answer would teach the model to answer with nothing."""
    data = write_jsonl(tmp_path / "c.jsonl", [record])
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    with pytest.raises(DataError, match=message):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


def test_eval_file_in_another_format_is_named(tmp_path, tiny_llama):
    """Plain text is trained without a template: an eval file of it for a conversation run is refused (a
    conversation format of another kind is read as its own: see the mixed-formats test)."""
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "q", "output": "a"}] * 2)
    evalf = write_jsonl(tmp_path / "e.jsonl", [{"text": "q a"}])
    cfg = _cfg(tmp_path, tiny_llama, data=train, eval=str(evalf))
    with pytest.raises(DataError, match=r"data.eval: .*e.jsonl:1 is a text record, data.train holds alpaca"):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


def test_eval_file_that_max_length_empties_is_an_error(tmp_path, tiny_llama):
    """It used to be dropped with a 'skipped' warning, and the run trained without any evaluation."""
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "q", "output": "a"}] * 2)
    evalf = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "word " * 200, "output": "a"}] * 3)
    cfg = _cfg(tmp_path, tiny_llama, data=train, eval=str(evalf), max_length=96)
    with pytest.raises(DataError, match=r"data.eval: no usable examples in .*e.jsonl \(3 had no target tokens "
                                        r"within data.max_length=96\)"):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


@pytest.mark.parametrize("obj", [
    {"instruction": "q", "output": "a"},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "s"},
])
def test_a_json_file_of_one_object_is_one_record(tmp_path, obj):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(obj))
    records = read_records(str(path))
    assert [{k: v for k, v in r.items() if k in obj} for r in records] == [obj]


@pytest.mark.parametrize("trained,templated", [("alpaca", True), ("text", False), ("prompt_completion", False)])
def test_plain_line_is_a_user_turn_only_for_models_trained_on_chats(tiny_llama, tmp_path, trained, templated):
    """A model trained on `text` or `prompt_completion` never saw the chat template: a plain input line is
    its prompt as it is, not an "### Instruction:" turn."""
    from scaletune.infer import prompt_segments

    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}]))
    tok = load_tokenizer(cfg)
    prompt, segments = prompt_segments({"text": "Once upon a time"}, tok, trained)
    rendered = "".join(text for text, _ in segments)
    assert prompt == "Once upon a time"
    assert (rendered == "Once upon a time") == (not templated)


def test_text_pairs_train_with_the_segment_ids_predict_uses(tmp_path, tiny_bert):
    """A BERT tokenizer marks the second text with token_type_ids = 1; predict (and any plain transformers
    use of the model) passes them, so training and eval must too."""
    from transformers import AutoModelForSequenceClassification

    from scaletune.tasks.base import pad_batch

    records = [{"text": "alpha bravo", "text_pair": "charlie", "label": "a"},
               {"text": "delta", "text_pair": "echo foxtrot golf", "label": "b"}]
    cfg = _cfg(tmp_path, tiny_bert, task="seq_cls", data=write_jsonl(tmp_path / "p.jsonl", records),
               text_pair_column="text_pair")
    tok = load_tokenizer(cfg)
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]  # as BertTokenizerFast has
    task = get_task("seq_cls")
    train = build_datasets(cfg, task, tok)["train"]
    batch = pad_batch([train[i] for i in range(2)], tok.pad_token_id)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2, type_vocab_size=2).eval()
    with torch.no_grad():
        model.bert.embeddings.token_type_embeddings.weight.normal_()  # segments must matter in this model
        _, logits = task.loss_sum(model, batch)
        for i, r in enumerate(records):
            direct = model(**tok(r["text"], r["text_pair"], return_tensors="pt")).logits[0]
            torch.testing.assert_close(logits[i], direct)


def test_missing_relative_data_path_says_it_is_read_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data.train: file not found: data/t.jsonl \(relative paths are read from "
                                        r"the working directory: .*/data/t.jsonl\)"):
        read_records("data/t.jsonl")


_CLOSING = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ END }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_a_chat_template_that_refuses_a_conversation_is_a_data_error(tmp_path, tiny_llama):
    """Templates without a system role (Gemma-style) raise from Jinja: one error naming file:line and the
    template's message, not a traceback."""
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "system", "content": "s"},
                                                            {"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]}])
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    tok = load_tokenizer(cfg)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + _CLOSING.replace("{{ END }}", "</s>"))
    with pytest.raises(DataError, match=r"c.jsonl:1: the tokenizer's chat template refused this conversation "
                                        r"\(system -> user -> assistant\): System role not supported"):
        build_datasets(cfg, get_task("causal_lm"), tok)


def test_conversation_formats_mix_and_text_is_named(tmp_path, tiny_llama):
    """Sources in alpaca, sharegpt and messages are all chats: a run may mix them (axolotl's and LLaMA-Factory's
    dataset lists do), and data.eval may be in another of them; each record trains as it would alone. Plain text
    is trained without a template: a source of it beside a chat format is named (was "sharegpt.jsonl:1: field
    'instruction' is missing")."""
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "q", "input": "", "output": "a"}] * 2)
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"conversations": [{"from": "human", "value": "q2"},
                                                                      {"from": "gpt", "value": "a2"}]}] * 2)
    messages = write_jsonl(tmp_path / "messages.jsonl", [{"messages": [{"role": "user", "content": "q3"},
                                                                       {"role": "assistant", "content": "a3"}]}])
    tok = load_tokenizer(_cfg(tmp_path, tiny_llama, data=alpaca))
    alone = {p: [(ex["input_ids"], ex["labels"])
                 for ex in build_datasets(_cfg(tmp_path, tiny_llama, data=p), get_task("causal_lm"), tok)["train"]]
             for p in (alpaca, chats, messages)}
    cfg = _cfg(tmp_path, tiny_llama, data=alpaca, eval=str(messages))
    cfg.data.train = [str(alpaca), str(chats)]
    built = build_datasets(cfg, get_task("causal_lm"), tok)
    assert sorted((ex["input_ids"], ex["labels"]) for ex in built["train"]) == sorted(alone[alpaca] + alone[chats])
    assert [(ex["input_ids"], ex["labels"]) for ex in built["eval"]] == alone[messages]
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "q a"}] * 2)
    cfg.data.train, cfg.data.eval = [str(alpaca), str(chats), {"path": str(text), "weight": 2}], None
    # (the text file is named, not the sharegpt one before it, which may be mixed)
    with pytest.raises(DataError, match=f"data.train: {text}:1 is a text record, {alpaca}:1 is alpaca; text and "
                                        "prompt_completion records are not mixed with another format"):
        build_datasets(cfg, get_task("causal_lm"), tok)
    both = write_jsonl(tmp_path / "both.jsonl", [{"instruction": "q", "output": "a"}, {"text": "q a"}])
    cfg.data.train = str(both)  # one file too (its text record failed with alpaca's "field 'instruction'")
    with pytest.raises(DataError, match=f"data.train: {both}:2 is a text record, {both}:1 is alpaca"):
        build_datasets(cfg, get_task("causal_lm"), tok)


@pytest.mark.parametrize("template", [False, True])
def test_a_conversation_opened_by_the_assistant_is_named(tmp_path, tiny_llama, template):
    """A chat template failed on the empty prompt before it (a raw ValueError); the built-in one trained it
    with no prompt at all."""
    record = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a"}]}
    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "c.jsonl", [record] * 2))
    tok = load_tokenizer(cfg)
    if template:
        tok.chat_template = _CLOSING.replace("{{ END }}", "</s>")
    with pytest.raises(DataError, match=r"c.jsonl:1: the conversation starts with an assistant turn to learn"):
        build_datasets(cfg, get_task("causal_lm"), tok)
    # a greeting kept as context (weight 0) trains the answer after it
    record["messages"][0]["weight"] = 0
    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "g.jsonl", [record] * 2))
    ex = build_datasets(cfg, get_task("causal_lm"), tok)["train"][0]
    assert tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]).strip() in ("a</s>", "a")


@pytest.mark.parametrize("record,message", [
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}}, r"p.jsonl:2: 'chosen' / 'rejected' make this preference-pair data"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": False},
     r"p.jsonl:2: a true/false 'label' next to the conversation makes this KTO data"),
])
def test_preference_data_is_refused_saying_what_it_is(tmp_path, tiny_llama, record, message):
    """DPO pairs had "no assistant turn to learn from"; KTO's undesirable answers were trained as targets."""
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    data = write_jsonl(tmp_path / "p.jsonl", [plain, record])
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    with pytest.raises(DataError, match=message):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))
    # as an eval file too (KTO's undesirable answers were scored as targets beside plain training data)
    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "t.jsonl", [plain] * 2), eval=str(data))
    with pytest.raises(DataError, match=message):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


@pytest.mark.parametrize("template", [False, True])
def test_weight_0_answer_stays_untrained_with_train_on_prompt(tmp_path, tiny_llama, template):
    record = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "zebra", "weight": 0},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    data = write_jsonl(tmp_path / "c.jsonl", [record] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, train_on_prompt=True)
    tok = load_tokenizer(cfg)
    if template:
        tok.chat_template = _CLOSING.replace("{{ END }}", "</s>")
    ex = build_datasets(cfg, get_task("causal_lm"), tok)["train"][0]
    trained = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    assert "q1" in trained and "q2" in trained and "a2" in trained  # the context is trained, as asked
    assert "zebra" not in trained and "zebra" in tok.decode(ex["input_ids"])


@pytest.mark.parametrize("end,warned", [("</s>", False), ("</s>\n", False), ("\n", True)])
def test_answers_that_end_in_no_special_token_are_warned(tmp_path, tiny_llama, caplog, end, warned):
    """A chat template that closes no assistant turn trains a model that never stops: said once per dataset."""
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    data = write_jsonl(tmp_path / "c.jsonl", [record] * 3)
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    tok = load_tokenizer(cfg)
    tok.chat_template = _CLOSING.replace("{{ END }}", end)
    with caplog.at_level("WARNING", logger="scaletune"):
        build_datasets(cfg, get_task("causal_lm"), tok)
    notes = [r.getMessage() for r in caplog.records if "does not learn to stop" in r.getMessage()]
    assert notes == (["data.train: 3 of 3 example(s) hold an answer that ends in no end-of-sequence (or other "
                      "special) token" + notes[0].split("special) token", 1)[1]] if warned else []), notes


_GLAIVE = {"conversations": [{"from": "human", "value": "find chicken recipes"},
                             {"from": "function_call", "value": '{"name": "search", "arguments": {"q": "chicken"}}'},
                             {"from": "observation", "value": '{"hits": ["stir fry"]}'},
                             {"from": "gpt", "value": "Try a stir fry."}],
           "tools": '[{"name": "search", "description": "recipe search", "parameters": {"type": "object"}}]'}


def _trained_and_context(tok, ex):
    trained = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    context = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE])
    return trained, context


def test_sharegpt_tools_reach_the_prompt_with_the_built_in_template(tmp_path, tiny_llama):
    """Glaive-style tool data (LLaMA-Factory's ShareGPT + tools): the schemas were dropped and the tool results
    became user instructions. Now the schemas are in the prompt, the call is trained, the result is context."""
    data = write_jsonl(tmp_path / "g.jsonl", [_GLAIVE] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=1024)
    tok = load_tokenizer(cfg)
    trained, context = _trained_and_context(tok, build_datasets(cfg, get_task("causal_lm"), tok)["train"][0])
    assert '"name": "search"' in trained and "Try a stir fry." in trained
    assert "recipe search" in context and "### Tool result:" in context and "stir fry\"]" in context
    assert "recipe search" not in trained and "hits" not in trained


def test_tool_schemas_as_text_keep_non_ascii_names_as_the_calls_write_them(tmp_path, tiny_llama):
    """Chinese tool data (LLaMA-Factory's glaive_toolcall_zh): the schemas in the built-in prompt were
    ASCII-escaped ("\\u5929\\u6c14") while the trained call names the function "天气" as written."""
    record = {"conversations": [{"from": "human", "value": "北京天气"},
                                {"from": "function_call", "value": '{"name": "天气", "arguments": {"城市": "北京"}}'},
                                {"from": "observation", "value": '{"温度": 20}'},
                                {"from": "gpt", "value": "北京20度"}],
              "tools": '[{"name": "天气", "description": "查询天气", "parameters": {"type": "object"}}]'}
    data = write_jsonl(tmp_path / "g.jsonl", [record] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=1024)
    tok = load_tokenizer(cfg)
    trained, context = _trained_and_context(tok, build_datasets(cfg, get_task("causal_lm"), tok)["train"][0])
    assert '[{"name": "天气", "description": "查询天气"' in context, context
    assert '{"name": "天气", "arguments": {"城市": "北京"}}' in trained


def test_built_in_template_puts_the_response_header_before_every_answer(tmp_path, tiny_llama):
    """The answer after a tool result followed the result with no '### Response:' header, so the model learnt
    to answer where `predict` and every other answer put the header; an answer after another answer too."""
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "one"},
                                {"from": "gpt", "value": "two"}]}
    data = write_jsonl(tmp_path / "g.jsonl", [_GLAIVE, record])
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=1024)
    tok = load_tokenizer(cfg)
    for ex, answers in zip(build_datasets(cfg, get_task("causal_lm"), tok)["train"], (2, 2)):
        text = tok.decode(ex["input_ids"])
        assert text.count("### Response:\n") == answers, text
    glaive = tok.decode(build_datasets(cfg, get_task("causal_lm"), tok)["train"][0]["input_ids"])
    assert 'stir fry"]}\n\n### Response:\nTry a stir fry.' in glaive, glaive


_TOOL_TEMPLATE = ("{% if tools %}<|tools|>{% for t in tools %}{{ t.function.name }}:{{ t.function.description }};"
                  "{% endfor %}</s>{% endif %}{% for m in messages %}<|{{ m.role }}|>"
                  "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }}"
                  "({{ c.function.arguments | tojson }}){% endfor %}{% else %}{{ m.content }}{% endif %}</s>"
                  "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_sharegpt_tools_go_to_a_chat_template_that_takes_them(tmp_path, tiny_llama):
    template = _TOOL_TEMPLATE
    data = write_jsonl(tmp_path / "g.jsonl", [_GLAIVE] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=1024)
    tok = load_tokenizer(cfg)
    tok.chat_template = template
    trained, context = _trained_and_context(tok, build_datasets(cfg, get_task("causal_lm"), tok)["train"][0])
    assert 'CALL search({"q": "chicken"})' in trained and "Try a stir fry." in trained
    assert "search:recipe search;" in context and '<|tool|>{"hits"' in context
    assert '"name": "search"' not in trained + context  # the call as the template writes it, not twice


def test_sharegpt_tools_with_a_template_without_tool_support_are_text_with_a_warning(tmp_path, tiny_llama, caplog):
    import scaletune.data.formats as formats

    formats._told_tools_as_text = False
    data = write_jsonl(tmp_path / "g.jsonl", [_GLAIVE] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=1024)
    tok = load_tokenizer(cfg)
    tok.chat_template = _CLOSING.replace("{{ END }}", "</s>")
    with caplog.at_level("WARNING", logger="scaletune"):
        ex = build_datasets(cfg, get_task("causal_lm"), tok)["train"][0]
    trained, context = _trained_and_context(tok, ex)
    assert "chat template takes no tools" in caplog.text
    assert '"name": "search"' in trained and "recipe search" in context and '<|user|>{"hits"' in context


_OPENAI = {"messages": [{"role": "user", "content": "weather in Paris?"},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"id": "c1", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
                        {"role": "assistant", "content": "It is 21 degrees."}],
           "tools": [{"type": "function", "function": {"name": "get_weather", "description": "current weather",
                                                       "parameters": {"type": "object"}}}]}


@pytest.mark.parametrize("native", [False, True])
def test_openai_tool_calls_in_messages(tmp_path, tiny_llama, caplog, native):
    """OpenAI's fine-tuning format with tools: a call's content is null (was refused: "content must be a
    string"), its arguments a JSON string; the call is trained, the schemas and the result are context."""
    data = write_jsonl(tmp_path / "o.jsonl", [_OPENAI] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=1024)
    tok = load_tokenizer(cfg)
    if native:
        tok.chat_template = _TOOL_TEMPLATE
    with caplog.at_level("WARNING", logger="scaletune"):
        trained, context = _trained_and_context(tok, build_datasets(cfg, get_task("causal_lm"), tok)["train"][0])
    assert "ignored" not in caplog.text
    assert "It is 21 degrees." in trained and "current weather" in context and "temp" in context
    if native:
        assert 'CALL get_weather({"city": "Paris"})' in trained
    else:
        assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in trained


def test_a_function_call_that_is_not_json_names_its_turn(tmp_path, tiny_llama):
    bad = {**_GLAIVE, "conversations": [_GLAIVE["conversations"][0], {"from": "function_call", "value": "search"}]}
    data = write_jsonl(tmp_path / "g.jsonl", [bad])
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    with pytest.raises(DataError, match=r"g.jsonl:1: conversations\[1\] \(function_call\) must be a JSON object"):
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


def test_a_file_with_bad_lines_is_named_by_the_setting_that_gave_it(tmp_path):
    """`eval --data broken.jsonl` said "broken.jsonl has unreadable lines", not which flag named the file."""
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\nnot json\n{"text": \n')
    with pytest.raises(DataError) as err:
        read_records(str(bad), key="--data")
    assert str(err.value).startswith(f"error: --data: {bad} has unreadable lines:\n  - {bad}:2: ")


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


def test_records_of_a_json_array_are_named_by_line(tmp_path, tiny_llama):
    """Errors in a pretty-printed JSON array named the item's index (`alp.json[77776]` of a 500k-line file);
    the README promises file:line. A one-line array keeps the index (every item is on line 1)."""
    from scaletune.data.readers import WHERE

    records = [{"instruction": f"Task {i}", "output": "ok"} for i in range(4)]
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(records, indent=2))  # "[", then 4 lines per item: item i starts on 2 + 4 i
    assert [r[WHERE] for r in read_records(str(pretty))] == [f"{pretty}:{2 + 4 * i}" for i in range(4)]
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps(records))
    assert [r[WHERE] for r in read_records(str(flat))] == [f"{flat}[{i}]" for i in range(4)]
    records[2]["output"] = 7
    pretty.write_text(json.dumps(records, indent=2))
    cfg = _cfg(tmp_path, tiny_llama, data=pretty)
    with pytest.raises(DataError, match=r"pretty.json:10: field 'output' must be a string, got int"):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))
    pretty.write_text(pretty.read_text().replace('"Task 3"', '"Task 3" oops'))
    with pytest.raises(DataError, match=r"pretty.json:15: invalid JSON"):
        read_records(str(pretty))


def _built_in_pieces(monkeypatch, cfg, task_name, chunk, procs):
    """build_datasets with pieces of `chunk` records over `procs` processes; also returns the pool sizes used."""
    import scaletune.data as data_mod

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
    monkeypatch.setattr("scaletune.data.CHUNK", 200)  # (a piece's ids outgrow a pipe's 64 KiB buffer)
    monkeypatch.setattr("scaletune.data._workers", workers)
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


@pytest.mark.parametrize("records,extra,message", [
    ([{"prompt": "q", "completion": "a"}], {"chat_template": "chatml"},
     r"data.chat_template: .*t.jsonl holds prompt_completion records, which are not conversations"),
    ([{"text": "plain text"}], {"chat_template": "chatml"},
     r"data.chat_template: .*t.jsonl holds text records, which are not conversations"),
    ([{"text": "plain text"}], {"train_on_prompt": True}, r"data.train_on_prompt: .*t.jsonl holds text records"),
])
def test_a_setting_the_detected_format_ignores_is_refused(tmp_path, tiny_llama, records, extra, message):
    """With data.format auto the format is known only from the data: a chat template the records never
    meet (the token ids were the same with and without it) is refused there."""
    from scaletune.errors import ConfigError

    data = write_jsonl(tmp_path / "t.jsonl", records * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, **extra)
    with pytest.raises(ConfigError, match=message):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


def test_a_revision_of_a_local_model_directory_is_refused(tmp_path, tiny_llama):
    """transformers ignores `revision` for a local directory: `revision: no-such-branch` trained."""
    from scaletune.errors import ConfigError

    cfg = _cfg(tmp_path, tiny_llama, data=tmp_path / "t.jsonl")
    cfg.model.revision = "no-such-branch"
    with pytest.raises(ConfigError, match=r"model.revision: 'no-such-branch' names a version of a hub model, but "
                                          r"model.name_or_path .* is a local directory"):
        load_tokenizer(cfg)
    load_tokenizer(cfg, str(tiny_llama))  # eval/predict (an adapter's tokenizer): a hub run's local snapshot


def test_a_chat_template_that_drops_the_answers_is_named(tmp_path, tiny_llama):
    """A template that writes only the user turns left every example without targets, reported as "no
    target tokens within max_length": the fix it pointed at (a longer max_length) could not help."""
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]}] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    tok = load_tokenizer(cfg)
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(DataError, match=r"c.jsonl:1: the chat template renders assistant turn messages\[1\] as nothing"):
        build_datasets(cfg, get_task("causal_lm"), tok)


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


def test_predict_reads_a_txt_of_conll_columns_as_conll_and_plain_sentences_as_lines(tmp_path):
    """CoNLL-2003 ships as .txt, which training reads as CoNLL: predict on it used to tag each line's columns
    ("EU NNP B-NP B-ORG") as a sentence of four words. Lines ending in the tagger's tags are a CoNLL file;
    sentences, even one ending in a word that is a tag name, stay lines."""
    from scaletune.predict_input import read_inputs

    tags = ["B-ORG", "B-PER", "I-PER", "O"]
    conll = tmp_path / "test.txt"
    conll.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n"
                     "Blackburn NNP I-NP I-PER\n", encoding="utf-8")
    got = read_inputs(str(conll), None, None, tags)
    assert [(item["tokens"], item["__line__"]) for item in got] == [(["EU", "rejects"], 3), (["Peter", "Blackburn"], 6)]
    text = tmp_path / "news.txt"
    text.write_text("EU rejects German call to boycott British lamb.\nJohn says O\n", encoding="utf-8")
    assert [item["text"] for item in read_inputs(str(text), None, None, tags)] == \
        ["EU rejects German call to boycott British lamb.", "John says O"]
    # a seq_cls run (no tags) reads a .txt as lines, as before
    assert len(read_inputs(str(conll), None)) == 5


def test_predict_finds_conll_columns_by_the_runs_tag_column(tmp_path):
    """A .txt whose tags sit in data.conll_columns' tag column (not the last) is read as CoNLL: predict looks
    for the tags where training read them, not in the last column."""
    from scaletune.predict_input import read_inputs

    conll = tmp_path / "test.txt"
    conll.write_text("EU B-ORG NNP\nrejects O VBZ\n\nPeter B-PER NNP\n", encoding="utf-8")
    got = read_inputs(str(conll), None, [1, 2], ["B-ORG", "B-PER", "O"])
    assert [item["tokens"] for item in got] == [["EU", "rejects"], ["Peter"]]


def test_tag_column_lines_are_recognised_by_their_place_and_docstart():
    """A .txt is read as a tagger's CoNLL columns only where every sampled line has two or more columns and one
    of the tags in data.conll_columns' tag place (counted from 1, negative from the end); a bare -DOCSTART- line
    is allowed among them. Lines of a single tag name are plain text."""
    from scaletune.predict_input import conll_lines

    tags = ["O", "B-ORG", "B-PER"]
    assert conll_lines(["-DOCSTART-", "", "EU B-ORG", "rejects O"], tags)
    assert not conll_lines(["O", "B-ORG"], tags)  # (one column: words, not a word and its tag)
    assert not conll_lines(["EU B-ORG", "then a plain sentence"], tags)  # (every sampled line, not the first)
    assert conll_lines(["EU B-ORG NNP", "rejects O VBZ"], tags, 2)
    assert not conll_lines(["EU B-ORG NNP", "rejects O VBZ"], tags, 3)


def test_conll_sniffing_skips_comments_and_tolerates_a_stray_tag():
    """A "#" comment (read_conll skips it) or one tag the tagger does not know in ten lines leaves a .txt a
    CoNLL file; below ten lines, or with more misses, or as plain sentences, it is read as lines of text."""
    from scaletune.predict_input import conll_lines

    tags = ["O", "B-ORG", "B-PER"]
    rows = [f"w{i} {'B-ORG' if i % 3 else 'O'}" for i in range(18)]
    assert conll_lines(["# sent_id = 1", *rows[:3]], tags)
    assert conll_lines([*rows[:9], "Paris B-LOC"], tags)  # (1 of 10 lines: a tag the tagger lacks)
    assert not conll_lines([*rows[:8], "Paris B-LOC"], tags)  # (below ten lines every line must fit)
    assert not conll_lines([*rows[:17], "Paris B-LOC", "a plain sentence"], tags)  # (2 misses in 19 lines)
    assert conll_lines([*rows, "Paris B-LOC", "# O"], tags)  # ("# O" is the "#" word, tagged)
    assert not conll_lines(["# comment", "The cat sat on the mat .", "I saw John O"] * 10, tags)
