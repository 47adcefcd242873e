"""Bad input tried (issue 8): malformed run configs, data files and arguments, fixed corpus + hypothesis.

Every case must end with exit code 2 and a one-screen message (<= 25 lines from "error:") naming the
key / file / line, never a traceback, and must leave output_dir as it was (absent, or byte-identical).
The number of cases tried is printed at the end of the module (`bad-input cases tried: N`).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scaletune.cli import main

from stutil import alpaca_records, cls_records, ner_records, write_jsonl

HYP = settings(derandomize=True, deadline=None, max_examples=30, database=None,
               suppress_health_check=list(HealthCheck))
TRIED = {"n": 0}
_ids = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def _report_count(request):
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    line = f"bad-input cases tried: {TRIED['n']}"
    if tr is not None:
        tr.write_line(line)
    else:
        print(line)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama, tiny_bert):
    root = tmp_path_factory.mktemp("bad_input")
    old = os.environ.get("SCALETUNE_CACHE")
    os.environ["SCALETUNE_CACHE"] = str(root / "cache")
    good = {"causal_lm": write_jsonl(root / "alpaca.jsonl", alpaca_records(16)),
            "seq_cls": write_jsonl(root / "cls.jsonl", cls_records(16)),
            "token_cls": write_jsonl(root / "ner.jsonl", ner_records(16))}
    models = {"causal_lm": tiny_llama, "seq_cls": tiny_bert, "token_cls": tiny_bert}
    yield {"root": root, "good": good, "models": models}
    if old is None:
        os.environ.pop("SCALETUNE_CACHE", None)
    else:
        os.environ["SCALETUNE_CACHE"] = old


def base_raw(world, task="causal_lm") -> dict:
    n = next(_ids)
    return {"task": task, "model": {"name_or_path": str(world["models"][task]), "dtype": "float32"},
            "peft": {"method": "lora", "r": 4, "target_modules": "all-linear"},
            "data": {"train": str(world["good"][task]), "max_length": 160, "cache": False},
            "train": {"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 2, "mixed_precision": "no",
                      "report_to": [], "eval_every": None, "save_every": None, "warmup_ratio": 0.0},
            "output_dir": str(world["root"] / f"out{n}")}


def snapshot(path: Path):
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(path.rglob("*"))}


def run_main(args) -> tuple[int, str]:
    err = io.StringIO()
    # stdout is left alone: infer.run_predict binds `out=sys.stdout` when first imported
    with contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    return code, err.getvalue()


def check_clean(code, err: str, *fragments: str) -> None:
    assert code == 2, f"exit {code}\n{err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    start = next((i for i, ln in enumerate(lines) if "error:" in ln), None)
    assert start is not None, err
    assert len(lines[start:]) <= 25, err
    for f in fragments:
        assert f in err, f"{f!r} not in:\n{err}"


def expect_bad(world, raw_or_text, *fragments, args=(), cmd="train", out_dir=None) -> str:
    """Write the config, run the CLI in-process, check exit 2 / message / output_dir untouched."""
    TRIED["n"] += 1
    path = world["root"] / f"cfg{next(_ids)}.yaml"
    if isinstance(raw_or_text, dict):
        path.write_text(yaml.safe_dump(raw_or_text, sort_keys=False))
        if out_dir is None and isinstance(raw_or_text.get("output_dir"), str) and raw_or_text["output_dir"]:
            out_dir = raw_or_text["output_dir"]
    elif isinstance(raw_or_text, bytes):
        path.write_bytes(raw_or_text)
    elif isinstance(raw_or_text, str):
        path.write_text(raw_or_text)
    else:  # a Path: use as the config path itself
        path = raw_or_text
    out_dir = Path(out_dir) if out_dir else world["root"] / "never"
    before = snapshot(out_dir)
    code, err = run_main([cmd, path, *args])
    check_clean(code, err, *fragments)
    assert snapshot(out_dir) == before, f"{out_dir} changed by a failing command"
    return err


def mutate(raw: dict, dotted: str, value) -> dict:
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return raw


_DELETE = object()

# ---------------------------------------------------------------------------------------------
# 1. Fixed corpus: run configs (key, bad value, fragments that must be in the message)

CONFIG_CASES = [
    ("causal_lm", "train.learning_rate", "fast", ["train.learning_rate: expected float"]),
    ("causal_lm", "train.learning_rate", 1e308, ["train.learning_rate", "far too large"]),
    ("causal_lm", "train.learning_rate", float("inf"), ["train.learning_rate: must be a finite number"]),
    ("causal_lm", "train.learning_rate", float("nan"), ["train.learning_rate: must be a finite number"]),
    ("causal_lm", "train.max_grad_norm", float("-inf"), ["train.max_grad_norm"]),
    ("causal_lm", "data.max_length", 10**12, ["data.max_length", "larger than any model context"]),
    ("causal_lm", "data.max_length", "long", ["data.max_length: expected int"]),
    ("causal_lm", "data.max_length", 3.5, ["data.max_length: expected int"]),
    ("causal_lm", "train.global_batch_size", True, ["train.global_batch_size: expected int"]),
    ("causal_lm", "train.global_batch_size", 0, ["train.global_batch_size: must be >= 1"]),
    ("causal_lm", "train.micro_batch_size", 3, ["divisible by train.micro_batch_size"]),
    ("causal_lm", "train.seed", 10**15, ["train.seed: must be in [0, 2**32 - 1]"]),
    ("causal_lm", "train.seed", -1, ["train.seed"]),
    ("causal_lm", "train.adam_beta1", 1e308, ["train.adam_beta1: must be in [0, 1)"]),
    ("causal_lm", "train.adam_beta2", -0.5, ["train.adam_beta2"]),
    ("causal_lm", "train.adam_epsilon", -1.0, ["train.adam_epsilon: must be > 0"]),
    ("causal_lm", "train.adam_epsilon", 0.0, ["train.adam_epsilon: must be > 0"]),
    ("causal_lm", "train.max_steps", 0, ["train.max_steps: must be >= 1"]),
    ("causal_lm", "train.warmup_ratio", 1.5, ["train.warmup_ratio"]),
    ("causal_lm", "train.report_to", ["slack"], ["train.report_to: unknown tracker 'slack'"]),
    ("causal_lm", "train.optimizer", "sgd", ["train.optimizer: 'sgd' is not one of"]),
    ("causal_lm", "train.lerning_rate", 1e-4, ["train.lerning_rate: unknown key", "did you mean 'learning_rate'"]),
    ("causal_lm", "trian", {"seed": 1}, ["trian: unknown key", "did you mean 'train'"]),
    ("causal_lm", "model", [1, 2], ["model: expected a mapping"]),
    ("causal_lm", "train", "fast", ["train: expected a mapping"]),
    ("causal_lm", "data", None, ["data.train: required key is missing"]),
    ("causal_lm", "task", _DELETE, ["task: required key is missing"]),
    ("causal_lm", "task", "clm", ["task: 'clm' is not one of"]),
    ("causal_lm", "model.name_or_path", _DELETE, ["model.name_or_path: required key is missing"]),
    ("causal_lm", "model.name_or_path", "", ["model.name_or_path: must not be empty"]),
    ("causal_lm", "model.name_or_path", 42, ["model.name_or_path: expected str"]),
    ("causal_lm", "model.dtype", "float64", ["model.dtype", "did you mean 'float16'"]),
    ("causal_lm", "model.trust_remote_code", "yes please", ["model.trust_remote_code: expected bool"]),
    ("causal_lm", "output_dir", "", ["output_dir: must not be empty"]),
    ("causal_lm", "output_dir", ["a"], ["output_dir: expected str"]),
    ("causal_lm", "data.train", "", ["data.train: must not be empty"]),
    ("causal_lm", "data.train", "hub:", ["'hub:' names no dataset"]),
    ("causal_lm", "data.format", "xml", ["data.format: 'xml' is not valid for task causal_lm"]),
    ("causal_lm", "data.packing", "yes", ["data.packing: expected bool"]),
    ("causal_lm", "data.eval_fraction", 1.5, ["data.eval_fraction"]),
    ("causal_lm", "data.num_workers", 10**9, ["data.num_workers", "too many"]),
    ("causal_lm", "data.num_workers", -1, ["data.num_workers: must be >= 0"]),
    ("causal_lm", "peft", [1, 2], ["peft: expected dict"]),
    ("causal_lm", "peft.method", 5, ["peft.method: expected a method name"]),
    ("causal_lm", "peft.r", 10**12, ["peft.r", "larger than any layer"]),
    ("causal_lm", "peft.r", float("nan"), ["peft.r: must be a finite number, got nan", "peft.r: expected an integer"]),
    ("causal_lm", "peft.lora_alpha", float("inf"), ["peft.lora_alpha: must be a finite number, got inf"]),
    ("causal_lm", "peft.alpha_pattern", {"q_proj": float("nan")}, ["peft.alpha_pattern.q_proj: must be a finite"]),
    ("causal_lm", "peft.target_modules", "([", ["peft.target_modules: '([' is not a valid regular expression"]),
    ("causal_lm", "peft.target_modules", "q{4294967296}", ["peft.target_modules: 'q{4294967296}' is not a valid"]),
    ("causal_lm", "peft", {"method": "prompt_tuning", "num_virtual_tokens": 4, "prompt_tuning_init": "BOGUS"},
     ["peft.prompt_tuning_init: expected TEXT | SAMPLE_VOCAB | RANDOM, got str 'BOGUS'"]),
    ("causal_lm", "peft", {"method": "bottleneck_adapter", "bottleneck_dim": 10**9},
     ["peft.bottleneck_dim: 1000000000 is larger than any layer"]),
    ("causal_lm", "peft", {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 1, "deltaT": 0},
     ["peft.deltaT: AdaLoRA re-allocates ranks every deltaT steps: must be >= 1, got 0"]),
    ("causal_lm", "peft.use_dora", "yes", ["peft.use_dora: expected bool (true or false), got str 'yes'"]),
    ("causal_lm", "peft.modules_to_save", ["lm_heads"],
     ["peft.modules_to_save: 'lm_heads' matches no module of LlamaForCausalLM", "close names: lm_head"]),
    ("causal_lm", "train.lr", 1e-4, ["train.lr: unknown key (did you mean 'learning_rate'?)"]),
    ("causal_lm", "distributed.zero_stage", 4, ["distributed.zero_stage"]),
    ("causal_lm", "distributed.offload", "optimizer", ["distributed.offload needs distributed.zero_stage"]),
    ("seq_cls", "data.labels", [], ["data.labels: seq_cls needs at least 2"]),
    ("seq_cls", "data.labels", [{"a": 1}, "b"], ["data.labels: every label must be a string or an integer"]),
    ("seq_cls", "data.labels", ["a", "a"], ["data.labels: contains duplicates"]),
    ("seq_cls", "data.packing", True, ["data.packing: only supported for task causal_lm"]),
    ("token_cls", "data", lambda w: {"train": str(w["good"]["token_cls"]), "tokens_column": "tokens",
                                     "tags_column": "tokens"}, ["data.tokens_column and data.tags_column"]),
    ("token_cls", "data.tokens_column", "", ["data.tokens_column: must not be empty"]),
]


@pytest.mark.parametrize("task,key,value,fragments", CONFIG_CASES,
                         ids=[f"{c[1]}={str(c[2])[:20]}" for c in CONFIG_CASES])
def test_bad_config_values(world, task, key, value, fragments):
    raw = mutate(base_raw(world, task), key, value(world) if callable(value) else value)
    expect_bad(world, raw, *fragments)


TEXT_CASES = {
    "yaml-list": ("- a\n- b\n", ["top level must be a mapping, got list"]),
    "yaml-scalar": ("42\n", ["top level must be a mapping, got int"]),
    "yaml-string": ("just a string\n", ["top level must be a mapping, got str"]),
    "yaml-invalid": ("task: causal_lm\nmodel: {name_or_path: x\n", [":3: invalid YAML"]),
    "yaml-tab": ("task:\tcausal_lm\n\tmodel: 1\n", ["invalid YAML"]),
    "yaml-python-tag": ("task: !!python/object/apply:os.system ['echo pwned']\n", ["invalid YAML",
                                                                                   "could not determine a constructor"]),
    "yaml-non-utf8": (b"task: causal_lm\nmodel: \xff\xfe\n", ["cannot read"]),
    "yaml-empty": ("", ["task: required key is missing", "data.train: required key is missing"]),
    "yaml-unhashable-key": ("? [a, b]\n: 1\n", ["invalid YAML"]),
    "yaml-int-key": ("1: 2\n", ["1: unknown key"]),
    "yaml-huge-int": ("task: causal_lm\nseed: " + "9" * 5000 + "\n", ["invalid YAML", "4300 digits"]),
    "yaml-deep-nesting": ("a: " + "[" * 3000 + "]" * 3000 + "\n", ["invalid YAML", "nested too deeply"]),
    "yaml-binary": ("task: !!binary aGVsbG8=\n", ["task: b'hello' is not one of"]),
    "yaml-date": ("output_dir: 2001-12-14\n", ["output_dir: expected str, got date"]),
}


@pytest.mark.parametrize("name", list(TEXT_CASES))
def test_bad_config_files(world, name):
    text, fragments = TEXT_CASES[name]
    expect_bad(world, text, *fragments)


def test_config_path_missing_or_directory(world):
    expect_bad(world, world["root"] / "nope.yaml", "nope.yaml: file not found")
    d = world["root"] / "cfgdir"
    d.mkdir()
    expect_bad(world, d, "cfgdir: is a directory")


OVERRIDE_CASES = [
    (["train.learning_rate"], ["expected key=value"]),
    (["=3"], ["bad key ''"]),
    (["train..seed=1"], ["bad key 'train..seed'"]),
    (["train.max_steps="], ["override 'train.max_steps=': no value after '='; write train.max_steps=null"]),
    (["output_dir= "], ["override 'output_dir= ': no value after '='"]),
    (["train=5"], ["train: expected a mapping"]),
    (["output_dir.x=1"], ["output_dir: expected str"]),
    (["train.learning_rate=[1,"], ["train.learning_rate: expected float"]),
    (["train.learning_rate=.nan"], ["train.learning_rate: must be a finite number"]),
    (["data.max_length=1e12"], ["data.max_length: expected int"]),
    (["train.seed=" + "9" * 5000], ["train.seed: expected int"]),
    (["train.learning_rate=abc"], ["(with 1 command-line override) has 1 problem:",
                                   "train.learning_rate: expected float, got str 'abc' "
                                   "(from override train.learning_rate=abc)"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
]


@pytest.mark.parametrize("overrides,fragments", OVERRIDE_CASES, ids=[c[0][0][:24] for c in OVERRIDE_CASES])
def test_bad_overrides(world, overrides, fragments):
    raw = base_raw(world)
    expect_bad(world, raw, *fragments, args=overrides)


# ---------------------------------------------------------------------------------------------
# 2. Fixed corpus: data files. (task, file name, content, fragments; "{p}" = the file's path)

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


def test_zero_stage_without_a_launcher(world, monkeypatch):
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    raw = base_raw(world)
    raw["distributed"] = {"zero_stage": 2}
    err = expect_bad(world, raw, "distributed.zero_stage=2 needs a launcher", "scaletune launch")
    assert re.search(r"cfg\d+\.yaml cannot run here", err), err  # the title names the file, as the others do


def test_adalora_target_rank_above_initial_rank(world):
    raw = base_raw(world)
    raw["peft"] = {"method": "adalora", "init_r": 4, "target_r": 8, "target_modules": ["q_proj"]}
    expect_bad(world, raw, "peft.target_r: 8 is above peft.init_r (4)")
    raw["peft"] = {"method": "prompt_tuning", "num_virtual_tokens": 0}
    expect_bad(world, raw, "peft.num_virtual_tokens: must be >= 1, got 0")


CLI_CASES = [
    ("predict", ["--max-new-tokens", "-5"], ["--max-new-tokens: must be >= 1"]),
    ("predict", ["--input", "/nonexistent/prompts.txt"], ["--input /nonexistent/prompts.txt: file not found"]),
    ("eval", [], ["no trained adapter at"]),
    ("eval", ["--adapter", "/nonexistent"], ["--adapter /nonexistent: directory not found"]),
    ("merge", ["--out", "{good}"], ["exists and is not a directory"]),
    ("launch", ["--nnodes", "0", "--dry-run"], ["--nnodes >= 1"]),
    ("launch", ["--node-rank", "3", "--dry-run"], ["--node-rank: must be in [0, 0]"]),
    ("launch", ["--master-port", "70000", "--dry-run"], ["--master-port"]),
    ("slurm", ["--nodes", "0", "--dry-run"], ["--nodes must be >= 1"]),
    ("slurm", ["--nodes", "2", "--gpus-per-node", "8", "--dry-run"],
     ["cannot run on 2 node(s) x 8 GPU(s)", "global_batch_size"]),
    ("plan", ["--gpu-memory", "lots"], ["--gpu-memory: cannot read 'lots'"]),
    ("plan", ["--gpu-memory", "80"], ["--gpu-memory: '80' has no unit", "80GiB"]),
]


@pytest.mark.parametrize("cmd,args,fragments", CLI_CASES, ids=[f"{c[0]}{c[1][:1]}" for c in CLI_CASES])
def test_bad_command_arguments(world, cmd, args, fragments):
    raw = base_raw(world)
    args = [a.format(good=world["good"]["causal_lm"]) for a in args]
    expect_bad(world, raw, *fragments, args=args, cmd=cmd)


def test_demo_bad_arguments_write_nothing(world):
    TRIED["n"] += 2
    out = world["root"] / "demo-out"
    code, err = run_main(["demo", "--steps", "-3", "--out", out])
    check_clean(code, err, "--steps: must be >= 1")
    assert not out.exists()
    code, err = run_main(["demo", "--out", world["good"]["causal_lm"]])
    check_clean(code, err, "exists and is not a directory")


# ---------------------------------------------------------------------------------------------
# 3. Property-based: random type errors / unknown keys / out-of-range numbers in the run config


def _leaf_types():
    import dataclasses
    import typing

    from scaletune.config import RunConfig

    out = {}

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = tp

    walk(RunConfig, "")
    return out


LEAVES = _leaf_types()
WORD = st.text(alphabet=string.ascii_letters + "_", min_size=1, max_size=10)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def wrong_value(tp):
    """Values that can never satisfy annotation `tp` (None allowed only where the key is not Optional)."""
    import types
    import typing

    args = typing.get_args(tp)
    optional = type(None) in args
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in args if a is not type(None))
    lists = st.lists(st.integers(), min_size=1, max_size=3)
    dicts = st.dictionaries(WORD, st.integers(), min_size=1, max_size=2)
    nothing = st.nothing() if optional else st.none()
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        return st.one_of(WORD.filter(lambda w: w not in choices), st.floats(allow_nan=False), lists, dicts)
    if tp is bool:
        return st.one_of(st.integers(), WORD, lists, dicts, nothing)
    if tp is int:
        return st.one_of(WORD, st.floats(allow_nan=False).filter(lambda x: not float(x).is_integer()), st.booleans(),
                         lists, dicts, nothing)
    if tp is float:
        return st.one_of(WORD.filter(lambda w: not _is_number(w)), st.booleans(), lists, dicts, nothing,
                         st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    if tp is str:
        return st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), lists, dicts, nothing)
    if tp is list or typing.get_origin(tp) is list:
        return st.one_of(st.integers(), st.floats(allow_nan=False), dicts)
    if tp is dict:
        return st.one_of(st.integers(), WORD, lists)
    raise AssertionError(tp)


leaf_and_value = st.sampled_from(sorted(LEAVES)).flatmap(lambda k: st.tuples(st.just(k), wrong_value(LEAVES[k])))
unknown_key = st.tuples(st.sampled_from(["", "model.", "data.", "train.", "distributed."]), WORD).filter(
    lambda t: t[1] not in {k.split(".")[-1] for k in LEAVES if k.startswith(t[0]) and k.count(".") == t[0].count(".")}
    and t[1] not in ("model", "data", "train", "distributed", "peft"))


@HYP
@given(st.lists(st.one_of(leaf_and_value.map(lambda kv: ("bad", *kv)), unknown_key.map(lambda t: ("unk", *t))),
                min_size=1, max_size=3, unique_by=lambda x: x[1] if x[0] == "bad" else x[1] + x[2]))
def test_property_config_type_errors_and_unknown_keys(world, mutations):
    raw = base_raw(world)
    fragments = []
    for kind, a, b in mutations:
        if kind == "bad":
            mutate(raw, a, b)
            fragments.append(f"{a}:")
        else:
            mutate(raw, a + b, 1)
            fragments.append(f"{a}{b}: unknown key")
    expect_bad(world, raw, *fragments)


RANGE = {  # key -> strategy of out-of-range values (types are right; the value is not)
    "data.max_length": st.one_of(st.integers(max_value=7), st.integers(min_value=1_048_577, max_value=10**18)),
    "train.global_batch_size": st.integers(max_value=0),
    "train.micro_batch_size": st.integers(max_value=0),
    "train.log_every": st.integers(max_value=0),
    "train.max_steps": st.integers(max_value=0),
    "train.eval_every": st.integers(max_value=0),
    "train.save_every": st.integers(max_value=0),
    "train.save_total_limit": st.integers(max_value=0),
    "train.warmup_steps": st.integers(max_value=-1),
    "train.max_nonfinite_skips": st.integers(max_value=0),
    "train.learning_rate": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001, max_value=1e308)),
    "train.warmup_ratio": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0, max_value=1e308)),
    "train.weight_decay": st.floats(max_value=-1e-12),
    "train.max_grad_norm": st.floats(max_value=0.0),
    "train.seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32, max_value=10**30)),
    "train.adam_beta1": st.one_of(st.floats(max_value=-1e-12), st.floats(min_value=1.0, max_value=1e308)),
    "train.adam_beta2": st.one_of(st.floats(max_value=-1e-12), st.floats(min_value=1.0, max_value=1e308)),
    "train.adam_epsilon": st.floats(max_value=0.0),
    "data.num_workers": st.one_of(st.integers(max_value=-1), st.integers(min_value=65, max_value=10**15)),
    "distributed.timeout_s": st.integers(max_value=0),
    "data.num_proc": st.one_of(st.integers(max_value=0), st.integers(min_value=65, max_value=10**15)),
    "peft.r": st.integers(min_value=65537, max_value=10**15),
}


@HYP
@given(st.sampled_from(sorted(RANGE)).flatmap(lambda k: st.tuples(st.just(k), RANGE[k])))
def test_property_out_of_range_numbers(world, kv):
    key, value = kv
    raw = mutate(base_raw(world), key, value)
    expect_bad(world, raw, key)


# ---------------------------------------------------------------------------------------------
# 4. Property-based: one corrupted line in an otherwise good data file must be named file:line

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


# ---------------------------------------------------------------------------------------------
# 5. A handful through the real entry point: real exit code, no traceback on stderr


def test_real_subprocess_exit_codes(world):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCALETUNE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    root = world["root"]
    cases = []
    (root / "sub-list.yaml").write_text("- a\n- b\n")
    cases.append((["train", str(root / "sub-list.yaml")], "top level must be a mapping"))
    (root / "sub-bytes.yaml").write_bytes(b"task: \xff\n")
    cases.append((["train", str(root / "sub-bytes.yaml")], "cannot read"))
    raw = base_raw(world)
    raw["train"]["adam_beta1"] = 1e308
    raw["train"]["seed"] = 10**15
    (root / "sub-range.yaml").write_text(yaml.safe_dump(raw))
    cases.append((["train", str(root / "sub-range.yaml")], "train.seed"))
    bad = root / "sub-bad.jsonl"
    bad.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n')
    raw = base_raw(world)
    raw["data"]["train"] = str(bad)
    (root / "sub-data.yaml").write_text(yaml.safe_dump(raw))
    cases.append((["train", str(root / "sub-data.yaml")], f"{bad}:2: not valid UTF-8"))
    for args, fragment in cases:
        TRIED["n"] += 1
        res = subprocess.run([sys.executable, "-m", "scaletune", *args], capture_output=True, text=True, env=env,
                             timeout=300)
        check_clean(res.returncode, res.stderr, fragment)
    assert not Path(raw["output_dir"]).exists()
