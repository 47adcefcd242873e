"""causal_lm: supervised instruction tuning with prompt masking; eval = loss + perplexity."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..data.formats import get_format, to_segments
from ..data.readers import WHERE
from .base import IGNORE, Task, ce_sum, register


@register("causal_lm")
class CausalLM(Task):
    peft_task_type = "CAUSAL_LM"

    def auto_model_class(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def setup(self, records: list[dict], cfg: Any, source: str) -> list[str] | None:
        self.format = get_format(cfg.data.format, records, source)
        return None

    def encode(self, record: dict, tokenizer: Any, cfg: Any, label2id: dict | None) -> dict | None:
        segments = to_segments(self.format.convert(record), tokenizer, record.get(WHERE, "?"))
        ids: list[int] = []
        labels: list[int] = []
        bos = tokenizer.bos_token_id
        if bos is not None and not segments[0][0].startswith(tokenizer.bos_token or "\0"):
            ids.append(bos)
            labels.append(IGNORE)
        for text, trainable in segments:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            learn = trainable or cfg.data.train_on_prompt
            labels += piece if learn else [IGNORE] * len(piece)
        ids, labels = ids[: cfg.data.max_length], labels[: cfg.data.max_length]
        # After the shift, label[0] is never predicted; an example needs a target past position 0.
        if not any(lab != IGNORE for lab in labels[1:]):
            return None
        return {"input_ids": ids, "labels": labels}

    def loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**inputs, use_cache=False).logits
        # Shift so that position t predicts token t+1; packed rows carry their own shifted labels.
        labels = batch["labels"][:, 1:]
        return ce_sum(logits[:, :-1], labels), logits

    @staticmethod
    def count_targets(batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def metrics(self, preds: list, loss_sum: float, n_targets: int, labels: list[str] | None) -> dict:
        loss = loss_sum / max(n_targets, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": n_targets}
