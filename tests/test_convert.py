"""`scaletune convert`: other tools' configs (LLaMA-Factory, axolotl, TrainingArguments) as scaletune's, checked by
loading (and, for LLaMA-Factory's dataset registry, training on) what it writes."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from scaletune.config import load_config

from stutil import alpaca_records, assert_clean_error, read_metrics, run_cli, write_jsonl

LLAMA_FACTORY = """\
### model
model_name_or_path: {model}
### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 4
lora_target: q_proj,v_proj
### dataset
dataset: renamed_demo
dataset_dir: {registry}
template: llama3
cutoff_len: 128
max_samples: 24
overwrite_cache: true
preprocessing_num_workers: 1
### output
output_dir: {out}
logging_steps: 1
save_steps: 2
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none
### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
learning_rate: 1.0e-3
max_steps: 2
lr_scheduler_type: cosine_with_restarts
warmup_ratio: 0.0
bf16: false
ddp_timeout: 180000000
### eval
val_size: 0.25
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 2
"""


def _registry(tmp_path: Path) -> Path:
    """A LLaMA-Factory dataset folder: alpaca records under other column names, mapped in dataset_info.json."""
    folder = tmp_path / "lf_data"
    folder.mkdir()
    renamed = [{"question": r["instruction"] + " " + r["input"], "answer": r["output"]} for r in alpaca_records(24)]
    (folder / "renamed.json").write_text(json.dumps(renamed))
    (folder / "dataset_info.json").write_text(json.dumps(
        {"renamed_demo": {"file_name": "renamed.json", "columns": {"prompt": "question", "response": "answer"}}}))
    return folder


def _converted(tmp_path: Path, text: str, capsys) -> tuple[dict, str, Path]:
    src = tmp_path / "theirs.yaml"
    src.write_text(text)
    out = tmp_path / "run.yaml"
    code, _, err = run_cli(["convert", src, "--out", out], capsys)
    assert code == 0, err
    return yaml.safe_load(out.read_text()), out.read_text(), out


def test_a_llama_factory_config_converts_and_trains_on_its_registered_dataset(tmp_path, tiny_llama, capsys):
    text = LLAMA_FACTORY.format(model=tiny_llama, registry=_registry(tmp_path), out=tmp_path / "out")
    raw, written, out = _converted(tmp_path, text, capsys)
    assert raw["task"] == "causal_lm"
    # LLaMA-Factory's alpha default (2 x rank) made explicit; its comma list of modules as a list
    assert raw["peft"] == {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    assert raw["data"]["train"] == str(tmp_path / "lf_data" / "renamed.json")
    assert raw["data"]["columns"] == {"instruction": "question", "output": "answer"}
    assert raw["data"]["eval_fraction"] == 0.25
    train = raw["train"]
    assert (train["micro_batch_size"], train["global_batch_size"]) == (2, 4)
    assert (train["mixed_precision"], train["lr_scheduler"], train["report_to"]) == ("no", "cosine", [])
    assert (train["eval_every"], train["save_every"], train["log_every"]) == (2, 2, 1)
    assert raw["distributed"]["timeout_s"] == 180000000
    # what does not carry over is said in the file, not dropped silently
    assert "template: 'llama3'" in written and "save_only_model" in written and "ONE process" in written
    assert raw["train"]["eval_batch_size"] == 1  # (per_device_eval_batch_size)
    cfg = load_config(out, check_peft=True)
    assert cfg.train.learning_rate == 1e-3
    # the registry's column mapping is what makes the renamed file readable as alpaca records
    code, _, err = run_cli(["train", out], capsys)
    assert code == 0, err
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2]
    assert [m["step"] for m in read_metrics(tmp_path / "out", "eval")] == [2]


AXOLOTL = """\
base_model: {model}
load_in_8bit: false
load_in_4bit: true
strict: false
datasets:
  - path: {data}
    type: alpaca
