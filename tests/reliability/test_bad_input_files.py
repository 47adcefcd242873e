"""Bad input tried (issue 8), files and directories: malformed data files (JSON lines, JSON, CSV/TSV, CoNLL,
parquet) and paths, a hypothesis-corrupted line in a good file named file:line, missing or damaged models, and
output_dir / checkpoints that a failing --resume or --overwrite must leave as they were. (Run configs and
arguments: test_bad_input.py; the checks every case passes: badinput.py.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import badinput
from badinput import HYP, WORD, _ids, base_raw, expect_bad, mutate, run_main
from stutil import alpaca_records, cls_records, ner_records, write_jsonl

# the bad-input fixtures, this module's own: its world (tiny models, good data files) and its count of cases
world = badinput.world
_report_count = badinput._report_count


# ---------------------------------------------------------------------------------------------
# 1. Fixed corpus: data files. (task, file name, content, fragments; "{p}" = the file's path) Then model
#    directories, output_dir and checkpoints.

J = lambda recs: "".join(json.dumps(r) + "\n" for r in recs)  # noqa: E731
ALP = [{"instruction": "do x", "output": "y z"}] * 3
CLS = [{"text": "a b", "label": "pos"}, {"text": "c d", "label": "neg"}] * 2
NER = [{"tokens": ["a", "b"], "tags": ["O", "B-PER"]}] * 3
DATA_CASES = [
    ("causal_lm", "broken.jsonl", J(ALP) + '{"instruction": "x", "output": \n', ["{p}:4: invalid JSON"]),
    ("causal_lm", "array.jsonl", J(ALP) + "[1, 2]\n", ["{p}:4: expected a JSON object, got list"]),
    ("causal_lm", "many-bad.jsonl", "x\n" * 40, ["{p}:1: invalid JSON", "stopping after 10 problems"]),
    ("causal_lm", "out-int.jsonl", J(ALP + [{"instruction": "x", "output": 5}]), ["{p}:4: field 'output'"]),
    ("causal_lm", "out-empty.jsonl", J(ALP + [{"instruction": "x", "output": " "}]), ["{p}:4: field 'output' is empty"]),
    ("causal_lm", "history.jsonl", J(ALP + [{"instruction": "x", "output": "y", "history": 5}]),
     ["{p}:4: field 'history' must be a list"]),
    ("causal_lm", "history-turn.jsonl", J(ALP + [{"instruction": "x", "output": "y", "history": [["a", "b"], ["c"]]}]),
     ["{p}:4: history[1] must be a [user, assistant] pair of strings"]),
    ("causal_lm", "sharegpt-null.jsonl", J([{"conversations": [{"from": "human", "value": "hi"},
                                                               {"from": "gpt", "value": None}]}]),
     ["{p}:1: conversations[1].value must be a string, got NoneType"]),
    ("causal_lm", "sharegpt-role.jsonl", J([{"conversations": [{"from": ["human"], "value": "hi"}]}]),
     ["{p}:1: conversations[0].from"]),
    ("causal_lm", "sharegpt-noassist.jsonl", J([{"conversations": [{"from": "human", "value": "hi"}]}] * 4),
     ["{p}:1: conversation has no assistant turn"]),
    ("causal_lm", "messages-str.jsonl", J([{"messages": "hello"}]), ["{p}:1: 'messages' must be a non-empty list"]),
    ("causal_lm", "text-empty.jsonl", J([{"text": ""}] * 4), ["{p}:1: field 'text' is empty"]),
    ("causal_lm", "columns.jsonl", J([{"foo": 1}]), ["{p}: cannot tell the data format", "data.format"]),
    ("causal_lm", "nonutf8.jsonl", J(ALP).encode() + b'{"instruction": "\xff", "output": "x"}\n',
     ["{p}:4: not valid UTF-8"]),
    ("causal_lm", "utf16.jsonl", J(ALP).encode("utf-16"), ["{p}:1: not valid UTF-8"]),
    ("causal_lm", "deep.jsonl", "[" * 100000 + "]" * 100000 + "\n", ["{p}:1: invalid JSON (nested too deeply)"]),
    ("causal_lm", "deep.json", "[" * 100000 + "]" * 100000, ["{p}: invalid JSON (nested too deeply)"]),
    ("causal_lm", "scalar.json", "42", ["{p}: expected a list of objects, got int"]),
    ("causal_lm", "ints.json", "[1, 2]", ["{p}: item 0 is int"]),
    ("causal_lm", "broken.json", '[{"a": 1},\n {"b": ]', ["{p}:2: invalid JSON"]),
    ("causal_lm", "surrogate.jsonl", J(ALP + [{"instruction": "x", "output": "a\ud800b"}]),
     ["{p}:4: field 'output' holds a lone surrogate (\\ud800)"]),
    ("causal_lm", "surrogate.json", json.dumps(ALP + [{"instruction": "x", "history": [["\udfff", "b"]], "output": "y"}]),
     ["{p}[3]: field 'history[0][0]' holds a lone surrogate (\\udfff)"]),
    ("causal_lm", "blank.jsonl", "\n \n", ["{p} contains no examples"]),
    ("causal_lm", "bom.jsonl", b"\xef\xbb\xbf", ["{p} contains no examples"]),
    ("causal_lm", "garbage.parquet", b"not parquet", ["{p}: not a readable parquet file"]),
    ("causal_lm", "data.xml", "<a/>", ["unknown file type '.xml'"]),
    ("seq_cls", "fields.csv", "text,label\na b,pos\nc,d,neg\n", ["{p}:3: 3 fields, header has 2"]),
    ("seq_cls", "dup.csv", "text,text\na,b\n", ["{p}:1: the first line must be a header"]),
    ("seq_cls", "empty.csv", "", ["{p}: file is empty"]),
    ("seq_cls", "header.csv", "text,label\n", ["{p} contains no examples"]),
    ("seq_cls", "multiline.csv", 'text,label\n"a\nb\nc",pos\n"d\u2028e",neg\nf,pos,x\n', ["{p}:6: 3 fields, header has 2"]),
    ("seq_cls", "fields.tsv", "text\tlabel\na\tpos\tx\n", ["{p}:2: 3 fields, header has 2"]),
    ("seq_cls", "mixed.jsonl", J([{"text": "a", "label": "pos"}, {"text": "b", "label": 1}]),
     ["{p}:2: column 'label' mixes label types", "{p}:1"]),
    ("seq_cls", "float.jsonl", J([{"text": "a", "label": 1.5}, {"text": "b", "label": 1}]), ["{p}:1: label 1.5"]),
    ("seq_cls", "nan.jsonl", '{"text": "a", "label": NaN}\n{"text": "b", "label": 1}\n', ["{p}:1: label nan"]),
    ("seq_cls", "one-label.jsonl", J([{"text": "a", "label": "x"}] * 4), ["{p}: column 'label' has a single label"]),
    ("seq_cls", "empty-text.jsonl", J(CLS + [{"text": "", "label": "pos"}]), ["{p}:5: column 'text' must be a non-empty"]),
    ("seq_cls", "list-text.jsonl", J(CLS + [{"text": ["a"], "label": "pos"}]), ["{p}:5: column 'text'"]),
    ("seq_cls", "no-label-col.jsonl", J([{"sentence": "a", "y": 1}]), ["no label column"]),
    ("token_cls", "lengths.jsonl", J(NER + [{"tokens": ["a", "b", "c"], "tags": ["O"]}]), ["{p}:4: 3 tokens but 1 tags"]),
    ("token_cls", "empty-sent.jsonl", J(NER + [{"tokens": [], "tags": []}]), ["{p}:4: empty sentence"]),
    ("token_cls", "not-list.jsonl", J(NER + [{"tokens": "a b", "tags": "O O"}]), ["{p}:4:", "must be lists"]),
    ("token_cls", "empty-token.jsonl", J(NER + [{"tokens": ["a", ""], "tags": ["O", "O"]}]),
     ["{p}:4: every token must be a non-empty string"]),
    ("token_cls", "mixed-tags.jsonl", J(NER + [{"tokens": ["a", "b"], "tags": [0, "O"]}]),
     ["{p}:4: column 'tags' mixes label types"]),
    ("token_cls", "no-tags.jsonl", J([{"tokens": ["a"]}] + NER), ["{p}:1: token_cls needs"]),
    ("token_cls", "stray.conll", "a O\nb B-PER\n\nc x O\nd O\n", ["{p}:4: 3 columns, earlier lines have 2"]),
    ("token_cls", "onecol.conll", "a O\nb\n", ["{p}:2: expected 'token ... tag' columns"]),
    ("token_cls", "blank.conll", "\n\n", ["{p} contains no examples"]),
    ("token_cls", "docstart.conll", "-DOCSTART- O\n\n", ["{p} contains no examples"]),
    ("token_cls", "nonutf8.conll", b"a O\n\xc3\x28 O\n", ["{p}:2: not valid UTF-8"]),
]


@pytest.mark.parametrize("task,name,content,fragments", DATA_CASES, ids=[c[1] for c in DATA_CASES])
def test_bad_data_files(world, task, name, content, fragments):
    d = world["root"] / f"data{next(_ids)}"
    d.mkdir()
    p = d / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    raw = mutate(base_raw(world, task), "data.train", str(p))
    expect_bad(world, raw, *[f.format(p=p) for f in fragments])


def test_bad_data_paths_and_eval(world):
    raw = mutate(base_raw(world), "data.train", str(world["root"] / "missing.jsonl"))
    expect_bad(world, raw, "data.train: file not found", "missing.jsonl")
    raw = mutate(base_raw(world), "data.train", str(world["root"]))
    expect_bad(world, raw, "data.train:", "is a directory")
    raw = mutate(base_raw(world), "data.eval", str(world["root"] / "missing-eval.jsonl"))
    expect_bad(world, raw, "data.eval: file not found")
    bad_eval = write_jsonl(world["root"] / "eval-labels.jsonl", [{"text": "a", "label": "maybe"}])
    raw = mutate(base_raw(world, "seq_cls"), "data.eval", str(bad_eval))
    expect_bad(world, raw, f"{bad_eval}:1: label 'maybe' is not in the label set")
    raw = mutate(base_raw(world), "data.train", "hub:no-such/dataset")
    expect_bad(world, raw, "hub:no-such/dataset: cannot load")


def test_bad_model_and_sizes(world):
    raw = mutate(base_raw(world), "model.name_or_path", str(world["root"] / "no-model"))
    expect_bad(world, raw, "model.name_or_path: directory not found")
    raw = mutate(base_raw(world), "model.name_or_path", str(world["good"]["causal_lm"]))
    expect_bad(world, raw, "model.name_or_path:", "has no config.json")
    raw = mutate(base_raw(world), "train.global_batch_size", 10**15)
    raw["train"]["micro_batch_size"] = 10**15
    expect_bad(world, raw, "train.global_batch_size (1000000000000000) is larger than the training set")
    raw = mutate(base_raw(world), "peft.target_modules", ["nope"])
    expect_bad(world, raw, "peft.method=lora: cannot apply")
    raw = mutate(base_raw(world), "peft.rank", 8)
    expect_bad(world, raw, "peft.rank: not a LoraConfig option")
    raw = base_raw(world)
    Path(raw["output_dir"]).write_text("a file")
    expect_bad(world, raw, "output_dir:", "exists and is not a directory", out_dir=raw["output_dir"])
    below_file = dict(raw, output_dir=str(Path(raw["output_dir"]) / "run"))
    expect_bad(world, below_file, "output_dir:", f"cannot be created: {raw['output_dir']} is a file")
    expect_bad(world, dict(raw, output_dir=str(world["root"] / ("x" * 300))), "output_dir:", "is not a usable path",
               out_dir=world["root"] / "never")  # (the name is too long to snapshot)


def test_existing_output_dir_is_untouched_by_a_failing_resume(world):
    raw = base_raw(world)
    out = Path(raw["output_dir"])
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("")
    bad = world["root"] / "resume-bad.jsonl"
    bad.write_text('{"instruction": oops}\n')
    raw["data"]["train"] = str(bad)
    expect_bad(world, raw, f"{bad}:1: invalid JSON", args=["--resume", "auto"], out_dir=out)
    (out / "precious.txt").write_text("keep me")  # nothing to resume, and not only a run's files: refused first
    expect_bad(world, raw, "has no checkpoint to resume", "precious.txt", args=["--resume", "auto"], out_dir=out)
    expect_bad(world, raw, "is not empty", out_dir=out)  # no --resume, no --overwrite: refused, untouched
    expect_bad(world, base_raw(world), "--resume /nonexistent: not a usable checkpoint",
               args=["--resume", "/nonexistent"])


def test_existing_output_dir_survives_overwrite_with_bad_data(world):
    raw = base_raw(world)
    out = Path(raw["output_dir"])
    out.mkdir()
    # an earlier run's output, which --overwrite may replace (a directory holding only a run's files)
    (out / "run.json").write_text('{"config_fingerprint": "an earlier run"}')
    (out / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 1.0}\n')
    bad = world["root"] / "overwrite-bad.jsonl"
    bad.write_text('{"instruction": oops}\n')
    raw["data"]["train"] = str(bad)
    expect_bad(world, raw, "invalid JSON", args=["--overwrite"], out_dir=out)


def test_overwrite_deletes_only_an_earlier_runs_output(world):
    """--overwrite removes the whole output_dir: never a directory scaletune did not write, nor one
    holding this run's data, model or the working directory."""
    raw = base_raw(world)
    out = Path(raw["output_dir"])
    out.mkdir()
    (out / "NOTES.md").write_text("not a run")
    expect_bad(world, raw, "--overwrite would delete", "not a scaletune run's output", args=["--overwrite"])
    (out / "run.json").write_text("{}")
    data = write_jsonl(out / "train.jsonl", alpaca_records(16))
    raw["data"]["train"] = str(data)
    expect_bad(world, raw, "--overwrite would delete", f"data.train ({data}) is inside it", args=["--overwrite"])
    raw["data"]["train"] = str(world["good"]["causal_lm"])
    template = out / "chat.jinja"  # inputs read by path that are not data: the template, the config itself
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    expect_bad(world, {**raw, "data": {**raw["data"], "chat_template": str(template)}}, "--overwrite would delete",
               f"data.chat_template ({template}) is inside it", args=["--overwrite"])
    inside = out / "run.yaml"
    inside.write_text(yaml.safe_dump(raw, sort_keys=False))
    expect_bad(world, inside, "--overwrite would delete", f"the run config ({inside}) is inside it",
               args=["--overwrite"], out_dir=out)
    cwd = os.getcwd()
    os.chdir(out)
    try:
        expect_bad(world, raw, "the working directory (.) is inside it", args=["--overwrite"], out_dir=out)
    finally:
        os.chdir(cwd)


