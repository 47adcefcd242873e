"""The run-config keys as documentation: the README's table and `scaletune config-help`'s terminal layout,
both from the dataclasses' fields and their help text."""

from __future__ import annotations

import dataclasses
import shutil
import textwrap
import typing

from .config import RunConfig, _is_dataclass_type, _type_name
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
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, *cells in _rows(wanted):
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


def _rows(wanted: list[str] | tuple[str, ...]) -> list[tuple[str, str, str, str]]:
    rows = [row for row in config_rows() if not wanted or any(w.lower() in row[0].lower() for w in wanted)]
    if not rows:
        raise UserError(f"no run-config key contains {' or '.join(map(repr, wanted))}",
                        hint="scaletune config-help lists them all")
    return rows
