"""The run config: typed, validated before anything heavy, every problem reported at once; YAML and
command-line overrides read as meant; settings the run would ignore refused. (Other tools' key names:
test_config_aliases.py; the peft section: test_config_peft.py.)"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scaletune.config import apply_overrides, from_dict, load_config
from scaletune.config_help import config_reference
from scaletune.errors import ConfigError
from scaletune.rules import cross_field_problems

from stutil import BASE, problems_of

ROOT = Path(__file__).resolve().parents[1]


def test_minimal_config_gets_documented_defaults():
    cfg = from_dict(BASE)
    assert cfg.peft_method == "lora"
    assert cfg.train.global_batch_size == 64 and cfg.train.micro_batch_size == 4
    assert cfg.model.trust_remote_code is False


def test_unknown_keys_get_did_you_mean_and_all_problems_are_reported_together():
    raw = {**BASE, "train": {"lerning_rate": 1e-4, "micro_batch_size": "four"}, "modle": {}}
    problems = problems_of(raw)
    text = "\n".join(problems)
    assert "train.lerning_rate: unknown key (did you mean 'learning_rate'?)" in text
    assert "modle: unknown key (did you mean 'model'?)" in text
    assert "train.micro_batch_size: expected int, got str" in text
    assert len(problems) == 3


def test_missing_required_keys_named():
    problems = problems_of({"task": "causal_lm"})
    assert any(p.startswith("model.name_or_path: required") for p in problems)
    assert any(p.startswith("data.train: required") for p in problems)


def test_literal_choice_with_hint():
    problems = problems_of({**BASE, "task": "causal-lm"})
    assert problems == ["task: 'causal-lm' is not one of causal_lm | dpo | kto | reward | seq_cls | seq_regression | token_cls (did you mean 'causal_lm'?)"]


def test_batch_arithmetic_checked_against_world_size():
    raw = {**BASE, "train": {"global_batch_size": 12, "micro_batch_size": 4}}
    from_dict(raw, world_size=1)
    problems = problems_of(raw, world_size=2)
    assert "divisible by micro_batch_size x world size (4 x 2 = 8)" in problems[0]
    assert "divisible by train.micro_batch_size" in problems_of({**BASE, "train": {"global_batch_size": 10,
                                                                                  "micro_batch_size": 4}})[0]


def test_cross_field_combinations_refused_with_alternative():
    raw = {**BASE, "model": {"name_or_path": "m", "quantization": "8bit"}, "distributed": {"zero_stage": 3}}
    assert any("use quantization: 4bit" in p for p in problems_of(raw))
    cfg = from_dict({**BASE, "train": {"mixed_precision": "fp16"}, "model": {"name_or_path": "m", "dtype": "float16"}})
    assert any("needs a CUDA GPU" in p for p in cross_field_problems(cfg, has_cuda=False))
    raw = {**BASE, "data": {"train": "x", "packing": True}, "task": "seq_cls"}
    assert any("data.packing: only supported for task causal_lm" in p for p in problems_of(raw))


def test_overrides_parse_yaml_values_and_create_sections(tmp_path):
    raw = apply_overrides({"train": {}}, ["train.learning_rate=1e-4", "train.report_to=[]", "peft.r=8",
                                          "data.packing=true"])
    assert raw["train"]["learning_rate"] == 1e-4 and raw["train"]["report_to"] == []
    assert raw["peft"]["r"] == 8 and raw["data"]["packing"] is True
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["train.learning_rate"])


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: causal_lm\nmodel:\n  name_or_path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(path)


def test_string_scientific_notation_accepted():
    cfg = from_dict({**BASE, "train": {"learning_rate": "2e-4"}})
    assert cfg.train.learning_rate == pytest.approx(2e-4)


def test_validation_does_not_import_torch():
    code = ("import sys, scaletune.config as c\n"
            "c.from_dict({'task': 'causal_lm', 'model': {'name_or_path': 'm'}, 'data': {'train': 'x'}})\n"
            "assert 'torch' not in sys.modules, 'config validation imported torch'\n")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    assert time.perf_counter() - start < 10


def test_readme_config_reference_is_generated_from_the_code():
    assert config_reference() in (ROOT / "README.md").read_text()


def test_readme_layout_names_every_module():
    # the Layout section is where a newcomer looks a module up: one left out (schedules.py, new_tokens.py) is lost
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    missing = [p.name for p in sorted((ROOT / "src" / "scaletune").glob("*.py"))
               if not p.name.startswith("__") and not re.search(rf"(?<![\w.]){re.escape(p.name)}", layout)]
    assert not missing, f"README's Layout does not name {missing}"


def test_reference_lists_every_key():
    ref = config_reference()
    for key in ("model.quantization", "train.global_batch_size", "data.train_on_prompt", "distributed.zero_stage"):
        assert f"`{key}`" in ref


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_example_validates(path):
    from scaletune.peft_options import peft_config
    from scaletune.tasks import get_task

    raw = yaml.safe_load(path.read_text())
    cfg = from_dict(raw, source=str(path), world_size=1)
    assert not cross_field_problems(cfg, world_size=1, has_cuda=True)
    peft_config(cfg, get_task(cfg.task).peft_task_type)  # method keys valid for that peft config class


def test_config_reference_rows_have_four_cells():
    """Markdown splits a row at every unescaped |; enum types ("a | b") must not add columns."""
    import re

    for row in config_reference().splitlines():
        assert len(re.split(r"(?<!\\)\|", row.strip().strip("|"))) == 4, row


def test_type_and_cross_field_problems_reported_in_one_run():
    raw = {**BASE, "train": {"learning_rate": "fast", "global_batch_size": 10, "micro_batch_size": 4}}
    assert problems_of(raw) == ["train.learning_rate: expected float, got str 'fast'",
                                "train.global_batch_size (10) must be divisible by train.micro_batch_size (4)"]
    # a rule about a key whose value was bad would judge its default, which the user did not give: left out
    raw = {**BASE, "train": {"micro_batch_size": "four", "global_batch_size": 10}}
    assert problems_of(raw) == ["train.micro_batch_size: expected int, got str 'four'"]
    assert problems_of(raw, world_size=3) == ["train.micro_batch_size: expected int, got str 'four'"]
    raw = {**BASE, "model": {"name_or_path": "m", "dtype": "float64"}, "train": {"mixed_precision": "no"}}
    assert len(problems_of(raw)) == 1
    # required keys missing or a bad task (no default to fall back on) do not break the rules
    assert problems_of({"task": "clm", "model": {"name_or_path": "m"},
                        "data": {"train": "x", "packing": True, "labels": []}}) == [
        "task: 'clm' is not one of causal_lm | dpo | kto | reward | seq_cls | seq_regression | token_cls (did you mean 'causal_lm'?)"]
    problems = problems_of({"data": 5, "train": {"seed": -1}, "model": "m"})
    assert problems[-1] == "train.seed: must be in [0, 2**32 - 1], got -1" and len(problems) == 6


@pytest.mark.parametrize("columns, message", [
    ([2], "data.conll_columns: expected [word column, tag column], two integers counted from 1 (negative: from "
          "the end), e.g. [2, 3]; got [2]"),
    (["2", 3], "data.conll_columns: expected [word column, tag column]"),
    ([True, 3], "data.conll_columns: expected [word column, tag column]"),
    ([0, 3], "data.conll_columns: [0, 3]: columns count from 1 (-1 is the last); there is no column 0"),
    ([3, 3], "data.conll_columns: [3, 3]: the word and the tag are the same column"),
])
def test_conll_columns_must_be_two_different_column_numbers(columns, message):
    raw = {**BASE, "task": "token_cls", "data": {"train": "t.conll", "conll_columns": columns}}
    problems = problems_of(raw)
    assert len(problems) == 1 and problems[0].startswith(message)
    raw["data"]["conll_columns"] = [2, -1]
    assert from_dict(raw).data.conll_columns == [2, -1]


def test_problems_from_command_line_overrides_say_so(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "train": {"seed": "x"}}))
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.learning_rate=abc", "output_dir.sub=1"])
    assert err.value.title == f"{path} (with 2 command-line overrides) has 3 problems"
    assert err.value.problems == [
        "train.seed: expected int, got str 'x'",
        "train.learning_rate: expected float, got str 'abc' (from override train.learning_rate=abc)",
        "output_dir: expected str, got dict {'sub': 1} (from override output_dir.sub=1)",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.global_batch_size=10", "train.micro_batch_size=4"])
    assert err.value.problems[-1] == ("train.global_batch_size (10) must be divisible by train.micro_batch_size (4) "
                                      "(from override train.global_batch_size=10; train.micro_batch_size=4)")


def test_override_attribution_ignores_section_names_used_as_words(tmp_path):
    # A problem names an override whose section it is about ("output_dir: expected str" for output_dir.sub=1),
    # not one whose section's name is merely an English word in its text ("eval data", "would train on").
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data.max_samples=40", "train.max_steps=5", "train.eval_every=2"], check_peft=True)
    [problem] = err.value.problems
    assert problem.startswith("train.eval_every: there is no eval data")
    assert problem.endswith("(from override train.eval_every=2)")


def test_duplicate_yaml_keys_refused_naming_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: causal_lm\n"
                    "model:\n"
                    "  name_or_path: m\n"
                    "  dtype: float32\n"
                    "  dtype: bfloat16\n"
                    "data: {train: t.jsonl}\n"
                    "base: &base {seed: 1}\n"  # an anchor + merge key overridden by the mapping is not a duplicate
                    "train:\n"
                    "  learning_rate: fast\n"
                    "train: {<<: *base, seed: 2}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == [
        f"{path}:5: duplicate key 'dtype' (first at line 4; YAML would keep only this one)",
        f"{path}:10: duplicate key 'train' (first at line 8; YAML would keep only this one)",
        "base: unknown key",
    ]
    path.write_text("task: causal_lm\nmodel: {name_or_path: m}\ndata: {train: t.jsonl}\ntask: causal_lm\n")
    with pytest.raises(ConfigError, match=r"run.yaml:4: duplicate key 'task' \(first at line 1"):
        load_config(path)


def test_yaml_booleans_for_no_yes_on_off(tmp_path):
    path = tmp_path / "run.yaml"
    # the docs write `mixed_precision: no`; YAML 1.1 reads it as false, which can only mean "no"
    path.write_text("task: seq_cls\nmodel: {name_or_path: m, dtype: float32}\ndata: {train: t.jsonl}\n"
                    "train: {mixed_precision: no}\n")
    assert load_config(path).train.mixed_precision == "no"
    path.write_text(path.read_text().replace("mixed_precision: no", "mixed_precision: bf16"))
    assert load_config(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    hint = "(unquoted no/yes/on/off are booleans in YAML: quote them)"
    raw = {**BASE, "task": "seq_cls", "model": {"name_or_path": "m", "dtype": "float32"},
           "train": {"mixed_precision": True}, "distributed": {"offload": False, "zero_stage": True},
           "data": {"train": "t.jsonl", "labels": [False, True]}, "output_dir": True}
    assert problems_of(raw) == [
        f"train.mixed_precision: True is not one of no | fp16 | bf16 {hint}",
        f"distributed.offload: False is not one of none | optimizer | params | all {hint}",
        f"distributed.zero_stage: True is not one of 0 | 1 | 2 | 3 {hint}",
        f"output_dir: expected str, got bool True {hint}",
        "data.labels: every label must be a string or an integer, got False (unquoted no/yes/on/off are booleans "
        "in YAML: quote them; JSON true/false labels are 'true' and 'false')",
    ]


def test_override_of_a_string_key_keeps_the_text_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(path, ["model.revision=0123e45", "output_dir=2024", "task=seq_cls", "data.text_column=yes"])
    assert (cfg.model.revision, cfg.output_dir, cfg.data.text_column) == ("0123e45", "2024", "yes")
    assert load_config(path, ["model.revision=1234567"]).model.revision == "1234567"
    assert load_config(path, ["model.revision=null"]).model.revision is None
    # a '#' is no comment, ': ' makes no mapping, a newline stays: the override `output_dir=run #2` trained into
    # run/ (and with --overwrite replaced it); quotes still unquote, and data.train still takes a list
    cfg = load_config(path, ["output_dir=run #2", "data.train=a #1.jsonl", "data.eval=x: y", "model.revision=a\nb"])
    assert (cfg.output_dir, cfg.data.train, cfg.data.eval, cfg.model.revision) == ("run #2", "a #1.jsonl", "x: y",
                                                                                   "a\nb")
    cfg = load_config(path, ["output_dir='quoted dir'", 'data.eval=" e.jsonl"', "data.train=[a.jsonl, b.jsonl]"])
    assert (cfg.output_dir, cfg.data.eval, cfg.data.train) == ("quoted dir", " e.jsonl", ["a.jsonl", "b.jsonl"])
    # numbers still parse for numeric keys, and a float key takes YAML 1.1's "1e-4" string as a number
    cfg = load_config(path, ["train.learning_rate=1e-4", "train.max_steps=10", "train.epochs=1.5"])
    assert (cfg.train.learning_rate, cfg.train.max_steps, cfg.train.epochs) == (1e-4, 10, 1.5)
    # peft's options are not typed here: a number in text form is left to the peft check (its annotations)
    assert apply_overrides({}, ["peft.revision=0123e45"])["peft"]["revision"] == "0123e45"


def test_message_details():
    # null spelled as a string
    assert problems_of({**BASE, "model": {"name_or_path": "m", "quantization": "None"}}) == [
        "model.quantization: 'None' is a string; for no value write null (unquoted) or leave the key out"]
    # the offload value given is the one named
    problems = problems_of({**BASE, "model": {"name_or_path": "m", "quantization": "4bit"},
                            "distributed": {"zero_stage": 2, "offload": "all"}})
    assert problems[:2] == ["model.quantization with distributed.offload=all: quantized weights cannot be offloaded; "
                            "use offload: optimizer",
                            "distributed.offload=all needs distributed.zero_stage=3 (only ZeRO-3 partitions "
                            "parameters)"]
    # a key suggested is not a key the problem is about
    assert problems_of({**BASE, "learning_rate": 1e-4}, overrides={"learning_rate": "learning_rate=1e-4",
                                                                    "train.learning_rate": "train.learning_rate=1"}) \
        == ["learning_rate: unknown key (did you mean 'train.learning_rate'?) (from override learning_rate=1e-4)"]
    # peft options written in another section
    assert problems_of({**BASE, "model": {"name_or_path": "m", "r": 8}, "method": "lora"}) == [
        "model.r: unknown key (did you mean 'peft.r'?)", "method: unknown key (did you mean 'peft.method'?)"]
    # nccl without CUDA would quietly run gloo
    cfg = from_dict({**BASE, "distributed": {"backend": "nccl"}})
    assert "distributed.backend=nccl needs CUDA GPUs; on CPU use gloo (or leave it null)" in \
        cross_field_problems(cfg, has_cuda=False)
    assert not cross_field_problems(cfg, has_cuda=True)


class _Tokenizer:
    """Enough of a tokenizer for SeqCls.encode: every text is two tokens."""

    def __call__(self, text, pair=None, **kw):
        return {"input_ids": [1, 2]}


def test_seq_cls_labels_json_booleans_and_spaces():
    from scaletune.errors import DataError
    from scaletune.tasks import get_task

    def labels_of(values, labels=None):
        cfg = from_dict({**BASE, "task": "seq_cls", "data": {"train": "t.jsonl", "labels": labels}})
        records = [{"text": "a b", "label": v, "__where__": f"t.jsonl:{i + 1}"} for i, v in enumerate(values)]
        task = get_task("seq_cls")
        names = task.setup(records, cfg, "t.jsonl")
        label2id = {name: i for i, name in enumerate(names)}
        return names, [task.encode(r, _Tokenizer(), cfg, label2id)["labels"] for r in records]

    # JSON true/false are the labels "true"/"false", found in the data or listed in data.labels (as a CSV has them)
    assert labels_of([True, False, True]) == (["false", "true"], [1, 0, 1])
    assert labels_of([True, False], labels=["true", "false"]) == (["true", "false"], [0, 1])
    with pytest.raises(DataError, match=r"label True is not in the label set \['False', 'True'\] \(JSON true is "
                                        r"the label 'true': list it so in data.labels\)"):
        labels_of([True, False], labels=["False", "True"])
    # a label that differs from another only in spaces would be a class of its own
    with pytest.raises(DataError) as err:
        labels_of(["neg", "pos", "neg "])
    assert "differ only in spaces: 'neg' at t.jsonl:1, 'neg ' at t.jsonl:3" in str(err.value)
    assert labels_of(["neg", "neg "], labels=["neg", "neg "]) == (["neg", "neg "], [0, 1])  # listed: kept apart
    with pytest.raises(DataError, match=r"label 'neg ' is not in the label set \['neg', 'pos'\] \(it differs from "
                                        r"'neg' only in spaces\)"):
        labels_of(["neg", "neg "], labels=["neg", "pos"])


def test_a_warmup_that_cannot_happen_is_refused():
    """`constant` has no warmup (it ignored warmup_steps silently), and a warmup at least as long as the run
    never reaches the learning rate."""
    problems = problems_of({**BASE, "train": {"lr_scheduler": "constant", "warmup_steps": 3}})
    assert any("train.warmup_steps: 3 with lr_scheduler: constant, which has no warmup" in p for p in problems)
    problems = problems_of({**BASE, "train": {"max_steps": 5, "warmup_steps": 10}})
    assert any("train.warmup_steps: 10 is not shorter than train.max_steps (5)" in p for p in problems)
    from_dict({**BASE, "train": {"lr_scheduler": "constant_with_warmup", "warmup_steps": 3}})
    from_dict({**BASE, "train": {"max_steps": 6, "warmup_steps": 5}})
    from_dict({**BASE, "train": {"max_steps": 1, "warmup_steps": 1}})  # a smoke test: warned at setup


def test_tracker_that_is_not_installed_is_refused_before_training(monkeypatch):
    """accelerate drops a tracker whose package is missing with a warning (wandb: silently), so the run
    logged nowhere and exited 0; the commands about to train refuse it, naming the extra to install."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "mlflow")
                        else real(name, *a))
    raw = {**BASE, "train": {"report_to": ["tensorboard", "wandb", "mlflow"]}}
    assert problems_of(raw, check_peft=True) == [
        f"train.report_to: {t} is not installed in this environment (pip install 'scaletune[{t}]', or drop it "
        "from report_to)" for t in ("wandb", "mlflow")]
    from_dict(raw)  # eval / predict / merge log to no tracker: they do not ask
    from_dict({**BASE, "train": {"report_to": ["tensorboard"]}}, check_peft=True)


