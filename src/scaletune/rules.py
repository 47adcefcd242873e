"""Cross-field rules of the run config: every rule about a combination of keys lives here, and
`from_dict`, `train`, `launch`, `slurm` and `plan` all ask this one function (the last three with the
world size and hardware they will run on)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from .class_weights import config_problems as class_weight_problems
from .config import (
    _PEFT_SIZE_KEYS,
    CAUSAL_FORMATS,
    CHAT_TASKS,
    EVAL_METRICS,
    MAX_PEFT_SIZE,
    RunConfig,
)
from .config_values import BOOL_HINT, _did_you_mean, _short
from .generation_metrics import GENERATED_SCORES
from .new_tokens import config_problems as new_token_problems
from .optimizers import BNB_CLASSES, ZERO_OPTIMIZERS
from .rope import config_problems as rope_problems
from .rules_data import columns_problems, conll_columns_problems, label_columns_problems, train_sources

# peft methods that add virtual tokens or key/values in front of every example
VIRTUAL_TOKEN_METHODS = ("prefix_tuning", "prompt_tuning", "p_tuning")


def cross_field_problems(cfg: RunConfig, *, world_size: int | None = None, has_cuda: bool | None = None) -> list[str]:
    p: list[str] = []
    t, d, m, dist = cfg.train, cfg.data, cfg.model, cfg.distributed

    for key in ("global_batch_size", "micro_batch_size", "log_every"):
        if getattr(t, key) is not None and getattr(t, key) < 1:
            p.append(f"train.{key}: must be >= 1, got {getattr(t, key)}")
    for key in ("eval_batch_size", "eval_every", "save_every", "max_steps", "save_total_limit", "evals_per_epoch",
                "saves_per_epoch"):
        if getattr(t, key) is not None and getattr(t, key) < 1:
            p.append(f"train.{key}: must be >= 1 (or null), got {getattr(t, key)}")
    if t.warmup_steps is not None and t.warmup_steps < 0:
        p.append(f"train.warmup_steps: must be >= 0 (or null), got {t.warmup_steps}")
    if t.max_steps is not None and t.max_steps > 100_000_000:
        p.append(f"train.max_steps: {t.max_steps} would not finish (at most 100000000)")
    if t.epochs is not None and t.epochs > 100_000:
        p.append(f"train.epochs: {t.epochs} would not finish (at most 100000)")
    if t.weight_decay > 10:
        p.append(f"train.weight_decay: {t.weight_decay} would wipe the adapter out (typical 0..0.1)")
    if t.max_steps is None and (t.epochs is None or t.epochs <= 0):
        p.append("train.epochs: must be > 0 when train.max_steps is not set")
    if not (t.learning_rate > 0):
        p.append(f"train.learning_rate: must be > 0, got {t.learning_rate}")
    if t.learning_rate > 1.0:
        p.append(f"train.learning_rate: {t.learning_rate} is far too large for fine-tuning (typical 1e-5..1e-3)")
    if t.lr_scheduler == "constant" and t.warmup_steps:
        p.append(f"train.warmup_steps: {t.warmup_steps} with lr_scheduler: constant, which has no warmup; use "
                 "lr_scheduler: constant_with_warmup")
    if t.max_steps is not None and t.warmup_steps is not None and t.warmup_steps >= t.max_steps > 1:
        p.append(f"train.warmup_steps: {t.warmup_steps} is not shorter than train.max_steps ({t.max_steps}); the "
                 "learning rate would never reach train.learning_rate")
    p += _best_and_early_stopping(cfg)
    if t.loraplus_lr_ratio is not None:
        if not (1 <= t.loraplus_lr_ratio <= 1000):
            p.append(f"train.loraplus_lr_ratio: must be between 1 and 1000 (the paper suggests 16), got "
                     f"{t.loraplus_lr_ratio}")
        if cfg.peft_method != "lora":
            p.append(f"train.loraplus_lr_ratio: LoRA+ sets the learning rate of LoRA's B matrices; peft.method is "
                     f"{cfg.peft_method}")
    if t.neftune_noise_alpha is not None and not (0 < t.neftune_noise_alpha <= 1000):
        p.append(f"train.neftune_noise_alpha: must be > 0 (typical 5-15), got {t.neftune_noise_alpha}")
    if not (0 <= t.min_lr_ratio < 1):
        p.append(f"train.min_lr_ratio: must be in [0, 1), got {t.min_lr_ratio}")
    if not (0 < t.decay_ratio <= 1):
        p.append(f"train.decay_ratio: must be in (0, 1], got {t.decay_ratio}")
    if not (0 <= t.warmup_ratio < 1):
        p.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if t.weight_decay < 0:
        p.append(f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        p.append(f"train.max_grad_norm: must be > 0 or null, got {t.max_grad_norm}")
    if t.max_nonfinite_skips < 1:
        p.append(f"train.max_nonfinite_skips: must be >= 1, got {t.max_nonfinite_skips}")
    if not (0 <= t.seed < 2**32):
        p.append(f"train.seed: must be in [0, 2**32 - 1], got {t.seed}")
    for key in ("adam_beta1", "adam_beta2"):
        if not (0 <= getattr(t, key) < 1):
            p.append(f"train.{key}: must be in [0, 1), got {getattr(t, key)}")
    if t.adam_epsilon <= 0:  # (0 divides by zero where a second moment is 0: a frozen-in-practice weight)
        p.append(f"train.adam_epsilon: must be > 0, got {t.adam_epsilon}")
    for tracker in t.report_to or []:
        if tracker not in ("tensorboard", "wandb", "mlflow"):
            p.append(f"train.report_to: unknown tracker {tracker!r} (tensorboard | wandb | mlflow)")

    if t.global_batch_size >= 1 and t.micro_batch_size >= 1:
        if t.global_batch_size % t.micro_batch_size:
            p.append(
                f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
                f"train.micro_batch_size ({t.micro_batch_size})"
            )
        elif world_size and t.global_batch_size % (t.micro_batch_size * world_size):
            p.append(
                f"train.global_batch_size ({t.global_batch_size}) must be divisible by micro_batch_size x "
                f"world size ({t.micro_batch_size} x {world_size} = {t.micro_batch_size * world_size}); "
                f"pick a global batch that is a multiple of {t.micro_batch_size * world_size}"
            )

    if d.max_length < 8:
        p.append(f"data.max_length: must be >= 8, got {d.max_length}")
    if d.max_length > 1_048_576:
        p.append(f"data.max_length: {d.max_length} is larger than any model context (max 1048576)")
    if d.max_prompt_length is not None and not 1 <= d.max_prompt_length < d.max_length:
        p.append(f"data.max_prompt_length: must be >= 1 and below data.max_length ({d.max_length}), leaving the "
                 f"answers room; got {d.max_prompt_length}")
    if d.eval is not None and d.eval_fraction is not None:
        p.append("data.eval and data.eval_fraction: give one or the other, not both")
    if d.eval_fraction is not None and not (0 < d.eval_fraction < 1):
        # (axolotl's val_set_size: 0 holds nothing out; LLaMA-Factory's val_size counts examples when a whole number)
        why = ("; 0 holds nothing out: leave the key out for no eval data" if d.eval_fraction == 0 else
               "; a fraction of data.train, not a count of examples" if float(d.eval_fraction).is_integer() else "")
        p.append(f"data.eval_fraction: must be in (0, 1), got {d.eval_fraction}{why}")
    if d.max_samples is not None and d.max_samples < 1:
        p.append(f"data.max_samples: must be >= 1 (or null: every record), got {d.max_samples}")
    if d.num_workers < 0:
        p.append(f"data.num_workers: must be >= 0, got {d.num_workers}")
    if cfg.distributed.timeout_s < 1:
        p.append(f"distributed.timeout_s: must be >= 1, got {cfg.distributed.timeout_s}")
    if d.num_proc is not None and not 1 <= d.num_proc <= 64:  # (64: a typo must not fork-bomb the node)
        p.append(f"data.num_proc: must be between 1 and 64, got {d.num_proc}")
    for key, value in (("model.name_or_path", m.name_or_path), ("model.init_adapter", m.init_adapter),
                       ("data.train", d.train), ("data.eval", d.eval),
                       ("output_dir", cfg.output_dir), ("data.text_column", d.text_column),
                       ("data.text_pair_column", d.text_pair_column), ("data.label_column", d.label_column),
                       ("data.tokens_column", d.tokens_column), ("data.tags_column", d.tags_column)):
        if isinstance(value, str) and not value.strip():
            p.append(f"{key}: must not be empty")
    train_problems = train_sources(d.train)
    p += train_problems
    if not train_problems and isinstance(d.train, (str, list)):
        from .data.sources import eval_file_problems

        p += eval_file_problems(d.train, d.eval)
    if d.tokens_column and d.tokens_column == d.tags_column:
        p.append(f"data.tokens_column and data.tags_column: both name column {d.tokens_column!r}")
    p += columns_problems(d.columns)
    p += conll_columns_problems(d.conll_columns)
    p += label_columns_problems(d)
    if d.text_column and d.text_column in (d.label_column, d.text_pair_column):
        p.append(f"data.text_column: column {d.text_column!r} is also the label or text-pair column")
    if d.num_workers > 64:  # each worker is a process: a typo here would fork-bomb the node
        p.append(f"data.num_workers: {d.num_workers} worker processes is too many (at most 64)")
    fmt_ok = {
        "causal_lm": ("auto", *CAUSAL_FORMATS),
        "seq_cls": ("auto", "text"),
        "seq_regression": ("auto", "text"),
        "token_cls": ("auto", "tokens", "conll"),
    }.get(cfg.task, ("auto",))
    if d.format not in fmt_ok:
        p.append(f"data.format: {d.format!r} is not valid for task {cfg.task} ({' | '.join(fmt_ok)})"
                 f"{_did_you_mean(d.format, list(fmt_ok))}")
    if d.chat_template is not None and cfg.task not in CHAT_TASKS:
        p.append(f"data.chat_template: only used by {', '.join(CHAT_TASKS)}, not {cfg.task}")
    if d.packing and cfg.task != "causal_lm":
        p.append(f"data.packing: only supported for task causal_lm, not {cfg.task}")
    if d.too_long == "drop" and cfg.task != "causal_lm":
        p.append(f"data.too_long: drop is for task causal_lm; {cfg.task} truncates"
                 + (" or splits (data.too_long: split)" if cfg.task == "token_cls" else " (leave it out)"))
    elif d.too_long == "split" and cfg.task not in ("causal_lm", "token_cls"):
        p.append(f"data.too_long: split is for tasks causal_lm (plain text) and token_cls; {cfg.task} truncates "
                 "(leave it out)")
    elif d.too_long == "split" and cfg.task == "causal_lm" and d.format not in ("auto", "text"):
        p.append(f"data.too_long: split cuts plain text (data.format text) into pieces; pieces of {d.format} "
                 "records would lose their prompts (use drop or truncate)")
    if d.labels is not None and cfg.task == "causal_lm":
        p.append("data.labels: only used by seq_cls/token_cls")
    elif d.labels is not None and cfg.task == "seq_regression":
        p.append("data.labels: seq_regression predicts a real-valued score, it has no label set; leave data.labels "
                 "out (for classes, use task: seq_cls)")
    elif d.labels is not None:
        bad = [x for x in d.labels if isinstance(x, bool) or not isinstance(x, (str, int))]
        if bad:
            # (a boolean here is YAML's reading of no/yes; the data's JSON true/false are named 'true'/'false')
            hint = f" ({BOOL_HINT}; JSON true/false labels are 'true' and 'false')" if isinstance(bad[0], bool) else ""
            p.append(f"data.labels: every label must be a string or an integer, got {_short(bad[0])}{hint}")
        elif len(set(map(str, d.labels))) != len(d.labels):
            p.append("data.labels: contains duplicates")
        if cfg.task in ("seq_cls", "token_cls") and len(d.labels) < (2 if cfg.task == "seq_cls" else 1):
            p.append(f"data.labels: {cfg.task} needs at least {2 if cfg.task == 'seq_cls' else 1} label(s), "
                     f"got {len(d.labels)}")
    p += class_weight_problems(cfg)
    p += _dpo_problems(cfg)
    p += rope_problems(cfg)
    p += new_token_problems(cfg)
    if not 0 <= t.label_smoothing < 1:
        p.append(f"train.label_smoothing: {t.label_smoothing:g} is outside [0, 1) (0: off; 0.1 is usual)")
    elif t.label_smoothing and cfg.task not in ("seq_cls", "token_cls"):
        p.append(f"train.label_smoothing: smooths seq_cls/token_cls class targets; task {cfg.task} has none")

    method = cfg.peft_method
    if not isinstance(cfg.peft.get("method", "lora"), str):
        p.append(f"peft.method: expected a method name, got {cfg.peft.get('method')!r}")
    for key, value in _numbers(cfg.peft, "peft"):
        if not math.isfinite(value):  # (YAML's .nan/.inf: a NaN scale or dropout trains to a NaN loss later)
            p.append(f"{key}: must be a finite number, got {value}")
    for key in _PEFT_SIZE_KEYS:  # sizes that allocate memory: refuse absurd ones before allocating
        value = cfg.peft.get(key)
        if isinstance(value, float):
            p.append(f"peft.{key}: expected an integer, got {value}")
        elif isinstance(value, int) and not isinstance(value, bool) and value > MAX_PEFT_SIZE:
            p.append(f"peft.{key}: {value} is larger than any layer (max {MAX_PEFT_SIZE})")
        elif key in ("num_virtual_tokens", "init_r", "target_r") and isinstance(value, int) and value < 1:
            p.append(f"peft.{key}: must be >= 1, got {value}")  # (OFT's r may be 0: block size instead)
    if method == "adalora" and isinstance(cfg.peft.get("deltaT"), int) and cfg.peft["deltaT"] < 1:
        p.append(f"peft.deltaT: AdaLoRA re-allocates ranks every deltaT steps: must be >= 1, got {cfg.peft['deltaT']}")
    targets = cfg.peft.get("target_modules")
    if isinstance(targets, str) and targets.lower() == "all":  # (LLaMA-Factory's lora_target: all)
        p.append(f"peft.target_modules: {targets!r} would match only a module named so; for every linear layer "
                 "write all-linear")
    elif isinstance(targets, str) and re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)+", targets.strip()):
        # LLaMA-Factory's lora_target: q_proj,v_proj; as peft's regular expression it matches no module, and
        # peft says so only after the base has loaded
        names = ", ".join(n.strip() for n in targets.split(","))
        p.append(f"peft.target_modules: {targets!r} is one regular expression to peft, matching no module; for "
                 f"these modules write a list: [{names}]")
    elif isinstance(targets, str) and targets != "all-linear":  # peft reads a string as a regular expression
        try:
            re.compile(targets)
        except (re.error, OverflowError, RecursionError) as exc:  # (q{4294967296}; deep nesting)
            p.append(f"peft.target_modules: {targets!r} is not a valid regular expression ({exc}); a string is "
                     "matched as one against module names; give a list of names for plain names")
    init_r, target_r = cfg.peft.get("init_r"), cfg.peft.get("target_r")
    if method == "adalora" and isinstance(init_r, int) and isinstance(target_r, int) \
            and target_r > init_r:
        # AdaLoRA only prunes ranks: a target above the initial rank fails at its first re-allocation
        p.append(f"peft.target_r: {target_r} is above peft.init_r ({init_r}); AdaLoRA prunes from init_r "
                 "down to target_r")
    if m.quantization and m.dtype == "float32":
        p.append("model.quantization: the quantized base computes in bf16/fp16; set model.dtype to bfloat16 "
                 "(or float16)")
    if m.quantization == "8bit" and dist.zero_stage == 3:
        p.append("model.quantization=8bit with distributed.zero_stage=3: ZeRO-3 cannot shard int8 weights; "
                 "use quantization: 4bit (QLoRA) or zero_stage 2")
    if m.quantization and dist.offload in ("params", "all"):
        p.append(f"model.quantization with distributed.offload={dist.offload}: quantized weights cannot be "
                 "offloaded; use offload: optimizer")
    if dist.offload != "none" and dist.zero_stage == 0:
        p.append("distributed.offload needs distributed.zero_stage >= 1 (offload is a DeepSpeed feature)")
    if dist.offload in ("params", "all") and dist.zero_stage != 3:
        p.append(f"distributed.offload={dist.offload} needs distributed.zero_stage=3 (only ZeRO-3 partitions "
                 "parameters)")
    if t.optimizer not in ZERO_OPTIMIZERS and dist.zero_stage > 0:
        # ZeRO partitions the optimizer's state into flat fp32 buffers and a checkpoint gathers it back by
        # name: bitsandbytes' quantized or paged states follow neither
        p.append(f"train.optimizer={t.optimizer} with distributed.zero_stage={dist.zero_stage}: ZeRO shards "
                 "the optimizer state itself, which bitsandbytes' optimizers keep their own way; use optimizer: "
                 "adamw or adafactor, or zero_stage 0")
    if t.mixed_precision == "fp16" and m.dtype == "bfloat16" and m.quantization is None:
        p.append("train.mixed_precision=fp16 with model.dtype=bfloat16: pick bf16 (or dtype float16/float32)")
    if t.mixed_precision == "no" and m.dtype != "float32" and m.quantization is None:
        p.append(f"train.mixed_precision=no with model.dtype={m.dtype}: the float32 adapter would meet "
                 f"{m.dtype} activations without autocast; use mixed_precision: bf16, or dtype: float32")
    if has_cuda is False and t.mixed_precision == "fp16":
        p.append("train.mixed_precision=fp16 needs a CUDA GPU; on CPU use bf16 or no")
    if has_cuda is False and dist.backend == "nccl":  # (accelerate would quietly start gloo instead)
        p.append("distributed.backend=nccl needs CUDA GPUs; on CPU use gloo (or leave it null)")
    if has_cuda is False and m.attn_implementation == "flash_attention_2":
        p.append("model.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa")
    if method in VIRTUAL_TOKEN_METHODS and d.packing:
        p.append(f"data.packing with peft.method={method}: virtual tokens cannot be isolated per packed "
                 "example; set packing: false")
    if method == "p_tuning" and dist.zero_stage == 3:  # (prefix and prompt tuning: the method matrix's refusal)
        p.append("peft.method=p_tuning with distributed.zero_stage=3: peft saves the adapter by running its prompt "
                 "encoder on the main rank alone, whose weights ZeRO-3 gathers from every rank (the save would "
                 "hang); use ZeRO-2")
    if method in ("prefix_tuning",) and m.gradient_checkpointing:
        p.append("model.gradient_checkpointing with peft.method=prefix_tuning is not supported by peft "
                 "(past key values); set gradient_checkpointing: false")
    if t.torch_compile and dist.zero_stage == 3:
        p.append("train.torch_compile with distributed.zero_stage=3: ZeRO-3's parameter gathering hooks are "
                 "not traced by torch.compile here; use zero_stage 2 or torch_compile: false")
    from .methods import problems as method_problems

    p.extend(method_problems(cfg))
    return p


_DPO_KEYS = ("dpo_loss", "simpo_gamma", "dpo_sft_weight")
_KTO_KEYS = ("kto_desirable_weight", "kto_undesirable_weight")
_REWARD_KEYS = ("reward_center_weight",)


def _dpo_problems(cfg: RunConfig) -> list[str]:
    """train.dpo_beta, the keys only dpo or kto reads, and what they cannot train: their reference is the base with
    the adapter switched off; kto's KL estimate needs two examples in a micro-batch."""
    beta = cfg.train.dpo_beta
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        return [f"train.dpo_beta: must be a number > 0 (0.1 is usual), got {beta!r}"]
    p = [f"train.{key}: only read by task {task}, not {cfg.task}" for task, keys in
         (("dpo", _DPO_KEYS), ("kto", _KTO_KEYS), ("reward", _REWARD_KEYS)) if cfg.task != task for key in keys if _changed(cfg.train, key)]
    if cfg.task == "reward":
        return p + _reward_problems(cfg)
    if cfg.task not in ("dpo", "kto"):
        return p + (["train.dpo_beta: only read by tasks dpo and kto, not " + cfg.task]
                    if _changed(cfg.train, "dpo_beta") else [])
    p += [f"train.{key}: must be a number >= 0, got {getattr(cfg.train, key)}" for key in ("simpo_gamma",
          "dpo_sft_weight", *_KTO_KEYS) if not getattr(cfg.train, key) >= 0]
    if cfg.task == "kto" and cfg.train.micro_batch_size == 1:  # (z: the mean log-ratio of mismatched pairs)
        p.append("train.micro_batch_size: kto estimates its reference point from the micro-batch's other examples' "
                 "answers, and a micro-batch of 1 has none; use 2 or more (4 or more is better)")
    if cfg.task == "kto" and cfg.train.eval_batch_size == 1:  # (an eval batch of 1: z = 0, its kl 0, every loss off)
        p.append("train.eval_batch_size: kto's evals estimate the reference point from the eval batch's other "
                 "examples' answers, and a batch of 1 has none; use 2 or more (or null: micro_batch_size)")
    if cfg.task == "dpo" and _changed(cfg.train, "simpo_gamma") and cfg.train.dpo_loss != "simpo":
        p.append(f"train.simpo_gamma: only read by dpo_loss simpo, not {cfg.train.dpo_loss}")
    if p:
        return p
    if cfg.peft_method == "p_tuning":  # (prefix and prompt tuning: the method matrix's refusal)
        return [f"peft.method={cfg.peft_method} with task {cfg.task}: the reference (the adapter switched off) would see "
                "no virtual tokens and the answers' log-probabilities would be taken at shifted positions; use a "
                "LoRA-family method (lora, dora, ia3, ...)"]
    return []