dataset_prepared_path: last_run_prepared
val_set_size: 0.05
output_dir: ./outputs/qlora-out
adapter: qlora
lora_model_dir:
sequence_len: 512
sample_packing: true
pad_to_sequence_len: true
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
wandb_project:
wandb_entity:
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_torch_fused
lr_scheduler: cosine
learning_rate: 0.0002
train_on_inputs: false
bf16: auto
tf32: false
gradient_checkpointing: true
flash_attention: true
warmup_steps: 10
evals_per_epoch: 4
saves_per_epoch: 1
deepspeed: {deepspeed}
weight_decay: 0.0
special_tokens:
  pad_token: "<|end_of_text|>"
"""


def test_an_axolotl_qlora_config_with_a_deepspeed_file_converts(tmp_path, capsys):
    data = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_records(4))
    ds = tmp_path / "zero3_offload.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    raw, written, out = _converted(tmp_path, AXOLOTL.format(model="some/model", data=data, deepspeed=ds), capsys)
    assert raw["model"] == {"name_or_path": "some/model", "quantization": "4bit", "gradient_checkpointing": True,
                            "attn_implementation": "flash_attention_2", "dtype": "bfloat16"}  # (bf16: auto)
    assert raw["data"] == {"train": str(data), "format": "alpaca", "eval_fraction": 0.05, "max_length": 512,
                           "packing": True, "train_on_prompt": False, "too_long": "drop"}  # (axolotl drops long rows)
    assert raw["peft"]["target_modules"] == "all-linear" and raw["peft"]["method"] == "lora"
    assert raw["train"]["optimizer"] == "adamw" and raw["train"]["global_batch_size"] == 8
    assert raw["distributed"] == {"zero_stage": 3, "offload": "optimizer"}  # read from the JSON, not its name
    # empty keys set nothing and are not noted; keys with no equivalent are
    assert "wandb_project" not in written and "lora_model_dir" not in written
    assert "tf32" in written and "special_tokens" in written and "pad_to_sequence_len" in written
    load_config(out)


def test_stages_name_the_task_and_loss(tmp_path, capsys):
    for stage, extra, task, more in (("dpo", "pref_loss: sigmoid\npref_beta: 0.2\n", "dpo", {"dpo_beta": 0.2}),
                                     ("rm", "", "reward", {}), ("kto", "", "kto", {})):
        (tmp_path / "run.yaml").unlink(missing_ok=True)
        raw, _, _ = _converted(tmp_path, f"model_name_or_path: m\nstage: {stage}\n{extra}", capsys)
        assert raw["task"] == task
        assert {k: raw["train"][k] for k in more} == more
        # what LLaMA-Factory's config leaves out is what it means there: its LoRA and TrainingArguments' defaults
        assert raw["peft"] == {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
        assert {k: raw["train"][k] for k in ("learning_rate", "lr_scheduler", "warmup_ratio", "micro_batch_size")} \
            == {"learning_rate": 5e-5, "lr_scheduler": "linear", "warmup_ratio": 0.0, "micro_batch_size": 8}
    (tmp_path / "run.yaml").unlink()
    raw, _, _ = _converted(tmp_path, "model_name_or_path: m\nstage: pt\nfp16: true\n", capsys)
    assert (raw["task"], raw["data"]["format"], raw["train"]["mixed_precision"]) == ("causal_lm", "text", "fp16")
    assert raw["data"]["too_long"] == "split"  # (pretraining: long texts become blocks, not cut)
    assert raw["model"]["dtype"] == "float16"  # (as the other tool's base: autocast to another dtype is refused)


def test_convert_prints_without_out_and_never_overwrites(tmp_path, capsys):
    src = tmp_path / "theirs.yaml"
    src.write_text("model_name_or_path: m\ndataset: missing_name\nnum_train_epochs: 2\n")
    code, out, err = run_cli(["convert", src], capsys)
    assert code == 0 and yaml.safe_load(out)["train"]["epochs"] == 2
    # what still keeps it from running is said: the dataset name that is no file here
    assert "missing_name" in out and "still to fix" in err and "data.train" in err
    mine = tmp_path / "mine.yaml"
    mine.write_text("precious\n")
    code, _, err = run_cli(["convert", src, "--out", mine], capsys)
    assert_clean_error(code, err, str(mine), "exists")
    assert mine.read_text() == "precious\n"
    # a directory named for --out: a new one with its trailing slash wrote a file of its name
    for where in (f"{tmp_path / 'new'}/", str(tmp_path)):
        code, _, err = run_cli(["convert", src, "--out", where], capsys)
        assert_clean_error(code, err, "name the file to write")
    assert not (tmp_path / "new").exists()


def test_a_foreign_config_error_points_to_convert(tmp_path, capsys):
    src = tmp_path / "theirs.yaml"
    src.write_text("model_name_or_path: m\ndataset: d\nlearning_rate: 1.0e-4\nnum_train_epochs: 2\nlora_rank: 8\n")
    code, _, err = run_cli(["train", src], capsys)
    assert code == 2 and f"scaletune convert {src} --out run.yaml" in err
    # a scaletune config with a stray key or two gets its hints alone
    own = tmp_path / "own.yaml"
    own.write_text("task: causal_lm\nmodel: {name_or_path: m}\ndata: {train: t.jsonl}\nlr: 1\n")
    code, _, err = run_cli(["train", own], capsys)
    assert code == 2 and "train.learning_rate" in err and "convert" not in err


def test_keys_left_out_take_the_other_tools_defaults(tmp_path, capsys):
    # LLaMA-Factory's own kto/ds3/qlora examples give no lora_rank: rank 8 and alpha 16 there (peft's alpha: 8)
    raw, written, _ = _converted(tmp_path, "model_name_or_path: m\nstage: sft\nfinetuning_type: lora\n"
                                 "gradient_accumulation_steps: 8\n", capsys)
    assert raw["peft"] == {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
    assert (raw["train"]["micro_batch_size"], raw["train"]["global_batch_size"]) == (8, 64)  # (per device: 8)
    assert "LLaMA-Factory's defaults" in written and "could not read the batch size" not in written
    # axolotl: one epoch and a micro batch of 1 unless said; TrainingArguments'/TRL's learning rate is noted
    (tmp_path / "run.yaml").unlink()
    raw, _, _ = _converted(tmp_path, "base_model: m\nadapter: lora\nlearning_rate: 1.0e-4\n", capsys)
    assert (raw["train"]["epochs"], raw["train"]["micro_batch_size"], raw["train"]["global_batch_size"]) == (1, 1, 1)
    assert raw["data"]["too_long"] == "drop"  # (axolotl's excess_length_strategy default)
    for theirs, ours in (("truncate", "truncate"), ("raise", "drop")):
        (tmp_path / "run.yaml").unlink()
        raw, written, _ = _converted(tmp_path, f"base_model: m\nadapter: lora\nexcess_length_strategy: {theirs}\n",
                                     capsys)
        assert raw["data"]["too_long"] == ours and ("has no such choice" in written) == (theirs == "raise")
    (tmp_path / "run.yaml").unlink()
    raw, written, _ = _converted(tmp_path, "model_name_or_path: m\nnum_train_epochs: 1\n", capsys)
    assert (raw["train"]["lr_scheduler"], raw["train"]["warmup_ratio"]) == ("linear", 0.0)
    assert "learning_rate: not given" in written
    # a config that is scaletune's already gets none of that
    (tmp_path / "run.yaml").unlink()
    raw, _, _ = _converted(tmp_path, "task: causal_lm\nmodel: {name_or_path: m}\ndata: {train: t.jsonl}\n", capsys)
    assert raw == {"task": "causal_lm", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}


def test_axolotl_bf16_auto_with_fp16_false_is_bf16_not_float32(tmp_path, capsys):
    for text in ("bf16: auto\nfp16: false\n", "fp16: false\nbf16: auto\n", "bf16: 'true'\nfp16: false\n"):
        (tmp_path / "run.yaml").unlink(missing_ok=True)
        raw, _, _ = _converted(tmp_path, "base_model: m\n" + text, capsys)
        assert (raw["train"]["mixed_precision"], raw["model"]["dtype"]) == ("bf16", "bfloat16"), text


AXOLOTL_ODDS = """\
base_model: m
adapter: ia3
peft_target_modules: [k_proj, v_proj, down_proj]
peft_feedforward_modules: [down_proj]
datasets:
  - path: {data}
    type: chat_template
    field_messages: conversation
  - type: alpaca
