"""Preference pairs for task dpo: a prompt and two answers to it, the chosen and the rejected.

Two layouts are read, each record's own detected from its fields:
- LLaMA-Factory's ShareGPT preference data: `conversations` (the prompt's turns, from human/gpt/system), `chosen`
  and `rejected` ({from: gpt, value}); `system` and `tools` as sharegpt reads them.
- TRL's: `prompt`, `chosen`, `rejected`, all strings (plain text, no chat template, as causal_lm's
  prompt_completion), or a prompt of messages ({role, content}) and each answer a list of one assistant message.
  Or TRL's implicit prompt: no `prompt`, `chosen` and `rejected` each the whole text or conversation; the prompt
  is what they share at the start (`explicit`, as TRL's extract_prompt), and the record reads as the explicit one.
Each answer becomes, with the prompt, what causal_lm's converter for that layout gives (sharegpt, messages or
prompt_completion), so the chat is rendered by the same code (render.to_segments); only the answer is a target.
"""

from __future__ import annotations

from typing import Any

from ..errors import DataError
from .formats import _messages, _sharegpt, _text
from .readers import WHERE, fields_of

# the causal_lm format each layout's prompt is rendered as (and `predict` reads a DPO adapter's prompts as),
# with the fields a record of that layout may hold
FIELDS = {"sharegpt": {"conversations", "chosen", "rejected", "system", "tools"},
          "messages": {"prompt", "chosen", "rejected", "tools"},
          "prompt_completion": {"prompt", "chosen", "rejected"}}

_IMPLICIT_HINT = ("give the prompt as its own field, {prompt, chosen, rejected}, or begin both with it: "
                  "{chosen: [user, assistant], rejected: [user, assistant]}, the same user turn(s) in both")


def layout(rec: dict) -> str:
    """Which causal_lm format `rec`'s prompt is in (a key of FIELDS); a DataError naming its place if it is no pair."""
    where = rec.get(WHERE, "?")
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if missing:
        raise DataError(f"{where}: a preference pair needs {', '.join(missing)} (the record has: {fields_of(rec)})",
                        hint="dpo reads {conversations, chosen: {from, value}, rejected: {from, value}} "
                             "(LLaMA-Factory), {prompt, chosen, rejected} or {chosen, rejected} with the prompt "
                             "at the start of both (TRL)")
    if _implicit(rec):  # (a string pair is plain text as an explicit one; a conversation pair chat messages)
        return "prompt_completion" if isinstance(rec["chosen"], str) else "messages"
    if "conversations" in rec:
        return "sharegpt"
    return "prompt_completion" if isinstance(rec["prompt"], str) else "messages"


def _implicit(rec: dict) -> bool:
    """Whether pair `rec` holds no prompt of its own (TRL's implicit prompt: `chosen` and `rejected` begin with it).
    A null prompt is none: a parquet or hub table mixing both forms holds one in the implicit rows."""
    return rec.get("conversations") is None and rec.get("prompt") is None


def explicit(rec: dict) -> dict:
    """Pair `rec` with its prompt a field of its own: an implicit-prompt pair as {prompt, chosen, rejected}, the
    prompt what `chosen` and `rejected` share at the start (as TRL's extract_prompt), the rest of each its answer;
    any other pair as it is. A DataError naming the record's place if the two share nothing, or (conversations)
    if what follows the shared messages is not one assistant answer on each side."""
    if not _implicit(rec):
        return rec
    where, chosen, rejected = rec.get(WHERE, "?"), rec["chosen"], rec["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = _shared_text(chosen, rejected)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        cut = _shared_turns(chosen, rejected)
    else:
        raise DataError(f"{where}: a pair without a prompt needs 'chosen' and 'rejected' both whole texts (strings) "
                        f"or both conversations (lists of messages), got {_short(chosen)} and {_short(rejected)}",
                        hint=_IMPLICIT_HINT)
    if cut == 0:
        raise DataError(f"{where}: 'chosen' and 'rejected' share no prompt: with no 'prompt' field, the prompt is "
                        "what both begin with, and they differ from the start", hint=_IMPLICIT_HINT)
    if isinstance(chosen, list):
        _check_answers(rec, cut)
    return {**rec, "prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}


def _shared_text(chosen: str, rejected: str) -> int:
    """How many leading characters of two texts are their prompt, as TRL's extract_prompt counts them: those up
    to the first that differs, less a space just before it (which begins the answers: " blue." / " green.")."""
    n = min(len(chosen), len(rejected))
    at = next((i for i in range(n) if chosen[i] != rejected[i]), None)
    if at is None:  # one text begins the other: the shorter keeps its last character as its answer, as in TRL
        return max(n - 1, 0)
    return at - 1 if at and chosen[at - 1] == " " else at


def _shared_turns(chosen: list, rejected: list) -> int:
    """How many leading messages two conversations share, at most all but each one's last (its answer, as
    TRL's extract_prompt leaves it when one conversation begins the other)."""
    n = min(len(chosen), len(rejected))
    return next((i for i in range(n) if chosen[i] != rejected[i]), max(n - 1, 0))


def _check_answers(rec: dict, cut: int) -> None:
    """Refuse a conversation pair whose `chosen` or `rejected`, past its first `cut` messages (the prompt), is not
    one assistant message: dpo scores one answer to the shared prompt."""
    for side in ("chosen", "rejected"):
        rest = rec[side][cut:]
        if not (len(rest) == 1 and isinstance(rest[0], dict) and rest[0].get("role") == "assistant"):
            roles = " ".join(str(m.get("role")) if isinstance(m, dict) else _short(m) for m in rest) or "nothing"
            raise DataError(f"{rec.get(WHERE, '?')}: 'chosen' and 'rejected' share their first {cut} message(s), "
                            f"the prompt; what follows in {side!r} must be one assistant message, the answer, "
                            f"and is: {roles}", hint=_IMPLICIT_HINT)


def to_pair(rec: dict) -> tuple[dict, dict]:
    """(chosen, rejected): each the prompt with that answer as a causal_lm converter's output, the answer its
    only target (assistant turns of the prompt are context). An implicit-prompt pair gives what its explicit
    form (`explicit`) gives."""
    where = rec.get(WHERE, "?")
    kind = layout(rec)
    rec = explicit(rec)
    pair = tuple(_converted(rec, kind, side) for side in ("chosen", "rejected"))
    if pair[0] == pair[1]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same answer: there is nothing to prefer")
    return pair


def one_answer(rec: dict, kind: str) -> dict:
    """The prompt of `rec` with its one answer in `chosen` (no `rejected`), converted as `to_pair` converts each
    side of a pair of layout `kind` (task reward's `predict`: a row scored as training scored a pair's side)."""
    return _converted(rec, kind, "chosen")


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