def _reward_problems(cfg: RunConfig) -> list[str]:
    """What task reward refuses: a negative or non-finite train.reward_center_weight, dpo's beta (a reward model has
    no reference to stay near), and p_tuning (peft hands the model embeddings, not ids, so transformers cannot find
    a padded row's last token and would read its reward at a pad; prefix and prompt tuning: the method matrix)."""
    c, p = cfg.train.reward_center_weight, []
    if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
        p.append(f"train.reward_center_weight: must be a number >= 0 (0.01 is TRL's suggestion), got {c!r}")
    if _changed(cfg.train, "dpo_beta"):
        p.append("train.dpo_beta: only read by tasks dpo and kto; a reward model has no reference to stay near")
    if cfg.peft_method == "p_tuning":
        p.append("peft.method=p_tuning with task reward: peft passes the model embeddings, not token ids, so a padded "
                 "row's reward would be read at a pad; use a LoRA-family method (lora, dora, ia3, ...)")
    return p


def tracker_problems(cfg: RunConfig) -> list[str]:
    """train.report_to trackers whose package is not installed here. accelerate only warns about one
    (or, for wandb, says nothing) and the run logs to no tracker at all: refuse it before training."""
    # each is the name of its package (and of scaletune's extra); tensorboard is a dependency of scaletune
    missing = [t for t in cfg.train.report_to or [] if t in ("wandb", "mlflow") and _missing(t)]
    return [f"train.report_to: {t} is not installed in this environment (pip install 'scaletune[{t}]', "
            f"or drop it from report_to)" for t in missing]


