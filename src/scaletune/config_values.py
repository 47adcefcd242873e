"""Checking one config value against its key's annotation (the types in config.py), and the wording its
problems share with rules.py: a short repr, a did-you-mean hint, YAML's boolean trap."""

from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Any, Literal

from .aliases import VALUE_ALIASES


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " | ".join(_type_name(a) for a in args) + (" | null" if type(None) in typing.get_args(tp) else "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; convert the few safe cases (int -> float, '1e-4')."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if _null_spelled_out(value) and inner[0] is not str:
            problems.append(f"{key}: {value!r} is a string; for no value write null (unquoted) or leave the key out")
            return None
        if len(inner) == 1:
            return _coerce(value, inner[0], key, problems)
        for option in inner:  # (str | list: the first of the types the value is)
            tried: list[str] = []
            out = _coerce(value, option, key, tried)
            if not tried:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {_short(value)}")
        return None
    if origin is Literal:
        return _choice(value, tp, key, problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                return float(value)
            problems.append(f"{key}: must be a finite number, got {value!r}")
            return None
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                out = float(value)
                if math.isfinite(out):
                    return out
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if key.endswith("report_to") and [str(v).strip().lower() for v in (value if isinstance(value, list)
                                                                            else [value])] == ["none"]:
            return []  # (transformers' "no trackers")
        if isinstance(value, list):
            return value
        if isinstance(value, str) and key.endswith("report_to"):
            return [value]
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    hint = f" ({BOOL_HINT})" if isinstance(value, bool) and tp is str else ""
    problems.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {_short(value)}{hint}")
    return None


# Keys whose meaning YAML's booleans leave unambiguous: `mixed_precision: no` (as the docs write it) arrives as
# False, and false can only mean "no mixed precision".
_BOOL_CHOICES = {"train.mixed_precision": {False: "no"}}
BOOL_HINT = "unquoted no/yes/on/off are booleans in YAML: quote them"


def _null_spelled_out(value: Any) -> bool:
    """Whether `value` is the word none/null as a string (quoted, or `None` in Python's spelling)."""
    return isinstance(value, str) and value.strip().lower() in ("none", "null", "~")


def _choice(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """`value` if it is one of the Literal `tp`'s choices (the type too: True is not 1); problems name them."""
    choices = typing.get_args(tp)
    if value in choices and type(value) is type(choices[choices.index(value)]):
        return value
    if isinstance(value, bool) and value in _BOOL_CHOICES.get(key, {}):
        return _BOOL_CHOICES[key][value]
    if isinstance(value, bool) and bool not in {type(c) for c in choices}:
        hint = f" ({BOOL_HINT})"
    elif isinstance(value, str) and value in [str(c) for c in choices]:  # zero_stage: "3", quoted
        hint = f" (write {value} unquoted: a number)"
    else:
        hint = _did_you_mean(str(value), [str(c) for c in choices])
    problems.append(f"{key}: {_short(value)} is not one of {_type_name(tp)}{hint}")
    return None


def _holds_nul(value: Any) -> bool:
    """Whether a string in `value` (nested lists and mappings too, keys included) has a NUL byte."""
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    return isinstance(value, list) and any(_holds_nul(v) for v in value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(word: str, choices: list[str]) -> str:
    # (peft's TaskType spells CAUSAL_LM, transformers' pipelines text-generation: same names, other spelling)
    plain = word.lower().replace("-", "_")
    alias = VALUE_ALIASES.get(plain, ())
    # (one alias table serves every key: "fp32" is model.dtype's float32 and mixed_precision's no)
    named = [c for c in (plain, *((alias,) if isinstance(alias, str) else alias)) if c in choices]
    close = named[:1] or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
