"""seq_cls: text (or text pair) classification; the new head trains and saves with the adapter.

A label column holding lists (["sports", "politics"], or ids named by data.labels) makes the run multi-label:
every class is a yes/no of its own (a sigmoid each, `problem_type="multi_label_classification"` in the model
config), trained with binary cross-entropy and predicted where the sigmoid exceeds 0.5 (an empty list: no
class). The loss is the mean over examples x classes, as torch's BCEWithLogitsLoss and transformers' own
loss take it: `count_targets` counts labels.numel(), which for the (examples, classes) target is that."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F

from ..data.readers import WHERE, fields_of
from ..errors import DataError
from .base import (
    TRUNCATED,
    Task,
    ce_sum,
    collect_labels,
    id_names_for,
    label_name,
    named_by_id,
    overflowed,
    pad_batch,
    register,
    unknown_label,
)

_TEXT_COLUMNS = ("text", "sentence", "content", "review")
_LABEL_COLUMNS = ("label", "labels", "class", "category")


def _pick(records: list[dict], explicit: str | None, candidates: tuple[str, ...], what: str, key: str,
          source: str) -> str:
    first = records[0]
    if explicit:
        if explicit not in first:
            raise DataError(f"{first.get(WHERE, source)}: column {explicit!r} ({key}) not found; columns: "
                            f"{sorted(k for k in first if k != WHERE)}")
        return explicit
    for c in candidates:
        if c in first:
            return c
    raise DataError(f"{source}: no {what} column among {sorted(k for k in first if k != WHERE)}; expected one "
                    f"of {list(candidates)} or set {key}")


# Classes up to which eval gives a confusion matrix: it has N^2 cells, written on every eval's metrics line (3,000
# intents would be 9 million numbers an eval)
CONFUSION_MAX_CLASSES = 50


@register("seq_cls")
class SeqCls(Task):
    peft_task_type = "SEQ_CLS"
    id_names: list[str] | None = None  # integer labels: the name of each id (data.labels)
    multi_label = False  # the label column holds lists (set by `setup`; an adapter's scaletune.json keeps it)
    separator: str | None = None  # data.label_separator: the label column's text holds several labels
    # multi-label eval's decision: a sigmoid above this (None: 0.5; `eval --threshold`). Private: no cache keeps it
    _threshold: float | None = None

    def auto_model_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self, labels: list[str] | None) -> dict:
        """The label maps, and for multi-label the problem type, which the saved and merged config.json carry
        so that plain transformers scores with sigmoids (and BCE) too."""
        kwargs = super().model_kwargs(labels)
        if self.multi_label and kwargs:
            kwargs["problem_type"] = "multi_label_classification"
        return kwargs

    def setup(self, records: list[dict], cfg: Any, source: str, key: str = "data.train") -> list[str] | None:
        d = cfg.data
        self.pick_text_columns(records, cfg, source)
        if isinstance(d.label_column, list):  # one 0/1 column per class (Jigsaw): multi-label, the columns its classes
            self.label = [_pick(records, c, (), "label", "data.label_column", source) for c in d.label_column]
            self.multi_label, self.id_names = True, None
            return list(self.label)
        self.label = _pick(records, d.label_column, _LABEL_COLUMNS, "label", "data.label_column", source)
        self.separator = d.label_separator
        if self.separator is not None:  # (the labels as lists, for the checks and the label set below)
            records = [{**rec, self.label: self._labels_of(rec[self.label])} if self.label in rec else rec
                       for rec in records]
        if key == "data.train":  # (`scaletune eval`'s file keeps the adapter's shape, which setup_cached restored:
            # a single-label file would be scored with softmax on sigmoid classes)
            self.multi_label = self.separator is not None or _holds_lists(records, self.label)
        if d.labels is not None:  # (the labels as given: data.labels may keep spellings apart that differ in spaces)
            # SST-2's 0/1 named by data.labels: [negative, positive]
            found = {label_name(v) for rec in records for v in _as_list(rec.get(self.label))}
            self.id_names = id_names_for(list(found), d.labels)
            return [str(x) for x in d.labels]
        self.id_names = None
        labels = collect_labels(records, self.label, is_list=False, multi_label=self.multi_label)
        if len(labels) < 2:
            found = f"a single label {labels}" if labels else "no label at all (every list is empty)"
            raise DataError(f"{source}: column {self.label!r} has {found}; need at least 2 classes")
        return labels

    def pick_text_columns(self, records: list[dict], cfg: Any, source: str) -> None:
        """Set the text column (data.text_column or the first of the usual names) and the optional pair column."""
        d = cfg.data
        self.text = _pick(records, d.text_column, _TEXT_COLUMNS, "text", "data.text_column", source)
        self.pair = d.text_pair_column
        if self.pair and self.pair not in records[0]:
            raise DataError(f"{source}: column {self.pair!r} (data.text_pair_column) not found")

    def encode(self, record: dict, tokenizer: Any, cfg: Any, label2id: dict | None) -> dict | None:
        where = record.get(WHERE, "?")
        text = record.get(self.text)
        pair = record.get(self.pair) if self.pair else None
        for col, val in ((self.text, text), (self.pair, pair)):
            if col and col not in record:  # (an eval file of another shape: say so, not "got None")
                raise DataError(f"{where}: no column {col!r}; the record has {fields_of(record)}")
            if col and (not isinstance(val, str) or not val.strip()):
                raise DataError(f"{where}: column {col!r} must be a non-empty string, got {val!r}")
        target = self.record_target(record, where, label2id)
        enc = tokenizer(text, pair, truncation=True, max_length=cfg.data.max_length)
        out = {"input_ids": enc["input_ids"], "labels": target,
               TRUNCATED: overflowed(enc, cfg.data.max_length)}
        if self.pair and "token_type_ids" in enc:
            # BERT-style segment ids mark the second text; predict and a plain transformers pipeline pass
            # them, so training and eval must see them too (a pair column is required on every record)
            out["token_type_ids"] = enc["token_type_ids"]
        return out

    def _labels_of(self, value: Any) -> Any:
        """A record's label as written, or with data.label_separator its text split into a list of labels
        ("sports; politics": ["sports", "politics"]; "": []); a list stays as it is, another value is one label."""
        if self.separator is None or value is None or isinstance(value, list):
            return value
        if not isinstance(value, str):
            return [value]
        return [part.strip() for part in value.split(self.separator) if part.strip()]

    def record_target(self, record: dict, where: str, label2id: dict | None) -> Any:
        """The training target of one record (read before tokenising, so a bad label costs no tokenizer call)."""
        if isinstance(self.label, list):
            return _flags(record, self.label, where)
        value = record.get(self.label)
        if isinstance(value, str) and _LIST_TEXT.match(value):
            # a list column exported to CSV (pandas writes "['sports', 'politics']"): read as one label it would
            # train a class per combination, split at data.label_separator it would train classes named "['sports'"
            raise DataError(f"{where}: label {value!r} in column {self.label!r} is a list written as text; seq_cls "
                            "does not parse it", hint="write the file as JSONL/parquet with a real list, or the "
                            "labels joined by a separator (sports;politics) with data.label_separator: ';'")
        return self._target(self._labels_of(value), where, label2id)

    def _target(self, label: Any, where: str, label2id: dict) -> int | list[int]:
        """A record's label as the class id, or for multi-label as a 0/1 entry per class."""
        if not self.multi_label:
            if isinstance(label, list):
                raise DataError(f"{where}: label {label!r} is a list, but the training data has one label an "
                                "example; a list in every training record makes the run multi-label")
            name = named_by_id(label, self.id_names, where, "label") if label is not None else None
            if name not in label2id:
                raise unknown_label(where, "label", label, label2id)
            return label2id[name]
        if not isinstance(label, list):
            raise DataError(f"{where}: label {label!r} must be a list of labels: the training data is multi-label "
                            "(an example with no class has [])")
        hot = [0] * len(label2id)
        for value in label:
            name = named_by_id(value, self.id_names, where, "label") if isinstance(value, (str, int)) else None
            if name not in label2id:
                raise unknown_label(where, "label", value, label2id)
            hot[label2id[name]] = 1
        return hot

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        if not self.multi_label:
            return pad_batch(examples, pad_id)
        # (pad_batch would read a 0/1 list as per-token labels): BCE takes a float (examples, classes) target
        batch = pad_batch([{**e, "labels": 0} for e in examples], pad_id)
        batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.float32)
        return batch

    @staticmethod
    def forward(model: Any, batch: dict) -> torch.Tensor:
        """The head's logits for a collated batch (segment ids passed where a text pair has them)."""
        segments = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **segments).logits

    def loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self._loss(model, batch, None, 0.0)

    def train_loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self._loss(model, batch, self._class_weights, self._label_smoothing)

    def _loss(self, model: Any, batch: dict, weights: torch.Tensor | None,
              smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, logits); `weights`: per-class weights of the targets (multi-label: of the positives);
        `smoothing`: single-label cross-entropy's label smoothing."""
        logits = self.forward(model, batch)
        if self.multi_label:  # summed over examples x classes, in float32 as ce_sum is
            pos_weight = weights.to(logits.device) if weights is not None else None
            return F.binary_cross_entropy_with_logits(logits.float(), batch["labels"].float(), pos_weight=pos_weight,
                                                      reduction="sum"), logits
        return ce_sum(logits, batch["labels"], weights, smoothing), logits

    @staticmethod
    def count_targets(batch: dict) -> int:
        return int(batch["labels"].numel())

    def step_weight(self, batches: list[dict]) -> float | None:
        # (pos_weight leaves BCEWithLogitsLoss's mean over examples x classes as it is: the count)
        return None if self.multi_label else super().step_weight(batches)

    def set_threshold(self, threshold: float | None) -> None:
        """Multi-label eval: predict a class where its sigmoid exceeds `threshold` (None: 0.5)."""
        self._threshold = threshold

    def predictions(self, logits: torch.Tensor, batch: dict) -> list:
        if self.multi_label:  # (a logit above 0 is a sigmoid above 0.5, without rounding near the threshold)
            cut = 0.0 if self._threshold is None else math.log(self._threshold / (1 - self._threshold))
            return list(zip((logits > cut).int().tolist(), batch["labels"].int().tolist()))
        return list(zip(logits.argmax(-1).tolist(), batch["labels"].tolist()))

    def example_outputs(self, logits: torch.Tensor, batch: dict) -> list:
        """Single-label: the probability of each example's predicted class (multi-label: None)."""
        if self.multi_label:
            return [None] * len(logits)
        return logits.float().softmax(-1).max(-1).values.tolist()

    def example_line(self, pred: Any, extra: Any, record: dict, labels: list[str] | None) -> dict:
        """The text (and pair), gold and predicted label names (multi-label: lists), and whether they agree."""
        predicted, gold = pred
        line = {"text": record.get(self.text)}
        if self.pair:
            line["text_pair"] = record.get(self.pair)
        if self.multi_label:
            return {**line, "label": [labels[j] for j, on in enumerate(gold) if on],
                    "predicted": [labels[j] for j, on in enumerate(predicted) if on], "correct": predicted == gold}
        return {**line, "label": labels[gold], "predicted": labels[predicted], "score": extra,
                "correct": predicted == gold}

    def metrics(self, preds: list, loss_sum: float, n_targets: int, labels: list[str] | None) -> dict:
        from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

        if self.multi_label:
            return multi_label_metrics(preds, loss_sum / max(n_targets, 1), labels)
        y_pred = [p for p, _ in preds]
        y_true = [t for _, t in preds]
        ids = list(range(len(labels)))
        report = classification_report(y_true, y_pred, labels=ids, target_names=labels, output_dict=True,
                                       zero_division=0)
        # macro F1 averages the classes that occur (in the answers or the predictions): a class the eval set
        # lacks and nothing predicted would count as F1 0 and cap a perfect classifier below 1
        out = {"loss": loss_sum / max(n_targets, 1), "accuracy": accuracy_score(y_true, y_pred),
                "macro_f1": f1_score(y_true, y_pred, average="macro", zero_division=0),
                # (one label an example: micro F1 is the accuracy; named too, so best_metric reads both kinds)
                "micro_f1": f1_score(y_true, y_pred, average="micro", zero_division=0),
                "per_class": {name: {k: report[name][k] for k in ("precision", "recall", "f1-score", "support")}
                              for name in labels}}
        if len(labels) <= CONFUSION_MAX_CLASSES:
            # every class gets a row and a column, in label order, even one the eval set lacks
            out["confusion_matrix"] = {"labels": list(labels),
                                       "counts": confusion_matrix(y_true, y_pred, labels=ids).tolist()}
        return out


