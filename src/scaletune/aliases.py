"""Other fine-tuning tools' names (transformers' TrainingArguments, axolotl, LLaMA-Factory, TRL) for scaletune's
keys and values: an unknown key or a refused value is looked up here for its "did you mean"."""

from __future__ import annotations

# Names other fine-tuning tools (transformers' TrainingArguments, axolotl, LLaMA-Factory) use for scaletune's keys.
# difflib cannot connect "lr" to "learning_rate", so an unknown key is looked up here first. A value that is a
# dotted key becomes "did you mean ...?"; any other value is shown as it is.
_BATCH = ("scaletune has train.micro_batch_size (per forward pass per rank) and train.global_batch_size "
          "(per optimizer step, all ranks)")
_ACCUM = ("scaletune derives it: set train.global_batch_size = train.micro_batch_size x accumulation steps x "
          "world size")
KEY_ALIASES: dict[str, str] = {
    "lr": "train.learning_rate",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.micro_batch_size",
    "batch_size": _BATCH,
    "train_batch_size": _BATCH,
    "total_batch_size": "train.global_batch_size",
    "gradient_accumulation_steps": _ACCUM,
    "grad_accum": _ACCUM,
    "bf16": "use train.mixed_precision: bf16 | fp16 | no",
    "fp16": "use train.mixed_precision: bf16 | fp16 | no",
    "logging_steps": "train.log_every",
    "save_steps": "train.save_every",
    "eval_steps": "train.eval_every",
    "evals_per_epoch": "train.evals_per_epoch",
    "saves_per_epoch": "train.saves_per_epoch",
    "lora_r": "peft.r",
    "lora_rank": "peft.r",
    "rank": "peft.r",
    "lora_alpha": "peft.lora_alpha",
    "lora_dropout": "peft.lora_dropout",
    "target_modules": "peft.target_modules",
    "lora": "LoRA options go in the peft section, with method: lora",
    "model_name_or_path": "model.name_or_path",
    "base_model": "model.name_or_path",
    "torch_dtype": "model.dtype",
    "load_in_4bit": "set model.quantization: 4bit",
    "load_in_8bit": "set model.quantization: 8bit",
    "max_seq_length": "data.max_length",
    "cutoff_len": "data.max_length",
    "sequence_len": "data.max_length",
    "dataset": "data.train",
    "train_file": "data.train",
    "deepspeed": "distributed.zero_stage (scaletune writes the DeepSpeed config itself)",
    "lr_scheduler_type": "train.lr_scheduler",
    "optim": "train.optimizer",
    "val_set_size": "data.eval_fraction",
    "val_size": "data.eval_fraction",
    "validation_split_percentage": "data.eval_fraction",
    "train_on_inputs": "data.train_on_prompt",
    "completion_only_loss": "the loss is on completions only unless data.train_on_prompt: true",
    "sample_packing": "data.packing",
    "flash_attention": "set model.attn_implementation: flash_attention_2 (or varlen, nothing to install)",
    "use_flash_attention": "set model.attn_implementation: flash_attention_2 (or varlen, nothing to install)",
    "lora_target_modules": "peft.target_modules",
    "lora_target": "peft.target_modules",
    "lora_target_linear": "set peft.target_modules: all-linear",
    "lora_modules_to_save": "peft.modules_to_save",
    "adapter": "set peft.method (lora, ...); QLoRA is method lora with model.quantization: 4bit",
    "finetuning_type": "set peft.method (lora, ...)",
    "eval_strategy": "scaletune evaluates every train.eval_every steps (or train.evals_per_epoch times an epoch) "
                     "and at the end",
    "evaluation_strategy": "scaletune evaluates every train.eval_every steps (or train.evals_per_epoch times an "
                           "epoch) and at the end",
    "save_strategy": "scaletune checkpoints every train.save_every steps (or train.saves_per_epoch times an "
                     "epoch) and at the end",
    "load_best_model_at_end": "set train.best_metric: the best eval's adapter is kept in OUTPUT_DIR/best_adapter/",
    "metric_for_best_model": "train.best_metric",
    "early_stopping": "train.early_stopping_patience",
    "neftune_noise_alpha": "train.neftune_noise_alpha",
    "resume_from_checkpoint": "resume with `scaletune train CONFIG --resume auto` (or --resume CHECKPOINT_DIR)",
    "datasets": "data.train (a file, hub:<id>[:split], or a list of them with weights; data.eval for evaluation)",
    "greater_is_better": "train.best_metric knows its direction (loss, perplexity: lower; the others: higher)",
    "neftune": "train.neftune_noise_alpha",
    "loraplus_lr_ratio": "train.loraplus_lr_ratio",
    "validation_split": "data.eval_fraction",
    "test_size": "data.eval_fraction",
    "chat_template": "data.chat_template",
    "template": "data.chat_template",
    "label_smoothing_factor": "train.label_smoothing",
}


# Values other tools use for scaletune's choices, which difflib cannot connect ("ner" to "token_cls").
VALUE_ALIASES: dict[str, str] = {
    "ner": "token_cls", "token_classification": "token_cls", "classification": "seq_cls",
    "text_classification": "seq_cls", "sequence_classification": "seq_cls", "regression": "seq_regression",
    "sequence_regression": "seq_regression", "sft": "causal_lm",
    "clm": "causal_lm", "causal": "causal_lm", "pretrain": "text", "pt": "text",
    "chat_template": "messages", "openai": "messages", "chatml": "messages", "conversation": "sharegpt",
    "input_output": "prompt_completion",
}