def test_a_problem_of_one_override_is_not_blamed_on_its_neighbours(tmp_path):
    """'+peft: unknown key' was said to come from every peft override on the line (the key matched 'peft')."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError) as err:
        load_config(path, ["peft.lora_alpha=8", "peft.lora_dropout=0.5", "+peft.modules_to_save=[foo]"])
    assert err.value.problems == ["+peft: unknown key (did you mean 'peft'?) (from override +peft.modules_to_save=[foo])"]


def test_task_and_format_names_agree_wherever_they_are_listed():
    """The config's task names (its tuple and the typed field), the task registry and the method matrix's,
    and the causal formats the config accepts and the format registry, are kept by hand in several
    places; a task or format added to one and not the others would be refused or crash late."""
    import typing

    import scaletune.tasks  # noqa: F401  (registers the tasks)
    from scaletune import config, methods
    from scaletune.data.formats import FORMATS
    from scaletune.tasks.base import TASKS

    typed = typing.get_args(typing.get_type_hints(config.RunConfig)["task"])
    assert list(config.TASKS) == list(TASKS) == list(typed) == list(methods._ALL)
    assert set(config.CAUSAL_FORMATS) == set(FORMATS)


@pytest.mark.parametrize("section,task,message", [
    ({"train": {"lr_scheduler": "cosine", "min_lr_ratio": 0.5}}, "causal_lm",
     "train.min_lr_ratio: only lr_scheduler: cosine_with_min_lr or warmup_stable_decay ends at a floor; cosine "
     "ignores it"),
    ({"train": {"lr_scheduler": "constant", "warmup_ratio": 0.5}}, "causal_lm",
     "train.warmup_ratio: 0.5 with lr_scheduler: constant, which has no warmup"),
    ({"train": {"warmup_ratio": 0.2, "warmup_steps": 5}}, "causal_lm",
     "train.warmup_ratio and train.warmup_steps: give one or the other"),
    ({"train": {"on_nonfinite": "stop", "max_nonfinite_skips": 3}}, "causal_lm",
     "train.max_nonfinite_skips: counts skipped updates, and on_nonfinite: stop skips none (it stops at the first); "
     "set on_nonfinite: skip, or max_nonfinite_skips back to 10"),
    ({"train": {"max_nonfinite_skips": 3}}, "causal_lm",
     "train.max_nonfinite_skips: counts skipped updates, and on_nonfinite: stop skips none"),
    ({"train": {"eval_every": 5}}, "causal_lm", "train.eval_every: there is no eval data to evaluate"),
    ({"train": {"early_stopping_threshold": 0.5}}, "causal_lm",
     "train.early_stopping_threshold: only early stopping reads it"),
    ({"train": {"eval_max_new_tokens": 64}}, "causal_lm",
     "train.eval_max_new_tokens: only train.eval_generate's answers read it; set eval_generate"),
    ({"data": {"train": "t.jsonl", "train_on_prompt": True}}, "seq_cls",
     "data.train_on_prompt: only used by causal_lm, not seq_cls"),
    ({"data": {"train": "t.jsonl", "train_on_prompt": True, "format": "text"}}, "causal_lm",
     "data.train_on_prompt: data.format text has no prompt"),
    ({"data": {"train": "t.jsonl", "tags_column": "x"}}, "seq_cls", "data.tags_column: only read by task token_cls"),
    ({"data": {"train": "t.jsonl", "text_column": "x"}}, "token_cls", "data.text_column: only read by task seq_cls"),
    ({"data": {"train": "t.jsonl", "label_column": "x"}}, "causal_lm", "data.label_column: only read by task seq_cls"),
    ({"data": {"train": "t.conll", "conll_columns": [2, 3]}}, "seq_cls",
     "data.conll_columns: only read by task token_cls"),
    ({"data": {"train": "t.jsonl", "chat_template": "chatml", "format": "prompt_completion"}}, "causal_lm",
     "data.chat_template: data.format prompt_completion records are not conversations"),
    ({"model": {"name_or_path": "m", "attn_implementation": "varlen"}}, "seq_cls",
     "model.attn_implementation=varlen: its kernel is causal, for causal_lm; seq_cls would run SDPA"),
    ({"model": {"name_or_path": "m", "attn_implementation": "varlen"}, "peft": {"method": "prompt_tuning"}},
     "causal_lm", "model.attn_implementation=varlen with peft.method=prompt_tuning: the virtual tokens"),
    ({"peft": {"method": "lora", "inference_mode": True}}, "causal_lm",
     "peft.inference_mode: true freezes the adapter, leaving nothing to train"),
])
def test_a_setting_the_run_would_ignore_is_refused(section, task, message):
    """Each of these was accepted and then never read: the user believed it in effect (a floor on the
    learning rate, a column name, the varlen kernel), and the run silently did without it."""
    raw = {**BASE, "task": task, **section}
    problems = problems_of(raw, check_peft=True)
    assert [p for p in problems if p.startswith(message)], problems
    if "inference_mode" not in message:  # (a peft option: checked with the peft section, as training asks)
        from_dict(raw)  # eval / predict / merge read a trained run's config: a training-only setting is no error


def test_a_revision_of_a_local_model_directory_is_refused_with_the_config(tmp_path):
    """`scaletune plan run.yaml model.revision=main` on a local base said FITS: only loading the tokenizer,
    once training started, refused it. A run's own config (eval, predict, merge) still loads."""
    raw = {**BASE, "model": {"name_or_path": str(tmp_path), "revision": "main"}}
    assert [p for p in problems_of(raw, check_peft=True) if p.startswith(
        f"model.revision: 'main' names a version of a hub model, but model.name_or_path {tmp_path} is a local "
        "directory")]
    from_dict(raw)
    from_dict({**raw, "model": {"name_or_path": "org/hub-model", "revision": "main"}}, check_peft=True)