# A label cell that is a list's text: JSON's ["a", "b"] or [0, 2], Python's ['a', 'b'], or [] (no label is so named)
_LIST_TEXT = re.compile(r"""^\s*\[\s*(?:\]|(["'])[^"']*\1\s*(?:,\s*(["'])[^"']*\2\s*)*\]|\d+\s*(?:,\s*\d+\s*)*\])\s*$""")

# A class column's yes/no as written: JSON numbers and booleans, CSV text, parquet/pandas floats.
_FLAGS = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}


def _flags(record: dict, columns: list[str], where: str) -> list[int]:
    """A record's 0/1 entry per class, read from one column per class (data.label_column: [toxic, ...])."""
    hot = []
    for column in columns:
        if column not in record:
            raise DataError(f"{where}: no label column {column!r} (data.label_column); the record has "
                            f"{fields_of(record)}")
        value = record[column]
        flag = _FLAGS.get(str(value).strip().lower()) if isinstance(value, (str, int, float)) else None
        if flag is None:
            # (Jigsaw's test_labels.csv marks the rows it does not score -1)
            raise DataError(f"{where}: column {column!r} holds {value!r}; a class column holds 0 or 1 (or "
                            "true/false)", hint="drop the records whose classes are unknown (-1 in Jigsaw's "
                            "test labels)" if str(value).strip() == "-1" else None)
        hot.append(flag)
    return hot


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _holds_lists(records: list[dict], column: str) -> bool:
    """Whether the label column holds lists (multi-label); a file mixing lists and single labels is refused at
    the first record whose shape differs from the first record's."""
    first: tuple[bool, str] | None = None
    for rec in records:
        if column not in rec:  # (collect_labels names the record)
            continue
        is_list, where = isinstance(rec[column], list), rec.get(WHERE, "?")
        if first is None:
            first = (is_list, where)
        elif is_list != first[0]:
            shape = {True: "a list of labels (multi-label)", False: "a single label"}
            raise DataError(f"{where}: label {rec[column]!r} is {shape[is_list]}, but the label at {first[1]} is "
                            f"{shape[first[0]]}; write every label as a list (multi-label) or none")
    return bool(first and first[0])


def multi_label_metrics(preds: list, loss: float, labels: list[str]) -> dict:
    """Multi-label scores of (predicted, gold) 0/1 rows: "accuracy" is the exact match of the whole label set
    (scikit-learn's subset accuracy), micro F1 pools every (example, class) decision, macro F1 averages the
    classes that occur (in the answers or the predictions, as single-label's does), and per_class scores each."""
    import numpy as np
    from sklearn.metrics import accuracy_score, classification_report, f1_score

    y_pred = np.array([p for p, _ in preds], dtype=int).reshape(-1, len(labels))
    y_true = np.array([t for _, t in preds], dtype=int).reshape(-1, len(labels))
    ids = list(range(len(labels)))
    report = classification_report(y_true, y_pred, labels=ids, target_names=labels, output_dict=True,
                                   zero_division=0)
    occurring = [j for j in ids if y_true[:, j].any() or y_pred[:, j].any()]
    macro = f1_score(y_true, y_pred, labels=occurring, average="macro", zero_division=0) if occurring else 0.0
    return {"loss": loss, "accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(macro), "micro_f1": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
            "per_class": {name: {k: report[name][k] for k in ("precision", "recall", "f1-score", "support")}
                          for name in labels}}
