"""dpo: Direct Preference Optimization (Rafailov et al. 2023) of a causal LM adapter on preference pairs.

The reference model is the same base with the adapter switched off (peft's `disable_adapter()`), so no second
model is held; its forward runs with dropout off (`reference_mode`), so its log-probabilities are fixed. Per
pair, with logp the summed log-probability of the answer's tokens (the prompt is context):
    reward(answer) = beta * (logp_policy(answer) - logp_reference(answer))
    loss = -log sigmoid(reward(chosen) - reward(rejected))
(train.dpo_loss: hinge and ipo change the loss of that margin, ipo on mean token log-probabilities; simpo and
orpo drop the reference: rewards are beta x mean token log-probabilities; simpo's loss is DPO's less a margin
gamma, orpo's the chosen answer's mean NLL plus beta x an odds-ratio term. train.dpo_sft_weight
adds the chosen answer's negative mean token log-probability.)
`loss_sum` returns the loss summed over the micro-batch's pairs and `count_targets` their number: the loop's
division by the pairs of the whole optimizer step makes the step's loss their mean at any micro-batch size.
Chosen and rejected of a pair are two rows of one forward. Eval reports the rewards besides the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from ..data.formats import FORMATS
from ..data.preference import FIELDS, layout, to_pair
from ..data.readers import WHERE
from ..data.render import to_segments
from ..errors import ConfigError, DataError
from ..trainable_state import unwrap
from .base import IGNORE, TRUNCATED, UNSTOPPED, pad_batch, register
from .causal_lm import CausalLM, _accepts_logits_to_keep, target_columns

log = logging.getLogger("scaletune")
REJECTED = "rejected_"  # prefix of the rejected answer's columns (input_ids, labels); the chosen's are unprefixed


class AnswerScoring(CausalLM):
    """What dpo and kto share: records in one layout of their own (`_layout`, their fields `_fields`), prompts
    rendered as causal_lm renders that layout, each answer scored by its whole log-probability."""

    _layout: Any = staticmethod(layout)
    _fields: dict = FIELDS
    _noun, _plural, _strings = "pair", "pairs", "prompt, chosen and rejected"

    def setup(self, records: list[dict], cfg: Any, source: str, key: str = "data.train") -> list[str] | None:
        # `format` is the causal_lm format the prompts are in: what `predict` reads this adapter's prompts as
        self.format = FORMATS[one_layout(records, key, self._layout, self._noun)]
        if cfg.data.chat_template is not None and not self.format.chat:
            raise ConfigError(f"data.chat_template: {source} holds plain-text {self._plural} ({self._strings} "
                              "strings), which no template renders (drop data.chat_template)")
        return None

    def check_eval(self, records: list[dict], cfg: Any, source: str) -> None:
        found = one_layout(records, "data.eval", self._layout, self._noun)
        if found != self.format.name:
            raise DataError(f"data.eval: {source} holds {found} {self._plural}, data.train {self.format.name} "
                            f"{self._plural}; the prompts would be rendered differently", hint="convert one of them")

    def ignored_fields(self, records: list[dict], key: str) -> str | None:
        unread = sorted({k for rec in records for k, v in rec.items()
                         if k != WHERE and v is not None and k not in self._fields[self.format.name]})
        return f"{key}: fields ignored by task {self.name}: {', '.join(unread)}" if unread else None

    def enable_chunked_loss(self, model: Any, autocast_dtype: torch.dtype | None = None) -> str | None:
        return f"task {self.name} scores each answer's log-probability as a whole"


@register("dpo")
class DPO(AnswerScoring):
    # train.dpo_beta, dpo_loss, simpo_gamma, dpo_sft_weight (`configure`); private: not data, so no dataset cache
    # keeps them
    _beta, _loss, _gamma, _sft = 0.1, "sigmoid", 0.5, 0.0

    def configure(self, cfg: Any) -> None:
        super().configure(cfg)
        t = cfg.train
        self._beta, self._loss, self._gamma, self._sft = t.dpo_beta, t.dpo_loss, t.simpo_gamma, t.dpo_sft_weight

    def encode(self, record: dict, tokenizer: Any, cfg: Any, label2id: dict | None) -> dict | None:
        """Both answers after the shared prompt (cut to data.max_prompt_length), cut at data.max_length from the
        end (the answers lose their ends, the prompt is kept); None if either has no target token left."""
        where = record.get(WHERE, "?")
        rows = [cut_prompt(*self.tokens(to_segments(side, tokenizer, where), tokenizer), cfg, tokenizer)
                for side in to_pair(record)]
        limit = cfg.data.max_length
        cut = [(ids[:limit], labels[:limit]) for ids, labels, _ in rows]
        if not all(any(lab != IGNORE for lab in labels[1:]) for _, labels in cut):
            return None
        (ids, labels), (r_ids, r_labels) = cut
        return {"input_ids": ids, "labels": labels, f"{REJECTED}input_ids": r_ids, f"{REJECTED}labels": r_labels,
                TRUNCATED: any(len(ids) > limit for ids, _, _ in rows),
                UNSTOPPED: rows[0][2] and len(rows[0][0]) <= limit}

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """The pairs' chosen answers as rows 0..n-1, their rejected ones as rows n..2n-1."""
        rejected = [{"input_ids": e[f"{REJECTED}input_ids"], "labels": e[f"{REJECTED}labels"]} for e in examples]
        chosen = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
        return pad_batch(chosen + rejected, pad_id)

    def loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed preference loss of the batch's pairs, each pair's [chosen reward, rejected reward]): rewards
        are beta x the answers' log-ratios (ipo: of their mean token log-probabilities; simpo, orpo: beta x the
        mean token log-probabilities themselves, there being no reference)."""
        reference = None
        if self._loss not in ("simpo", "orpo"):
            reference = reference_logps(model, batch)
        policy = answer_logps(model, batch)
        counts = (batch["labels"][:, 1:] != IGNORE).sum(1)
        scores = policy - reference if reference is not None else policy
        if self._loss in ("ipo", "simpo", "orpo"):
            scores = scores / counts
        n = len(policy) // 2
        rewards = self._beta * scores.view(2, n).T  # [pair, (chosen, rejected)]
        margin = rewards[:, 0] - rewards[:, 1]
        if self._loss == "hinge":
            loss = F.relu(1 - margin)
        elif self._loss == "ipo":
            loss = (margin / self._beta - 1 / (2 * self._beta)) ** 2
        elif self._loss == "simpo":
            loss = -F.logsigmoid(margin - self._gamma)
        elif self._loss == "orpo":  # log odds of p = exp(mean token log-probability): log p - log(1 - p)
            mean = scores.view(2, n)
            # (log(1 - p) as log(-expm1): exact near p = 1, where 1 - exp rounds to 0; kept finite at p = 1)
            log_not = torch.log(-torch.expm1(mean.clamp(max=-1e-7)))
            odds = (mean[0] - mean[1]) - (log_not[0] - log_not[1])
            loss = -mean[0] - self._beta * F.logsigmoid(odds)
        else:
            loss = -F.logsigmoid(margin)
        if self._sft:  # (the chosen answers are rows 0..n-1)
            loss = loss - self._sft * policy[:n] / counts[:n]
        return loss.sum(), rewards.detach()

    @staticmethod
    def count_targets(batch: dict) -> int:
        return len(batch["input_ids"]) // 2

    def predictions(self, logits: torch.Tensor, batch: dict) -> list:
        return logits.float().tolist()  # (each pair's two rewards, as `loss_sum` gives them)

    def example_outputs(self, logits: torch.Tensor | None, batch: dict) -> list:
        return [None] * self.count_targets(batch)

    def example_line(self, pred: Any, extra: Any, record: dict, labels: list[str] | None) -> dict:
        chosen, rejected = pred
        # the reward task's fields for a pair: one reader takes both tasks' lines; `correct` is what
        # reward_accuracy counts
        return {"chosen_reward": chosen, "rejected_reward": rejected, "reward_margin": chosen - rejected,
                "correct": chosen > rejected}

    def metrics(self, preds: list, loss_sum: float, n_targets: int, labels: list[str] | None) -> dict:
        n = max(len(preds), 1)
        margins = [c - r for c, r in preds]
        return {"loss": loss_sum / max(n_targets, 1), "reward_accuracy": sum(m > 0 for m in margins) / n,
                "reward_margin": sum(margins) / n, "chosen_reward": sum(c for c, _ in preds) / n,
                "rejected_reward": sum(r for _, r in preds) / n, "pairs": n_targets}


def cut_prompt(ids: list[int], labels: list[int], unstopped: bool, cfg: Any,
               tokenizer: Any) -> tuple[list[int], list[int], bool]:
    """`tokens`' result with the prompt (the tokens before the first target) cut to its last
    data.max_prompt_length tokens, a leading BOS kept in front of them: the end of a prompt is what the answer
    follows (TRL keeps it too)."""
    keep = cfg.data.max_prompt_length
    start = next((i for i, lab in enumerate(labels) if lab != IGNORE), len(labels))
    if keep is None or start <= keep:
        return ids, labels, unstopped
    lead = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
    cut = start - keep + lead  # (the prompt keeps `keep` tokens, BOS among them)
    return ids[:lead] + ids[cut:], labels[:lead] + labels[cut:], unstopped


def reference_logps(model: Any, batch: dict) -> torch.Tensor:
    """`answer_logps` of the reference: the base with the adapter switched off, without a gradient, and with its
    dropout off however the model is set (TRL turns dropout off too): the reference is a fixed baseline, so two
    scorings of one answer must agree, where a base with dropout > 0 would draw noise into every reward."""
    with torch.no_grad(), reference_mode(model):
        return answer_logps(model, batch)


@contextmanager
def reference_mode(model: Any) -> Iterator[None]:
    """`model`'s PEFT model with its adapter disabled and every module in eval mode for the block; each module's
    own train/eval flag is put back after it (set directly, not through train(): a module left in eval mode on
    purpose stays so). Eval mode only stops dropout here: the forward still runs on every rank, as ZeRO-3's
    gathers need, and gradient checkpointing, off in eval mode, has nothing to save under no_grad anyway."""
    inner = unwrap(None, model)
    modes = [(m, m.training) for m in inner.modules()]
    inner.eval()
    try:
        with inner.disable_adapter():
            yield
    finally:
        for module, training in modes:
            module.training = training


def answer_logps(model: Any, batch: dict) -> torch.Tensor:
    """Each row's summed log-probability of its target tokens (float32), from the logits of the positions
    that predict one (as causal_lm's loss takes them)."""
    labels = batch["labels"][:, 1:]
    keep = target_columns(batch["labels"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if _accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits[:, keep]
    return -F.cross_entropy(logits.float().transpose(1, 2), labels[:, keep], ignore_index=IGNORE,
                            reduction="none").sum(1)


def one_layout(records: list[dict], key: str, layout_of: Any = layout, what: str = "pair") -> str:
    """The layout every record of `records` is in (`layout_of`: data/preference.py's, or data/feedback.py's for
    task kto); a record in another is refused: plain strings and chats render their prompts differently."""
    first = layout_of(records[0])
    for rec in records[1:]:
        if (found := layout_of(rec)) != first:
            raise DataError(f"{key}: {rec.get(WHERE, '?')} is a {found} {what}, {records[0].get(WHERE, '?')} a "
                            f"{first} {what}; one run reads one layout", hint="convert one of them")
    return first
