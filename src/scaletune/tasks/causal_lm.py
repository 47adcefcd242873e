"""causal_lm: supervised instruction tuning with prompt masking; eval = loss + perplexity."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch

from ..data.formats import get_format, to_segments
from ..data.readers import WHERE
from .base import IGNORE, Task, ce_sum, pad_batch, register


@functools.lru_cache(maxsize=8)
def _accepts_by_class(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether the underlying transformers model can slice hidden states before its LM head."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    return _accepts_by_class(type(inner))


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

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        if "position_ids" in examples[0]:
            from ..data.packing import collate_packed  # (data.packing imports tasks.base)

            return collate_packed(examples, pad_id)
        return pad_batch(examples, pad_id)

    def loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        # Position t predicts token t+1. Only positions that have a target need logits: with prompt
        # masking that skips the vocabulary projection (and its float32 loss) for every prompt token.
        labels = batch["labels"][:, 1:]
        keep = (labels != IGNORE).any(0).nonzero().squeeze(1)
        if _accepts_logits_to_keep(model):
            logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        else:
            logits = model(**inputs, use_cache=False).logits[:, keep]
        return ce_sum(logits, labels[:, keep]), logits

    @staticmethod
    def count_targets(batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def metrics(self, preds: list, loss_sum: float, n_targets: int, labels: list[str] | None) -> dict:
        loss = loss_sum / max(n_targets, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": n_targets}