def test_a_config_written_out_whole_validates_again():
    """run.json's `config` holds every default: rerunning it must not read the defaults as settings
    (min_lr_ratio 0.1 beside lr_scheduler cosine, eval_every 200 without eval data)."""
    for task in ("causal_lm", "seq_cls", "token_cls"):
        cfg = from_dict({**BASE, "task": task})
        assert from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_a_missing_deepspeed_or_bitsandbytes_is_named_before_anything_starts(monkeypatch):
    """Command 1 installs no DeepSpeed: `scaletune launch ... distributed.zero_stage=3` ended in accelerate's
    ImportError traceback on every rank, exit 1. A launch (or a Slurm submit) names the extra first; a dry
    run or a plan, composed for another machine, does not ask."""
    import importlib.util

    from scaletune.launch import preflight

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("deepspeed", "bitsandbytes")
                        else real(name, *a))
    raw = {**BASE, "model": {"name_or_path": "m", "quantization": "4bit", "dtype": "bfloat16"},
           "distributed": {"zero_stage": 2}}
    cfg = from_dict(raw, check_peft=True)
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    assert err.value.problems == [
        "distributed.zero_stage=2 needs DeepSpeed, which is not installed in this environment (pip install "
        "'scaletune[deepspeed]', or zero_stage 0)",
        "model.quantization=4bit needs bitsandbytes, which is not installed in this environment (pip install "
        "'scaletune[quant]')"]
    cfg = from_dict({**BASE, "train": {"optimizer": "adamw_8bit"}}, check_peft=True)
    with pytest.raises(ConfigError, match=r"train.optimizer=adamw_8bit needs bitsandbytes"):
        preflight(cfg)