def test_resume_from_a_named_checkpoint_checks_the_config(world):
    """`--resume DIR` refuses a checkpoint of another config like `--resume auto` does, and one that does
    not fit the model even with --allow-config-change (different rank) ends in one line, not a traceback."""
    raw = base_raw(world)
    raw["train"]["save_every"] = 1
    path = world["root"] / f"cfg{next(_ids)}.yaml"
    path.write_text(yaml.safe_dump(raw))
    code, err = run_main(["train", path])
    assert code == 0, err
    step = Path(raw["output_dir"]) / "checkpoints" / "step-2"
    other = base_raw(world)
    other["train"]["learning_rate"] = 0.1
    expect_bad(world, other, "was written by a different run config", "--allow-config-change",
               args=["--resume", step], out_dir=raw["output_dir"])
    moved = base_raw(world)
    moved["data"]["eval_fraction"] = 0.5  # would move trained examples into the eval set
    expect_bad(world, moved, "was written by a different run config", args=["--resume", step],
               out_dir=raw["output_dir"])
    other["peft"]["r"] = 8
    expect_bad(world, other, "does not fit this run's model and adapter",
               args=["--resume", step, "--allow-config-change"], out_dir=raw["output_dir"])
    adapter = Path(raw["output_dir"]) / "adapter"
    prompts = world["root"] / "prompts.txt"
    prompts.write_text("great film\n")
    for cmd, extra in (("predict", ["--input", prompts]), ("eval", ["--data", world["good"]["seq_cls"]])):
        expect_bad(world, base_raw(world, "seq_cls"), "was trained for task causal_lm", "task: seq_cls",
                   cmd=cmd, args=["--adapter", adapter, *extra], out_dir=raw["output_dir"])