def package_problems(cfg: RunConfig) -> list[str]:
    """DeepSpeed and bitsandbytes, where the run needs them and this environment lacks them: a launch
    failed inside accelerate with one ImportError traceback per rank (launch.preflight asks)."""
    p = []
    if cfg.distributed.zero_stage > 0 and _missing("deepspeed"):
        p.append(f"distributed.zero_stage={cfg.distributed.zero_stage} needs DeepSpeed, which is not installed in "
                 "this environment (pip install 'scaletune[deepspeed]', or zero_stage 0)")
    for key, value in (("model.quantization", cfg.model.quantization), ("train.optimizer", cfg.train.optimizer)):
        if (value in ("4bit", "8bit") or value in BNB_CLASSES) and _missing("bitsandbytes"):
            p.append(f"{key}={value} needs bitsandbytes, which is not installed in this environment (pip install "
                     "'scaletune[quant]')")
    return p


def _missing(package: str) -> bool:
    """Whether `package` is not installed here (looked up, not imported)."""
    import importlib.util

    return importlib.util.find_spec(package) is None


def _plain_format(name: str) -> bool:
    """Whether data.format `name` is a causal_lm format of plain text (no chat template renders it)."""
    from .data.formats import FORMATS  # (no torch: config validation reads the data package)

    return name in FORMATS and not FORMATS[name].chat


