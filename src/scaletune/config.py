"""The run config: typed dataclasses and per-key validation (reading the YAML file and the overrides is in
config_file.py, the rules about combinations of keys in rules.py).

This module is the single source of truth for what a run can say. It imports nothing heavy, so a bad
config fails in well under a second, before torch/transformers are loaded. All problems are
collected and reported together.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from .aliases import KEY_ALIASES
from .config_values import _coerce, _did_you_mean, _holds_nul
from .errors import ConfigError, problems_count

TASKS = ("causal_lm", "dpo", "kto", "reward", "seq_cls", "seq_regression", "token_cls")
# tasks whose adapter is a causal LM's (peft CAUSAL_LM): they render chats alike, and predict generates with them
CAUSAL_TASKS = ("causal_lm", "dpo", "kto")
# tasks whose data is rendered as causal_lm renders it (chat templates included): reward reads dpo's pairs too
CHAT_TASKS = (*CAUSAL_TASKS, "reward")
CAUSAL_FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
MAX_PEFT_SIZE = 65536  # adapter rank / virtual tokens: far beyond any model's hidden size
_PEFT_SIZE_KEYS = ("r", "init_r", "target_r", "num_virtual_tokens", "encoder_hidden_size", "bottleneck_dim")



# What each task's eval reports that can pick the best adapter, and which way is better.
EVAL_METRICS: dict[str, dict[str, str]] = {
    "causal_lm": {"loss": "min", "perplexity": "min", "exact_match": "max", "token_f1": "max",
                  "rouge_l": "max"},
    "dpo": {"loss": "min", "reward_accuracy": "max", "reward_margin": "max", "chosen_reward": "max",
            "rejected_reward": "min"},
    "kto": {"loss": "min", "reward_margin": "max", "desirable_reward": "max", "undesirable_reward": "min"},
    "reward": {"loss": "min", "accuracy": "max", "reward_margin": "max", "chosen_reward": "max",
               "rejected_reward": "min"},
    "seq_cls": {"loss": "min", "accuracy": "max", "macro_f1": "max", "micro_f1": "max"},
    "token_cls": {"loss": "min", "f1": "max", "precision": "max", "recall": "max", "token_accuracy": "max"},
    "seq_regression": {"loss": "min", "mse": "min", "rmse": "min", "mae": "min", "pearson": "max", "spearman": "max"},
}


def lower_is_better(metric: str) -> bool:
    """Whether a lower value of eval metric `metric` is better (an error, a loss), by EVAL_METRICS: one name keeps
    one direction in every task, so best_metric and `report`'s best-so-far read it from here alike."""
    return any(names.get(metric) == "min" for names in EVAL_METRICS.values())


def has_direction(metric: str) -> bool:
    """Whether eval metric `metric` is a score with a better direction (EVAL_METRICS names it for some task):
    kto's kl (the reference point, a diagnostic) and counts (examples, pairs) are not, and have no best."""
    return any(metric in names for names in EVAL_METRICS.values())


# The most used peft options, so `model.r` can be pointed to `peft.r` without importing peft (its options
# are known only to the method's peft config class).
_PEFT_OPTIONS = ("method", "r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora",
                 "modules_to_save", "init_lora_weights", "num_virtual_tokens", "init_r", "target_r", "alpha")


