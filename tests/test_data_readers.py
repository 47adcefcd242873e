"""Data files read into records (JSONL, JSON, CSV/TSV, CoNLL, parquet) and predict's input lines:
each error names its file:line (or row), and a CoNLL layout is read by its columns."""

from __future__ import annotations

import json
import os

import pytest

from scaletune.data import build_datasets
from scaletune.data.readers import WHERE, read_records
from scaletune.errors import DataError
from scaletune.model import load_tokenizer
from scaletune.tasks import get_task

from stutil import cls_records
from stutil import data_config as _cfg


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


def test_a_tab_separated_file_named_csv_says_to_name_it_tsv(tmp_path):
    """SST-2's `sentence<TAB>label` saved as .csv: the error was "N fields, header has 1" at the first sentence
    holding a comma (line 5 of SST-2's dev set), which said nothing of tabs."""
    p = tmp_path / "dev.csv"
    p.write_text("sentence\tlabel\ngood film\t1\nbad\t0\nslow , dull\t0\n")
    with pytest.raises(DataError, match=r"dev.csv:1: the header 'sentence\\tlabel' is tab-separated, .* name the "
                                        r"file .tsv"):
        read_records(str(p))
    (tmp_path / "one.csv").write_text("text\nhello\n")  # (a one-column CSV without tabs reads as before)
    assert read_records(str(tmp_path / "one.csv"))[0]["text"] == "hello"


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


@pytest.mark.parametrize("obj", [
    {"instruction": "q", "output": "a"},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "s"},
])
def test_a_json_file_of_one_object_is_one_record(tmp_path, obj):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(obj))
    records = read_records(str(path))
    assert [{k: v for k, v in r.items() if k in obj} for r in records] == [obj]


def test_missing_relative_data_path_says_it_is_read_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data.train: file not found: data/t.jsonl \(relative paths are read from "
                                        r"the working directory: .*/data/t.jsonl\)"):
        read_records("data/t.jsonl")


def test_a_file_with_bad_lines_is_named_by_the_setting_that_gave_it(tmp_path):
    """`eval --data broken.jsonl` said "broken.jsonl has unreadable lines", not which flag named the file."""
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\nnot json\n{"text": \n')
    with pytest.raises(DataError) as err:
        read_records(str(bad), key="--data")
    assert str(err.value).startswith(f"error: --data: {bad} has unreadable lines:\n  - {bad}:2: ")


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


def test_json_files_of_json_lines_a_wrapper_or_columns_are_records(tmp_path):
    """A .json holding JSON lines (common) is read as such, naming lines; {"data": [...]} and equal-length
    columns are records too; columns of unequal length are refused, not cut to the shortest."""
    lines = tmp_path / "l.json"
    lines.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [(r["text"], r[WHERE]) for r in read_records(str(lines))] == [("a", f"{lines}:1"), ("b", f"{lines}:3")]
    wrapper = tmp_path / "w.json"
    wrapper.write_text(json.dumps({"version": 2, "data": [{"text": "a"}, {"text": "b"}]}))
    assert [r["text"] for r in read_records(str(wrapper))] == ["a", "b"]
    columns = tmp_path / "c.json"
    columns.write_text(json.dumps({"text": ["a", "b"], "label": ["x", "y"]}))
    assert [(r["text"], r["label"]) for r in read_records(str(columns))] == [("a", "x"), ("b", "y")]
    columns.write_text(json.dumps({"text": ["a", "b"], "label": ["x"]}))
    with pytest.raises(DataError, match=r"c.json: expected a list of objects .* columns of equal length"):
        read_records(str(columns))


def test_a_csv_header_naming_a_column_twice_is_refused_empty_rows_skipped_and_tsv_quotes_are_text(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,x\n,\n , \nb,y\n")  # a spreadsheet's empty rows
    assert [r["text"] for r in read_records(str(p))] == ["a", "b"]
    p.write_text("text,label,text\na,x,b\n")
    with pytest.raises(DataError, match=r"d.csv:1: the first line must be a header with distinct, non-empty"):
        read_records(str(p))
    t = tmp_path / "d.tsv"  # TSV has no quoting (SST-2's sentences hold stray quotes): an open quote is a character
    t.write_text('sentence\tlabel\nshe said "hi\t1\n"ok" then\t0\n')
    assert [r["sentence"] for r in read_records(str(t))] == ['she said "hi', '"ok" then']


def test_a_file_of_many_bad_lines_names_the_first_ten(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("not json\n" * 15)
    with pytest.raises(DataError) as err:
        read_records(str(p))
    text = err.value.render()
    assert f"{p}:10: invalid JSON" in text and f"{p}:11:" not in text and "stopping after 10 problems" in text


def test_predict_reads_a_json_array_as_records_a_bom_on_stdin_and_refuses_a_blank_api_input(tmp_path):
    import io

    from scaletune.predict_input import LINE, PLAIN, given_inputs, read_inputs

    p = tmp_path / "in.json"
    p.write_text('\ufeff[\n  {"text": "a"},\n  {"text": "b"}\n]\n', encoding="utf-8")
    assert [(r["text"], r[LINE]) for r in read_inputs(str(p), io.StringIO())] == [("a", 2), ("b", 3)]
    piped = read_inputs(None, io.StringIO('\ufeff{"text": "c"}\n'))  # a byte-order mark on stdin too
    assert [(r["text"], PLAIN in r) for r in piped] == [("c", False)]
    with pytest.raises(DataError, match=r"inputs\[1\]: expected a non-blank str or a dict, got ' '"):
        given_inputs(["ok", " "])


def test_llama_factory_dataset_names_point_to_their_files(tmp_path, monkeypatch):
    """LLaMA-Factory names data by dataset_info.json entries (`dataset: alpaca_en_demo`) and lists several with
    commas; as data.train both were a bare "file not found"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"alpaca_en_demo": {
        "file_name": "alpaca_en_demo.json"}}))
    with pytest.raises(DataError) as err:
        read_records("alpaca_en_demo")
    assert (f"'alpaca_en_demo' is a dataset name in {tmp_path / 'data' / 'dataset_info.json'}: data.train takes "
            f"the file, {tmp_path / 'data' / 'alpaca_en_demo.json'}") in err.value.render()
    with pytest.raises(DataError) as err:
        read_records("a.json,b.json")
    assert "several files are a YAML list, not one comma-separated string: [a.json, b.json]" in err.value.render()
    with pytest.raises(DataError) as err:  # a name no dataset_info.json knows: just not found
        read_records("other")
    assert err.value.render().rstrip().endswith(f"{tmp_path / 'other'})")


def test_docstart_ends_the_sentence_before_it(tmp_path):
    """Documents concatenated without a blank line before -DOCSTART- joined the last sentence of one document
    to the first of the next: one record, `Paris x`."""
    from scaletune.data.readers import read_conll

    p = tmp_path / "cat.conll"
    p.write_text("-DOCSTART- -X- -X- O\n\nParis NNP I-NP B-LOC\n-DOCSTART- -X- -X- O\nx NN I-NP O\n")
    assert [(r["tokens"], r[WHERE]) for r in read_conll(p)] == [(["Paris"], f"{p}:3"), (["x"], f"{p}:5")]
