"""`model.new_special_tokens`: tokens added to the tokenizer as special tokens (a chat format's `<|im_start|>`
for a base model whose tokenizer lacks it), new embedding rows for them in the model, and those rows trained
with peft's `trainable_token_indices` (only the new rows train, the rest of the table stays the base's).

The same steps run wherever the base model is loaded: training adds the tokens to the base's tokenizer;
eval, predict and merge read the adapter's tokenizer (saved with them) and its scaletune.json's record of
which rows are new, and resize the base identically before the adapter is loaded onto it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .adapter_record import adapter_config

log = logging.getLogger("scaletune")

# peft methods whose config takes `trainable_token_indices` (peft 0.21: LoraConfig and its subclass
# AdaLoraConfig); the others would leave the new rows at their initial values: refused by the config check
SUPPORTED_METHODS = ("lora", "adalora")
# dpo and kto compare with the adapter switched off, which switches the trained rows off too: their reference
# would read the new tokens as their mean-embedding placeholders
SUPPORTED_TASKS = ("causal_lm", "reward", "seq_cls", "seq_regression", "token_cls")
_ATTR = "scaletune_new_tokens"  # where a tokenizer carries its record (see `record`)
META_KEY = "new_special_tokens"  # the record's key in an adapter's scaletune.json
# peft 0.21's TrainableTokensLayer under ZeRO-3: its set-up gathers the partitioned table onto a CUDA device
# (torch.cuda.current_device(), hard-coded: no CPU or other backend), its forward reads the base table's whole
# weight from the wrapper's forward, where ZeRO-3 gathers only the parameters of the module that runs (the table's
# own forward never runs: an empty partition), and saving it under ZeRO-3 fails (peft issues #2603, #2946)
ZERO3_PROBLEM = ("model.new_special_tokens: not with distributed.zero_stage=3: peft's trainable tokens read the "
                 "whole embedding table, which ZeRO-3 partitions across the ranks (peft issues #2603, #2946); use "
                 "distributed.zero_stage 2 (the embedding is whole on every rank), or add the tokens in a ZeRO-2 "
                 "or single-process run, merge it (scaletune merge) and train the merged model under ZeRO-3")


def config_problems(cfg: Any) -> list[str]:
    """The config check's problems with `model.new_special_tokens`: its type, and the peft methods, tasks and
    ZeRO stage that cannot train the new rows."""
    tokens = cfg.model.new_special_tokens
    if tokens is None:
        return []
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
        return [f"model.new_special_tokens: expected a non-empty list of tokens (strings), got {tokens!r}"]
    problems = []
    if len(set(tokens)) != len(tokens):
        problems.append("model.new_special_tokens: lists a token twice: "
                        f"{sorted({t for t in tokens if tokens.count(t) > 1})}")
    method = cfg.peft_method if isinstance(cfg.peft, dict) else None
    if isinstance(method, str) and method not in SUPPORTED_METHODS:
        problems.append(f"model.new_special_tokens: peft.method {method} cannot train the new tokens' embedding "
                        "rows (peft's trainable_token_indices is a LoRA option), so they would stay untrained "
                        f"placeholders; use peft.method {' or '.join(SUPPORTED_METHODS)} (DoRA, rsLoRA too), or a "
                        "base model whose tokenizer has the tokens (e.g. a merged LoRA run that added them)")
    if cfg.task not in SUPPORTED_TASKS:
        problems.append(f"model.new_special_tokens: task {cfg.task} compares with the model with its adapter "
                        "switched off, which switches the new tokens' trained rows off too; add the tokens in a "
                        "causal_lm run, merge it (scaletune merge) and train dpo/kto on the merged model")
    if cfg.distributed.zero_stage == 3:
        problems.append(ZERO3_PROBLEM)
    if isinstance(cfg.peft, dict) and cfg.peft.get("trainable_token_indices") is not None:
        problems.append("model.new_special_tokens: scaletune sets peft.trainable_token_indices to the new tokens' "
                        "rows; remove peft.trainable_token_indices (or give ~peft.trainable_token_indices)")
    return problems


def add_to_tokenizer(tokenizer: Any, tokens: list[str]) -> None:
    """Add `tokens` as special tokens (never split, skipped when decoding with skip_special_tokens); the ones
    the tokenizer has already are left as they are, with a note. The tokenizer keeps the record `load_model`
    resizes the model by."""
    known = tokenizer.get_vocab()
    have = [t for t in tokens if t in known]
    if have:
        log.info("model.new_special_tokens: the tokenizer has %s already (not added again)",
                 _few([f"{t!r} (id {known[t]})" for t in have]))
    base_length = len(tokenizer)
    added = [t for t in tokens if t not in known]
    if added:
        tokenizer.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
        log.info("model.new_special_tokens: added %s",
                 _few([f"{t!r} (id {tokenizer.convert_tokens_to_ids(t)})" for t in added]))
    # (the listed tokens the tokenizer had may still lack a model row: `fit_embeddings` checks against the model)
    setattr(tokenizer, _ATTR, {"tokens": {t: tokenizer.convert_tokens_to_ids(t) for t in tokens},
                               "added": added, "base_length": base_length})


def record(tokenizer: Any) -> dict | None:
    """The tokenizer's new-token record (None without `model.new_special_tokens`): {"tokens": {token: id},
    "added": [...], "base_length": tokens before adding, and once the model is fitted "rows": embedding rows,
    "trained": the ids whose rows train}; saved in the adapter's scaletune.json."""
    return getattr(tokenizer, _ATTR, None)