def _f(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field with help text (shown by `scaletune config-help` and the README)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(kw_only=True)
class ModelConfig:
    name_or_path: str = _f(help="Local directory or hub id of the base model.")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("bfloat16", "Dtype of the frozen base weights.")
    quantization: Literal["4bit", "8bit"] | None = _f(
        None, "bitsandbytes quantization of the frozen base: 4bit = NF4 + double quant, 8bit = LLM.int8."
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (use_reentrant=False).")
    trust_remote_code: bool = _f(False, "Allow model code from the model repository to run. Off unless set.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "varlen"] | None = _f(
        None, "Attention kernel; default lets transformers choose (sdpa where available). varlen: PyTorch's "
        "variable-length flash kernel on CUDA, each packed example / padded row attends only to itself with "
        "no work on padding (nothing to install); SDPA answers where it cannot run (CPU, generation)."
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the base model.")
    init_adapter: str | None = _f(None, "Start from this adapter's weights instead of a new initialisation: an "
                                  "earlier run's OUTPUT_DIR/adapter or best_adapter, a checkpoint (OUTPUT_DIR/checkpoints/"
                                  "step-N: its adapter), or any peft adapter of the same method and shapes on this "
                                  "base, to train on new data or go on training. The peft "
                                  "section must describe the same adapter; a resumed run takes its checkpoint's.")
    new_special_tokens: list | None = _f(None, "Tokens to add to the tokenizer as special tokens (never split), e.g. "
                                         "[<|im_start|>, <|im_end|>] for data.chat_template: chatml on a base model "
                                         "whose tokenizer lacks them; ones it has are not added again. The model's "
                                         "embeddings (and LM head) get new rows, started at the mean embedding and "
                                         "trained with peft's trainable_token_indices (peft.method lora or adalora; "
                                         "not dpo/kto; not under ZeRO-3). The adapter's tokenizer and scaletune.json "
                                         "keep them: eval, predict and merge resize the base the same way.")
    rope_scaling: dict | None = _f(None, "Stretch a rotary model's positions (Llama, Qwen, Mistral, ...) to train on longer data.max_length than it was pretrained for: {type: linear | dynamic | yarn | llama3 | longrope, factor: F, ...}, F x the model's max_position_embeddings (a model's own scheme, Llama 3.1's llama3 say, given a new factor: F x its original_max_position_embeddings); yarn may add original_max_position_embeddings, attention_factor, beta_fast, beta_slow, mscale, mscale_all_dim, truncate; llama3 needs low_freq_factor, high_freq_factor; longrope needs short_factor, long_factor (factor optional); any may set rope_theta. Applied to the base in train, eval, predict, plan and merge (written into the merged config.json), from the config each is given: eval, predict and merge warn where it differs from the adapter's run (recorded in its scaletune.json).")


@dataclass(kw_only=True)
class DataConfig:
    train: str | list = _f(help="Training data: a file (jsonl/json/csv/tsv/parquet/conll), a pattern (shards/*.jsonl: "
                           "the files it matches, sorted) or 'hub:<id>[:split]', or a "
                           "list of them, concatenated; an item may be {path: ..., weight: W}: W times its examples "
                           "(2: each twice; 0.5: a seeded half), after any eval_fraction split.")
    eval: str | None = _f(None, "Evaluation data: one file or 'hub:<id>[:split]', as in `train`.")
    eval_fraction: float | None = _f(None, "Hold out this fraction of `train` for evaluation instead.")
    max_samples: int | None = _f(None, "Quick trials: keep only the first N records of each data.train item (a "
                                 "pattern's files together, in sorted order) and of data.eval (scaletune eval's "
                                 "too; a file given as eval --data is scored whole), in file order, before weights and the eval_fraction split, as "
                                 "LLaMA-Factory's max_samples; the cut is logged. null: every record.")
    format: str = _f(
        "auto",
        f"causal_lm: {' | '.join(CAUSAL_FORMATS)}; "
        "seq_cls, seq_regression: text (+text_pair) + label; token_cls: tokens + tags or conll. auto = detect from "
        "columns.",
    )
    max_length: int = _f(1024, "Truncate tokenised examples to this many tokens (causal_lm: or drop or split them, token_cls: or split them, data.too_long; lowered, with a warning, to the tokenizer's model_max_length and to a learned position table's size, max_position_embeddings: 512 for BERT-family models; above a rotary model's max_position_embeddings, times model.rope_scaling's factor, it is kept, with a warning); how many examples it cut is logged per split and kept in run.json (truncated_examples).")
    too_long: Literal["truncate", "drop", "split"] = _f(
        "truncate", "What becomes of an example longer than max_length. causal_lm: truncate: its first max_length "
        "tokens are trained (an answer loses its end, end-of-sequence token included); drop: it is left out, as "
        "axolotl's default; split (data.format text only, continued pretraining on long "
        "documents): cut into pieces of max_length tokens, each piece's first token the previous piece's last, so "
        "every token after the first is a target exactly once. token_cls: truncate (the words past max_length are "
        "not trained, and eval and predict tag them \"O\") or split: a sentence is cut at word boundaries into "
        "windows of at most max_length sub-tokens, each an example; eval scores each sentence whole, its windows' "
        "tags stitched, and predict tags a long line so. Counted per split, logged and kept in run.json "
        "(too_long_examples).")
    chat_template: str | None = _f(None, "causal_lm conversations (alpaca, sharegpt, messages; dpo, kto and reward: "
                                   "chat pairs): null = the tokenizer's "
                                   "chat template, else scaletune's Alpaca-style rendering; 'default' = scaletune's "
                                   "even where the tokenizer has one; 'chatml'; or a Jinja template file. Saved with "
                                   "the adapter's tokenizer, so predict renders prompts the same way.")
    max_prompt_length: int | None = _f(None, "dpo, kto, reward: cut a longer prompt to its last N tokens (the BOS token "
                                       "kept), as TRL's max_prompt_length; a prompt filling data.max_length "
                                       "otherwise costs its example (only answers are cut). null: prompts whole.")
    train_on_prompt: bool = _f(False, "causal_lm: also compute the loss on prompt/user tokens.")
    train_on_last_turn: bool = _f(False, "causal_lm conversations: train only each record's last assistant turn "
                                  "(the last one without `weight: 0`); earlier answers are context, as a "
                                  "`weight: 0` turn is (LLaMA-Factory's "
                                  "mask_history). Applies to the eval loss too.")
    packing: bool = _f(False, "causal_lm: pack several examples per row (attention isolated per example).")
    columns: dict | None = _f(None, "causal_lm: the data's own names for a format's fields, {field: column}, e.g. "
                              "{instruction: question, output: answer}: each record's column is read as that field "
                              "(the format detected from the fields), in data.train, data.eval and predict's input.")
    text_column: str | None = _f(None, "seq_cls, seq_regression: column with the text (default: text/sentence).")
    text_pair_column: str | None = _f(None, "seq_cls, seq_regression: optional second text column.")
    label_column: str | list | None = _f(None, "seq_cls: label column (default: label); a list of labels in "
                                               "every record makes the run multi-label. A list of columns, each "
                                               "holding 0/1 (or true/false) for its class, is multi-label too, "
                                               "those columns the classes in that order (Jigsaw's [toxic, "
                                               "severe_toxic, ...]). seq_regression: the score column (default: "
                                               "label/score), a number each (\"3.8\" in a CSV).")
    label_separator: str | None = _f(None, "seq_cls multi-label from text cells (CSV/TSV, where a cell holds no "
                                     "list): the label column's text is split at this separator, e.g. ';' for "
                                     "'sports;politics' (spaces around a label are dropped; an empty cell: no "
                                     "class); a JSON list is read as it is.")
    tokens_column: str | None = _f(None, "token_cls: column with the word list (default: tokens).")
    tags_column: str | None = _f(None, "token_cls: column with the tag list (default: tags/ner_tags).")
    conll_columns: list | None = _f(None, "token_cls CoNLL column files: [word column, tag column], counted from 1, "
                                    "negative from the end (-1: the last); default [1, -1], word first and tag "
                                    "last (CoNLL-2003). GermEval 2014: [2, 3] (its .tsv files with data.format: "
                                    "conll, or a .tsv is read as a table). A CoNLL-U file (.conllu) has no NER "
                                    "column and needs this key: [2, N], FORM and the column holding the tags.")
    labels: list | None = _f(None, "seq_cls/token_cls: the label set, in order; default: sorted from train. With integer "
                               "labels (ids) in the data, their names in id order, e.g. [negative, positive].")
    group_by_length: bool = _f(True, "Sort each window of 50 global batches by length to cut padding (a training "
                               "set of at most 50 global batches then gets the same batches every epoch, in a "
                               "new order; false: random batches).")
    num_workers: int = _f(0, "DataLoader worker processes.")
    num_proc: int | None = _f(None, "Processes that tokenise the data (once: the result is cached), each a "
                              "chunk of 2000 records at a time; default: the CPUs this process may use, at most "
                              "8. A file of at most 2000 records is tokenised in this process.")
    cache: bool = _f(True, "Cache tokenised data (datasets arrow cache) across runs and ranks.")


@dataclass(kw_only=True)
class TrainConfig:
    global_batch_size: int = _f(64, "Examples per optimizer step over all ranks and micro-steps.")
    micro_batch_size: int = _f(4, "Examples per forward pass per rank.")
    eval_batch_size: int | None = _f(None, "Examples per eval forward pass per rank (training's evals and "
                                     "`scaletune eval`): no gradients or activations are kept there, so it can "
                                     "be several times micro_batch_size (plan does not estimate eval's memory); "
                                     "also the batch of generation (eval --generate, train.eval_generate) and of "
                                     "`scaletune predict` (lines per forward or prompts per generate, default "
                                     "32 / 16), to lower where they run out of memory. "
                                     "kto's eval metrics depend on it (the reference point is estimated per "
                                     "batch; 1 is refused). null: micro_batch_size.")
    epochs: float | None = _f(3, "Passes over the training data (ignored when max_steps is set). The examples "
                              "that do not fill a last global batch sit that epoch out (a random set each epoch; "
                              "how many is logged).")
    max_steps: int | None = _f(None, "Total optimizer steps; overrides epochs.")
    learning_rate: float = _f(2.0e-4, "Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup",
                          "warmup_stable_decay", "inverse_sqrt", "reduce_lr_on_plateau"] = _f(
        "cosine", "Learning-rate schedule after warmup (constant: none, the peak from step 1; cosine_with_min_lr: "
        "cosine down to min_lr_ratio x learning_rate instead of 0; warmup_stable_decay: warmup from min_lr_ratio x "
        "learning_rate, the peak held, then a cosine decay over the last decay_ratio of the steps down to "
        "min_lr_ratio x learning_rate; inverse_sqrt: learning_rate x sqrt(W / step) after W warmup steps, "
        "transformers' curve, which does not depend on the run's length (without warmup W is 10000: about flat "
        "for a short run); reduce_lr_on_plateau: after warmup learning_rate, multiplied by plateau_factor each "
        "time the eval's best_metric (the loss if unset) has not improved for more than plateau_patience evals "
        "in a row, as torch's ReduceLROnPlateau under HF Trainer; needs eval data and evals during the run)."
    )
    plateau_factor: float = _f(0.1, "reduce_lr_on_plateau: what a plateau multiplies the learning rate by.")
    plateau_patience: int = _f(10, "reduce_lr_on_plateau: evals in a row without a better metric (by more than "
                               "1e-4 of the best, torch's test) that it waits out; the next one lowers the rate.")
    min_lr_ratio: float = _f(0.1, "cosine_with_min_lr, warmup_stable_decay: the learning rate they end at, as a "
                             "fraction of learning_rate.")
    decay_ratio: float = _f(0.1, "warmup_stable_decay: the fraction of the total steps its final decay takes.")
    warmup_ratio: float = _f(0.03, "Fraction of total steps spent warming up (its default gives way to "
                             "warmup_steps; set one or the other).")
    warmup_steps: int | None = _f(None, "Warmup steps, instead of warmup_ratio.")
    weight_decay: float = _f(0.0, "Decoupled weight decay, as AdamW's (Adafactor and Lion apply it the same way), not on "
                          "biases and norm weights.")
    loraplus_lr_ratio: float | None = _f(None, "LoRA+ (Hayou et al. 2024; peft.method lora): LoRA's B matrices learn "
                                         "at this multiple of learning_rate, A at learning_rate (the paper "
                                         "suggests 16).")
    adam_beta1: float = _f(0.9, "AdamW (and Lion) beta1.")
    adam_beta2: float = _f(0.999, "AdamW (and Lion) beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float | None = _f(1.0, "Clip the global gradient norm; null disables clipping.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "lion",
                       "lion_8bit", "paged_lion_8bit"] = _f(
        "adamw", "Optimizer. adamw: torch's. adamw_8bit, paged_adamw_8bit, paged_adamw_32bit (QLoRA's): "
        "bitsandbytes' AdamW with 8-bit or 32-bit moments, paged ones in memory that pages to the host "
        "under pressure. adafactor: transformers' Adafactor driven by learning_rate and lr_scheduler (no "
        "relative step or parameter scaling, no beta1 as HF Trainer's; adam_* unused), factored second "
        "moments for matrices. lion, lion_8bit, paged_lion_8bit: bitsandbytes' Lion, one momentum; it takes "
        "adam_beta1/adam_beta2 as given (the Lion paper suggests 0.9/0.99 and a 3-10x smaller learning_rate "
        "than AdamW's). Under ZeRO (distributed.zero_stage > 0): adamw or adafactor (whose flat ZeRO partitions "
        "it cannot factor: a full second moment, half of AdamW's state).")
    mixed_precision: Literal["no", "fp16", "bf16"] = _f("bf16", "Autocast precision for this run.")
    seed: int = _f(42, "Seed for data order, initialisation and dropout.")
    eval_every: int | None = _f(200, "Evaluate every N optimizer steps (and at the end); null: end only.")
    evals_per_epoch: int | None = _f(None, "Evaluate N times per epoch instead, at steps spread evenly over each "
                                     "epoch with the last at its end (the run's start logs which; at most once a "
                                     "step); leave eval_every unset.")
    eval_generate: bool | int = _f(False, "causal_lm: each eval also generates answers (greedy, as `scaletune eval "
                                   "--generate`) to the eval examples, true: all of them, N: the first N, and scores "
                                   "them against their references: exact_match, token_f1 and rouge_l join the eval's metrics "
                                   "(best_metric may pick by them) and OUTPUT_DIR/generations/step-S.jsonl keeps "
                                   "each answer. An answer takes a forward pass per token: keep N small.")
    eval_max_new_tokens: int = _f(128, "eval_generate: the most new tokens an answer gets.")
    neftune_noise_alpha: float | None = _f(None, "NEFTune: while training (never in eval or generation) add uniform "
                                           "noise in [-a, a] to the input embeddings, a = alpha / sqrt(row width x "
                                           "hidden size), as HF Trainer and TRL do; the paper's values are 5-15. "
                                           "The noise follows the step's seed: a resume replays it.")
    best_metric: str | None = _f(None, "Eval metric that picks the best adapter: each eval that beats the run's "
                                 "best so far writes OUTPUT_DIR/best_adapter/ (adapter/ stays the last step's). "
                                 "causal_lm: loss | perplexity (| exact_match | token_f1 | rouge_l with eval_generate); dpo: "
                                 "loss | reward_accuracy | reward_margin | chosen_reward | rejected_reward; kto: loss | reward_margin | "
                                 "desirable_reward | undesirable_reward; reward: loss | accuracy | reward_margin | chosen_reward | "
                                 "rejected_reward; seq_cls: loss | accuracy | macro_f1 | micro_f1; "
                                 "token_cls: loss | f1 | precision | recall | token_accuracy; seq_regression: "
                                 "loss | mse | rmse | mae | pearson | spearman (loss, perplexity, mse, rmse, mae: "
                                 "lower is better). Needs eval data.")
    early_stopping_patience: int | None = _f(None, "Stop after this many evals in a row that do not beat the best "
                                             "best_metric (by more than early_stopping_threshold); the run then "
                                             "ends, complete, at that step. Needs best_metric and eval_every (or "
                                             "evals_per_epoch).")
    early_stopping_threshold: float = _f(0.0, "How much an eval must beat the best best_metric by to reset "
                                         "early_stopping_patience (in the metric's units); best_adapter/ follows "
                                         "any better eval.")
    class_weights: str | dict | None = _f(None, "seq_cls/token_cls: weight the training loss by class for "
                                          "imbalanced data. balanced: n_examples / (n_classes x count) from the "
                                          "training data's labels (token_cls: the labelled words' tags; "
                                          "multi-label: each class's positive weight, negatives / positives), "
                                          "computed once, logged and kept in run.json and the checkpoints (a "
                                          "resume uses them); or {label: weight}, labels left out weighing 1. "
                                          "The loss is sum(w x loss) / sum(w) over the whole optimizer step "
                                          "(multi-label: BCEWithLogitsLoss's pos_weight, mean over examples x "
                                          "classes). Eval reports the unweighted loss, comparable across runs "
                                          "and to `scaletune eval`'s.")
    dpo_beta: float = _f(0.1, "dpo, kto: beta, how far the trained model may move from the base (the reference, "
                         "the adapter switched off): dpo's loss is -log sigmoid(beta x (chosen's log-ratio - "
                         "rejected's)), kto's reward beta x the answer's log-ratio; smaller lets it move further "
                         "(0.1 is the papers' and TRL's default).")
    dpo_loss: Literal["sigmoid", "hinge", "ipo", "simpo", "orpo"] = _f(
        "sigmoid", "dpo: each pair's loss, m being beta x (chosen's log-ratio - rejected's), a log-ratio an answer's "
        "log-probability with the adapter minus without: sigmoid (DPO) -log sigmoid(m); hinge (SLiC) max(0, 1 - m); "
        "ipo (Azar et al. 2023, on the answers' mean token log-probabilities) (m / beta - 1 / (2 beta))^2; simpo "
        "(Meng et al. 2024: no reference, no second forward) -log sigmoid(beta x (chosen's mean token "
        "log-probability - rejected's) - simpo_gamma), with a beta of about 2 (the paper's 2-2.5); orpo (Hong et "
        "al. 2024, no reference either) the chosen answer's negative mean token log-probability - beta x log "
        "sigmoid(log odds ratio of the mean token probabilities), beta the paper's lambda (0.1).")
    simpo_gamma: float = _f(0.5, "dpo_loss simpo: the reward margin gamma the chosen answer must win by.")
    dpo_sft_weight: float = _f(0.0, "dpo: add this times the chosen answer's negative mean token log-probability to "
                               "each pair's loss (RPO; LLaMA-Factory's pref_ftx, TRL's rpo_alpha), which keeps the "
                               "chosen answers likely while the pair's margin grows; 0: off.")
    kto_desirable_weight: float = _f(1.0, "kto: lambda_D, the weight of a desirable example's loss (TRL's "
                                     "desirable_weight); with unbalanced data the paper keeps lambda_D x desirable "
                                     "count / (lambda_U x undesirable count) in [1, 4/3].")
    kto_undesirable_weight: float = _f(1.0, "kto: lambda_U, the weight of an undesirable example's loss (TRL's "
                                       "undesirable_weight).")
    reward_center_weight: float = _f(0.0, "reward: add this times (r_chosen + r_rejected)^2 to each pair's loss "
                                     "(TRL's center_rewards_coefficient; 0.01 is the value it suggests), which "
                                     "keeps the rewards centred on 0; 0: off.")
    label_smoothing: float = _f(0.0, "seq_cls (single-label) / token_cls: label smoothing e of the training "
                                "cross-entropy, as torch's CrossEntropyLoss(label_smoothing=e) and HF's "
                                "label_smoothing_factor: the target is 1 - e on the gold class plus e spread over "
                                "all classes. Eval reports the plain cross-entropy.")
    save_every: int | None = _f(200, "Write a resumable checkpoint every N optimizer steps (and at the end; null: "
                                     "at the end only).")
    saves_per_epoch: int | None = _f(None, "Checkpoint N times per epoch instead, at steps spread evenly over "
                                     "each epoch with the last at its end (at most once a step); leave save_every "
                                     "unset.")
    log_every: int = _f(10, "Log metrics every N optimizer steps (the loss: their mean).")
    save_total_limit: int | None = _f(3, "Keep only the newest N checkpoints; null keeps all.")
    on_nonfinite: Literal["stop", "skip"] = _f("stop", "Non-finite loss/grad norm: stop, or skip the update.")
    max_nonfinite_skips: int = _f(10, "With on_nonfinite=skip: stop after this many skipped updates.")
    report_to: list = _f(["tensorboard"], "Trackers: tensorboard, wandb, mlflow (offline-safe) or [].")
    torch_compile: bool = _f(False, "torch.compile each repeated transformer block (regional compilation; "
                             "the first steps are slow while it compiles). Not with ZeRO-3.")
    chunked_loss: bool = _f(True, "causal_lm: LM head + cross-entropy a chunk of target tokens at a time, "
                            "never holding vocabulary-sized logits for the whole micro-batch (same loss and "
                            "gradients; kept off automatically for a trained/adapted head, ZeRO-3 and "
                            "prompt-learning methods).")
    fused_lora: bool = _f(True, "peft.method lora on an unquantized base: add the adapter's update into the "
                          "base layer's output inside one addmm instead of three full-width passes (float32: "
                          "the same numbers; 16-bit: one rounding instead of three; adapters/lora_addmm.py). "
                          "Not under ZeRO-3, which gathers each submodule's weights only for its own forward; "
                          "false: peft's forward.")
    release_cpu_memory: bool = _f(False, "CPU runs on Linux/glibc: serve tensors of 2 MiB and more with their own "
                                  "memory mapping, so what a step frees goes back to the OS instead of staying "
                                  "in the heap. Lowers peak RSS (-16% on the 30M benchmark) at the cost of "
                                  "page faults (steps 0-17% slower there). Ignored on GPU runs.")


@dataclass(kw_only=True)
class DistributedConfig:
    zero_stage: Literal[0, 1, 2, 3] = _f(0, "DeepSpeed ZeRO stage; 0 = plain DDP (or single process).")
    offload: Literal["none", "optimizer", "params", "all"] = _f("none", "ZeRO offload of states to CPU.")
    backend: Literal["nccl", "gloo"] | None = _f(None, "Process-group backend; default nccl on GPU, gloo on CPU.")
    timeout_s: int = _f(1800, "Seconds a rank waits in a collective for the others before the run fails (the "
                        "process group's timeout; NCCL's own default is 600), and the longest another node's "
                        "launcher waits for node 0 to start (and node 0's for the other nodes to join). Not the "
                        "wait for the main process to tokenise the data: that one waits as long as it takes.")


@dataclass(kw_only=True)
class RunConfig:
    task: Literal["causal_lm", "dpo", "kto", "reward", "seq_cls", "seq_regression", "token_cls"] = _f(
        help="What to train (dpo: preference pairs, Direct Preference Optimization; kto: answers labelled "
             "desirable or not, Kahneman-Tversky Optimization; reward: a reward model, a scalar head trained on dpo's "
             "preference pairs).")
    model: ModelConfig = _f(help="Base model.")
    data: DataConfig = _f(help="Training/evaluation data.")
    peft: dict = _f({"method": "lora"}, "PEFT adapter: `method` plus that method's peft config keys.")
    train: TrainConfig = _f(help="Optimisation.")
    distributed: DistributedConfig = _f(help="Scale-out (read by `scaletune launch` and at startup).")
    output_dir: str = _f("runs/run", "Where adapter, checkpoints and logs go.")
    # the YAML file load_config read (not a key): --overwrite must not delete it with the old run
    source_file: ClassVar[Path | None] = None

    # --- derived helpers (not config keys) ---
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def peft_method(self) -> str:
        """peft.method in lower case, as peft's PeftType and scaletune's method registry read it."""
        return str(self.peft.get("method", "lora")).lower()

    @property
    def peft_kwargs(self) -> dict:
        return {k: v for k, v in self.peft.items() if k != "method"}


# ----------------------------------------------------------------------------------------------
# Loading


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _section_keys() -> dict[str, str]:
    """Every key inside a section, by its own name: {'learning_rate': 'train.learning_rate', ...}."""
    out = {}
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            out.update({g.name: f"{f.name}.{g.name}" for g in dataclasses.fields(tp)})
    return out


def unknown_key_hint(key: str, section: str, known: list[str]) -> str:
    """The ' (...)' suggestion for unknown `key` in `section` ('' = top level; 'peft' for peft's options), whose
    valid keys are `known`: another tool's name for it, then the same key in another section, then difflib."""
    target = KEY_ALIASES.get(key)
    if target and re.fullmatch(r"\w+\.\w+", target):
        where, _, name = target.partition(".")
        if where != section:
            return f" (did you mean {target!r}?)"
        if name in known:  # (peft: only where this method has that option)
            return f" (did you mean {name!r}?)"
    elif target:
        return f" ({target})"
    elsewhere = _section_keys().get(key) or (f"peft.{key}" if key in _PEFT_OPTIONS else None)
    if elsewhere and not elsewhere.startswith(f"{section}."):
        return f" (did you mean {elsewhere!r}?)"
    if section and key in {f.name for f in dataclasses.fields(RunConfig)}:  # train.output_dir (TrainingArguments')
        return f" ({key} is a top-level key, not inside {section})"
    return _did_you_mean(key, known)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _build(cls: type, raw: Any, prefix: str, problems: list[str], bad: set[str]) -> Any:
    """Build dataclass `cls` from a mapping, recording every problem with its dotted key. A key with a bad value
    gets its default instead (None if required) and is added to `bad`, so the cross-field rules can still run."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix or 'config'}: expected a mapping (section), got {type(raw).__name__}")
        bad.add(prefix or "config")
        raw = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    # axolotl's examples list a dozen options left empty (wandb_watch:, fsdp:, debug:): one line for them all,
    # so the keys that set something still fit on the screen
    empty = [str(k) for k, v in raw.items() if k not in fields and v is None]
    if len(empty) > 1:
        problems.append(f"{prefix + ': ' if prefix else ''}unknown keys left empty (null), which set nothing: "
                        f"{', '.join(empty)}; delete them")
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields and (len(empty) < 2 or value is not None):
            problems.append(f"{dotted}: unknown key{unknown_key_hint(str(key), prefix, list(fields))}")
            continue
        if key not in fields:
            continue
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = _build(tp, value, dotted, problems, bad)
            continue
        before = len(problems)
        if _holds_nul(value):  # no path or name has one; the OS refuses it as "embedded null byte"
            problems.append(f"{dotted}: contains a NUL byte (\\0)")
        else:
            kwargs[key] = _coerce(value, tp, dotted, problems)
        if len(problems) > before:
            bad.add(dotted)
            kwargs[key] = _default(fields[key])
    for name, f in fields.items():
        if name in kwargs:
            continue
        tp = hints[name]
        if _is_dataclass_type(tp):
            kwargs[name] = _build(tp, {}, f"{prefix}.{name}" if prefix else name, problems, bad)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            dotted = f"{prefix}.{name}" if prefix else name
            problems.append(f"{dotted}: required key is missing ({f.metadata.get('help', '')})")
            bad.add(dotted)
            kwargs[name] = None
    # Build without running __init__ type checks: bad values were recorded as problems.
    obj = cls.__new__(cls)
    for name, f in fields.items():
        if name in kwargs:
            setattr(obj, name, kwargs[name])
        elif f.default_factory is not dataclasses.MISSING:
            setattr(obj, name, f.default_factory())
        else:
            setattr(obj, name, f.default)
    return obj


def _names(problem: str, key: str, *, inside: bool = True, leaf: bool = False) -> bool:
    """Whether `problem` names dotted `key` (with `inside`, a key under it too: 'train' in 'train.seed'; with
    `leaf`, also its last part on its own: 'micro_batch_size x world size', 'task causal_lm')."""
    names = [(key, r"(?!\w)" if inside else r"(?![\w.])")]
    if leaf:
        names.append((key.rpartition(".")[2], r"(?![\w.])"))
    # (not after "+": a problem about the unknown key '+peft' is not about 'peft')
    return any(re.search(rf"(?<![\w.+]){re.escape(k)}{end}", problem) for k, end in names)


def _from_override(problem: str, overrides: dict[str, str]) -> str:
    """`problem` + the command-line override(s) that gave the key(s) it is about."""
    texts = []
    # a suggested key is not what the problem is about: `learning_rate` (did you mean 'train.learning_rate'?)
    about = re.sub(r" \(did you mean '[^']*'\?\)", "", problem)
    for key, text in overrides.items():
        parents = [key.rsplit(".", n)[0] for n in range(1, key.count(".") + 1)]  # 'output_dir' for output_dir.x=1
        # a parent counts only as the key a problem is about ("output_dir: expected str"): section names are also
        # words ("no eval data to evaluate", "would train on"), which named data.max_samples=40 in unrelated problems
        if _names(about, key) or any(re.search(rf"(?<![\w.+]){re.escape(p)}:", about) for p in parents):
            texts.append(text if len(text) <= 60 else text[:57] + "...")
    return f"{problem} (from override {'; '.join(texts)})" if texts else problem


def from_dict(raw: dict, *, source: str = "run config", world_size: int | None = None,
              overrides: dict[str, str] | None = None, found: list[str] | None = None,
              check_peft: bool = False) -> RunConfig:
    """Build and fully validate a RunConfig; raises one ConfigError listing every problem.

    `overrides` maps the dotted keys set on the command line to the override text, which problems about
    them quote (they are not problems of the file). `found`: problems already found reading the file
    (duplicate keys), reported first. `check_peft`: the checks of the commands about to train (train,
    plan, launch, slurm): the peft section against the method's peft config (option names, types, values;
    this imports peft and torch, seconds), settings training would never read, and that the train.report_to
    trackers are installed."""
    problems: list[str] = []
    bad: set[str] = set()
    cfg = _build(RunConfig, raw, "", problems, bad)
    _expand_home(cfg)
    # Cross-field rules run even when some values were bad (those have their defaults here), so one run
    # reports everything; a rule that names a bad key would be about a value the user did not give.
    from .rules import cross_field_problems  # (rules.py reads this module's types)

    cross = cross_field_problems(cfg, world_size=world_size)
    problems.extend(p for p in cross if not any(_names(p, key, leaf=True) for key in bad))
    if check_peft and "peft" not in bad:
        from .peft_options import peft_problems

        problems.extend(peft_problems(cfg))
    if check_peft and "model.init_adapter" not in bad:
        from .init_adapter import problems as init_adapter_problems

        problems.extend(init_adapter_problems(cfg))
    if check_peft:
        from .rules import ignored_key_problems, tracker_problems

        problems.extend(p for p in ignored_key_problems(cfg) + tracker_problems(cfg)
                        if not any(_names(p, key, leaf=True) for key in bad))
        if cfg.data.chat_template is not None and "data.chat_template" not in bad:
            from .data.templates import chat_template_text  # (a name or a readable Jinja file: plan said FITS)

            try:
                chat_template_text(cfg.data.chat_template)
            except ConfigError as exc:
                problems.extend(exc.problems)
    problems = list(found or []) + [_from_override(p, overrides or {}) for p in problems]
    if problems:
        raise ConfigError(problems, title=f"{source} has {problems_count(len(problems))}")
    return cfg


def _expand_home(cfg: RunConfig) -> None:
    """A leading ~ in a path key is the user's home directory, as a shell reads it: YAML keeps it as written,
    and a shell expands it in `output_dir=~/x` but not in `data.train=~/x` (not a variable name), so
    `output_dir: ~/runs/x` made a directory named '~' in the working directory."""
    from .fileutil import map_paths

    cfg.output_dir = map_paths(cfg.output_dir, os.path.expanduser)
    cfg.model.name_or_path = map_paths(cfg.model.name_or_path, os.path.expanduser)
    cfg.model.init_adapter = map_paths(cfg.model.init_adapter, os.path.expanduser)
    for key in ("train", "eval", "chat_template"):
        setattr(cfg.data, key, map_paths(getattr(cfg.data, key), os.path.expanduser))


def load_config(
    path: str | Path, overrides: list[str] | None = None, *, world_size: int | None = None, check_peft: bool = False
) -> RunConfig:
    """Read a YAML run config, apply `key=value` overrides, validate everything (the peft section's options too
    with `check_peft`: see from_dict)."""
    raw, duplicates = read_yaml(path)
    try:
        cfg = configure(raw, overrides, source=str(path), found=duplicates, world_size=world_size,
                        check_peft=check_peft)
    except ConfigError as exc:
        from .aliases import KEY_ALIASES

        # (another tool's whole config gives a screenful of hints: one command writes what they mean)
        if exc.hint is None and sum(str(k) in KEY_ALIASES for k in raw) >= 3:
            exc.hint = (f"these are another tool's keys: `scaletune convert {shlex.quote(str(path))} --out run.yaml` "
                        "writes the scaletune config they mean, with notes on what does not carry over")
        raise
    cfg.source_file = Path(path)
    return cfg


def configure(raw: dict, overrides: list[str] | None = None, *, source: str = "run config",
              found: list[str] | None = None, world_size: int | None = None, check_peft: bool = False) -> RunConfig:
    """`raw` (a YAML file's mapping, or a Python caller's dict: changed in place) with the `key=value` overrides
    applied, validated as load_config validates a file; problems about an overridden key quote the override."""
    overrides = overrides or []
    raw = apply_overrides(raw, overrides)
    given = {".".join(parse_override(text)[0]): text for text in overrides}  # the last one for a key wins
    if overrides:
        source += f" (with {len(overrides)} command-line override{'s' if len(overrides) > 1 else ''})"
    return from_dict(raw, source=source, world_size=world_size, overrides=given, found=found, check_peft=check_peft)


# (re-exported: the file and override readers live in config_file.py)
from .config_file import apply_overrides, parse_override, read_yaml  # noqa: E402,F401
