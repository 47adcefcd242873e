"""Generating completions with a trained causal_lm adapter: prompts rendered as training renders them,
batched greedy or sampled decoding, and the loop prompt-learning adapters need (used by predict, eval
--generate and training's eval_generate)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from .data.readers import WHERE
from .errors import DataError
from .rope import stretched_length
from .seqlen import position_limit

log = logging.getLogger("scaletune")


def prompt_segments(item: dict, tokenizer: Any, trained_format: str | None = None) -> tuple[str, list]:
    """(the prompt to echo, the segments to generate after) for one input, rendered the way training
    renders a record of the same shape: the first registered format whose `prompt` takes the line says what
    its prompt is (data/formats.py): a conversation, which ends here in an empty assistant turn (Alpaca fields,
    ShareGPT `conversations`, `messages`, TRL's list of messages in `prompt`), or plain text used as it is
    (a `prompt` string: prompt/completion data is trained without a template). A plain `text` line is a user
    turn, except for a model trained on a format without one (`trained_format` text or prompt_completion),
    which never saw a template: there it is the prompt as it is."""
    from .data.formats import FORMATS, prompting
    from .data.render import to_segments

    where = item.get(WHERE, "<predict>")
    trained = FORMATS.get(trained_format) if trained_format is not None else None
    plain = trained is not None and not trained.chat
    taken = prompting(item, plain)
    if taken is None:
        raise DataError(f"{where}: nothing to prompt with (no data format reads this line)")
    asked = taken[1]
    if "prompt" in asked:
        return asked["prompt"], [(asked["prompt"], False)]
    messages = asked["messages"]
    if not messages:
        raise DataError(f"{where}: nothing to prompt with (no user turn)")
    segments = to_segments({"messages": [*messages, {"role": "assistant", "content": ""}],
                            "tools": asked.get("tools")}, tokenizer, where)
    return messages[-1]["content"], segments


_CAPPED: list = []  # warned once per process that --max-new-tokens was cut to the context


def prompt_ids(tokenizer: Any, segments: list) -> list[int]:
    """The token ids generation continues from: everything before the final (empty) assistant turn of
    `segments` (earlier assistant turns are part of the prompt), led by BOS as training's are (leading_bos)."""
    from .tasks.causal_lm import leading_bos

    last = max((i for i, (_, trainable) in enumerate(segments) if trainable), default=len(segments))
    ids = tokenizer("".join(s for s, _ in segments[:last]), add_special_tokens=False)["input_ids"]
    bos = leading_bos(tokenizer)
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


def _budget(model: Any, used: int, max_new_tokens: int) -> int:
    """How many tokens a completion of a `used`-position prompt may have: max_new_tokens, cut where a
    learned position table ends (it fails past its size); a rotary model runs on, with a warning."""
    context, hard = position_limit(model.config) if hasattr(model, "config") else (None, False)
    if context and hard:
        if used >= context:
            log.warning("a prompt of %d tokens fills the model's context (%d): no completion", used, context)
            return 0
        if used + max_new_tokens > context:
            if not _CAPPED:
                log.warning("--max-new-tokens %d: the model's context is %d tokens; each completion stops there",
                            max_new_tokens, context)
                _CAPPED.append(True)
            return context - used
    elif context and not _CAPPED:
        covered = stretched_length(model.config, context)  # (model.rope_scaling stretched a trained length)
        if used + max_new_tokens > covered:
            log.warning("--max-new-tokens %d: completions may run past the %d positions the model was trained "
                        "for%s", max_new_tokens, covered, " (its RoPE scaling's stretch)" if covered > context else "")
            _CAPPED.append(True)
    return max_new_tokens


def generate(model: Any, tokenizer: Any, segments: list, max_new_tokens: int) -> str:
    """Greedy completion after the prompt part of `segments` (see `prompt_segments`)."""
    return generate_batch(model, tokenizer, [segments], max_new_tokens)[0]


def generate_batch(model: Any, tokenizer: Any, prompts: list[list], max_new_tokens: int,
                   sampling: dict | None = None) -> list[str]:
    """Completions of several prompts (each a `prompt_segments` segment list), in their order: greedy, or
    sampled with `sampling` ({temperature, top_p}).

    Prompts with the same token budget are decoded together, left-padded, by one `model.generate`:
    transformers places each row's positions by its attention mask, so a row's completion is the one it
    gets alone (the tests compare them), for less time: 96 Alpaca prompts of the demo's adapter on 2 CPU
    cores took ~8 s one at a time and ~3 s in batches (loading aside). Prompt-learning adapters go one at a time through `greedy_without_cache`."""
    ids = [prompt_ids(tokenizer, segments) for segments in prompts]
    prompt_learning = is_prompt_learning(model)
    virtual = _virtual_tokens(model) if prompt_learning else 0  # (virtual tokens take positions)
    budgets = [_budget(model, len(row) + virtual, max_new_tokens) for row in ids]
    new: list[list[int]] = [[] for _ in ids]
    if prompt_learning:  # peft's generate is wrong for these (see greedy_without_cache)
        for i, row in enumerate(ids):
            if budgets[i]:
                new[i] = greedy_without_cache(model, torch.tensor([row]), budgets[i], sampling, tokenizer).tolist()
    else:
        for budget in sorted(set(budgets) - {0}):
            rows = [i for i, b in enumerate(budgets) if b == budget]
            for i, tokens in zip(rows, _generate_rows(model, tokenizer, [ids[i] for i in rows], budget, sampling)):
                new[i] = tokens
    return [strip_turn_end(tokenizer, tokenizer.decode(tokens, skip_special_tokens=True)) for tokens in new]


def _generate_rows(model: Any, tokenizer: Any, rows: list[list[int]], max_new_tokens: int,
                   sampling: dict | None = None) -> list[list[int]]:
    """Each row's new token ids from one left-padded `model.generate`, up to and including its first
    end-of-sequence token (a row that ends early is padded after it while the others go on)."""
    eos = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    out = model.generate(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                         max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(eos) or None,
                         **({"do_sample": True, "top_k": 0, **sampling} if sampling else {"do_sample": False}))
    result = []
    for tokens in out[:, width:].tolist():
        end = next((j + 1 for j, t in enumerate(tokens) if t in eos), len(tokens))
        result.append(tokens[:end])
    return result


def config_eos(model: Any) -> set[int]:
    """The ids the model's generation_config names as eos_token_id (an id, a list or none)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids a completion stops after: the model's generation_config EOS, the tokenizer's EOS (what
    training closes answers with) and the special token the chat template ends an assistant turn with. A base
    model's generation_config names only its own EOS (Qwen2.5's <|endoftext|>), while its template's answers,
    as trained, end in <|im_end|>: decoding went on past it to --max-new-tokens, and the text after the skipped
    marker (the next turn's scaffolding, repeats) was the completion's tail, scored by eval --generate."""
    return config_eos(model) | _trained_ending(tokenizer, len(tokenizer))[0]


def strip_turn_end(tokenizer: Any, completion: str) -> str:
    """`completion` without the turn-end marker the template writes as plain text before the EOS (data.chat_template
    chatml's <|im_end|> where the tokenizer has no such special token): the template's, not the answer's."""
    marker = _trained_ending(tokenizer, len(tokenizer))[1]
    if not marker:  # (the usual case: the answer ends in special tokens alone, which decoding skips)
        return completion
    end = completion.rstrip()
    return end[:-len(marker)] if end.endswith(marker) else completion


_PROBE = "Zq"  # the probe answer's content: what comes after it in the rendering is the template's turn end


@functools.lru_cache(maxsize=4)
def _trained_ending(tokenizer: Any, size: int) -> tuple[frozenset, str]:
    """(the tokenizer's EOS and the last special token, before any whitespace, of an answer as training renders it
    (causal_lm's _ends_in_special: what teaches the model to stop); the rest of the text the template ends an
    answer with, as a completion decodes it: special tokens skipped), from rendering a one-turn probe."""
    from .data.render import to_segments
    from .tasks.causal_lm import closing_special, special_ids

    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        segments = to_segments({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}],
                                "tools": None}, tokenizer, "<stop probe>")
    except Exception:  # noqa: BLE001  (a template that cannot render the probe: training refuses it anyway)
        return frozenset(stops), ""
    answer = next((text for text, trainable in segments if trainable), "")
    special = special_ids(tokenizer)
    if (closing := closing_special(tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer, special)) \
            is not None:
        stops.add(closing)
    after = answer.partition(_PROBE)[2]
    for token in sorted(tokenizer.convert_ids_to_tokens(sorted(special)), key=len, reverse=True):
        after = after.replace(token, "")  # (as decoding skips them)
    return frozenset(stops), after.strip()