def test_damaged_model_files(world):
    """An interrupted download (truncated safetensors) or weights that do not match config.json."""
    import shutil

    raw = base_raw(world)
    broken = world["root"] / "truncated-model"
    shutil.copytree(world["models"]["causal_lm"], broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    raw["model"]["name_or_path"] = str(broken)
    expect_bad(world, raw, f"model.name_or_path: '{broken}' looks damaged", "SafetensorError")
    shutil.rmtree(broken)
    shutil.copytree(world["models"]["causal_lm"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] *= 2
    (broken / "config.json").write_text(json.dumps(config))
    expect_bad(world, raw, f"model.name_or_path: '{broken}' looks damaged")


# ---------------------------------------------------------------------------------------------
# 2. Property-based: one corrupted line in an otherwise good data file must be named file:line

GOOD = {"causal_lm": alpaca_records, "seq_cls": cls_records, "token_cls": ner_records}
BAD_FIELD = {  # task -> (column, strategy of values that are never valid there)
    "causal_lm": ("output", st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2),
                                      st.sampled_from(["", " ", "\n\t"]))),
    "seq_cls": ("label", st.one_of(st.floats(allow_nan=False).filter(lambda x: x != int(x) if abs(x) < 1e300 else 1),
                                   st.booleans(), st.none(), st.lists(st.integers(), max_size=2),
                                   st.dictionaries(WORD, st.integers(), max_size=1))),
    "token_cls": ("tags", st.one_of(st.just("lengths"), st.just("empty"), st.integers(), st.text(max_size=3))),
}


