"""`scaletune convert`: another tool's run config (LLaMA-Factory, axolotl, transformers' TrainingArguments, TRL)
rewritten as a scaletune run config, with a note for every key that does not carry over as it is.

The key names come from aliases.py (the table behind the config errors' hints); what needs more than a new name
(LLaMA-Factory's stage and dataset registry, batch sizes, a DeepSpeed JSON, LoRA's alpha default) is translated
here. The result is checked as `scaletune train` would check it, and what is still to fix is reported."""

from __future__ import annotations

import json
import re
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml

from .aliases import KEY_ALIASES, VALUE_ALIASES
from .errors import ConfigError

SECTIONS = ("task", "model", "data", "peft", "train", "distributed", "output_dir")
_DOTTED = re.compile(r"(model|data|peft|train|distributed)\.\w+|output_dir|task")
# (LLaMA-Factory's stage and axolotl's rl values: the task and, for dpo's variants, the loss)
_STAGES = {"sft": ("causal_lm", None), "pt": ("causal_lm", None), "dpo": ("dpo", "sigmoid"), "kto": ("kto", None),
           "rm": ("reward", None), "ipo": ("dpo", "ipo"), "orpo": ("dpo", "orpo"), "simpo": ("dpo", "simpo"),
           "reward": ("reward", None)}
# LLaMA-Factory's dataset_info.json column names of the alpaca format, and scaletune's
_ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                   "history": "history"}


class Conversion:
    """The scaletune config being built (`out`, nested) and the notes on what did not carry over as it was."""

    def __init__(self, raw: dict, source: Path) -> None:
        self.raw = raw
        self.source = source
        self.out: dict[str, Any] = {}
        self.notes: list[str] = []
        self.done: set[str] = set()  # foreign keys already read by a handler of another key

    def set(self, dotted: str, value: Any) -> None:
        """Set scaletune key `dotted`, a choice value translated to scaletune's name where it has another."""
        value = _choice_value(dotted, value)
        *parents, leaf = dotted.split(".")
        node = self.out
        for part in parents:
            if not isinstance(node.get(part), dict):  # (a section given as null or a scalar: it held nothing)
                if node.get(part) is not None:
                    self.note(part, f"{node[part]!r} is no section (a mapping); replaced by the keys set here")
                node[part] = {}
            node = node[part]
        node[leaf] = value

    def get(self, dotted: str) -> Any:
        node: Any = self.out
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def note(self, key: str, text: str) -> None:
        self.notes.append(f"{key}: {text}")


def _choice_value(dotted: str, value: Any) -> Any:
    """`value` as scaletune names it, where the key is a choice and another tool's name has an alias
    (adamw_torch -> adamw, cosine_with_restarts -> cosine, fa2 -> flash_attention_2)."""
    from .config_file import _key_type, _without_none

    tp = _without_none(_key_type(dotted.split(".")))
    if typing.get_origin(tp) is not Literal or not isinstance(value, str):
        return value
    choices = [str(c) for c in typing.get_args(tp)]
    plain = value.lower().replace("-", "_")
    alias = VALUE_ALIASES.get(plain, ())
    for candidate in (plain, *((alias,) if isinstance(alias, str) else alias)):
        if candidate in choices:
            return typing.get_args(tp)[choices.index(candidate)]
    return value


def _as_list(value: Any) -> list:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _stage(c: Conversion, key: str, value: Any) -> None:
    task = _STAGES.get(str(value).lower())
    if task is None:
        c.note(key, f"{value!r} has no scaletune task (causal_lm, dpo, kto, reward, seq_cls, seq_regression, "
                    "token_cls); task left out")
        return
    c.set("task", task[0])
    if task[1] and task[1] != "sigmoid":
        c.set("train.dpo_loss", task[1])
    if str(value).lower() == "pt":  # (LLaMA-Factory joins the texts and cuts blocks; scaletune cuts each text)
        c.set("data.format", "text")
        c.set("data.too_long", "split")


