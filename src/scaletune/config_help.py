"""The run-config keys as documentation: the README's table and `scaletune config-help`'s terminal layout,
both from the dataclasses' fields and their help text."""

from __future__ import annotations

import dataclasses
import difflib
import re
import shutil
import textwrap
import typing

from .config import RunConfig, _is_dataclass_type
from .config_values import _type_name
from .errors import UserError


def config_rows() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) of every run-config key, in the dataclasses' order."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            key = f"{prefix}{f.name}"
            if _is_dataclass_type(tp):
                walk(tp, key + ".")
                continue
            if f.default is not dataclasses.MISSING:
                default = "null" if f.default is None else repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "required"
            rows.append((key, _type_name(tp), default, f.metadata.get("help", "")))

    walk(RunConfig, "")
    return rows


def config_reference(wanted: list[str] | tuple[str, ...] = ()) -> str:
    """Markdown table of the keys containing any of `wanted` (every key without: the README's) with their
    type, default and help."""
    return _table(_rows(wanted))


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, *cells in rows:
        # a bare | inside a cell (Literal types: "a | b") would split it into extra columns
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in (f"`{key}`", *cells)) + " |")
    return "\n".join(lines)


def config_help(wanted: list[str]) -> str:
    """The run-config keys containing any of `wanted` (all without), each as a `key: type = default` line and
    its meaning wrapped below it, to read on a terminal (the README's table is 400 characters wide)."""
    width = min(100, shutil.get_terminal_size().columns)
    return "\n".join(f"{key}: {kind} = {default}\n"
                     + textwrap.fill(meaning, width, initial_indent="    ", subsequent_indent="    ")
                     for key, kind, default, meaning in _rows(wanted))


def method_help(method: str, wanted: list[str], markdown: bool = False) -> str:
    """`config-help --method M [KEYS]`: the `peft.*` options of method M (its peft config class's fields, with
    peft's defaults and help text), which the run-config table leaves at `peft: dict`."""
    import peft

    from . import adapters  # noqa: F401  (scaletune's own methods' config classes)
    from .methods import MATRIX, how_to_select
    from .peft_options import SCALETUNE_DEFAULTS

    row = MATRIX.get(method.lower())
    name = row.peft_method if row is not None else "lora" if method.lower() == "qlora" else method.lower()
    classes = {str(getattr(k, "value", k)).lower(): v for k, v in peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    if name not in classes:
        close = difflib.get_close_matches(name, list(classes), n=1)
        variants = ", ".join(sorted(set(MATRIX) - set(classes)))
        raise UserError(f"--method {method}: not a peft method{f' (did you mean {close[0]!r}?)' if close else ''}",
                        hint=f"known: {', '.join(sorted(classes))} (and the variants {variants}, qlora)")
    cls = classes[name]
    own = {f.name for f in dataclasses.fields(peft.PeftConfig)}  # (task type, peft version...: scaletune's to set)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in own or (wanted and not any(w.lower() in f.name.lower() for w in wanted)):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        kind = re.sub(r"\btyping\.|\bOptional\[(.*)\]$", r"\1", str(getattr(f.type, "__name__", f.type)))
        shown = "null" if default is None else repr(default)
        if f.name in SCALETUNE_DEFAULTS:
            shown = f"{shown}; scaletune: {SCALETUNE_DEFAULTS[f.name]}"
        rows.append((f"peft.{f.name}", kind, shown,
                     " ".join(str(f.metadata.get("help", "")).split())))
    if not rows:
        raise UserError(f"{cls.__name__} has no option containing {' or '.join(map(repr, wanted))}",
                        hint=f"scaletune config-help --method {method} lists them all")
    how = how_to_select(method)
    head = f"peft.method: {name} ({cls.__name__})" + (f"; {how}" if how else "")
    if markdown:
        return head + "\n\n" + _table(rows)
    width = min(100, shutil.get_terminal_size().columns)
    return head + "\n" + "\n".join(
        f"{key}: {kind} = {default}\n"
        + textwrap.fill(meaning or "(no description)", width, initial_indent="    ", subsequent_indent="    ")
        for key, kind, default, meaning in rows)


def _rows(wanted: list[str] | tuple[str, ...]) -> list[tuple[str, str, str, str]]:
    rows = [row for row in config_rows() if not wanted or any(w.lower() in row[0].lower() for w in wanted)]
    if not rows:
        raise UserError(f"no run-config key contains {' or '.join(map(repr, wanted))}",
                        hint="scaletune config-help lists them all; a peft method's own options (peft.r, "
                             "peft.target_modules, ...): scaletune config-help --method lora (or its name)")
    return rows
