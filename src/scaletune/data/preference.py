"""Preference pairs for task dpo: a prompt and two answers to it, the chosen and the rejected.

Two layouts are read, each record's own detected from its fields:
- LLaMA-Factory's ShareGPT preference data: `conversations` (the prompt's turns, from human/gpt/system), `chosen`
  and `rejected` ({from: gpt, value}); `system` and `tools` as sharegpt reads them.
- TRL's: `prompt`, `chosen`, `rejected`, all strings (plain text, no chat template, as causal_lm's
  prompt_completion), or a prompt of messages ({role, content}) and each answer a list of one assistant message.
Each answer becomes, with the prompt, what causal_lm's converter for that layout gives (sharegpt, messages or
prompt_completion), so the chat is rendered by the same code (formats.to_segments); only the answer is a target.
"""

from __future__ import annotations

from typing import Any

from ..errors import DataError
from .formats import _messages, _sharegpt, _text
from .readers import WHERE, fields_of

# the causal_lm format each layout's prompt is rendered as (and `predict` reads a DPO adapter's prompts as)
LAYOUTS = ("sharegpt", "messages", "prompt_completion")
FIELDS = {"sharegpt": {"conversations", "chosen", "rejected", "system", "tools"},
          "messages": {"prompt", "chosen", "rejected", "tools"},
          "prompt_completion": {"prompt", "chosen", "rejected"}}


def layout(rec: dict) -> str:
    """Which causal_lm format `rec`'s prompt is in (LAYOUTS); a DataError naming its place if it is no pair."""
    where = rec.get(WHERE, "?")
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if "conversations" not in rec and "prompt" not in rec:
        missing.insert(0, "conversations (or prompt)")
    if missing:
        raise DataError(f"{where}: a preference pair needs {', '.join(missing)} (the record has: {fields_of(rec)})",
                        hint="dpo reads {conversations, chosen: {from, value}, rejected: {from, value}} "
                             "(LLaMA-Factory) or {prompt, chosen, rejected} (TRL)")
    if "conversations" in rec:
        return "sharegpt"
    return "prompt_completion" if isinstance(rec["prompt"], str) else "messages"


def to_pair(rec: dict) -> tuple[dict, dict]:
    """(chosen, rejected): each the prompt with that answer as a causal_lm converter's output, the answer its
    only target (assistant turns of the prompt are context)."""
    where = rec.get(WHERE, "?")
    kind = layout(rec)
    pair = tuple(_converted(rec, kind, side) for side in ("chosen", "rejected"))
    if pair[0] == pair[1]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same answer: there is nothing to prefer")
    return pair


def _converted(rec: dict, kind: str, side: str) -> dict:
    where = rec.get(WHERE, "?")
    if kind == "prompt_completion":
        return {"segments": [(_text(rec, "prompt"), False), (_text(rec, side, target=True), True)]}
    if kind == "sharegpt":
        turns = rec["conversations"]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: 'conversations' (the prompt) must be a non-empty list")
        out = _sharegpt({**rec, "conversations": [*turns, _sharegpt_answer(rec, side)]})
    else:
        prompt = rec["prompt"]
        if not isinstance(prompt, list) or not prompt:
            raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
        out = _messages({**rec, "messages": [*prompt, _message_answer(rec, side)]})
    messages = out["messages"]
    if messages[-2]["role"] == "assistant":
        raise DataError(f"{where}: the prompt ends in an assistant turn; '{side}' must answer a user (or tool) turn")
    # the prompt's own answers are context, never targets
    out["messages"] = [{**m, "train": None} if m["role"] == "assistant" else m for m in messages[:-1]] + messages[-1:]
    return out


def _sharegpt_answer(rec: dict, side: str) -> dict:
    turn = rec[side]
    if not (isinstance(turn, dict) and isinstance(turn.get("value"), str)) or turn.get("from", "gpt") not in (
            "gpt", "assistant"):
        raise DataError(f"{rec.get(WHERE, '?')}: field {side!r} must be an answer {{\"from\": \"gpt\", \"value\": "
                        f"TEXT}}, got {_short(turn)}")
    if not turn["value"].strip():
        raise DataError(f"{rec.get(WHERE, '?')}: field {side!r} is empty (nothing to learn from)")
    return {"from": "gpt", "value": turn["value"]}


def _message_answer(rec: dict, side: str) -> dict:
    value = rec[side]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not (isinstance(value, dict) and value.get("role") == "assistant" and isinstance(value.get("content"), str)):
        raise DataError(f"{rec.get(WHERE, '?')}: field {side!r} must be one assistant message, [{{\"role\": "
                        f"\"assistant\", \"content\": TEXT}}], got {_short(value)}")
    if not value["content"].strip():
        raise DataError(f"{rec.get(WHERE, '?')}: field {side!r} is empty (nothing to learn from)")
    return {"role": "assistant", "content": value["content"]}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
