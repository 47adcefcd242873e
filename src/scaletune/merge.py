"""`merge`: fold a trained adapter into its base's weights, written as a model that loads without peft."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .config import CAUSAL_TASKS, CHAT_TASKS, RunConfig
from .errors import UserError, failed_write, write_error
from .fileutil import MERGING, merge_out_is_empty
from .infer import load_trained

log = logging.getLogger("scaletune")


def run_merge(cfg: RunConfig, adapter: str | None, out_dir: str) -> Path:
    """Fold the adapter into the base weights; the result loads with AutoModelFor*.from_pretrained."""
    if cfg.model.quantization:
        log.warning("merge: the adapter was trained on the %s-quantized base and is folded into the base's "
                    "full-precision weights, so the merged model's outputs differ somewhat from base + adapter's; "
                    "evaluate the merged model itself", cfg.model.quantization)
        cfg.model.quantization = None  # merge into full-precision weights, never into 4/8-bit ones
    model, tokenizer, task, labels, path = load_trained(cfg, adapter, tokenises=False)
    # the adapter's own method: the config may name another (it is read from adapter_config.json)
    configs = list(getattr(model, "peft_config", {}).values())
    method = str(getattr(configs[0].peft_type, "value", configs[0].peft_type)).lower() if configs else cfg.peft_method
    if not hasattr(model, "merge_and_unload"):
        # prompt learning (prompt/prefix/p-tuning) trains virtual tokens or key/values, not weight updates
        raise UserError(f"peft method {method} cannot be merged into the base weights: it adds virtual tokens "
                        "(or key/values), not changes to the base's weights",
                        hint="use the adapter as it is: `eval`/`predict` with it, or load base + adapter with "
                             "peft.PeftModel.from_pretrained")
    try:
        merged = model.merge_and_unload()
    except (ValueError, NotImplementedError, AttributeError) as exc:
        raise UserError(f"cannot merge a {method} adapter: {exc}") from None
    target = Path(out_dir)
    if target.exists() and not merge_out_is_empty(target):
        raise UserError(f"--out {target} is not empty; choose a new directory")
    # Written aside and moved in: a failed write (a full disk) leaves no half model that looks whole and
    # no directory that refuses the retry as "not empty". An existing (empty) --out may be a mount point
    # or the working directory, which cannot be renamed onto: the files are moved into it instead.
    tmp = target / MERGING if target.is_dir() else target.parent / f".{target.name}.merging"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.task in CHAT_TASKS and not getattr(tokenizer, "chat_template", None) and \
            getattr(getattr(task, "format", None), "chat", True):
        from .data.templates import alpaca_style_template

        # conversations were rendered by scaletune's own template: the merged tokenizer gets it as its chat
        # template, so the merged model's users (apply_chat_template, serving stacks) give it the same text
        tokenizer.chat_template = alpaca_style_template(tokenizer)
        log.info("merge: the merged tokenizer's chat template is scaletune's Alpaca-style rendering, which "
                 "the adapter was trained with")
    elif cfg.data.chat_template not in (None, "default"):
        bos_led_template(tokenizer)
    if cfg.task in CAUSAL_TASKS and getattr(merged, "generation_config", None) is not None:
        _stop_at_turn_end(merged, tokenizer)
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if tmp.parent == target:
            for item in tmp.iterdir():
                os.replace(item, target / item.name)
            tmp.rmdir()
        else:
            os.replace(tmp, target)
    except BaseException as exc:  # (Ctrl-C too: the half-written model goes, so a retry finds --out as it was)
        shutil.rmtree(tmp, ignore_errors=True)
        if not failed_write(exc):
            raise
        raise write_error(exc, f"--out {target}", "nothing was left there; free disk space (or fix "
                                                  "permissions) and run merge again") from None
    return target


def bos_led_template(tokenizer: object) -> None:
    """Lead the chat template data.chat_template chose (chatml, a file) with BOS where training led each sequence
    with it (a tokenizer that adds BOS itself, as Llama's; the template renders none): `apply_chat_template(...,
    tokenize=True)` on the merged model adds no special tokens of its own, so it would otherwise give ids without
    the BOS the model was trained (and `predict` prompts) with."""
    from .tasks.causal_lm import leading_bos

    template, bos = getattr(tokenizer, "chat_template", None), getattr(tokenizer, "bos_token", None)
    if not isinstance(template, str) or not bos or leading_bos(tokenizer) is None:
        return
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    except Exception:  # noqa: BLE001  (a template needing more than one user turn: left as it is)
        return
    if not text.startswith(bos):
        from .data.templates import bos_led

        tokenizer.chat_template = bos_led(tokenizer, template)
        log.info("merge: the merged tokenizer's chat template is led by %s, as training led each sequence", bos)


def _stop_at_turn_end(merged: object, tokenizer: object) -> None:
    """Name the token the trained answers end with (the template's <|im_end|>, the tokenizer's EOS) among the merged
    generation_config's eos_token_id, as predict stops there (generation.stop_ids): a base's own names only its
    EOS (Qwen2.5's <|endoftext|>), and `generate` on the merged model ran on past each answer's end."""
    from .generation import config_eos, stop_ids

    config = merged.generation_config
    have = config_eos(merged)
    added = sorted(stop_ids(merged, tokenizer) - have)
    if added:
        first = config.eos_token_id if isinstance(config.eos_token_id, list) else \
            [] if config.eos_token_id is None else [config.eos_token_id]
        config.eos_token_id = [*first, *added]
        log.info("merge: generation_config.json's eos_token_id is %s: the trained answers end with %s",
                 config.eos_token_id, ", ".join(tokenizer.convert_ids_to_tokens(added)))
