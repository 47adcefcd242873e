"""Instruction-data formats for causal_lm, one small converter each (and its predict prompt), registered by name.

A converter turns one record into either a chat (`list of {role, content}`) or plain
`segments` — `(text, trainable)` pairs, which data/render.py renders (`to_segments`) into the text to tokenise.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from .readers import WHERE, fields_of


@dataclass(frozen=True)
class Format:
    name: str
    required: tuple[str, ...]  # columns whose presence identifies the format
    convert: Callable[[dict], dict]  # record -> {"messages": [...]} or {"segments": [...]}
    optional: tuple[str, ...] = ()  # further columns `convert` reads when present
    turns: tuple[str, tuple[str, ...]] | None = None  # (list column, keys `convert` reads in each of its items)
    # predict's (and eval --generate's) line, whether the model was trained on plain text -> the line's prompt, its
    # answer left out: {"messages", "tools"} (a conversation, rendered as training renders it) or {"prompt": str}
    # (continued as it is); None where the line is not of this shape (the first format that takes it prompts it)
    prompt: Callable[[dict, bool], dict | None] = field(kw_only=True)  # (required, as answer is)
    asks: tuple[str, ...] = ()  # the columns a predict line holds its prompt in (named when a line has none)
    chat: bool = True  # converts to a conversation (a chat template renders it); False: plain text `segments`
    # (eval --generate's and train.eval_generate's) record of the shape this format prompts, the key asking
    # -> its reference answer, the one the prompt leaves out; a DataError where it has none to compare with
    answer: Callable[[dict, str], str] = field(kw_only=True)

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(self.required + self.optional)

    def holds(self, rec: dict) -> bool:
        """Whether `rec` has this format's identifying columns with values: a parquet or hub table of mixed
        records holds every record's columns in each row, null where the record had none."""
        return all(rec.get(col) is not None for col in self.required)


FORMATS: dict[str, Format] = {}


def register(name: str, required: tuple[str, ...], optional: tuple[str, ...] = (),
             turns: tuple[str, tuple[str, ...]] | None = None, *, prompt: Callable[[dict, bool], dict | None],
             asks: tuple[str, ...], answer: Callable[[dict, str], str], chat: bool = True) -> Callable:
    def deco(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
        FORMATS[name] = Format(name, required, fn, optional, turns, asks=asks, chat=chat, prompt=prompt, answer=answer)
        return fn

    return deco


def _text(rec: dict, key: str, *, optional: bool = False, target: bool = False) -> str:
    value = rec.get(key)
    if value is None and optional:
        return ""
    if key not in rec:
        raise DataError(f"{rec.get(WHERE, '?')}: field {key!r} is missing (the record has: {fields_of(rec)})")
    if not isinstance(value, str):
        raise DataError(f"{rec.get(WHERE, '?')}: field {key!r} must be a string, got {type(value).__name__}")
    if target and not value.strip():
        raise DataError(f"{rec.get(WHERE, '?')}: field {key!r} is empty (nothing to learn from)")
    return value


def prompting(line: dict, plain: bool) -> tuple[Format, dict] | None:
    """(the first registered format whose `prompt` takes `line`, that prompt); None where none takes it."""
    for fmt in FORMATS.values():
        if (asked := fmt.prompt(line, plain)) is not None:
            return fmt, asked
    return None


def _final_answer(converted: dict, rec: dict, key: str) -> str:
    """A converted conversation's final turn, where that is an assistant's text answer: a reference answer."""
    messages, where = converted["messages"], rec.get(WHERE, "?")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: {key}: the conversation ends in a {messages[-1]['role']} turn, "
                        "not the assistant's: it has no final answer to compare a generated one with")
    if messages[-1].get("tool_calls"):  # (its content is empty: every answer without text would match it)
        raise DataError(f"{where}: {key}: the conversation ends in a tool call (function_call / "
                        "tool_calls), not a text answer to compare a generated one with")
    return messages[-1]["content"]


def _asked(converted: dict) -> dict:
    """A converted conversation as a prompt: its trailing assistant turns dropped (the answer is generated anew)."""
    messages = converted["messages"]
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return {"messages": messages, "tools": converted.get("tools")}


def _alpaca_prompt(line: dict, plain: bool) -> dict | None:
    return {"messages": _alpaca({**line, "output": "-"})["messages"][:-1]} if "instruction" in line else None


def _alpaca_answer(rec: dict, key: str) -> str:
    return _text(rec, "output")


# (named functions, never lambdas, here: a task holds its format, and spawned DataLoader workers pickle it)
@register("alpaca", ("instruction", "output"), ("input", "system", "history"), prompt=_alpaca_prompt,
          asks=("instruction",), answer=_alpaca_answer)