def restore(tokenizer: Any, meta: dict) -> None:
    """Give an adapter's tokenizer the record its run saved (scaletune.json), for `load_model` to resize the
    base as training did; an adapter without one leaves the tokenizer as it is."""
    saved = meta.get(META_KEY)
    if isinstance(saved, dict) and saved.get("rows") and saved.get("trained") is not None:
        setattr(tokenizer, _ATTR, saved)


def saved_rows(adapter_dir: Path) -> list[int]:
    """The embedding rows an adapter trains as peft's trainable tokens (its adapter_config.json's
    trainable_token_indices: a list, or {module: list}); none for an adapter without them or no config to read."""
    indices = adapter_config(adapter_dir).get("trainable_token_indices")
    if isinstance(indices, dict):
        return sorted({i for ids in indices.values() for i in ids})
    return sorted(indices) if isinstance(indices, list) else []


def missing_record(adapter_dir: Path, meta: dict, base_rows: int) -> str | None:
    """Why the adapter at `adapter_dir` cannot be loaded onto a base of `base_rows` embedding rows: it trains rows
    past them (model.new_special_tokens) without its scaletune.json's record of how its run resized the base,
    which peft would index past the table with a bare IndexError. None when it loads."""
    beyond = [i for i in saved_rows(adapter_dir) if i >= base_rows]
    saved = meta.get(META_KEY)
    if not beyond or (isinstance(saved, dict) and saved.get("rows")):
        return None
    what = ("its scaletune.json is missing" if not (adapter_dir / "scaletune.json").is_file()
            else f"its scaletune.json has no {META_KEY} record")
    return (f"the adapter at {adapter_dir} trains embedding rows for tokens added to the tokenizer "
            f"(model.new_special_tokens: ids {_span(beyond)}, past the base model's {base_rows} rows), but {what}: "
            "the record of the tokens and rows its run added, which the base is resized by before the adapter "
            "loads")


RECORD_HINT = ("copy scaletune.json back from the run's output (OUTPUT_DIR/adapter/scaletune.json, or a checkpoint's "
               "OUTPUT_DIR/checkpoints/step-N/adapter/scaletune.json, the same for every step)")


def check_adapter_record(cfg: Any, adapter_dir: Path, meta: dict) -> None:
    """Refuse, before the base model loads, an adapter whose new tokens' record is gone (`missing_record`)."""
    from .errors import UserError

    if problem := record_problem(cfg, adapter_dir, meta):
        raise UserError(problem, hint=RECORD_HINT)


def record_problem(cfg: Any, adapter_dir: Path, meta: dict) -> str | None:
    """`missing_record` against the base model's vocabulary (its config's vocab_size: the embedding rows)."""
    from .seqlen import read_model_config

    saved = meta.get(META_KEY)
    if (isinstance(saved, dict) and saved.get("rows")) or not saved_rows(adapter_dir):
        return None  # (the base model's config is read only for an adapter that may need it)
    conf = read_model_config(cfg)
    rows = getattr(conf.get_text_config(), "vocab_size", None) if hasattr(conf, "get_text_config") else None
    rows = rows if isinstance(rows, int) else getattr(conf, "vocab_size", None)
    return missing_record(adapter_dir, meta, rows) if isinstance(rows, int) else None


