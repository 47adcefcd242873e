"""Keys and values people bring from other tools (TrainingArguments, TRL, axolotl, LLaMA-Factory): each is
refused naming scaletune's key or way, not as a bare "unknown key" or difflib's wrong guess."""

from __future__ import annotations

import re

import pytest

from scaletune.aliases import KEY_ALIASES
from scaletune.config import from_dict

from stutil import BASE, problems_of


def test_other_tools_key_names_get_scaletunes_key():
    raw = {**BASE, "model_name_or_path": "m",
           "train": {"lr": 1e-4, "gradient_accumulation_steps": 4, "num_train_epochs": 2, "bf16": True,
                     "lora_r": 8, "per_device_train_batch_size": 2, "gradient_checkpointing": True}}
    text = "\n".join(problems_of(raw))
    assert "train.lr: unknown key (did you mean 'learning_rate'?)" in text
    assert "train.num_train_epochs: unknown key (did you mean 'epochs'?)" in text
    assert "train.per_device_train_batch_size: unknown key (did you mean 'micro_batch_size'?)" in text
    assert "model_name_or_path: unknown key (did you mean 'model.name_or_path'?)" in text
    assert "train.lora_r: unknown key (did you mean 'peft.r'?)" in text
    assert "train.bf16: unknown key (use train.mixed_precision: bf16 | fp16 | no)" in text
    assert ("train.gradient_accumulation_steps: unknown key (scaletune derives it: set train.global_batch_size = "
            "train.micro_batch_size x accumulation steps x world size)") in text
    # a scaletune key in the wrong section is pointed to its section
    assert "train.gradient_checkpointing: unknown key (did you mean 'model.gradient_checkpointing'?)" in text


def test_axolotl_and_llama_factory_names_get_scaletunes_key():
    """The keys people bring from axolotl / LLaMA-Factory / TRL configs were bare "unknown key"s."""
    raw = {**BASE, "lr_scheduler_type": "cosine", "val_set_size": 0.05, "train_on_inputs": False,
           "sample_packing": True, "lora_target_linear": True, "resume_from_checkpoint": True,
           "train": {"optim": "adamw_torch"}}
    text = "\n".join(problems_of(raw))
    assert "lr_scheduler_type: unknown key (did you mean 'train.lr_scheduler'?)" in text
    assert "val_set_size: unknown key (did you mean 'data.eval_fraction'?)" in text
    assert "train_on_inputs: unknown key (did you mean 'data.train_on_prompt'?)" in text
    assert "sample_packing: unknown key (did you mean 'data.packing'?)" in text
    assert "lora_target_linear: unknown key (set peft.target_modules: all-linear)" in text
    assert "resume_from_checkpoint: unknown key (resume with `scaletune train CONFIG --resume auto`" in text
    assert "train.optim: unknown key (did you mean 'optimizer'?)" in text


def test_other_tools_names_for_values_get_scaletunes():
    """`task: ner`, `format: completion` (axolotl's plain-text format) or `format: chat_template` were refused
    with no pointer, as difflib cannot connect them; `report_to: none` (transformers') was an unknown tracker."""
    raw = {**BASE, "task": "ner"}
    assert "did you mean 'token_cls'?" in "\n".join(problems_of(raw))
    for given, meant in (("pretrain", "text"), ("chat_template", "messages"), ("input_output", "prompt_completion")):
        text = "\n".join(problems_of({**BASE, "data": {**BASE["data"], "format": given}}))
        assert f"did you mean {meant!r}?" in text, text
    assert "did you mean 'alpaca'?" in "\n".join(problems_of({**BASE, "data": {**BASE["data"], "format": "alpacca"}}))
    for none in ("none", ["none"], "None", [" NONE"]):
        assert from_dict({**BASE, "train": {"report_to": none}}).train.report_to == []


@pytest.mark.parametrize(("section", "key", "given", "meant"), [
    ("train", "mixed_precision", "fp32", "no"), ("model", "dtype", "fp32", "float32"),
    ("train", "mixed_precision", "float32", "no"), ("train", "mixed_precision", "none", "no"),
    ("train", "mixed_precision", "bfloat16", "bf16"), ("model", "dtype", "bf16", "bfloat16"),
])
def test_one_alias_names_each_keys_own_value(section, key, given, meant):
    """The alias table serves every key: fp32 is model.dtype's float32 but mixed_precision's no (it was given
    no hint there, its only alias not being one of that key's values)."""
    raw = {**BASE, section: {**BASE.get(section, {}), key: given}}
    assert f"{section}.{key}: {given!r} is not one of" in "\n".join(problems_of(raw))
    assert f"(did you mean {meant!r}?)" in "\n".join(problems_of(raw))


def test_every_alias_that_names_a_key_names_one_that_exists():
    import dataclasses

    from peft import LoraConfig

    from scaletune.config import _section_keys

    # (every peft option an alias names is a LoRA one: axolotl's and LLaMA-Factory's adapter keys are LoRA's)
    keys = set(_section_keys().values()) | {"peft.method"} | {f"peft.{f.name}" for f in dataclasses.fields(LoraConfig)}
    named = {v for v in KEY_ALIASES.values() if re.fullmatch(r"\w+\.\w+", v)}
    assert named and named <= keys, named - keys


