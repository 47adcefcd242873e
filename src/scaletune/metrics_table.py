"""`scaletune eval`'s metrics as a person reads them on a terminal: aligned numbers, the per-class report as a
table and the confusion matrix as a grid. (Piped or redirected, eval prints the JSON, at full precision.)"""

from __future__ import annotations

import json
from typing import Any

_COLUMNS = ("precision", "recall", "f1-score", "support")
_CORNER = "gold \\ predicted"


def metrics_table(metrics: dict) -> str:
    """The scalar metrics one a line, then each per-class report and the confusion matrix; anything else is
    shown as JSON, so no metric is ever left out."""
    scalars = {k: v for k, v in metrics.items() if _is_number(v)}
    width = max(map(len, scalars), default=0)
    lines = [f"{k:<{width}}  {_number(v)}" for k, v in scalars.items()]
    for key, value in metrics.items():
        if key in scalars:
            continue
        if _is_report(value):
            lines += ["", *_report(key, value)]
        elif key == "confusion_matrix" and isinstance(value, dict) and {"labels", "counts"} <= value.keys():
            lines += ["", *_confusion(value["labels"], value["counts"])]
        else:
            lines += ["", f"{key}: {json.dumps(value, default=float)}"]
    return "\n".join(lines)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: float) -> str:
    """4 decimals, as metrics are usually read; a value that would show as 0.0000 (a loss of 3e-5) or is very
    large keeps 4 significant digits instead."""
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e6 or value != value else f"{value:.4g}"


def _is_report(value: Any) -> bool:
    """A classification report: {class: {precision, recall, f1-score, support}} (sklearn's and seqeval's)."""
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(row, dict) and set(_COLUMNS) <= row.keys() for row in value.values()))


def _report(key: str, rows: dict) -> list[str]:
    width = max(len(key), *(len(str(name)) for name in rows))
    out = [f"{key:<{width}}  " + "  ".join(f"{c:>9}" for c in _COLUMNS)]
    for name, row in rows.items():
        cells = [f"{row[c]:>9.4f}" for c in _COLUMNS[:3]] + [f"{round(row['support']):>9}"]
        out.append(f"{name!s:<{width}}  " + "  ".join(cells))
    return out


def _confusion(labels: list, counts: list) -> list[str]:
    names = [str(label) for label in labels]
    cell = max([len(n) for n in names] + [len(str(c)) for row in counts for c in row] + [4])
    first = max([len(_CORNER)] + [len(n) for n in names])
    out = ["confusion matrix (rows: gold, columns: predicted)",
           f"{_CORNER:<{first}}  " + "  ".join(f"{n:>{cell}}" for n in names)]
    out += [f"{name:<{first}}  " + "  ".join(f"{c:>{cell}}" for c in row) for name, row in zip(names, counts)]
    return out