def _sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row, drawn at `temperature` from the most probable tokens whose probabilities add up to
    `top_p` (nucleus sampling, as `generate` does it)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    ordered, order = probs.sort(dim=-1, descending=True)
    ordered[(ordered.cumsum(-1) - ordered) >= top_p] = 0  # (the first token always stays)
    return order.gather(-1, torch.multinomial(ordered, 1))


def _virtual_tokens(model: Any) -> int:
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    return int(getattr(config, "num_virtual_tokens", 0) or 0)


def is_prompt_learning(model: Any) -> bool:
    """Whether `model` is a peft model whose adapter adds virtual tokens or key/values (prompt, p- and
    prefix tuning) rather than changing weights."""
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


# greedy-decoding settings a model's generation_config.json may carry (with their no-op values), which
# `greedy_without_cache` does not apply: named in a warning rather than silently dropped
_UNAPPLIED = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0,
              "bad_words_ids": None, "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None,
              "forced_bos_token_id": None, "forced_eos_token_id": None, "stop_strings": None,
              "exponential_decay_length_penalty": None}


@torch.no_grad()
def greedy_without_cache(model: Any, ids: torch.Tensor, max_new_tokens: int,
                         sampling: dict | None = None, tokenizer: Any = None) -> torch.Tensor:
    """The new token ids of a greedy completion of `ids` (one row; sampled with `sampling`), each from a full
    forward pass over the whole sequence so far, stopping after an end-of-sequence token.

    For prompt-learning adapters, not `model.generate`: peft 0.21 looks for the KV cache under
    `past_key_values`, which transformers 5.24 renamed `cache`, so during decoding it prepends the virtual
    prompt again at every step (prompt / p-tuning: wrong after the first tokens) or never passes the prefix
    (prefix tuning: the base model's completion); `use_cache=False` does not help prefix tuning, whose
    prefix cache comes back from the first step and is reused. The forward pass is the one training
    uses, so this is right on any version; without a cache it costs a forward per token over the whole
    sequence, which is fine at the scale these methods are used."""
    config = getattr(model, "generation_config", None)
    eos = stop_ids(model, tokenizer) if tokenizer is not None else config_eos(model)
    unapplied = {k: v for k, neutral in _UNAPPLIED.items()
                 if (v := getattr(config, k, None)) is not None and v != neutral and v != []}
    if unapplied:
        _warn_unapplied(", ".join(f"{k}={v!r}" for k, v in sorted(unapplied.items())))
    from .tasks.causal_lm import _accepts_logits_to_keep

    # only the last position's logits: the whole sequence's would be length x vocabulary floats per token
    last = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    seq = ids.to(model.device)
    for _ in range(max_new_tokens):
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), **last).logits
        token = logits[:, -1].argmax(-1, keepdim=True) if not sampling else _sample(logits[:, -1], **sampling)
        seq = torch.cat([seq, token], dim=1)
        if int(token) in eos:
            break
    return seq[0, ids.shape[1]:].cpu()


@functools.cache
def _warn_unapplied(settings: str) -> None:
    """Once per process and set of settings (not once per input line)."""
    log.warning("predict: a prompt-learning adapter is decoded by scaletune's own loop (peft's generate "
                "is wrong for it), which does not apply the model's generation_config %s", settings)
