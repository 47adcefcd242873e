"""Unpaired feedback for task kto: a prompt, one answer to it, and whether that answer is desirable.

Three layouts are read, each record's own detected from its fields:
- LLaMA-Factory's KTO data: `messages` ({role, content}) or `conversations` ({from, value}, as sharegpt reads
  them) whose last turn is the answer (an assistant's), and a boolean `label`; `system` and `tools` as usual.
- TRL's unpaired preference data: `prompt`, `completion`, `label`; both strings (plain text, no chat template, as
  causal_lm's prompt_completion), or a prompt of messages and a completion of one assistant message.
The prompt and answer become what causal_lm's converter for that format gives (sharegpt, messages or
prompt_completion), so the chat is rendered by the same code (formats.to_segments); only the answer is a target.
"""

from __future__ import annotations

from ..errors import DataError
from .formats import _messages, _sharegpt, _text
from .preference import _message_answer, _short
from .readers import WHERE, fields_of

# the causal_lm format each layout's prompt is rendered as (and `predict` reads a KTO adapter's prompts as)
FIELDS = {"sharegpt": {"conversations", "label", "system", "tools"},
          "messages": {"messages", "prompt", "completion", "label", "tools"},
          "prompt_completion": {"prompt", "completion", "label"}}
_HINT = ("kto reads {messages: [..., {role: assistant, content}], label: true|false} (LLaMA-Factory) or "
         "{prompt, completion, label} (TRL)")


def layout(rec: dict) -> str:
    """Which causal_lm format `rec` is in (a key of FIELDS); a DataError naming its place if it is no feedback."""
    where = rec.get(WHERE, "?")
    chat = next((k for k in ("messages", "conversations") if k in rec), None)
    missing = [] if chat or "prompt" in rec else ["messages (or prompt)"]
    missing += [] if chat or "completion" in rec else ["completion"]
    missing += [] if "label" in rec else ["label"]
    if missing:
        raise DataError(f"{where}: a feedback example needs {', '.join(missing)} (the record has: {fields_of(rec)})",
                        hint=_HINT)
    if not isinstance(rec["label"], bool):
        raise DataError(f"{where}: field 'label' must be true (a desirable answer) or false (an undesirable one), "
                        f"got {_short(rec['label'])}", hint="JSON's true/false, not strings or numbers")
    if chat:
        return "sharegpt" if chat == "conversations" else "messages"
    return "prompt_completion" if isinstance(rec["prompt"], str) else "messages"


def to_example(rec: dict) -> tuple[dict, bool]:
    """(the prompt and answer as a causal_lm converter's output, the answer its only target; whether the answer
    is desirable)."""
    kind = layout(rec)
    if kind == "prompt_completion":
        return {"segments": [(_text(rec, "prompt"), False), (_text(rec, "completion", target=True), True)]}, rec["label"]
    if kind == "sharegpt":
        out = _sharegpt(rec)
    elif "messages" in rec:
        out = _messages(rec)
    else:
        prompt = rec["prompt"]
        if not isinstance(prompt, list) or not prompt:
            raise DataError(f"{rec.get(WHERE, '?')}: 'prompt' must be a string or a non-empty list of messages")
        out = _messages({**rec, "messages": [*prompt, _message_answer(rec, "completion")]})
    return {**out, "messages": _answer_last(out["messages"], rec)}, rec["label"]


def _answer_last(messages: list[dict], rec: dict) -> list[dict]:
    """`messages` with every turn but the last, the answer, as context; refused unless the last is an assistant's
    answer to a user (or tool) turn."""
    where = rec.get(WHERE, "?")
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] == "assistant":
        roles = " ".join(m["role"] for m in messages)
        raise DataError(f"{where}: the conversation must end in one assistant answer to a user (or tool) turn, "
                        f"the answer the label judges; its turns are: {roles}", hint=_HINT)
    if messages[-1].get("train", True) is None:  # (messages' weight 0: the one answer would train nothing)
        raise DataError(f"{where}: the answer (the last turn) has weight 0: there is nothing to judge")
    # the prompt's own answers are context, never targets
    return [{**m, "train": None} if m["role"] == "assistant" else m for m in messages[:-1]] + messages[-1:]
