"""Rendering a converted record into `(text, trainable)` segments, ready to tokenise (`to_segments`): a chat by
the tokenizer's chat template when it has one (the characters of assistant turns tracked so the loss can be
restricted to them), else by scaletune's built-in Alpaca-style rendering; tool use as a template without it
takes it. The converters that produce the chats are data/formats.py's."""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

from ..errors import DataError
from .templates import ALPACA_STYLE

# (text, trainable): True a target, False context, None an answer the data marks as not to be learnt
# (a `weight: 0` turn), which stays untrained even with data.train_on_prompt.
Segments = list[tuple[str, bool | None]]
log = logging.getLogger("scaletune")

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