def test_a_leading_tilde_is_the_home_directory(monkeypatch):
    """`output_dir: ~/runs/x` made a directory named '~' in the working directory; a shell expands
    `output_dir=~/x` but not `data.train=~/x`, so the config does it for every path key."""
    monkeypatch.setenv("HOME", "/home/me")
    cfg = from_dict({**BASE, "output_dir": "~/runs/x", "model": {"name_or_path": "~/models/m"},
                     "data": {"train": ["~/a.jsonl", {"path": "~/b.jsonl", "weight": 2}], "eval": "~/e.jsonl",
                              "chat_template": "~/t.jinja"}})
    assert cfg.output_dir == "/home/me/runs/x" and cfg.model.name_or_path == "/home/me/models/m"
    assert cfg.data.train == ["/home/me/a.jsonl", {"path": "/home/me/b.jsonl", "weight": 2}]
    assert (cfg.data.eval, cfg.data.chat_template) == ("/home/me/e.jsonl", "/home/me/t.jinja")
    assert from_dict({**BASE, "output_dir": "runs/~x"}).output_dir == "runs/~x"  # only a leading one


def test_every_data_problem_is_reported_beside_a_column_clash():
    raw = {**BASE, "task": "seq_cls", "data": {"train": "t.jsonl", "labels": ["a", "b"], "text_column": "x",
                                               "label_column": "x", "num_workers": 500}}
    text = "\n".join(problems_of(raw))
    assert "also the label or text-pair column" in text and "500 worker processes is too many" in text


