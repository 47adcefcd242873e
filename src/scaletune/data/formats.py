"""Instruction-data formats for causal_lm, one small converter each (and its predict prompt), registered by name.

A converter turns one record into either a chat (`list of {role, content}`) or plain
`segments` — `(text, trainable)` pairs. Chats are rendered by the tokenizer's chat template when it
has one, else by a built-in Alpaca-style template; the rendering keeps track of which characters
belong to assistant turns so the loss can be restricted to them.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .readers import WHERE, fields_of
from .templates import ALPACA_STYLE

# (text, trainable): True a target, False context, None an answer the data marks as not to be learnt
# (a `weight: 0` turn), which stays untrained even with data.train_on_prompt.
Segments = list[tuple[str, bool | None]]
log = logging.getLogger("scaletune")


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
    prompt: Callable[[dict, bool], dict | None] = lambda line, plain: None
    asks: tuple[str, ...] = ()  # the columns a predict line holds its prompt in (named when a line has none)
    chat: bool = True  # converts to a conversation (a chat template renders it); False: plain text `segments`

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
             asks: tuple[str, ...], chat: bool = True) -> Callable:
    def deco(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
        FORMATS[name] = Format(name, required, fn, optional, turns, prompt, asks, chat)
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


def _asked(converted: dict) -> dict:
    """A converted conversation as a prompt: its trailing assistant turns dropped (the answer is generated anew)."""
    messages = converted["messages"]
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return {"messages": messages, "tools": converted.get("tools")}


def _alpaca_prompt(line: dict, plain: bool) -> dict | None:
    return {"messages": _alpaca({**line, "output": "-"})["messages"][:-1]} if "instruction" in line else None


@register("alpaca", ("instruction", "output"), ("input", "system", "history"), prompt=_alpaca_prompt,
          asks=("instruction",))
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
    # (a string `prompt` beside the conversation is prompt_completion's: the prompt as it is)
    return _asked(_sharegpt(line)) if "conversations" in line and not isinstance(line.get("prompt"), str) else None


@register("sharegpt", ("conversations",), ("system", "tools"), turns=("conversations", ("from", "value")),
          prompt=_sharegpt_prompt, asks=("conversations",))
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
    if isinstance(line.get("prompt"), str):  # (prompt_completion's, as beside sharegpt's)
        return None
    if "messages" in line:
        return _asked(_messages(line))
    return _asked(_messages({**line, "messages": line["prompt"]})) if isinstance(line.get("prompt"), list) else None


@register("messages", ("messages",), ("tools",), turns=("messages", ("role", "content", "weight", "tool_calls",
                                                                      "tool_call_id")),
          prompt=_messages_prompt, asks=("messages", "prompt"))
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
            msg["train"] = None  # falsy as context is, but never trained (see Segments)
        elif m["role"] == "assistant" and not m["content"].strip() and calls is None:  # a target of nothing
            raise DataError(f"{where}: messages[{i}].content is empty (nothing to learn from); drop the turn or "
                            "give it weight 0")
        out.append(msg)
    tools = _tools(rec.get("tools"), where)
    return {"messages": out, **({"tools": tools} if tools else {})}


@register("prompt_completion", ("prompt", "completion"), chat=False, asks=("prompt",),
          prompt=lambda line, plain: {"prompt": line["prompt"]} if isinstance(line.get("prompt"), str) else None)
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


@register("text", ("text",), chat=False, prompt=_text_prompt, asks=("text",))
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


# ---------------------------------------------------------------------------------------------
# Rendering chats into (text, trainable) segments

_DEFAULT_HEADERS = {"system": "{content}\n\n", "user": "### Instruction:\n{content}\n\n### Response:\n",
                    "tool": "### Tool result:\n{content}\n\n"}


def _render_default(messages: list[dict], eos: str) -> Segments:
    segments: Segments = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            if i and messages[i - 1]["role"] != "user":  # (after a tool result, another answer, a system prompt)
                # every answer follows the header a user turn ends with, which `predict` ends its prompt with
                segments.append(("### Response:\n", False))
            segments.append((m["content"] + eos, m.get("train", True)))
            segments.append(("\n\n", False))
        else:
            segments.append((_DEFAULT_HEADERS[m["role"]].format(content=m["content"]), False))
    while segments and segments[-1] == ("\n\n", False):
        segments.pop()
    return segments


def _render_template(messages: list[dict], tokenizer: Any, where: str, tools: list[dict]) -> Segments:
    """Use the tokenizer's chat template; assistant spans are found by rendering growing prefixes."""

    def render(msgs: list[dict], gen: bool) -> str:
        from jinja2 import TemplateError

        msgs = [{k: v for k, v in m.items() if k != "train"} for m in msgs]  # without scaletune's own key
        try:
            return tokenizer.apply_chat_template(msgs, tools=tools or None, tokenize=False, add_generation_prompt=gen)
        except TemplateError as exc:  # the template's own raise_exception(): e.g. no system role, strict alternation
            roles = " -> ".join(m["role"] for m in messages)
            raise DataError(f"{where}: the tokenizer's chat template refused this conversation ({roles}): {exc}",
                            hint="reshape the data as the template wants (e.g. fold a system prompt into the "
                                 "first user turn), or use another template") from None
        except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, RecursionError) as exc:
            if not _raised_in_template(exc):  # transformers' own API errors, or ours: not the template's
                raise
            raise DataError(f"{where}: the chat template failed while rendering this conversation: "
                            f"{type(exc).__name__}: {str(exc)[:200]}",
                            hint="fix the template (data.chat_template, or the tokenizer's own)") from None

    segments: Segments = []
    done = 0
    full = render(messages, False)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else ""  # (a template cannot render an empty conversation)
        upto = render(messages[: i + 1], False)
        if not full.startswith(upto):
            # A template that writes a turn otherwise when it is the last one (Qwen3's empty <think> block on
            # the answer after the last question, Phi-3's EOS after the last turn): the turn as the whole
            # conversation renders it, from its generation prompt to its end marker
            upto = _turn_in(full, before, upto, m, tokenizer) or upto
        if not (upto.startswith(before) and before.startswith(_joined(segments)) and full.startswith(upto)):
            raise DataError(f"{where}: the tokenizer's chat template does not render conversations "
                            "incrementally; use data.format text/prompt_completion or another template; "
                            + _parting(i, before, upto, full, _joined(segments)),
                            hint="a template that writes a turn otherwise when it is the last one (Phi-3's, Qwen3's) "
                                 "is read from its turn-end markers, which must be special tokens of the tokenizer "
                                 "(model.new_special_tokens adds them); one that writes the text before an answer "
                                 "otherwise when the answer follows (Mistral's puts the system prompt into the last "
                                 "user turn only when no answer follows it, and drops it from a conversation ending "
                                 "in one) cannot be trained as it renders: fold the system prompt into the first "
                                 "user turn")
        if m.get("train", True) and not upto[len(before):].strip():  # (else "no target tokens within max_length")
            raise DataError(f"{where}: the chat template renders assistant turn messages[{i}] as nothing, so there "
                            "is nothing to learn from it",
                            hint="the template must write each assistant message's content (and its end marker)")
        answer = upto[len(before):]
        # The whitespace a template writes after a turn's end marker (ChatML's "<|im_end|>\n", Gemma's
        # "<end_of_turn>\n") is the next turn's scaffolding: generation stops at the marker and never emits it.
        # Trained, it was one more target per turn that is not the answer.
        end = len(answer.rstrip())
        if end < len(answer) and any(answer[:end].endswith(t) for t in _end_markers(tokenizer)):
            answer, after = answer[:end], answer[end:]
        else:
            after = ""
        segments.append((before[done:], False))
        segments.append((answer, m.get("train", True)))
        segments.append((after, False))
        done = len(upto)
    if len(full) > done:
        segments.append((full[done:], False))
    return [s for s in segments if s[0]]