@st.composite
def corrupted_file(draw):
    task = draw(st.sampled_from(sorted(GOOD)))
    n = draw(st.integers(4, 12))
    records = GOOD[task](n, seed=draw(st.integers(0, 99)))
    i = draw(st.integers(0, n - 1))
    kind = draw(st.sampled_from(["truncated", "not-object", "non-utf8", "field"]))
    lines = [json.dumps(r).encode() for r in records]
    if kind == "truncated":
        cut = draw(st.integers(1, len(lines[i]) - 1))
        lines[i] = lines[i][:cut]
        frag = "invalid JSON"
    elif kind == "not-object":
        lines[i] = json.dumps(draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=2), st.text(max_size=4),
                                             st.none()))).encode()
        frag = "expected a JSON object"
    elif kind == "non-utf8":
        pos = draw(st.integers(0, len(lines[i])))
        bad = draw(st.sampled_from([b"\xff", b"\xfe", b"\x80", b"\xc3\x28", b"\xed\xa0\x80"]))
        lines[i] = lines[i][:pos] + bad + lines[i][pos:]
        frag = "not valid UTF-8"
    else:
        col, values = BAD_FIELD[task]
        value = draw(values)
        rec = dict(records[i])
        if task == "token_cls" and value == "lengths":
            rec["tags"] = rec["tags"] + ["O"]
            frag = "tokens but"
        elif task == "token_cls" and value == "empty":
            rec["tokens"], rec["tags"] = [], []
            frag = "empty sentence"
        else:
            rec[col] = value
            frag = ""
        lines[i] = json.dumps(rec).encode()
    return task, b"".join(line + b"\n" for line in lines), i + 1, frag