def _alpaca(rec: dict) -> dict:
    instruction = _text(rec, "instruction")
    extra = _text(rec, "input", optional=True)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = []
    system = _text(rec, "system", optional=True)
    if system:
        messages.append({"role": "system", "content": system})
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"{rec.get(WHERE, '?')}: field 'history' must be a list of [user, assistant] pairs, "
                        f"got {type(history).__name__}")
    for i, turn in enumerate(history):  # LLaMA-Factory's [[user, assistant], ...]
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataError(f"{rec.get(WHERE, '?')}: history[{i}] must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(rec, "output", target=True)}]
    return {"messages": messages}


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}


def _tools(value: Any, where: str) -> list[dict]:
    """ShareGPT's `tools` (a JSON list of function schemas, often as a string) in the form chat templates
    take: [{"type": "function", "function": schema}]."""
    if value is None or value == "":
        return []
    try:
        tools = json.loads(value) if isinstance(value, str) else value
    except ValueError as exc:
        raise DataError(f"{where}: field 'tools' is not valid JSON ({exc})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: field 'tools' must be a list of function schemas (JSON objects)")
    return [t if t.get("type") == "function" and "function" in t else {"type": "function", "function": t}
            for t in tools]


def _tool_calls(value: str, where: str) -> list[dict]:
    """A `function_call` turn's JSON ({"name", "arguments"}, or a list of them) as chat-template tool calls."""
    try:
        calls = json.loads(value)
    except ValueError:
        calls = None
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise DataError(f"{where} must be a JSON object with 'name' and 'arguments' (or a list of them)")
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
            for c in calls]


def _openai_tool_calls(value: Any, where: str) -> list[dict]:
    """An OpenAI-format assistant turn's `tool_calls` ([{"type": "function", "function": {"name", "arguments"}}],
    arguments as a JSON string or object), with arguments as objects, the form chat templates print."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where} must be a non-empty list of {{\"type\": \"function\", \"function\": {{...}}}}")
    calls = []
    for call in value:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}: each call needs function.name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                raise DataError(f"{where}: function.arguments of {fn['name']!r} is not valid JSON") from None
        calls.append({**call, "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return calls


def _sharegpt_prompt(line: dict, plain: bool) -> dict | None:
    # (a `prompt` string beside the conversation, as ultrachat_200k's first question is, stays unread: training
    # reads such a record as the conversation too)
    return _asked(_sharegpt(line)) if "conversations" in line else None


def _sharegpt_answer(rec: dict, key: str) -> str:
    return _final_answer(_sharegpt(rec), rec, key)


@register("sharegpt", ("conversations",), ("system", "tools"), turns=("conversations", ("from", "value")),
          prompt=_sharegpt_prompt, asks=("conversations",), answer=_sharegpt_answer)
def _sharegpt(rec: dict) -> dict:
    turns = rec.get("conversations")
    where = rec.get(WHERE, "?")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    messages = []
    system = _text(rec, "system", optional=True)
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{i}] needs 'from' and 'value'")
        role = _SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise DataError(f"{where}: conversations[{i}].from={turn['from']!r} is not one of "
                            f"{sorted(_SHAREGPT_ROLES)}")
        if not isinstance(turn["value"], str):
            raise DataError(f"{where}: conversations[{i}].value must be a string, got {type(turn['value']).__name__}")
        if role == "assistant" and not turn["value"].strip():  # would teach answering with nothing, as
            raise DataError(f"{where}: conversations[{i}].value is empty (nothing to learn from)")  # alpaca's
        message = {"role": role, "content": turn["value"]}
        if turn["from"] == "function_call":  # the call is its tool_calls (and text again only for a template without)
            message = {"role": role, "content": "",
                       "tool_calls": _tool_calls(turn["value"], f"{where}: conversations[{i}] (function_call)")}
        messages.append(message)
    tools = _tools(rec.get("tools"), where)
    return {"messages": messages, **({"tools": tools} if tools else {})}


# OpenAI's (and multimodal datasets') content parts, [{"type": "text", "text": ...}, {"type": "image_url", ...}]:
# joining the text parts would pick a separator the data does not give, and other parts cannot be trained
_PARTS_HINT = ("scaletune trains on text and reads each message's content as one string: join the text parts "
               "yourself, e.g. jq -c '.messages[].content |= (if type == \"array\" then map(.text // empty) | "
               "join(\"\") else . end)' FILE.jsonl, after dropping the records with image or audio parts (their answers "
               "are about what the model would never see)")


_LEGACY_FUNCTIONS_HINT = ("write it as tool calls: the record's `functions` as `tools` ([{\"type\": \"function\", "
                          "\"function\": {...}}]), an assistant `function_call` as `tool_calls` ([{\"type\": "
                          "\"function\", \"function\": {\"name\": ..., \"arguments\": ...}}]) and a role "
                          "'function' message as role 'tool'")


def _content_kind(value: Any) -> str:
    """What a message's content is instead of a string: `null`, or a list of parts and their types."""
    if isinstance(value, list):
        kinds = sorted({str(p.get("type")) for p in value if isinstance(p, dict)})
        return f"a list of content parts ({', '.join(kinds) or 'no types'})"
    return "null" if value is None else type(value).__name__