def _default(section: Any, key: str) -> Any:
    return type(section).__dataclass_fields__[key].default


def _changed(section: Any, key: str) -> bool:
    """Whether `key` of a config section differs from its default. A config written out whole (run.json's
    `config`, to rerun a run) holds every default, so "set" cannot mean "present"."""
    return getattr(section, key) != _default(section, key)


def ignored_key_problems(cfg: RunConfig) -> list[str]:
    """Keys set away from their defaults that training would accept and then never read: each is a setting
    the user believes is in effect. Asked by the commands about to train only: eval, predict and merge read
    a trained run's config, where a training-only setting is no error."""
    t, d, m, p = cfg.train, cfg.data, cfg.model, []
    if _changed(t, "min_lr_ratio") and t.lr_scheduler not in ("cosine_with_min_lr", "warmup_stable_decay"):
        p.append(f"train.min_lr_ratio: only lr_scheduler: cosine_with_min_lr or warmup_stable_decay ends at a floor; "
                 f"{t.lr_scheduler} ignores it (set one of them, or min_lr_ratio back to "
                 f"{_default(t, 'min_lr_ratio')})")
    if _changed(t, "decay_ratio") and t.lr_scheduler != "warmup_stable_decay":
        p.append(f"train.decay_ratio: only lr_scheduler: warmup_stable_decay has a final decay; {t.lr_scheduler} "
                 f"ignores it (set lr_scheduler: warmup_stable_decay, or decay_ratio back to "
                 f"{_default(t, 'decay_ratio')})")
    for key in ("plateau_factor", "plateau_patience"):
        if _changed(t, key) and t.lr_scheduler != "reduce_lr_on_plateau":
            p.append(f"train.{key}: only lr_scheduler: reduce_lr_on_plateau reads it; {t.lr_scheduler} ignores it "
                     f"(set lr_scheduler: reduce_lr_on_plateau, or {key} back to {_default(t, key)})")
    if _changed(t, "warmup_ratio") and t.warmup_ratio and t.lr_scheduler == "constant":
        p.append(f"train.warmup_ratio: {t.warmup_ratio} with lr_scheduler: constant, which has no warmup; use "
                 "lr_scheduler: constant_with_warmup")
    elif _changed(t, "warmup_ratio") and t.warmup_ratio and t.warmup_steps is not None:
        p.append("train.warmup_ratio and train.warmup_steps: give one or the other (warmup_steps would win)")
    if _changed(t, "max_nonfinite_skips") and t.on_nonfinite != "skip":
        p.append(f"train.max_nonfinite_skips: counts skipped updates, and on_nonfinite: stop skips none (it stops "
                 f"at the first); set on_nonfinite: skip, or max_nonfinite_skips back to {_default(t, 'max_nonfinite_skips')}")
    if t.early_stopping_threshold and t.early_stopping_patience is None:
        p.append("train.early_stopping_threshold: only early stopping reads it; set train.early_stopping_patience "
                 "too, or the threshold back to 0")
    if _changed(t, "eval_every") and t.eval_every is not None and not (d.eval or d.eval_fraction):
        p.append("train.eval_every: there is no eval data to evaluate; set data.eval or data.eval_fraction (or "
                 "eval_every: null)")
    if _changed(t, "eval_max_new_tokens") and not t.eval_generate:
        p.append("train.eval_max_new_tokens: only train.eval_generate's answers read it; set eval_generate (true, or "
                 f"N examples), or eval_max_new_tokens back to {_default(t, 'eval_max_new_tokens')} (`scaletune eval "
                 "--generate` takes --max-new-tokens)")
    if t.evals_per_epoch is not None and not (d.eval or d.eval_fraction):
        p.append("train.evals_per_epoch: there is no eval data to evaluate; set data.eval or data.eval_fraction")
    for per_epoch, every in (("evals_per_epoch", "eval_every"), ("saves_per_epoch", "save_every")):
        if getattr(t, per_epoch) is not None and getattr(t, every) is not None and _changed(t, every):
            p.append(f"train.{per_epoch} and train.{every}: give one or the other ({per_epoch} sets {every})")
    text_tasks = ("seq_cls", "seq_regression")
    for key, tasks in (("text_column", text_tasks), ("text_pair_column", text_tasks), ("label_column", text_tasks),
                       ("label_separator", ("seq_cls",)), ("tokens_column", ("token_cls",)),
                       ("tags_column", ("token_cls",)), ("conll_columns", ("token_cls",)), ("columns", ("causal_lm",)),
                       ("max_prompt_length", ("dpo", "kto", "reward"))):
        if getattr(d, key) is not None and cfg.task not in tasks:
            p.append(f"data.{key}: only read by task {'/'.join(tasks)}, not {cfg.task}")
    if isinstance(d.label_column, list) and cfg.task == "seq_regression":
        p.append("data.label_column: seq_regression reads one score column; a list of columns is seq_cls' "
                 "multi-label classes")
    if d.train_on_prompt and cfg.task != "causal_lm":
        p.append(f"data.train_on_prompt: only used by causal_lm, not {cfg.task}")
    elif d.train_on_prompt and d.format == "text":
        p.append("data.train_on_prompt: data.format text has no prompt (all of it is trained already)")
    if d.train_on_last_turn and cfg.task != "causal_lm":
        p.append(f"data.train_on_last_turn: only used by causal_lm, not {cfg.task}")
    elif d.train_on_last_turn and _plain_format(d.format):
        p.append(f"data.train_on_last_turn: data.format {d.format} records are not conversations; they have no "
                 "turns")
    if d.chat_template is not None and _plain_format(d.format):
        p.append(f"data.chat_template: data.format {d.format} records are not conversations; no template renders "
                 "them (use format alpaca/sharegpt/messages, or drop chat_template)")
    if m.attn_implementation == "varlen" and cfg.task != "causal_lm":
        p.append(f"model.attn_implementation=varlen: its kernel is causal, for causal_lm; {cfg.task} would run "
                 "SDPA on every call; use sdpa")
    elif m.attn_implementation == "varlen" and cfg.peft_method in VIRTUAL_TOKEN_METHODS:
        p.append(f"model.attn_implementation=varlen with peft.method={cfg.peft_method}: the virtual tokens leave "
                 "no call the kernel can take (each would run SDPA); use sdpa")
    if m.revision is not None and Path(m.name_or_path).expanduser().exists():
        # (load_tokenizer refuses it too, but only once training loads the model: `plan` said FITS first)
        p.append(f"model.revision: {m.revision!r} names a version of a hub model, but model.name_or_path "
                 f"{m.name_or_path} is a local directory (one version); drop model.revision")
    if cfg.peft.get("inference_mode") is True:
        p.append("peft.inference_mode: true freezes the adapter, leaving nothing to train (scaletune sets it "
                 "when it loads an adapter for eval and predict)")
    return p