def _method(c: Conversion, key: str, value: Any) -> None:
    name = str(value).lower()
    if name in ("lora", "qlora"):
        c.set("peft.method", "lora")
        if name == "qlora" and not c.get("model.quantization"):
            c.set("model.quantization", "4bit")
    elif name in ("freeze", "full"):
        c.note(key, f"{value!r}: scaletune trains adapters only; set to peft.method lora")
        c.set("peft.method", "lora")
    else:
        c.set("peft.method", name)  # (ia3, prefix_tuning, ...: the config check names the known ones)


def _flag(value: Any) -> bool | None:
    """A yes/no setting as written: true/false, quoted or not; axolotl's `bf16: auto` (bf16 where the GPU has it)."""
    text = str(value).lower() if isinstance(value, (str, bool)) else ""
    return True if text in ("true", "auto") else False if text == "false" else None


def _precision(c: Conversion, key: str, value: Any) -> None:
    if str(value).lower() == "auto":
        c.note(key, "auto (bf16 where the GPU has it): set to bf16; on a GPU without it, train.mixed_precision fp16")
    if _flag(value) is True:
        precision = key[:4] if key.startswith("bf16") else "fp16"
    elif _flag(value) is False and not any(_flag(c.raw.get(k)) for k in ("bf16", "fp16")):
        precision = "no"  # (both off: the other tool trained in float32)
    else:
        return
    c.set("train.mixed_precision", precision)
    if "torch_dtype" not in c.raw:  # (as LLaMA-Factory, the base's dtype follows: autocast to another is refused)
        c.set("model.dtype", {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}[precision])


def _batch(c: Conversion, key: str, value: Any) -> None:
    micro = c.raw.get("per_device_train_batch_size", c.raw.get("micro_batch_size", 1 if _tool(c.raw) == "axolotl"
                                                                          else 8))  # (their defaults)
    accum = c.raw.get("gradient_accumulation_steps") or 1
    c.done.update({"per_device_train_batch_size", "micro_batch_size", "gradient_accumulation_steps"})
    if not isinstance(micro, int) or not isinstance(accum, int):
        c.note(key, "could not read the batch size; set train.micro_batch_size and train.global_batch_size")
        return
    c.set("train.micro_batch_size", micro)
    c.set("train.global_batch_size", micro * accum)
    c.notes.append(f"train.global_batch_size {micro * accum} = {micro} per device x {accum} accumulation steps for "
                   f"ONE process: with N processes the other tool's batch was N times that; scaletune keeps "
                   f"global_batch_size whatever the process count, so multiply it by yours")


def _lora_rank(c: Conversion, key: str, value: Any) -> None:
    c.set("peft.r", value)
    if key == "lora_rank" and "lora_alpha" not in c.raw and isinstance(value, int):
        # LLaMA-Factory's lora_alpha defaults to 2 x rank, peft's to 8: the scale the run trained at
        c.set("peft.lora_alpha", 2 * value)
        c.note(key, f"peft.lora_alpha set to {2 * value}, LLaMA-Factory's default (2 x lora_rank; peft's is 8)")


def _targets(c: Conversion, key: str, value: Any) -> None:
    if value is True and key == "lora_target_linear":
        c.set("peft.target_modules", "all-linear")
        return
    items = _as_list(value)
    c.set("peft.target_modules", "all-linear" if [str(v).lower() for v in items] == ["all"] else items)


def _quantization(c: Conversion, key: str, value: Any) -> None:
    if key.startswith("load_in_"):
        if value is True:
            c.set("model.quantization", key[len("load_in_"):])
    elif value in (4, 8, "4", "8"):
        c.set("model.quantization", f"{value}bit")
    elif value is not None:
        c.note(key, f"{value!r}: scaletune quantizes with bitsandbytes 4bit or 8bit only; left out")