def test_warmup_steps_message_states_the_bound_it_checks():
    assert problems_of({**BASE, "train": {"warmup_steps": -1}}) == ["train.warmup_steps: must be >= 0 (or null), got -1"]
    from_dict({**BASE, "train": {"warmup_steps": 0}})


def test_two_merge_keys_in_one_mapping_are_refused(tmp_path):
    """Two `<<:` lines in one mapping: PyYAML lets the first win each key and drops the second's values without a
    word (the duplicate-key check skipped merge keys); one `<<: [*a, *b]` still works."""
    from scaletune.config import load_config

    path = tmp_path / "run.yaml"
    head = "task: causal_lm\nmodel: {name_or_path: m}\ndata: {train: t.jsonl}\n"
    path.write_text(head + "train:\n  <<: {seed: 1}\n  <<: {seed: 2, learning_rate: 0.1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems[0] == (f"{path}:6: a second merge key '<<' (first at line 5; YAML would let the first "
                                     "win each key): merge several as one `<<: [*a, *b]`")
    path.write_text(head + "train:\n  <<: [{seed: 1}, {seed: 2, learning_rate: 0.1}]\n  '<<': x\n")
    with pytest.raises(ConfigError) as err:  # (a quoted '<<' is a plain key: unknown, not a second merge)
        load_config(path)
    assert not any("merge key" in p for p in err.value.problems), err.value.problems
