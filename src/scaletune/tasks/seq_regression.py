"""seq_regression: a real-valued score for a text or text pair (STS-B similarity, review stars, quality).

The text columns, text pairs and segment ids are seq_cls'; the head is one output (num_labels=1 with
`problem_type="regression"` in the model config, so a merged model scores so in plain transformers too), trained
with the squared error summed in float32 over the micro-batch and one target per example: the loop's division by
the examples of the whole optimizer step makes it the MSE that transformers' own regression loss takes."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..data.readers import WHERE, fields_of
from ..errors import DataError
from .base import pad_batch, register
from .seq_cls import SeqCls, _pick

_SCORE_COLUMNS = ("label", "score", "labels", "target", "rating")


@register("seq_regression")
class SeqRegression(SeqCls):
    def model_kwargs(self, labels: list[str] | None) -> dict:
        """One output, and the problem type that makes transformers (and a merged model) read it as a score."""
        return {"num_labels": 1, "problem_type": "regression"}

    def setup(self, records: list[dict], cfg: Any, source: str, key: str = "data.train") -> list[str] | None:
        """The text (and pair) columns and the score column; a regression run has no label set (None)."""
        self.pick_text_columns(records, cfg, source)
        self.label = _pick(records, cfg.data.label_column, _SCORE_COLUMNS, "score", "data.label_column", source)
        return None

    def record_target(self, record: dict, where: str, label2id: dict | None) -> float:
        if self.label not in record:
            raise DataError(f"{where}: no score column {self.label!r} (data.label_column); the record has "
                            f"{fields_of(record)}")
        return score_of(record[self.label], where, self.label)

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        # (pad_batch makes integer class ids): the targets are float32 scores, one an example
        batch = pad_batch([{**e, "labels": 0} for e in examples], pad_id)
        batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.float32)
        return batch

    def loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.forward(model, batch)
        return F.mse_loss(logits.float().squeeze(-1), batch["labels"].float(), reduction="sum"), logits

    def train_loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_sum(model, batch)  # (train.class_weights is refused for a regression)

    def predictions(self, logits: torch.Tensor, batch: dict) -> list:
        return list(zip(logits.float().squeeze(-1).tolist(), batch["labels"].tolist()))

    def example_outputs(self, logits: torch.Tensor, batch: dict) -> list:
        return [None] * len(logits)

    def example_line(self, pred: Any, extra: Any, record: dict, labels: list[str] | None) -> dict:
        """The text (and pair), the gold score as the record gives it, the predicted one, and their difference."""
        predicted, _ = pred
        # the record's score, not the batch's float32 copy of it: a file's 3.8 is written 3.8, not 3.799999952...
        gold = score_of(record.get(self.label), record.get(WHERE, "?"), self.label)
        line = {"text": record.get(self.text)}
        if self.pair:
            line["text_pair"] = record.get(self.pair)
        return {**line, "label": gold, "predicted": predicted, "error": predicted - gold}

    def metrics(self, preds: list, loss_sum: float, n_targets: int, labels: list[str] | None) -> dict:
        return regression_metrics(preds, loss_sum / max(n_targets, 1))


def score_of(value: Any, where: str, column: str) -> float:
    """A record's score as a finite float: a JSON number or a CSV cell's text ("3.8"); else a DataError."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # (a JSON integer beyond float's range, 1 followed by 400 zeros: not finite)
            number = math.inf
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        why = "not a finite number" if number is not None else "not a number"
        raise DataError(f"{where}: column {column!r} holds {value!r}, {why}; seq_regression's target is one "
                        "real-valued score an example")
    return number


def regression_metrics(preds: list, loss: float) -> dict:
    """Scores of (predicted, gold) pairs: loss (the MSE the loss summed), mse, rmse, mae, and Pearson's and
    Spearman's correlation (NaN where either side is constant or there are fewer than 2 examples: undefined)."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    pred = np.array([p for p, _ in preds], dtype=np.float64)
    gold = np.array([g for _, g in preds], dtype=np.float64)
    mse = float(np.mean((pred - gold) ** 2)) if len(pred) else math.nan
    defined = len(pred) >= 2 and np.ptp(pred) > 0 and np.ptp(gold) > 0
    return {"loss": loss, "mse": mse, "rmse": math.sqrt(mse),
            "mae": float(np.mean(np.abs(pred - gold))) if len(pred) else math.nan,
            "pearson": float(pearsonr(pred, gold).statistic) if defined else math.nan,
            "spearman": float(spearmanr(pred, gold).statistic) if defined else math.nan}