def _deepspeed(c: Conversion, key: str, value: Any) -> None:
    path = _find(c, str(value))
    stage, offload = None, "none"
    if path is not None:
        try:
            zero = json.loads(path.read_text(encoding="utf-8")).get("zero_optimization", {})
        except (OSError, ValueError, AttributeError):
            zero = {}
        stage = zero.get("stage") if isinstance(zero, dict) else None
        devices = [isinstance(zero.get(k), dict) and zero[k].get("device") in ("cpu", "nvme")
                   for k in ("offload_optimizer", "offload_param")] if isinstance(zero, dict) else [False, False]
        offload = {(True, False): "optimizer", (False, True): "params", (True, True): "all"}.get(tuple(devices), "none")
    if stage is None:  # (not readable here: LLaMA-Factory's and axolotl's files are named ds_z3_config.json, zero3.json)
        found = re.search(r"(?:z|zero|stage)[_-]?([0-3])", Path(str(value)).name)
        stage = int(found.group(1)) if found else None
        offload = "all" if "offload" in str(value) and stage == 3 else "optimizer" if "offload" in str(value) else "none"
        c.note(key, f"{value} not readable here: " + (f"ZeRO stage {stage} taken from its name" if stage is not None
                                                      else "set distributed.zero_stage"))
    if stage in (0, 1, 2, 3):
        c.set("distributed.zero_stage", stage)
        if offload != "none":
            c.set("distributed.offload", offload)
    c.notes.append("distributed: scaletune writes the DeepSpeed config itself from zero_stage and offload; other "
                   f"settings of {value} are not carried over")


def _find(c: Conversion, name: str) -> Path | None:
    """`name` as a path: as given (absolute, or from the working directory), else beside the converted file."""
    for path in (Path(name), c.source.parent / name) if name.strip() else ():  # (Path(''): the working directory)
        if path.exists():
            return path
    return None


def _registry(c: Conversion) -> tuple[dict, Path] | None:
    """LLaMA-Factory's dataset_info.json (under dataset_dir, default 'data') and its folder, if found."""
    folder = _find(c, str(c.raw.get("dataset_dir", "data")))
    c.done.add("dataset_dir")
    if folder is None or not (folder / "dataset_info.json").is_file():
        return None
    try:
        info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (info, folder) if isinstance(info, dict) else None


def _dataset(c: Conversion, key: str, value: Any) -> None:
    """LLaMA-Factory's `dataset: a,b` (names in dataset_info.json), axolotl's `datasets: [{path, type}]`, or
    plain files."""
    target = "data.eval" if key in ("eval_dataset", "test_datasets") else "data.train"
    items = value if isinstance(value, list) else _as_list(value)
    registry = _registry(c) if any(isinstance(i, str) for i in items) else None
    paths: list[str] = []
    for item in items:
        if isinstance(item, dict):  # axolotl
            paths.append(_axolotl_dataset(c, key, item))
        elif registry and str(item) in registry[0]:
            paths.append(_registered(c, key, str(item), registry[0][str(item)], registry[1]))
        else:
            found = _find(c, str(item))
            paths.append(str(found) if found else str(item))
            if found is None:
                c.note(key, f"{item!r} is no file here" + (" and not in dataset_info.json" if registry else
                                                             " (a LLaMA-Factory dataset name? its dataset_info.json "
                                                             "was not found)")
                       + f": replace it in {target} with the data file's path (or hub:<id>)")
    paths = [p for p in paths if p]
    if not paths:
        return
    if target == "data.eval" and len(paths) > 1:
        c.note(key, f"scaletune evaluates on one file; data.eval is the first of {len(paths)}")
    if target == "data.train" and c.get(target):  # (dataset and datasets both given: all of them)
        earlier = c.get(target)
        paths = [*(earlier if isinstance(earlier, list) else [earlier]), *paths]
    c.set(target, paths[0] if len(paths) == 1 or target == "data.eval" else paths)


def _pretraining(c: Conversion, key: str, value: Any) -> None:
    """axolotl's pretraining_dataset: plain text, trained on whole."""
    _dataset(c, key, value if isinstance(value, list) else [value])
    c.set("data.format", "text")
    c.set("data.too_long", "split")