def _messages_prompt(line: dict, plain: bool) -> dict | None:
    """A `messages` line's conversation, or TRL's conversational prompt (a dpo/kto training line's list of
    messages in `prompt`) as one."""
    if "messages" in line:  # (a `prompt` string beside it too, as in ultrachat_200k: as training reads it)
        return _asked(_messages(line))
    return _asked(_messages({**line, "messages": line["prompt"]})) if isinstance(line.get("prompt"), list) else None


def _messages_answer(rec: dict, key: str) -> str:
    return _final_answer(_messages(rec), rec, key)


@register("messages", ("messages",), ("tools",), turns=("messages", ("role", "content", "weight", "tool_calls",
                                                                      "tool_call_id")),
          prompt=_messages_prompt, asks=("messages", "prompt"), answer=_messages_answer)
def _messages(rec: dict) -> dict:
    msgs = rec.get("messages")
    where = rec.get(WHERE, "?")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if isinstance(m, dict) and (m.get("role") == "function" or "function_call" in m):
            raise DataError(f"{where}: messages[{i}] is in OpenAI's legacy function-calling form (role 'function' "
                            "or 'function_call'), which scaletune does not read", hint=_LEGACY_FUNCTIONS_HINT)
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: messages[{i}] needs role system|user|assistant|tool and content")
        calls = m.get("tool_calls") if m.get("role") == "assistant" else None
        if calls is not None and m.get("content") is None:  # OpenAI: a tool call's content is null
            m = {**m, "content": ""}
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}].content must be a string, got {_content_kind(m.get('content'))}",
                            hint=_PARTS_HINT if isinstance(m.get("content"), list) else None)
        msg = {"role": m["role"], "content": m["content"]}
        if calls is not None:
            msg["tool_calls"] = _openai_tool_calls(calls, f"{where}: messages[{i}].tool_calls")
        if m["role"] == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        # OpenAI's fine-tuning format: an assistant turn with weight 0 is context, not a target. Dropping
        # the key would train on exactly the turns the data marks as not to be learnt.
        weight = 1 if m.get("weight") is None else m["weight"]  # (null: a parquet/hub row of a turn without one)
        if isinstance(weight, bool) or weight not in (0, 1):
            raise DataError(f"{where}: messages[{i}].weight must be 0 or 1, got {weight!r}")
        if weight == 0:
            if m["role"] != "assistant":
                raise DataError(f"{where}: messages[{i}].weight: only assistant turns are trained, "
                                f"so only they take a weight (this one is {m['role']})")
            msg["train"] = None  # falsy as context is, but never trained (see render.Segments)
        elif m["role"] == "assistant" and not m["content"].strip() and calls is None:  # a target of nothing
            raise DataError(f"{where}: messages[{i}].content is empty (nothing to learn from); drop the turn or "
                            "give it weight 0")
        out.append(msg)
    tools = _tools(rec.get("tools"), where)
    return {"messages": out, **({"tools": tools} if tools else {})}


def _completion_answer(rec: dict, key: str) -> str:
    if "completion" not in rec:
        raise DataError(f"{rec.get(WHERE, '?')}: {key}: a string 'prompt' makes this a prompt_completion record, "
                        f"whose reference answer is its 'completion', which it lacks (the record has: "
                        f"{fields_of(rec)})")
    return _text(rec, "completion")


def _completion_prompt(line: dict, plain: bool) -> dict | None:
    return {"prompt": line["prompt"]} if isinstance(line.get("prompt"), str) else None


@register("prompt_completion", ("prompt", "completion"), chat=False, asks=("prompt",), answer=_completion_answer,
          prompt=_completion_prompt)
def _prompt_completion(rec: dict) -> dict:
    return {"segments": [(_text(rec, "prompt"), False), (_text(rec, "completion", target=True), True)]}