@pytest.mark.parametrize(("raw", "wanted"), [
    # difflib pointed these to a wrong key: do_train -> train, model_type -> model, logging_strategy ->
    # learning_rate, per_device_eval_batch_size -> micro_batch_size, lr_scheduler_kwargs -> lr_scheduler
    ({"do_train": True}, "do_train: unknown key (`scaletune train CONFIG` trains"),
    ({"model_type": "LlamaForCausalLM"}, "model_type: unknown key (scaletune loads the task's AutoModelFor*"),
    ({"train": {"logging_strategy": "steps"}}, "train.logging_strategy: unknown key (scaletune logs every "
                                                "train.log_every optimizer steps)"),
    ({"train": {"per_device_eval_batch_size": 8}}, "train.per_device_eval_batch_size: unknown key (did you mean "
                                                   "'eval_batch_size'?)"),
    ({"train": {"lr_scheduler_kwargs": {}}}, "train.lr_scheduler_kwargs: unknown key (no scheduler options; for a "
                                             "floor set train.lr_scheduler: cosine_with_min_lr"),
    # these had no hint at all
    ({"quantization_bit": 4}, "quantization_bit: unknown key (set model.quantization: 4bit | 8bit)"),
    ({"pref_beta": 0.1}, "pref_beta: unknown key (did you mean 'train.dpo_beta'?)"),
    ({"train": {"rpo_alpha": 1.0}}, "train.rpo_alpha: unknown key (did you mean 'dpo_sft_weight'?)"),
    ({"bnb_4bit_compute_dtype": "bfloat16"}, "bnb_4bit_compute_dtype: unknown key (model.quantization: 4bit "
                                             "computes in model.dtype)"),
    ({"preprocessing_num_workers": 16}, "preprocessing_num_workers: unknown key (did you mean 'data.num_proc'?)"),
    ({"train": {"ddp_timeout": 9}}, "train.ddp_timeout: unknown key (did you mean 'distributed.timeout_s'?)"),
    ({"flash_attn": "fa2"}, "flash_attn: unknown key (set model.attn_implementation: flash_attention_2"),
    ({"fsdp": "full_shard"}, "fsdp: unknown key (no FSDP: scaletune shards with DeepSpeed ZeRO"),
    ({"wandb_project": "p"}, "wandb_project: unknown key (set train.report_to: [wandb]; the project comes from "
                             "$WANDB_PROJECT)"),
    ({"lora_fan_in_fan_out": None}, "lora_fan_in_fan_out: unknown key (did you mean 'peft.fan_in_fan_out'?)"),
    ({"peft_use_dora": True}, "peft_use_dora: unknown key (did you mean 'peft.use_dora'?)"),
    ({"stage": "sft"}, "stage: unknown key (set task: causal_lm for sft"),
    ({"train": {"overwrite_output_dir": True}}, "train.overwrite_output_dir: unknown key (replace a run with "
                                                "`scaletune train CONFIG --overwrite`)"),
    # a top-level key inside a section (TrainingArguments keeps output_dir with the training settings)
    ({"train": {"output_dir": "x"}}, "train.output_dir: unknown key (output_dir is a top-level key, not inside "
                                     "train)"),
    # values: transformers' names difflib got wrong or missed
    ({"train": {"lr_scheduler": "cosine_with_restarts"}}, "(did you mean 'cosine'?)"),
    ({"train": {"optimizer": "paged_adamw"}}, "(did you mean 'paged_adamw_32bit'?)"),
    ({"train": {"optimizer": "adamw_bnb_8bit"}}, "(did you mean 'adamw_8bit'?)"),
    ({"train": {"optimizer": "lion_32bit"}}, "(did you mean 'lion'?)"),
    ({"train": {"optimizer": "paged_lion_32bit"}}, "(did you mean 'lion'?)"),
    ({"train": {"optimizer": "adamw_torch_fused"}}, "(did you mean 'adamw'?)"),
    ({"model": {"name_or_path": "m", "dtype": "fp16"}}, "(did you mean 'float16'?)"),
    ({"model": {"name_or_path": "m", "quantization": 4}}, "(did you mean '4bit'?)"),
    ({"model": {"name_or_path": "m", "attn_implementation": "fa2"}}, "(did you mean 'flash_attention_2'?)"),
    ({"task": "CAUSAL_LM"}, "(did you mean 'causal_lm'?)"),
    ({"task": "token-classification"}, "(did you mean 'token_cls'?)"),
    ({"distributed": {"zero_stage": "3"}}, "distributed.zero_stage: '3' is not one of 0 | 1 | 2 | 3 (write 3 "
                                           "unquoted: a number)"),
    ({"peft": {"method": "lora", "target_modules": "all"}}, "peft.target_modules: 'all' would match only a module "
                                                            "named so; for every linear layer write all-linear"),
    # LLaMA-Factory's lora_target: q_proj,v_proj, which peft refused only once the base had loaded
    ({"peft": {"method": "lora", "target_modules": "q_proj, v_proj"}}, "peft.target_modules: 'q_proj, v_proj' is one "
                                                                       "regular expression to peft, matching no "
                                                                       "module; for these modules write a list: "
                                                                       "[q_proj, v_proj]"),
    # difflib's wrong guesses: export_dir -> output_dir, data_seed -> data, ref_model -> model, dpo (a loss) -> ipo
    ({"export_dir": "m"}, "export_dir: unknown key (`scaletune merge CONFIG --out DIR` writes the merged model"),
    ({"data_seed": 1}, "data_seed: unknown key (did you mean 'train.seed'?)"),
    ({"ref_model": "m"}, "ref_model: unknown key (dpo and kto's reference is the base model itself"),
    ({"train": {"dpo_loss": "dpo"}}, "train.dpo_loss: 'dpo' is not one of sigmoid | hinge | ipo | simpo | orpo "
                                     "(did you mean 'sigmoid'?)"),
    # axolotl's rl and LLaMA-Factory's stage values, and the adapter keys, had no hint
    ({"rl": "dpo"}, "rl: unknown key (set task: dpo"),
    ({"rl_beta": 0.1}, "rl_beta: unknown key (did you mean 'train.dpo_beta'?)"),
    ({"adapter_name_or_path": "a"}, "adapter_name_or_path: unknown key (training from it: model.init_adapter; "
                                    "eval, predict and merge: --adapter DIR)"),
    ({"lora_rank": 8}, "lora_rank: unknown key (peft.r; LLaMA-Factory's lora_alpha defaults to 2 x lora_rank, "
                       "peft's to 8: where yours left it out, set peft.lora_alpha to 2 x r)"),
    ({"predict_with_generate": True}, "predict_with_generate: unknown key (`scaletune eval CONFIG --generate`"),
    ({"max_new_tokens": 64}, "max_new_tokens: unknown key (the --max-new-tokens flag of predict and eval "
                             "--generate (while training: train.eval_max_new_tokens))"),
    ({"lora_model_dir": "a"}, "lora_model_dir: unknown key (did you mean 'model.init_adapter'?)"),
    ({"task": "rm"}, "task: 'rm' is not one of causal_lm | dpo | kto | reward | seq_cls | seq_regression | "
                     "token_cls (did you mean 'reward'?)"),
    ({"task": "pt"}, "(did you mean 'causal_lm'?)"),
    ({"task": "orpo"}, "(did you mean 'dpo'?)"),
    # axolotl's datasets: items carried to data.train
    ({"data": {"train": [{"path": "a.json", "type": "alpaca", "field_instruction": "q"}]}},
     "data.train[0]: unknown key(s) field_instruction, type (an item has path and weight; axolotl's type is "
     "data.format, its field_* data.columns, its split hub:<id>:split, set once for all of data.train)"),
    # axolotl's val_set_size: 0 (nothing held out) and LLaMA-Factory's whole-number val_size (a count)
    ({"data": {**BASE["data"], "eval_fraction": 0}}, "data.eval_fraction: must be in (0, 1), got 0.0; 0 holds "
                                                     "nothing out: leave the key out for no eval data"),
    ({"data": {**BASE["data"], "eval_fraction": 200}}, "data.eval_fraction: must be in (0, 1), got 200.0; a fraction "
                                                       "of data.train, not a count of examples"),
])
def test_other_tools_habits_get_scaletunes_way(raw, wanted):
    """Keys and values carried over from TrainingArguments, TRL, axolotl and LLaMA-Factory configs: each problem
    names scaletune's key or way instead of a bare "unknown key" or difflib's wrong guess."""
    raw = {**BASE, **raw, "model": {**BASE["model"], **raw.get("model", {})}}
    text = "\n".join(problems_of(raw))
    assert wanted in text, text


def test_axolotl_options_left_empty_share_one_line():
    """axolotl's examples carry a dozen options left empty (wandb_watch:, fsdp:, debug:): each was its own
    "unknown key" line, pushing the keys that set something off the screen."""
    raw = {**BASE, "wandb_watch": None, "debug": None, "fsdp": None, "lora_r": 8,
           "train": {**BASE.get("train", {}), "eval_table_size": None, "tf32": None}}
    problems = problems_of(raw)
    assert "unknown keys left empty (null), which set nothing: wandb_watch, debug, fsdp; delete them" in problems
    assert "train: unknown keys left empty (null), which set nothing: eval_table_size, tf32; delete them" in problems
    assert "lora_r: unknown key (did you mean 'peft.r'?)" in problems
    assert not any(p.startswith(("wandb_watch", "debug", "fsdp", "train.tf32")) for p in problems)
    # one alone keeps its own line and hint
    assert "fsdp: unknown key (no FSDP: scaletune shards with DeepSpeed ZeRO, set distributed.zero_stage: 3)" in \
        problems_of({**BASE, "fsdp": None})