val_set_size: 0.0
evals_per_epoch: 4
eval_steps: 0.05
save_steps: 0.25
logging_steps: 0.01
chat_template: tokenizer_default
"""


def test_nothing_is_dropped_silently_or_read_as_another_value(tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"conversation": [{"role": "user", "content": "hi"}]}])
    raw, written, _ = _converted(tmp_path, AXOLOTL_ODDS.format(data=data), capsys)
    written = written.replace("\n#   ", " ")  # (the notes as one line each)
    # axolotl's peft_* keys are peft's options; a dataset without a path is not the working directory ('.')
    assert raw["peft"] == {"method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                           "feedforward_modules": ["down_proj"]}
    assert raw["data"]["train"] == str(data)
    assert "field_messages not carried over" in written and "{'type': 'alpaca'} gives no path" in written
    # TrainingArguments' fractions of the run's steps are said, not read as a step count (or dropped)
    assert not {"eval_every", "save_every", "log_every"} & raw["train"].keys()
    assert all(f"{k}: {v}: a fraction of the run's total steps" in written
               for k, v in (("eval_steps", 0.05), ("save_steps", 0.25), ("logging_steps", 0.01)))
    # with no eval data, axolotl's evals_per_epoch meant nothing: left out instead of a refusal to fix
    assert "evals_per_epoch" not in raw["train"] and "there is no eval data" in written
    # LLaMA-Factory's `default` template is a rendering of its own, not the tokenizer's
    (tmp_path / "run.yaml").unlink()
    _, written, _ = _converted(tmp_path, "model_name_or_path: m\ntemplate: default\n", capsys)
    assert "template: 'default' is the other tool's own rendering" in written


def test_eval_steps_default_pretraining_data_and_both_dataset_keys(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_records(4))
    b = write_jsonl(tmp_path / "b.jsonl", alpaca_records(4, seed=1))
    text = tmp_path / "corpus.jsonl"
    text.write_text('{"text": "some plain text"}\n')
    # TrainingArguments: eval_strategy steps without eval_steps evaluates every logging_steps
    raw, _, _ = _converted(tmp_path, f"model_name_or_path: m\ndataset: {a}\ndatasets: [{{path: {b}, type: alpaca}}]\n"
                                     "val_size: 0.2\neval_strategy: steps\nlogging_steps: 7\n", capsys)
    assert raw["train"]["eval_every"] == 7 and raw["train"]["log_every"] == 7
    assert raw["data"]["train"] == [str(a), str(b)]  # (both keys given: both files, not the last key's)
    (tmp_path / "run.yaml").unlink()
    raw, _, _ = _converted(tmp_path, f"base_model: m\npretraining_dataset:\n  - path: {text}\n    type: pretrain\n",
                           capsys)
    assert (raw["data"]["train"], raw["data"]["format"], raw["data"]["too_long"]) == (str(text), "text", "split")


def test_a_section_given_as_null_or_a_scalar_does_not_crash(tmp_path, capsys):
    raw, written, _ = _converted(tmp_path, "model: null\ndata: oops\nbf16: true\nmax_seq_length: 64\n", capsys)
    assert raw["model"]["dtype"] == "bfloat16" and raw["data"]["max_length"] == 64
    assert "data: 'oops' is no section" in written
