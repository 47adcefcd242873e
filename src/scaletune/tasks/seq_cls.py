"""seq_cls: text (or text pair) classification; the new head trains and saves with the adapter."""

from __future__ import annotations

from typing import Any

import torch

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


@register("seq_cls")
class SeqCls(Task):
    peft_task_type = "SEQ_CLS"
    id_names: list[str] | None = None  # integer labels: the name of each id (data.labels)

    def auto_model_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def setup(self, records: list[dict], cfg: Any, source: str, key: str = "data.train") -> list[str] | None:
        d = cfg.data
        self.text = _pick(records, d.text_column, _TEXT_COLUMNS, "text", "data.text_column", source)
        self.pair = d.text_pair_column
        if self.pair and self.pair not in records[0]:
            raise DataError(f"{source}: column {self.pair!r} (data.text_pair_column) not found")
        self.label = _pick(records, d.label_column, _LABEL_COLUMNS, "label", "data.label_column", source)
        if d.labels is not None:  # (the labels as given: data.labels may keep spellings apart that differ in spaces)
            # SST-2's 0/1 named by data.labels: [negative, positive]
            self.id_names = id_names_for(list({label_name(rec.get(self.label)) for rec in records}), d.labels)
            return [str(x) for x in d.labels]
        self.id_names = None
        labels = collect_labels(records, self.label, is_list=False)
        if len(labels) < 2:
            raise DataError(f"{source}: column {self.label!r} has a single label {labels}; need at least 2 classes")
        return labels

    def encode(self, record: dict, tokenizer: Any, cfg: Any, label2id: dict | None) -> dict | None:
        where = record.get(WHERE, "?")
        text = record.get(self.text)
        pair = record.get(self.pair) if self.pair else None
        for col, val in ((self.text, text), (self.pair, pair)):
            if col and col not in record:  # (an eval file of another shape: say so, not "got None")
                raise DataError(f"{where}: no column {col!r}; the record has {fields_of(record)}")
            if col and (not isinstance(val, str) or not val.strip()):
                raise DataError(f"{where}: column {col!r} must be a non-empty string, got {val!r}")
        label = record.get(self.label)
        name = named_by_id(label, self.id_names, where, "label") if label is not None else None
        if name not in label2id:
            raise unknown_label(where, "label", label, label2id)
        enc = tokenizer(text, pair, truncation=True, max_length=cfg.data.max_length)
        out = {"input_ids": enc["input_ids"], "labels": label2id[name],
               TRUNCATED: overflowed(enc, cfg.data.max_length)}
        if self.pair and "token_type_ids" in enc:
            # BERT-style segment ids mark the second text; predict and a plain transformers pipeline pass
            # them, so training and eval must see them too (a pair column is required on every record)
            out["token_type_ids"] = enc["token_type_ids"]
        return out

    def loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        segments = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **segments).logits
        return ce_sum(logits, batch["labels"]), logits

    @staticmethod
    def count_targets(batch: dict) -> int:
        return int(batch["labels"].numel())

    def predictions(self, logits: torch.Tensor, batch: dict) -> list:
        return list(zip(logits.argmax(-1).tolist(), batch["labels"].tolist()))

    def metrics(self, preds: list, loss_sum: float, n_targets: int, labels: list[str] | None) -> dict:
        from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

        y_pred = [p for p, _ in preds]
        y_true = [t for _, t in preds]
        ids = list(range(len(labels)))
        report = classification_report(y_true, y_pred, labels=ids, target_names=labels, output_dict=True,
                                       zero_division=0)
        # macro F1 averages the classes that occur (in the answers or the predictions): a class the eval set
        # lacks and nothing predicted would count as F1 0 and cap a perfect classifier below 1
        return {"loss": loss_sum / max(n_targets, 1), "accuracy": accuracy_score(y_true, y_pred),
                "macro_f1": f1_score(y_true, y_pred, average="macro", zero_division=0),
                "per_class": {name: {k: report[name][k] for k in ("precision", "recall", "f1-score", "support")}
                              for name in labels},
                # every class gets a row and a column, in label order, even one the eval set lacks
                "confusion_matrix": {"labels": list(labels),
                                     "counts": confusion_matrix(y_true, y_pred, labels=ids).tolist()}}