def _parting(i: int, before: str, upto: str, full: str, done: str) -> str:
    """Where two renderings that must agree part (`_render_template`'s check for answer messages[i]), as one
    clause quoting a little of each: which part of the conversation the template writes otherwise is then seen
    (a system prompt moved, a header changed), not only that it does."""
    for (a, what_a), (b, what_b) in (
            ((before, f"the conversation before messages[{i}] with its generation prompt"),
             (full, "the whole conversation")),
            ((before, f"the conversation before messages[{i}] with its generation prompt"),
             (upto, f"the conversation up to messages[{i}]")),
            ((done, "the earlier turns"), (before, f"the conversation before messages[{i}]")),
            ((upto, f"the conversation up to messages[{i}]"), (full, "the whole conversation"))):
        if not b.startswith(a):
            at = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
            return (f"{what_a} renders {a[max(at - 30, 0):at + 30]!r} where {what_b} renders "
                    f"{b[max(at - 30, 0):at + 30]!r}")
    return f"answer messages[{i}] is not found in the whole conversation's rendering"


def _turn_in(full: str, before: str, alone: str, message: dict, tokenizer: Any) -> str | None:
    """`full` up to the end of the assistant turn whose generation prompt `before` ends with: its content, then
    the first turn-end marker after it (EOS, <|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>); None where
    `before` is not how `full` goes on, the content or a marker after it is not found, or the turn found does
    not end as `alone` (the conversation up to this turn, rendered) ends it."""
    content = message.get("content")
    if not full.startswith(before) or not alone.startswith(before) or not isinstance(content, str):
        return None
    # (Qwen3's template drops the reasoning of an answer before the last question: the answer after it). The
    # first found: the whole content may be found in a later turn that keeps it (the same answer asked again)
    places = {t: full.find(t, len(before)) for t in (content.strip(), content.rpartition("</think>")[2].strip())}
    shown = min((t for t, at in places.items() if at >= 0), key=places.__getitem__, default=None)
    if shown is None:
        return None
    after = places[shown] + len(shown)
    found = [(full.find(t, after), t) for t in _end_markers(tokenizer) if _ends_turns(t, tokenizer)]
    end, marker = min(((e, t) for e, t in found if e >= 0), default=(-1, ""))
    if end < 0:
        return None
    # The turn may lose a head the last one has (a reasoning block), never gain text before its marker: where
    # the marker is not a special token (a Phi-3-like template of plain text, EOS after the whole conversation),
    # the first marker found is a later turn's and the span took the next user turn in as a target
    last = alone[len(before):]
    at = last.find(shown)
    cut = last.find(marker, at + len(shown)) if at >= 0 else -1
    return full[:end + len(marker)] if last[:cut if cut >= 0 else len(last.rstrip())].endswith(
        full[len(before):end]) else None


