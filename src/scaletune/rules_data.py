"""The data section's shape checks (what its list- and dict-valued keys may hold), each returning its problems
for rules.cross_field_problems, which asks them with the rest."""

from __future__ import annotations

from typing import Any

from .config_values import _did_you_mean, _short


def train_sources(train: object) -> list[str]:
    """data.train as a list: non-empty, each item a spec or {path: spec, weight: > 0}."""
    if not isinstance(train, list):
        return []
    if not train:
        return ["data.train: an empty list; give a file (or a list of files)"]
    p = []
    for i, item in enumerate(train):
        key = f"data.train[{i}]"
        if isinstance(item, str):
            if not item.strip():
                p.append(f"{key}: must not be empty")
            continue
        if not isinstance(item, dict):
            p.append(f"{key}: expected a file or {{path: FILE, weight: W}}, got {type(item).__name__} {_short(item)}")
            continue
        extra = sorted(set(item) - {"path", "weight"})
        if extra:
            axolotl = ("; axolotl's type is data.format, its field_* data.columns, its split hub:<id>:split, "
                       "set once for all of data.train" if {"type", "split"} & set(extra)
                       or any(str(k).startswith("field_") for k in extra) else "")
            p.append(f"{key}: unknown key(s) {', '.join(map(str, extra))} (an item has path and weight{axolotl})")
        if not isinstance(item.get("path"), str) or not item["path"].strip():
            p.append(f"{key}.path: a data file (or hub:<id>[:split]) is required")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 < weight <= 1000):
            p.append(f"{key}.weight: must be a number > 0 (at most 1000), got {_short(weight)}")
    return p


def columns_problems(columns: dict | None) -> list[str]:
    """data.columns: {field: column}, each field one a causal_lm format reads, each column named once."""
    from collections import Counter

    from .data.formats import FORMATS

    if not columns:
        return []
    fields = sorted(set().union(*(f.fields for f in FORMATS.values())))
    p = []
    for field, column in columns.items():
        if field not in fields:
            p.append(f"data.columns.{field}: not a field any causal_lm format reads ({', '.join(fields)})"
                     f"{_did_you_mean(str(field), fields)}")
        if not isinstance(column, str) or not column.strip():
            p.append(f"data.columns.{field}: give the data's column name as a string, got {column!r}")
    twice = [c for c, n in Counter(v for v in columns.values() if isinstance(v, str)).items() if n > 1]
    if twice:
        p.append(f"data.columns: column {twice[0]!r} is named for more than one field")
    return p


def label_columns_problems(d: Any) -> list[str]:
    """data.label_column as a list: one 0/1 column per class, at least two, each named once and none a text
    column; the classes are the columns, so data.labels may only repeat them. data.label_separator: a
    non-empty string that splits one label column's text."""
    columns = d.label_column
    sep = d.label_separator
    if sep is not None and (not isinstance(sep, str) or not sep):
        return [f"data.label_separator: {sep!r}: give the text between two labels, e.g. ';' or ','"]
    if sep is not None and isinstance(columns, list):
        return ["data.label_separator: with data.label_column a list of 0/1 columns there is no label text to "
                "split; give one or the other"]
    if not isinstance(columns, list):
        return []
    if not all(isinstance(c, str) and c.strip() for c in columns):
        return [f"data.label_column: a list names one 0/1 column per class, as strings; got {_short(columns)}"]
    if len(columns) < 2:
        return [f"data.label_column: {columns}: one 0/1 column is a two-class label; write data.label_column: "
                f"{columns[0] if columns else 'COLUMN'} (a list needs a column per class, at least two)"]
    if len(set(columns)) != len(columns):
        return [f"data.label_column: {columns} names a column twice"]
    p = [f"data.{key}: column {getattr(d, key)!r} is also in data.label_column"
         for key in ("text_column", "text_pair_column") if getattr(d, key) in columns]
    if d.labels is not None and [str(x) for x in d.labels] != columns:
        p.append(f"data.labels: {_short(d.labels)} differs from data.label_column {_short(columns)}: with a column "
                 "per class the classes are those columns, in order; leave data.labels out")
    return p


def conll_columns_problems(columns: list | None) -> list[str]:
    """data.conll_columns: [word, tag], two different column numbers counted from 1 (negative: from the end)."""
    if columns is None:
        return []
    numbers = len(columns) == 2 and all(isinstance(c, int) and not isinstance(c, bool) for c in columns)
    if not numbers:
        return [f"data.conll_columns: expected [word column, tag column], two integers counted from 1 "
                f"(negative: from the end), e.g. [2, 3]; got {_short(columns)}"]
    if 0 in columns:
        return [f"data.conll_columns: {columns}: columns count from 1 (-1 is the last); there is no column 0"]
    if columns[0] == columns[1]:
        return [f"data.conll_columns: {columns}: the word and the tag are the same column"]
    return []