def _best_and_early_stopping(cfg: RunConfig) -> list[str]:
    t, d, p = cfg.train, cfg.data, []
    names = EVAL_METRICS.get(cfg.task, {})
    if t.best_metric is not None and names and t.best_metric not in names:
        p.append(f"train.best_metric: {t.best_metric!r} is not a {cfg.task} eval metric ({' | '.join(names)})"
                 + _did_you_mean(t.best_metric, list(names)))
    if t.best_metric is not None and not (d.eval or d.eval_fraction):
        p.append("train.best_metric: there is no eval data to pick the best adapter by; set data.eval or "
                 "data.eval_fraction")
    elif t.best_metric in GENERATED_METRICS and cfg.task == "causal_lm" and not t.eval_generate:
        p.append(f"train.best_metric: {t.best_metric} scores generated answers; set train.eval_generate (true, or "
                 "N: the first N eval examples) to generate them at each eval")
    p += _eval_generate(cfg)
    if t.early_stopping_patience is not None:
        if t.early_stopping_patience < 1:
            p.append(f"train.early_stopping_patience: must be >= 1 (or null), got {t.early_stopping_patience}")
        if t.best_metric is None:
            p.append("train.early_stopping_patience: needs train.best_metric, the eval metric it watches")
        if not (t.eval_every or t.evals_per_epoch):
            p.append("train.early_stopping_patience: needs train.eval_every or evals_per_epoch (with evals only at "
                     "the end there is nothing to stop early)")
    if t.lr_scheduler == "reduce_lr_on_plateau":
        if not (d.eval or d.eval_fraction):
            p.append("train.lr_scheduler: reduce_lr_on_plateau lowers the rate when the eval stops improving; set "
                     "data.eval or data.eval_fraction")
        elif not (t.eval_every or t.evals_per_epoch):
            p.append("train.lr_scheduler: reduce_lr_on_plateau needs evals during the run (train.eval_every or "
                     "evals_per_epoch); with one at the end only it would never lower the rate")
        if not (0 < t.plateau_factor < 1):
            p.append(f"train.plateau_factor: must be in (0, 1), got {t.plateau_factor}")
        if t.plateau_patience < 0:
            p.append(f"train.plateau_patience: must be >= 0, got {t.plateau_patience}")
    if not (t.early_stopping_threshold >= 0):
        p.append(f"train.early_stopping_threshold: must be >= 0, got {t.early_stopping_threshold}")
    return p