@HYP
@given(corrupted_file())
def test_property_corrupted_data_line_is_named(world, case):
    task, content, lineno, frag = case
    p = world["root"] / f"fuzz{next(_ids)}.jsonl"
    p.write_bytes(content)
    raw = mutate(base_raw(world, task), "data.train", str(p))
    expect_bad(world, raw, f"{p}:{lineno}", frag)


@HYP
@given(st.integers(2, 8), st.data())
def test_property_conll_and_csv_stray_columns(world, n, data):
    words = [f"w{i}" for i in range(n)]
    i = data.draw(st.integers(1, n - 1))  # not the first token line: that one sets the column count
    extra = data.draw(st.integers(1, 3))
    rows = [f"{w} {'X ' * extra if j == i else ''}O" for j, w in enumerate(words)]
    p = world["root"] / f"fuzz{next(_ids)}.conll"
    p.write_text("\n".join(rows) + "\n")
    raw = mutate(base_raw(world, "token_cls"), "data.train", str(p))
    expect_bad(world, raw, f"{p}:{i + 1}: {2 + extra} columns, earlier lines have 2")
    rows = ["text,label"] + [f"{w},{'pos' if j % 2 else 'neg'}{',x' * extra if j == i else ''}"
                             for j, w in enumerate(words)]
    p = world["root"] / f"fuzz{next(_ids)}.csv"
    p.write_text("\n".join(rows) + "\n")
    raw = mutate(base_raw(world, "seq_cls"), "data.train", str(p))
    expect_bad(world, raw, f"{p}:{i + 2}: {2 + extra} fields, header has 2")