def _ends_turns(token: str, tokenizer: Any) -> bool:
    """Whether special token `token` ends a turn or a text (not one that opens a turn, <|im_start|>)."""
    name = token.lower()
    return token == getattr(tokenizer, "eos_token", None) or any(w in name for w in ("end", "eot", "</s>"))


def _end_markers(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's special tokens (EOS, <|im_end|>, <end_of_turn>, ...): what a turn's end marker is."""
    return _special_tokens(tokenizer, len(tokenizer))  # (the size: a token added later is seen)


@functools.lru_cache(maxsize=4)  # (asked per assistant turn of every record; Qwen's tokenizers have ~200)
def _special_tokens(tokenizer: Any, size: int) -> tuple[str, ...]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    marks = set(getattr(tokenizer, "all_special_tokens", []) or [])
    marks |= {str(tok) for tok in added.values() if getattr(tok, "special", False)}
    return tuple(m for m in marks if m)


def _raised_in_template(exc: BaseException) -> bool:
    """Whether `exc` came from a Jinja template's own code (its frames are named <template>): the
    template's arithmetic or filters failing on this conversation."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            return True
        tb = tb.tb_next
    return False


def _template_takes_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders tool schemas and tool calls itself (else it would drop them)."""
    text = str(tokenizer.chat_template)
    return "tools" in text and "tool_calls" in text


_told_tools_as_text = False


def _tools_as_text(messages: list[dict], tools: list[dict], tool_role: str) -> list[dict]:
    """Tool use for a template that has no notion of it: the function schemas as JSON in the system prompt,
    each call as its JSON text (trained like any answer), each result as a `tool_role` turn."""
    out = []
    for original in messages:
        m = {k: v for k, v in original.items() if k not in ("tool_calls", "tool_call_id")}
        if m["role"] == "tool":
            m["role"] = tool_role
        if original.get("tool_calls"):
            calls = [c["function"] for c in original["tool_calls"]]
            text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            m["content"] = f"{m['content']}\n{text}" if m["content"] else text
        out.append(m)
    if tools:
        # (non-ASCII kept as written, as in the calls: an escaped "\u5929\u6c14" is not the name the call gives)
        schemas = json.dumps([t["function"] for t in tools], ensure_ascii=False)
        text = "You can call these functions (JSON schemas):\n" + schemas
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _joined(segments: Segments) -> str:
    return "".join(s for s, _ in segments)


def to_segments(converted: dict, tokenizer: Any, where: str) -> Segments:
    """Turn a converter's output into (text, trainable) segments, ready to tokenise."""
    if "segments" in converted:
        segs = list(converted["segments"])
        eos = tokenizer.eos_token or ""
        text, trainable = segs[-1]
        segs[-1] = (text + eos, trainable)
        return segs
    messages = converted["messages"]
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: conversation has no assistant turn to learn from")
    if not any(m["role"] == "assistant" and m.get("train", True) for m in messages):
        raise DataError(f"{where}: every assistant turn has weight 0: nothing to learn from")
    if messages[0]["role"] == "assistant" and messages[0].get("train", True):
        # (a greeting kept as context, weight 0, is fine: nothing is learnt from it)
        raise DataError(f"{where}: the conversation starts with an assistant turn to learn, which nothing prompts",
                        hint="drop that turn, put the user turn it answers (or a system prompt) before it, or "
                             "in the messages format give it \"weight\": 0 to keep it as context (sharegpt turns "
                             "have no weight)")
    tools = converted.get("tools") or []
    uses_tools = bool(tools) or any("tool_calls" in m for m in messages)
    if getattr(tokenizer, "chat_template", None):
        if uses_tools and ALPACA_STYLE in str(tokenizer.chat_template):
            # a model merged from a run with the built-in rendering: its template renders tool results as that
            # run's `### Tool result:` turns, so a later stage on it sees the text the SFT trained on
            return _render_template(_tools_as_text(messages, tools, "tool"), tokenizer, where, [])
        if uses_tools and not _template_takes_tools(tokenizer):
            global _told_tools_as_text
            if not _told_tools_as_text:
                _told_tools_as_text = True
                log.warning("the tokenizer's chat template takes no tools (no `tools` / `tool_calls` in it): tool "
                            "schemas go into the system prompt as JSON, calls are trained as their JSON text, and "
                            "tool results are user turns")
            messages, tools = _tools_as_text(messages, tools, "user"), []
        return _render_template(messages, tokenizer, where, tools)
    return _render_default(_tools_as_text(messages, tools, "tool") if uses_tools else messages,
                           tokenizer.eos_token or "")