def _text_prompt(line: dict, plain: bool) -> dict:
    """Any line no other format takes: its `text` as it is for a model trained on plain text (it never saw a
    template), else as a user turn (a line without one: an empty turn)."""
    if plain and isinstance(line.get("text"), str):
        return {"prompt": line["text"]}
    if not isinstance(line.get("text", ""), str):
        raise DataError(f"{line.get(WHERE, '<predict>')}: 'text' must be a string")
    return {"messages": [{"role": "user", "content": line.get("text", "")}]}


def _no_answer(rec: dict, key: str) -> str:
    raise DataError(f"{rec.get(WHERE, '?')}: {key}: a plain-text record (no instruction, conversation or "
                    "prompt/completion fields) has no reference answer to compare a generated one with")


@register("text", ("text",), chat=False, prompt=_text_prompt, asks=("text",), answer=_no_answer)
def _plain_text(rec: dict) -> dict:
    return {"segments": [(_text(rec, "text", target=True), True)]}


def detect(records: list[dict], source: str) -> Format:
    """Pick the format whose identifying columns the first record has: with values, else (a record whose field
    is null: that format's error names it) at all."""
    first = records[0]
    for fmt in [f for f in FORMATS.values() if f.holds(first)] or FORMATS.values():
        if all(col in first for col in fmt.required):
            return fmt
    cols = sorted(k for k in first if k != WHERE)
    options = "; ".join(f"{f.name}: {', '.join(f.required)}" for f in FORMATS.values())
    conll = (" (it was read as a CoNLL token/tag file, as .txt files are; for plain text use a .jsonl file with "
             'a "text" field)') if cols == ["tags", "tokens"] else ""
    raise DataError(f"{source}: cannot tell the data format from columns {cols}{conll}. Expected one of — "
                    f"{options}. Set data.format to choose explicitly.")


def ignored_fields(fmt: Format, records: list[dict], key: str, shown: int = 10) -> str | None:
    """One line naming the record fields `fmt` does not read (a KTO `label`, ShareGPT `tools`, ...) and how
    many records hold them, or None. Converting drops them silently, which could hide a wrong format choice."""
    used = fmt.fields
    counts = Counter(k for rec in records for k, v in rec.items()
                     if k != WHERE and k not in used and v is not None)  # hub/parquet rows hold None for gaps
    if fmt.turns:  # a turn's `name`, `tool_calls`, `loss` ... are dropped the same way: counted per record
        column, read = fmt.turns
        counts.update(f"{column}[].{k}" for rec in records if isinstance(rec.get(column), list)
                      for k in {k for turn in rec[column] if isinstance(turn, dict)
                                for k, v in turn.items() if k not in read and v is not None})
    if not counts:
        return None
    names = sorted(counts, key=str)
    listed = ", ".join(f"{name} ({counts[name]} record{'s' if counts[name] != 1 else ''})" for name in names[:shown])
    more = f", and {len(names) - shown} more" if len(names) > shown else ""
    return f"{key}: fields ignored by format {fmt.name}: {listed}{more}"


def get_format(name: str, records: list[dict], source: str) -> Format:
    refuse_preference_data(records, source)
    fmt = detect(records, source) if name == "auto" else FORMATS[name]
    missing = [c for c in fmt.required if c not in records[0]]
    if missing:
        raise DataError(f"{records[0].get(WHERE, source)}: format {fmt.name} needs column(s) {missing}")
    return fmt


def refuse_preference_data(records: list[dict], source: str) -> None:
    """Preference data (DPO pairs, KTO labels) read as instruction data would train the rejected or
    undesirable answers as targets, or none at all: refused, saying what the data is."""
    for rec in records:
        where = rec.get(WHERE, source)
        if "chosen" in rec and "rejected" in rec:
            raise DataError(f"{where}: 'chosen' / 'rejected' make this preference-pair data (DPO); causal_lm trains "
                            "on answers to imitate (supervised fine-tuning), not on preferences",
                            hint="train on the preferences with task: dpo; or, to fine-tune on the preferred answers, "
                                 "make each 'chosen' the conversation's last assistant turn and drop 'rejected'")
        if isinstance(rec.get("label"), bool) and ("messages" in rec or "conversations" in rec):
            raise DataError(f"{where}: a true/false 'label' next to the conversation makes this KTO data (desirable "
                            "and undesirable answers); scaletune would train every answer as a target, the "
                            "undesirable ones too",
                            hint="train on the feedback with task: kto; or, to fine-tune on the desirable answers, "
                                 "keep only the records with \"label\": true and drop the field, e.g. "
                                 "jq -c '.[] | select(.label) | del(.label)' FILE.json > sft.jsonl")