GENERATED_METRICS = tuple(GENERATED_SCORES)  # (the scores of generated answers: a best_metric needs eval_generate)


def _eval_generate(cfg: RunConfig) -> list[str]:
    """train.eval_generate's problems: generation needs a causal_lm with prompts and reference answers to eval,
    and every rank holding whole weights (a ZeRO-3 rank holds a slice: each token would gather the model)."""
    t, p = cfg.train, []
    if t.eval_max_new_tokens < 1:
        p.append(f"train.eval_max_new_tokens: must be >= 1, got {t.eval_max_new_tokens}")
    if t.eval_generate is False:
        return p
    if t.eval_generate is not True and t.eval_generate < 1:
        p.append(f"train.eval_generate: true (every eval example), N >= 1 (the first N) or false; got "
                 f"{t.eval_generate}")
    if cfg.task in ("dpo", "kto", "reward"):
        p.append(f"train.eval_generate: {cfg.task}'s eval scores given answers (their rewards); generating "
                 "answers to score them is causal_lm's")
    elif cfg.task != "causal_lm":
        p.append(f"train.eval_generate: {cfg.task} labels its inputs (its eval metrics score them); only causal_lm "
                 "generates answers")
    elif cfg.data.format == "text":
        p.append("train.eval_generate: data.format text is plain text, without prompts and reference answers to "
                 "score generated answers by")
    if not (cfg.data.eval or cfg.data.eval_fraction):
        p.append("train.eval_generate: there is no eval data to generate answers to; set data.eval or "
                 "data.eval_fraction")
    if cfg.distributed.zero_stage == 3:
        p.append("train.eval_generate: not under ZeRO-3, where every generated token would gather the whole "
                 "model across the ranks; score the saved adapters with `scaletune eval --generate` instead")
    return p


def _numbers(node: Any, where: str) -> list[tuple[str, float]]:
    """Every float in a free-form section (peft's nested dicts and lists too), with its dotted key."""
    if isinstance(node, float):
        return [(where, node)]
    if isinstance(node, dict):
        return [x for k, v in node.items() for x in _numbers(v, f"{where}.{k}")]
    if isinstance(node, list):
        return [x for i, v in enumerate(node) for x in _numbers(v, f"{where}[{i}]")]
    return []