def _registered(c: Conversion, key: str, name: str, entry: Any, folder: Path) -> str:
    """One dataset_info.json entry as a data.train item; its column mapping as data.columns where it is the
    alpaca format's (scaletune reads other formats by their own column names)."""
    if not isinstance(entry, dict):
        return name
    columns = entry.get("columns") or {}
    if entry.get("formatting", "alpaca") == "alpaca" and isinstance(columns, dict) and not entry.get("ranking"):
        mapping = {_ALPACA_COLUMNS[k]: v for k, v in columns.items() if k in _ALPACA_COLUMNS and _ALPACA_COLUMNS[k] != v}
        if mapping:
            if c.get("data.columns") not in (None, mapping):
                c.note(key, f"{name}: its columns {mapping} differ from another dataset's; scaletune's "
                            "data.columns holds one mapping for all files")
            else:
                c.set("data.columns", mapping)
    elif _renamed(columns, entry.get("tags")):
        c.note(key, f"{name}: its dataset_info.json columns/tags rename fields, which is not carried over; "
                    "scaletune reads sharegpt (conversations: from/value), messages (role/content) and the "
                    "preference formats (chosen/rejected, label) by these names")
    if entry.get("file_name"):
        return str(folder / entry["file_name"])
    if entry.get("hf_hub_url"):
        split = entry.get("split")
        return f"hub:{entry['hf_hub_url']}" + (f":{split}" if split else "")
    c.note(key, f"{name}: dataset_info.json gives no file_name or hf_hub_url; give data.train the file's path")
    return name


# LLaMA-Factory's default column and tag names, and the other names scaletune reads for the same field
_LF_COLUMNS = {"messages": ("conversations", "messages"), "system": ("system",), "tools": ("tools",),
               "chosen": ("chosen",), "rejected": ("rejected",), "kto_tag": ("label", "kto_tag")}
