"""train.class_weights: per-class loss weights for imbalanced seq_cls / token_cls data.

The config-only checks (`config_problems`) import nothing heavy: `from_dict` runs them before torch loads.
`resolve` turns the config's form into one weight per label once the label set and the tokenised training data
are known; the weights a run trains with are recorded in run.json and in every checkpoint, and a resume takes
the checkpoint's (`recorded`), so 'balanced' is computed once per run, from the data it started on.

Single-label classes weigh each target's cross-entropy (the loss is sum(w_y * nll) / sum(w_y) over the whole
optimizer step, as torch's CrossEntropyLoss(weight=w) over that batch); multi-label classes weigh each class's
positive term (BCEWithLogitsLoss's pos_weight; the mean stays over examples x classes).
"""

from __future__ import annotations

import math
from typing import Any

KEY = "train.class_weights"
BALANCED = "balanced"


def weight_label(key: Any) -> str:
    """A mapping key as a label name: YAML's true/false as `true`/`false` (as the data's labels are named)."""
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)


def config_problems(cfg: Any) -> list[str]:
    """What is wrong with train.class_weights given the config alone (the label set, where data.labels or a
    list data.label_column gives it)."""
    value = cfg.train.class_weights
    if value is None:
        return []
    p = []
    if cfg.task not in ("seq_cls", "token_cls"):
        p.append(f"{KEY}: weights classes of seq_cls/token_cls; task {cfg.task} has none")
    if isinstance(value, str):
        if value != BALANCED:
            p.append(f"{KEY}: {value!r} is not {BALANCED!r} or a mapping {{label: weight}}")
        return p
    if not value:
        return p + [f"{KEY}: an empty mapping; name the labels to weigh, e.g. {{positive: 3}}, or leave it out"]
    for label, weight in value.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight <= 0:
            p.append(f"{KEY}.{weight_label(label)}: a weight must be a finite number > 0, got {weight!r}")
    known = given_labels(cfg)
    if known is not None:
        p += unknown_names(value, known)
    return p


def given_labels(cfg: Any) -> list[str] | None:
    """The label set the config names (data.labels, or a list data.label_column), else None."""
    d = cfg.data
    if isinstance(d.label_column, list) and cfg.task == "seq_cls":
        return [str(c) for c in d.label_column]
    if isinstance(d.labels, list):
        return [str(x) for x in d.labels]
    return None


def unknown_names(mapping: dict, labels: list[str]) -> list[str]:
    """A problem for each key of `mapping` that names no label of `labels`."""
    return [f"{KEY}.{weight_label(k)}: not a label of this run ({', '.join(labels[:10])}"
            f"{', ...' if len(labels) > 10 else ''})" for k in mapping if weight_label(k) not in labels]


def resolve(cfg: Any, labels: list[str], train: Any, multi_label: bool) -> dict[str, float] | None:
    """One weight per label ({label: weight}, in label order) for train.class_weights, or None without it.
    'balanced' counts the tokenised training set `train` (its `labels` column); a mapping is checked against
    the run's `labels` (a ConfigError naming the key)."""
    from .errors import ConfigError

    value = cfg.train.class_weights
    if value is None:
        return None
    if isinstance(value, dict):
        if problems := unknown_names(value, labels):
            raise ConfigError(problems, title=f"{KEY} names labels the run does not have")
        given = {weight_label(k): float(w) for k, w in value.items()}
        return {name: given.get(name, 1.0) for name in labels}
    counts = label_counts(train, len(labels), multi_label)
    weights = pos_weights(*counts) if multi_label else balanced_weights(counts[0])
    return dict(zip(labels, weights))


def label_counts(train: Any, n_classes: int, multi_label: bool) -> tuple[Any, Any]:
    """(per-class counts, rows): single-label and token_cls count each class's targets (ignored tokens left
    out), multi-label each class's positives and the number of examples."""
    import numpy as np
    import pyarrow.compute as pc

    column = labels_column(train)
    if multi_label or hasattr(column.type, "value_type"):  # list columns: token tags, or 0/1 per class
        flat = pc.list_flatten(column).to_numpy()
    else:
        flat = column.to_numpy()
    flat = np.asarray(flat, dtype=np.int64)
    if multi_label:
        return flat.reshape(-1, n_classes).sum(0), len(train)
    targets = flat[flat >= 0]  # (token_cls: -100 marks sub-tokens and specials, which carry no loss)
    return np.bincount(targets, minlength=n_classes), len(targets)


def labels_column(train: Any) -> Any:
    """The `labels` column as Arrow, through the dataset's row selection (a split or a weighted source picks
    rows of the table it shares); a list of examples (tests) as an Arrow array."""
    import pyarrow as pa

    try:
        column = train.with_format("arrow")["labels"]
    except (AttributeError, TypeError, ValueError):
        return pa.array([e["labels"] for e in train])
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def balanced_weights(counts: Any) -> list[float]:
    """scikit-learn's 'balanced' weights of the classes that occur; an absent class (data.labels may name
    more) weighs 1, as it is never a training target."""
    import numpy as np
    from sklearn.utils.class_weight import compute_class_weight

    present = np.flatnonzero(counts)
    y = np.repeat(present, counts[present])
    computed = compute_class_weight("balanced", classes=present, y=y)
    out = [1.0] * len(counts)
    for cls, w in zip(present.tolist(), computed.tolist()):
        out[cls] = float(w)
    return out


def pos_weights(positives: Any, rows: int) -> list[float]:
    """Multi-label 'balanced': negatives / positives per class; a class that is never (or always) positive
    keeps 1, where the ratio would be infinite (or 0, which would never train it)."""
    return [float((rows - n) / n) if 0 < n < rows else 1.0 for n in positives.tolist()]


def recorded(state: dict, cfg: Any, labels: list[str]) -> dict[str, float] | None:
    """The weights a checkpoint's run trained with, where this run's train.class_weights is the one it was
    started with (a change allowed by --allow-config-change starts over from the config) and its labels are
    this run's; else None."""
    saved = state.get("class_weights")
    config = state.get("config") or {}
    if not saved or (config.get("train") or {}).get("class_weights") != cfg.train.class_weights:
        return None
    return saved if list(saved) == list(labels) else None


def describe(weights: dict[str, float]) -> str:
    """The weights as the start of a run logs them."""
    shown = ", ".join(f"{name}={w:.4g}" for name, w in list(weights.items())[:20])
    return shown + (f", ... ({len(weights)} classes)" if len(weights) > 20 else "")
