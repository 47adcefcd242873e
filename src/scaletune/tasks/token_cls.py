"""token_cls: named-entity recognition; each word's label goes to its first sub-token."""

from __future__ import annotations

from typing import Any

import torch

from ..data.readers import WHERE
from ..errors import DataError
from .base import IGNORE, Task, ce_sum, collect_labels, register

_TOKEN_COLUMNS = ("tokens", "words")
_TAG_COLUMNS = ("tags", "ner_tags", "labels")


@register("token_cls")
class TokenCls(Task):
    peft_task_type = "TOKEN_CLS"

    def auto_model_class(self) -> Any:
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    def setup(self, records: list[dict], cfg: Any, source: str) -> list[str] | None:
        first = records[0]
        self.tokens = cfg.data.tokens_column or next((c for c in _TOKEN_COLUMNS if c in first), None)
        self.tags = cfg.data.tags_column or next((c for c in _TAG_COLUMNS if c in first), None)
        if self.tokens not in first or self.tags not in first:
            raise DataError(f"{first.get(WHERE, source)}: token_cls needs a word-list column ({_TOKEN_COLUMNS}) "
                            f"and a tag-list column ({_TAG_COLUMNS}), or a CoNLL file; found "
                            f"{sorted(k for k in first if k != WHERE)}")
        for rec in records:
            self._check(rec)
        if cfg.data.labels is not None:
            return [str(x) for x in cfg.data.labels]
        return collect_labels(records, self.tags, is_list=True)

    def _check(self, rec: dict) -> None:
        where = rec.get(WHERE, "?")
        words, tags = rec.get(self.tokens), rec.get(self.tags)
        if not isinstance(words, list) or not isinstance(tags, list):
            raise DataError(f"{where}: {self.tokens!r} and {self.tags!r} must be lists")
        if len(words) != len(tags):
            raise DataError(f"{where}: {len(words)} tokens but {len(tags)} tags")
        if not words:
            raise DataError(f"{where}: empty sentence")
        if not all(isinstance(w, str) and w for w in words):
            raise DataError(f"{where}: every token must be a non-empty string")

    def encode(self, record: dict, tokenizer: Any, cfg: Any, label2id: dict | None) -> dict | None:
        self._check(record)
        tags = record[self.tags]
        unknown = [t for t in tags if str(t) not in label2id]
        if unknown:
            raise DataError(f"{record.get(WHERE, '?')}: tag {unknown[0]!r} is not in the label set {list(label2id)}")
        enc = tokenizer(record[self.tokens], is_split_into_words=True, truncation=True,
                        max_length=cfg.data.max_length)
        labels, previous = [], None
        for word in enc.word_ids():
            labels.append(IGNORE if word is None or word == previous else label2id[str(tags[word])])
            previous = word
        return {"input_ids": enc["input_ids"], "labels": labels, "n_words": len(tags)}

    def loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return ce_sum(logits, batch["labels"]), logits

    def predictions(self, logits: torch.Tensor, batch: dict) -> list:
        out = []
        for pred, gold in zip(logits.argmax(-1).tolist(), batch["labels"].tolist()):
            keep = [(p, g) for p, g in zip(pred, gold) if g != IGNORE]
            out.append(([p for p, _ in keep], [g for _, g in keep]))
        return out

    def metrics(self, preds: list, loss_sum: float, n_targets: int, labels: list[str] | None) -> dict:
        from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

        y_pred = [[labels[i] for i in p] for p, _ in preds]
        y_true = [[labels[i] for i in g] for _, g in preds]
        report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
        return {"loss": loss_sum / max(n_targets, 1),
                "precision": precision_score(y_true, y_pred, zero_division=0),
                "recall": recall_score(y_true, y_pred, zero_division=0),
                "f1": f1_score(y_true, y_pred, zero_division=0),
                "token_accuracy": accuracy_score(y_true, y_pred),
                "per_type": {k: {m: float(v[m]) for m in ("precision", "recall", "f1-score", "support")}
                             for k, v in report.items() if k not in ("micro avg", "macro avg", "weighted avg")}}
