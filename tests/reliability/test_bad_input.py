"""Bad input tried (issue 8), run configs and arguments: malformed configs (values, YAML files, overrides),
command-line arguments of every command, and hypothesis-generated type errors, unknown keys and out-of-range
numbers; a few through the real entry point. (Data files, model directories, output_dir and checkpoints:
test_bad_input_files.py; the checks every case passes: badinput.py.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import badinput
from badinput import _DELETE, HYP, TRIED, WORD, base_raw, check_clean, expect_bad, mutate, run_main

# the bad-input fixtures, this module's own: its world (tiny models, good data files) and its count of cases
world = badinput.world
_report_count = badinput._report_count


# ---------------------------------------------------------------------------------------------
# 1. Fixed corpus: run configs (key, bad value, fragments that must be in the message), overrides,
#    command-line arguments

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
    "yaml-non-utf8": (b"task: causal_lm\nmodel: \xff\xfe\n", [":2: not UTF-8 (byte 0xff)"]),
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
# 2. Property-based: random type errors / unknown keys / out-of-range numbers in the run config


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
# 3. A handful through the real entry point: real exit code, no traceback on stderr


def test_real_subprocess_exit_codes(world):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCALETUNE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    root = world["root"]
    cases = []
    (root / "sub-list.yaml").write_text("- a\n- b\n")
    cases.append((["train", str(root / "sub-list.yaml")], "top level must be a mapping"))
    (root / "sub-bytes.yaml").write_bytes(b"task: \xff\n")
    cases.append((["train", str(root / "sub-bytes.yaml")], "sub-bytes.yaml:1: not UTF-8"))
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
