"""Unpaired feedback for task kto: a prompt, one answer to it, and whether that answer is desirable.

Three layouts are read, each record's own detected from its fields:
- LLaMA-Factory's KTO data: `messages` ({role, content}) or `conversations` ({from, value}, as sharegpt reads
  them) whose last turn is the answer (an assistant's), and a boolean `label`; `system` and `tools` as usual.
- TRL's unpaired preference data: `prompt`, `completion`, `label`; both strings (plain text, no chat template, as
  causal_lm's prompt_completion), or a prompt of messages and a completion of one assistant message.
- Preference pairs, in any layout task dpo reads (data/preference.py, the implicit prompt too): each pair is two
  examples (`unpaired`), its chosen answer desirable and its rejected one undesirable, as TRL's
  unpair_preference_dataset makes them; the pair's layout is that of its examples.
The prompt and answer become what causal_lm's converter for that format gives (sharegpt, messages or
prompt_completion), so the chat is rendered by the same code (render.to_segments); only the answer is a target.
"""

from __future__ import annotations

from ..errors import DataError
from .formats import _messages, _sharegpt, _text
from .preference import _message_answer, _sharegpt_answer, _short, explicit, to_pair
from .preference import layout as pair_layout
from .readers import WHERE, fields_of

# the causal_lm format each layout's prompt is rendered as (and `predict` reads a KTO adapter's prompts as)
FIELDS = {"sharegpt": {"conversations", "label", "system", "tools", "chosen", "rejected"},
          "messages": {"messages", "prompt", "completion", "label", "tools", "chosen", "rejected"},
          "prompt_completion": {"prompt", "completion", "label", "chosen", "rejected"}}
_HINT = ("kto reads {messages: [..., {role: assistant, content}], label: true|false} (LLaMA-Factory), "
         "{prompt, completion, label} (TRL) or preference pairs as task dpo reads them")


def layout(rec: dict) -> str:
    """Which causal_lm format `rec` is in (a key of FIELDS); a DataError naming its place if it is no feedback."""
    where = rec.get(WHERE, "?")
    if _paired(rec):
        if rec.get("label") is not None:  # (which answer would it judge?)
            raise DataError(f"{where}: a preference pair ('chosen', 'rejected') takes no 'label': its chosen answer "
                            "is the desirable one, its rejected one the undesirable", hint=_HINT)
        return pair_layout(rec)
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
    is desirable), of an unpaired record (a pair's are `unpaired`'s)."""
    if _paired(rec):  # (a programming error: one record here is one example)
        raise ValueError(f"{rec.get(WHERE, '?')}: a preference pair is two feedback examples: to_example takes "
                         "each of unpaired(rec)")
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


def unpaired(rec: dict) -> list[dict]:
    """The feedback examples of record `rec`: a preference pair's two, {its prompt, the chosen answer, label true}
    and {its prompt, the rejected answer, label false}, each the unpaired record of its layout (a sharegpt
    conversation ending in the answer, or a prompt and completion), as TRL's unpair_preference_dataset makes
    them; any other record is its one example. A pair is refused where task dpo refuses it (naming its place)."""
    if not _paired(rec):
        return [rec]
    kind = layout(rec)
    to_pair(rec)  # (refused as dpo refuses it: an answer empty or the same as the other, a prompt ending in one)
    pair = explicit(rec)
    prompt = {k: v for k, v in pair.items() if k not in ("chosen", "rejected")}
    if kind == "sharegpt":
        return [{**prompt, "conversations": [*pair["conversations"], _sharegpt_answer(pair, side)],
                 "label": side == "chosen"} for side in ("chosen", "rejected")]
    return [{**prompt, "completion": _completion(pair, kind, side), "label": side == "chosen"}
            for side in ("chosen", "rejected")]


def _paired(rec: dict) -> bool:
    """Whether `rec` is a preference pair: 'chosen' or 'rejected' holds something. A null one is none: a parquet
    or hub table mixing pairs and unpaired examples holds both columns, null, in the unpaired rows."""
    return rec.get("chosen") is not None or rec.get("rejected") is not None


def _completion(pair: dict, kind: str, side: str) -> str | list[dict]:
    """Pair `pair`'s answer `side` as TRL's unpaired `completion` of layout `kind`: the text, or a list of the one
    assistant message."""
    return _text(pair, side, target=True) if kind == "prompt_completion" else [_message_answer(pair, side)]