_LF_TAGS = ({"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
            {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"})


def _renamed(columns: Any, tags: Any) -> bool:
    """Whether a sharegpt/ranking dataset_info.json entry names its fields otherwise than scaletune reads them."""
    columns = columns if isinstance(columns, dict) else {}
    tags = {k: v for k, v in tags.items() if k in _LF_TAGS[0]} if isinstance(tags, dict) else {}
    return (any(v not in _LF_COLUMNS.get(k, (k,)) for k, v in columns.items())
            or bool(tags) and not any(all(d[k] == v for k, v in tags.items()) for d in _LF_TAGS))


def _axolotl_dataset(c: Conversion, key: str, item: dict) -> str:
    path = str(item.get("path") or "")
    kind = str(item.get("type") or "")
    if other := [str(k) for k, v in item.items() if k not in ("path", "type", "split") and v is not None]:
        c.note(key, f"{path or item}: {', '.join(other)} not carried over (scaletune reads a file's columns by their "
                    "own names; data.columns renames an alpaca/text file's)")
    formats = {"alpaca": "alpaca", "sharegpt": "sharegpt", "chat_template": "messages", "completion": "text",
               "pretrain": "text"}
    if kind in formats and not c.get("data.format"):
        c.set("data.format", formats[kind])
        if formats[kind] == "text":  # (axolotl cuts a completion/pretrain text into sequence_len pieces)
            c.set("data.too_long", "split")
    elif kind and kind not in formats:
        c.note(key, f"{path}: type {kind!r} is not carried over (scaletune detects alpaca, sharegpt, messages, "
                    "prompt_completion and text by their columns)")
    found = _find(c, path)
    if found or not path:
        c.notes.extend([] if path else [f"{key}: {item} gives no path; left out"])
        return str(found or "")
    split = item.get("split")
    return f"hub:{path}" + (f":{split}" if split else "") if path else ""


def _template(c: Conversion, key: str, value: Any) -> None:
    if str(value) == "tokenizer_default":  # (axolotl; LLaMA-Factory's default/empty are renderings of its own)
        return
    if str(value) == "chatml":
        c.set("data.chat_template", "chatml")
        return
    c.note(key, f"{value!r} is the other tool's own rendering; scaletune renders with the tokenizer's chat "
                "template (data.chat_template: null), else its Alpaca-style one: check that the tokenizer's is the "
                "one you trained with (or give data.chat_template a Jinja file)")


def _eval_strategy(c: Conversion, key: str, value: Any) -> None:
    what = "eval" if key.startswith("eval") else "save"
    # (TrainingArguments: eval_steps defaults to logging_steps, and both, as save_steps, to 500)
    steps = c.raw.get(f"{what}_steps") or (c.raw.get("logging_steps") if what == "eval" else None) or 500
    if str(value) == "no" and what == "eval":
        c.set("train.eval_every", None)
    elif str(value) == "epoch":
        c.set(f"train.{what}s_per_epoch", 1)
    elif str(value) == "steps" and isinstance(steps, int):
        c.set(f"train.{what}_every", steps)
    elif str(value) == "no" and what == "save":
        c.note(key, "'no': scaletune always writes a checkpoint at the end (train.save_every: null: only then)")
        c.set("train.save_every", None)


def _steps(c: Conversion, key: str, value: Any) -> None:
    """eval_steps / save_steps / logging_steps, unless their strategy (read by _eval_strategy) says otherwise."""
    what = key.split("_")[0]
    target = {"eval": "train.eval_every", "save": "train.save_every", "logging": "train.log_every"}[what]
    strategy = c.raw.get(f"{what}_strategy", c.raw.get("evaluation_strategy") if what == "eval" else None)
    if isinstance(value, float) and 0 < value < 1:  # (TrainingArguments: a fraction of the run's total steps)
        c.note(key, f"{value}: a fraction of the run's total steps there; scaletune takes a step count: set {target}"
                    + (f" (or {what}s_per_epoch)" if what != "logging" else "") + "; left at scaletune's default")
    elif strategy in (None, "steps") and isinstance(value, int) and value > 0:
        c.set(target, value)


def _report_to(c: Conversion, key: str, value: Any) -> None:
    known = ("tensorboard", "wandb", "mlflow")
    names = [str(v).lower() for v in _as_list(value)]
    c.set("train.report_to", [n for n in names if n in known])
    if other := [n for n in names if n not in known and n not in ("none", "all")]:
        c.note(key, f"{', '.join(other)}: not a scaletune tracker (tensorboard, wandb, mlflow); left out")


def _warmup(c: Conversion, key: str, value: Any) -> None:
    if key == "warmup_steps" and isinstance(value, int) and value > 0:
        c.set("train.warmup_steps", value)  # (TrainingArguments: warmup_steps wins over warmup_ratio)
        c.done.add("warmup_ratio")
    elif key == "warmup_ratio" and not (isinstance(c.raw.get("warmup_steps"), int) and c.raw["warmup_steps"] > 0):
        c.set("train.warmup_ratio", value)


def _max_steps(c: Conversion, key: str, value: Any) -> None:
    if isinstance(value, int) and value > 0:  # (TrainingArguments' -1: by epochs)
        c.set("train.max_steps", value)


def _attention(c: Conversion, key: str, value: Any) -> None:
    name = {"fa2": "flash_attention_2", "disabled": "eager", "true": "flash_attention_2"}.get(str(value).lower(),
                                                                                            str(value).lower())
    if name in ("eager", "sdpa", "flash_attention_2"):
        c.set("model.attn_implementation", name)


def _eval_size(c: Conversion, key: str, value: Any) -> None:
    if isinstance(value, float) and 0 < value < 1:
        c.set("data.eval_fraction", value)
    elif value:
        c.note(key, f"{value!r}: scaletune holds out a fraction (data.eval_fraction, between 0 and 1), not a count")


def _cutoff(c: Conversion, key: str, value: Any) -> None:
    c.set("data.max_length", value)
    c.note(key, "LLaMA-Factory shares cutoff_len between prompt and answer, cutting each in proportion; scaletune "
                "cuts a longer example from its end (dpo, kto, reward: data.max_prompt_length caps the prompt)")


def _excess_length(c: Conversion, key: str, value: Any) -> None:
    """axolotl's excess_length_strategy: drop | truncate | raise (its completion texts are split whatever it says)."""
    if c.get("data.too_long") == "split":
        return
    if str(value) in ("drop", "truncate"):
        c.set("data.too_long", str(value))
    else:
        c.set("data.too_long", "drop")
        c.note(key, f"{value!r}: scaletune has no such choice; data.too_long: drop leaves long examples out and "
                    "warns how many")


def _torch_dtype(c: Conversion, key: str, value: Any) -> None:
    if str(value) != "auto":
        c.set("model.dtype", value)


HANDLERS: dict[str, Callable[[Conversion, str, Any], None]] = {
    "stage": _stage, "rl": _stage, "finetuning_type": _method, "adapter": _method, "bf16": _precision,
    "fp16": _precision, "per_device_train_batch_size": _batch, "micro_batch_size": _batch,
    "gradient_accumulation_steps": _batch, "lora_rank": _lora_rank, "lora_r": _lora_rank,
    "lora_target": _targets, "lora_target_modules": _targets, "target_modules": _targets,
    "lora_target_linear": _targets, "quantization_bit": _quantization, "load_in_4bit": _quantization,
    "load_in_8bit": _quantization, "deepspeed": _deepspeed, "dataset": _dataset, "datasets": _dataset,
    "pretraining_dataset": _pretraining,
    "train_file": _dataset, "eval_dataset": _dataset, "test_datasets": _dataset, "template": _template,
    "chat_template": _template, "eval_strategy": _eval_strategy, "evaluation_strategy": _eval_strategy,
    "save_strategy": _eval_strategy, "warmup_steps": _warmup, "warmup_ratio": _warmup, "max_steps": _max_steps,
    "flash_attn": _attention, "attn_implementation": _attention, "val_size": _eval_size,
    "val_set_size": _eval_size, "torch_dtype": _torch_dtype, "eval_steps": _steps, "save_steps": _steps,
    "report_to": _report_to, "cutoff_len": _cutoff, "logging_steps": _steps, "flash_attention": _attention,
    "use_flash_attention": _attention, "excess_length_strategy": _excess_length,
}
# keys that only choose what a command does, or say what scaletune always does: dropped without a note
_SILENT = {"do_train", "do_eval", "overwrite_output_dir", "plot_loss", "overwrite_cache", "resume_from_checkpoint",
           "dataset_dir", "strict"}


def convert(raw: dict, source: Path) -> Conversion:
    """Translate another tool's config mapping `raw` (read from `source`, whose folder relative paths are also
    looked up in) into scaletune's sections."""
    from .config import _PEFT_OPTIONS, _section_keys

    c = Conversion(raw, source)
    leaves = _section_keys()  # (learning_rate, seed, ...: scaletune's own leaf names)
    for key, value in raw.items():
        key = str(key)
        if key in c.done:
            continue
        if key in SECTIONS:  # already scaletune's (a config converted in part)
            if isinstance(value, dict) and isinstance(c.out.get(key), dict):
                c.out[key].update(value)
            else:
                c.out[key] = value
        elif value is None or key in _SILENT:  # (axolotl's examples leave a dozen keys empty)
            continue
        elif key in HANDLERS:
            HANDLERS[key](c, key, value)
        elif _DOTTED.fullmatch(KEY_ALIASES.get(key, "")):
            c.set(KEY_ALIASES[key], value)
        elif key in leaves:
            c.set(leaves[key], value)
        elif key in _PEFT_OPTIONS or key.startswith("peft_"):  # (peft's own names; axolotl's peft_target_modules)
            c.set(f"peft.{key.removeprefix('peft_')}", value)
        else:
            c.note(key, f"not carried over ({KEY_ALIASES.get(key, 'no scaletune equivalent')})")
    if set(map(str, raw)) - set(SECTIONS):  # (not a config that is scaletune's already)
        _defaults(c)
    if c.get("task") is None:
        c.set("task", "causal_lm")
        c.notes.append("task: causal_lm assumed (the other config names no stage); dpo, kto, reward, seq_cls, "
                       "seq_regression and token_cls are the others")
    if c.get("peft.method") is None and any(c.get(f"peft.{k}") is not None for k in ("r", "lora_alpha")):
        c.set("peft.method", "lora")
    return c


def _tool(raw: dict) -> str:
    """Whose config `raw` is, as far as its defaults go: LLaMA-Factory, axolotl, or TrainingArguments' (TRL's)."""
    if raw.keys() & {"stage", "finetuning_type", "lora_rank", "lora_target", "cutoff_len", "dataset_dir", "template"}:
        return "LLaMA-Factory"
    return "axolotl" if raw.keys() & {"base_model", "micro_batch_size", "adapter", "sequence_len"} else "TrainingArguments"


def _defaults(c: Conversion) -> None:
    """What a key the other config leaves out meant there, where scaletune's default differs: set, with a note."""
    tool, filled = _tool(c.raw), []

    def fill(dotted: str, value: Any, *theirs: str) -> None:
        if value is not None and c.get(dotted) is None and not any(c.raw.get(k) is not None for k in theirs):
            c.set(dotted, value)
            filled.append(f"{dotted}: {value}")

    if c.get("train.micro_batch_size") is None and c.get("train.global_batch_size") is None:
        _batch(c, "per_device_train_batch_size", None)
    if tool == "LLaMA-Factory" and c.get("peft.method") in (None, "lora"):  # (its lora_alpha: 2 x lora_rank)
        for dotted, value in (("peft.method", "lora"), ("peft.r", 8), ("peft.target_modules", "all-linear")):
            fill(dotted, value)
        fill("peft.lora_alpha", 2 * c.get("peft.r") if isinstance(c.get("peft.r"), int) else None, "lora_alpha")
    if tool == "axolotl":
        fill("train.epochs", 1, "max_steps")
        if c.get("task") in (None, "causal_lm"):
            fill("data.too_long", "drop", "excess_length_strategy")
    else:  # (TrainingArguments', which LLaMA-Factory and TRL keep; TRL's learning rates are its trainers' own)
        fill("train.lr_scheduler", "linear")
        if c.get("train.lr_scheduler") != "constant":  # (a warmup setting beside constant is refused)
            fill("train.warmup_ratio", 0.0, "warmup_steps")
        if tool == "LLaMA-Factory":
            fill("train.learning_rate", 5e-5)
        elif "learning_rate" not in c.raw:
            c.notes.append("learning_rate: not given: TrainingArguments' default is 5e-5 (TRL's SFTConfig 2e-5, "
                           "DPOConfig 1e-6), scaletune's 2e-4")
    if filled:
        c.notes.append(f"left out of the config, so set to {tool}'{'s' * (tool[-1] != 's')} defaults (scaletune's "
                       f"differ): {', '.join(filled)}")
    if c.get("data.eval") is None and not c.get("data.eval_fraction") and isinstance(c.out.get("train"), dict):
        for key in ("evals_per_epoch", "eval_every"):  # (no eval data: they evaluated nothing)
            if c.out["train"].pop(key, None) is not None:
                c.notes.append(f"train.{key}: left out, there is no eval data (data.eval or data.eval_fraction)")


def render(c: Conversion) -> str:
    """The converted config as YAML, sections in scaletune's order, the notes as comments at its end."""
    ordered = {k: c.out[k] for k in SECTIONS if k in c.out}
    peft = ordered.get("peft")
    if isinstance(peft, dict) and "method" in peft:  # (method first: the other keys are its options)
        ordered["peft"] = {"method": peft["method"], **{k: v for k, v in peft.items() if k != "method"}}
    text = (f"# scaletune run config converted from {c.source.name} by `scaletune convert`: read the notes at the end;"
            "\n# `scaletune plan THIS_FILE` checks it before a run.\n")
    text += yaml.safe_dump(ordered, sort_keys=False, default_flow_style=False, width=100, allow_unicode=True)
    if c.notes:
        text += "\n# Notes from the conversion:\n" + "".join(
            textwrap.fill(n, 110, initial_indent="# - ", subsequent_indent="#   ") + "\n" for n in c.notes)
    return text


def main_convert(config: str, out: str | None) -> int:
    """`scaletune convert CONFIG [--out FILE]`: write (or print) the scaletune config; say what is left to fix."""
    import sys

    from .cli import new_file_problem
    from .config import configure
    from .config_file import read_yaml

    raw, _ = read_yaml(config)
    if out is not None and (problem := new_file_problem(out)):
        raise ConfigError(f"--out {out}: {problem}")
    result = convert(raw, Path(config))
    text = render(result)
    from .data.sources import missing_files

    left: list[str] = []
    try:
        cfg = configure(yaml.safe_load(text) or {}, source=out or "the converted config", check_peft=True)
        left = missing_files(cfg.data)
    except ConfigError as exc:
        left = exc.problems
    if out is None:
        sys.stdout.write(text)
    else:
        Path(out).write_text(text, encoding="utf-8")
        print(f"wrote {out} ({len(result.notes)} note{'s' * (len(result.notes) != 1)} at its end)", file=sys.stderr)
    if left:
        print("still to fix before it runs:\n" + "\n".join(f"  - {p}" for p in left), file=sys.stderr)
    return 0