def init_problem(cfg: Any, adapter_dir: Path, meta: dict) -> str | None:
    """model.init_adapter's adapter against the run's model.new_special_tokens: its trained rows are its tokens',
    so the run must list the same tokens in the same order (the same ids); a run adding none, or other ones,
    would start rows from another token's values or leave them at the mean without a word."""
    if problem := record_problem(cfg, adapter_dir, meta):
        return f"model.init_adapter: {problem}"
    saved = meta.get(META_KEY)
    theirs = list(saved.get("tokens") or {}) if isinstance(saved, dict) else []
    ours = list(cfg.model.new_special_tokens or [])
    if theirs == ours:
        return None
    said = f"model.new_special_tokens {theirs}" if theirs else "no model.new_special_tokens"
    fix = (f"set model.new_special_tokens: {theirs} (in that order: the same ids)" if theirs else
           "drop model.new_special_tokens, or start without model.init_adapter")
    return (f"model.init_adapter: {adapter_dir} was trained with {said}, but this run lists "
            f"{ours if ours else 'none'}: its trained embedding rows belong to its tokens; {fix}")


def fit_embeddings(model: Any, tokenizer: Any) -> list[int]:
    """Resize `model`'s input (and output) embeddings for the tokenizer's new tokens and set their rows to the
    mean of the base's rows; returns the ids whose rows train (none without new tokens). The same rows result
    at eval as in training: the mean is of the base's own rows, and the row count is the record's."""
    import torch

    info = record(tokenizer)
    if info is None:
        return []
    old_rows = model.get_input_embeddings().num_embeddings
    fresh = "rows" not in info  # (eval, predict, merge: the record an adapter saved; its rows load over these)
    if fresh:  # training: fitted here the first time
        info["rows"] = max(old_rows, len(tokenizer))
        # added tokens, and listed ones the tokenizer had without the model having a row for them
        info["trained"] = sorted({i for t, i in info["tokens"].items() if t in info["added"] or i >= old_rows})
    if info["rows"] != old_rows:
        model.resize_token_embeddings(info["rows"], mean_resizing=False)  # (rows set below, deterministically)
    trained = info["trained"]
    # the mean of the base tokenizer's rows: padding rows past its vocabulary (a table rounded up) are not tokens
    real = min(info["base_length"], old_rows)
    for table in _tables(model):
        with torch.no_grad():
            table.weight[trained] = table.weight[:real].float().mean(0).to(table.weight.dtype)
    if trained and fresh:
        log.info("model.new_special_tokens: %d new embedding row(s) (ids %s) start at the mean embedding and train",
                 len(trained), _span(trained))
    return trained


def _tables(model: Any) -> list[Any]:
    """The input embedding and, where it is a separate table (untied), the output embedding (LM head)."""
    tables = [model.get_input_embeddings()]
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and out.weight is not tables[0].weight and out.weight.shape[0] == tables[0].weight.shape[0]:
        tables.append(out)
    return tables


def _span(ids: list[int]) -> str:
    """Ids for a log line: a few, then how many more."""
    return _few(list(map(str, ids)))


def _few(items: list[str]) -> str:
    """Items for a log line: a few, then how many in all (a list of thousands of tokens is no log line)."""
    return ", ".join(items[:6]) + (f" ... ({len(items)})" if len(items) > 6 else "")


def token_indices(model: Any, ids: list[int], modules_to_save: list[str] | None = None) -> dict[str, list[int]] | None:
    """peft's `trainable_token_indices` for `ids` on `model` (before peft wraps it): the input embedding's rows,
    and the LM head's where it is not tied to it (peft ties the rows of a tied head itself). A table named in
    peft.modules_to_save (an `lm_head` trained in full) trains its new rows with the rest of it: peft refuses
    both on one module."""
    if not ids:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    full = [str(m) for m in modules_to_save or []]
    indices = {name: list(ids) for name in (names[id(table)] for table in _tables(model))
               if not any(name == m or name.endswith("." + m) for m in full)}
    return indices or None


def set_token_indices(pconf: Any, indices: dict[str, list[int]] | None, method: str) -> None:
    """Put `indices` into the peft config; a method whose config has no such option (a newer peft's change, as
    the config check refuses the others) is an error rather than new rows left untrained."""
    if indices is None:
        return
    if not hasattr(pconf, "trainable_token_indices"):
        from .errors import ConfigError

        raise ConfigError(f"model.new_special_tokens: peft.method {method} has no trainable_token_indices in this "
                          "peft, so the new tokens' rows would stay untrained; use peft.method lora")
    pconf.trainable_token_indices = indices


def plan_rows(model: Any, cfg: Any) -> list[int]:
    """For `plan` (a model on the meta device, no tokenizer read): one new row per listed token, as if none were
    in the tokenizer yet (an upper bound), the model resized for them; returns their ids."""
    tokens = cfg.model.new_special_tokens
    if not tokens:
        return []
    rows = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(rows + len(tokens), mean_resizing=False)
    return list(range(rows, rows + len(tokens)))
