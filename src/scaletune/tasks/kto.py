"""kto: Kahneman-Tversky Optimization (Ethayarajh et al. 2024) of a causal LM adapter on unpaired feedback.

Each example is a prompt, one answer and whether the answer is desirable; a preference pair is two examples, its
chosen answer desirable and its rejected one not (`examples_of`, as TRL's unpair_preference_dataset). As in task dpo, the reference is the
base with the adapter switched off and an answer's reward is r = beta x (logp_policy - logp_reference), logp the
summed log-probability of its tokens. The reference point z estimates the policy's KL from the reference:
    z = max(0, mean over the micro-batch of logp_policy - logp_reference of MISMATCHED rows)
a mismatched row being example i's prompt followed by example i+1's answer (cyclically), scored without a
gradient (z is a baseline, not something to optimise), beta-free. Then, with beta applied to r - z as in the
paper and TRL,
    desirable:   loss = kto_desirable_weight   x (1 - sigmoid(r - beta z))
    undesirable: loss = kto_undesirable_weight x (1 - sigmoid(beta z - r))
A micro-batch of one example has no mismatched row: alone, its z is 0 (rules.py refuses train.micro_batch_size 1, so
only an eval's or a shard's last micro-batch can be one). Over several processes (DDP, ZeRO) z is the mean over
every rank's mismatched rows of the micro-batch they run together (0 if none has one), as TRL gathers its KL estimate: a rank's loss
then does not depend on how the examples were dealt between ranks.
`loss_sum` returns the summed loss and `count_targets` the examples: the step's loss is their mean.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from ..data.feedback import FIELDS, layout, to_example, unpaired
from ..data.readers import WHERE
from ..data.render import to_segments
from .base import IGNORE, TRUNCATED, UNSTOPPED, pad_batch, register
from .dpo import AnswerScoring, answer_logps, cut_prompt, reference_logps

DESIRABLE = "desirable"  # column: 1 for a desirable answer, 0 for an undesirable one


@register("kto")
class KTO(AnswerScoring):
    # train.dpo_beta, kto_desirable_weight, kto_undesirable_weight, data.max_length (`configure`); private: no
    # dataset cache keeps them
    _beta, _w_desirable, _w_undesirable, _max_length = 0.1, 1.0, 1.0, None
    _layout: Any = staticmethod(layout)
    _fields: dict = FIELDS
    _noun, _plural, _strings = "feedback example", "examples", "prompt and completion"

    def configure(self, cfg: Any) -> None:
        super().configure(cfg)
        t = cfg.train
        self._beta, self._w_desirable, self._w_undesirable = t.dpo_beta, t.kto_desirable_weight, t.kto_undesirable_weight
        self._max_length = cfg.data.max_length

    def examples_of(self, record: dict) -> list[dict]:
        """A preference pair's two examples (chosen desirable, rejected not), as TRL's unpair; else the record.
        Unpaired as they are encoded, after the eval split: a pair's two answers stay on one side of it."""
        return unpaired(record)

    def encode(self, record: dict, tokenizer: Any, cfg: Any, label2id: dict | None) -> dict | None:
        """The prompt (cut to data.max_prompt_length) and answer cut at data.max_length from the end (the answer
        loses its end, the prompt is kept); None if no target token is left."""
        converted, desirable = to_example(record)
        ids, labels, unstopped = cut_prompt(*self.tokens(to_segments(converted, tokenizer, record.get(WHERE, "?")),
                                                         tokenizer), cfg, tokenizer)
        limit = cfg.data.max_length
        if not any(lab != IGNORE for lab in labels[1:limit]):
            return None
        return {"input_ids": ids[:limit], "labels": labels[:limit], DESIRABLE: int(desirable),
                TRUNCATED: len(ids) > limit, UNSTOPPED: unstopped and len(ids) <= limit}

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """The examples as rows 0..n-1 and their mismatched rows as n..2n-1: row n+i is example i's prompt with
        example i+1's answer (cyclically), cut at data.max_length as TRL cuts it. (Not at the examples' widest
        row: a long prompt followed by another example's long answer would lose the answer's end, and z, a mean
        of whole-answer log-ratios like the rewards it is compared with, would sum fewer tokens for it; measured
        on 4 tiny-Llama examples, 0 instead of TRL's 0.26. The gradient forward drops the extra padding.)"""
        rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
        width = self._max_length
        # (one example: its own answer stands in, scored and not used, so that every rank runs the same forwards,
        # which ZeRO-3 needs: its forwards gather each layer's weights from all ranks)
        rows += [_mismatched(e, examples[(i + 1) % len(examples)], width) for i, e in enumerate(examples)]
        batch = pad_batch(rows, pad_id)
        batch[DESIRABLE] = torch.tensor([e[DESIRABLE] for e in examples], dtype=torch.bool)
        return batch

    def loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed KTO loss of the batch's examples, each example's [reward, desirable, z])."""
        n = len(batch[DESIRABLE])
        reference = reference_logps(model, batch)
        with torch.no_grad():  # the mismatched rows' mean log-ratio, the policy's without a gradient too
            kl_policy = answer_logps(model, _rows(batch, slice(n, None)))
        # (one example: its stand-in row is no mismatched pair, so it adds no log-ratio)
        z = reference_point(kl_policy - reference[n:] if n > 1 else kl_policy[:0])
        # (the examples' rows without the padding only the wider mismatched rows need: right-padded, so the
        # columns past the widest example are padding alone)
        own = int(batch["attention_mask"][:n].sum(1).max())
        rewards = self._beta * (answer_logps(model, _rows(batch, slice(0, n), own)) - reference[:n])
        desirable = batch[DESIRABLE]
        loss = torch.where(desirable, self._w_desirable * (1 - torch.sigmoid(rewards - self._beta * z)),
                           self._w_undesirable * (1 - torch.sigmoid(self._beta * z - rewards)))
        return loss.sum(), torch.stack([rewards.detach(), desirable.to(rewards.dtype), z.expand(n)], 1)

    @staticmethod
    def count_targets(batch: dict) -> int:
        return len(batch[DESIRABLE])

    def predictions(self, logits: torch.Tensor, batch: dict) -> list:
        return logits.float().tolist()  # (each example's [reward, desirable, z], as `loss_sum` gives them)

    def example_outputs(self, logits: torch.Tensor | None, batch: dict) -> list:
        return [None] * self.count_targets(batch)

    def example_line(self, pred: Any, extra: Any, record: dict, labels: list[str] | None) -> dict:
        reward, desirable, z = pred
        return {"reward": reward, "desirable": bool(desirable), "kl": z}

    def metrics(self, preds: list, loss_sum: float, n_targets: int, labels: list[str] | None) -> dict:
        good = [r for r, d, _ in preds if d]
        bad = [r for r, d, _ in preds if not d]
        # (an eval with no example of one kind has no mean reward for it: NaN, as seq_regression's undefined
        # correlations, which best_metric never takes for a best; a 0 would read as a measured reward and win
        # undesirable_reward's min)
        good_mean = sum(good) / len(good) if good else math.nan
        bad_mean = sum(bad) / len(bad) if bad else math.nan
        return {"loss": loss_sum / max(n_targets, 1), "desirable_reward": good_mean, "undesirable_reward": bad_mean,
                "reward_margin": good_mean - bad_mean, "kl": sum(z for *_, z in preds) / max(len(preds), 1),
                "examples": n_targets}


def reference_point(log_ratios: torch.Tensor) -> torch.Tensor:
    """z = max(0, mean of `log_ratios`, the mismatched rows' policy-reference log-ratios), 0 with none. Launched
    over several processes, the mean is over every rank's rows: one all-reduce of (sum, count), which every rank
    makes once per micro-batch (the loop runs as many micro-batches on each, eval pads a rank that ran out with
    a one-example batch that joins with no rows), else the ranks would wait on each other for ever. No gradient
    flows through it (its rows are scored under no_grad; TRL detaches the gathered estimate too)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        if len(log_ratios) == 0:
            return torch.zeros((), device=log_ratios.device)
        return log_ratios.mean().clamp(min=0)  # (one process: as before, bit for bit)
    # float64: the count is exact and the sum of a few thousand log-ratios loses nothing
    total = torch.stack([log_ratios.detach().double().sum(),
                         log_ratios.new_tensor(len(log_ratios), dtype=torch.float64)])
    dist.all_reduce(total)
    # (no rank with a row: the sum is 0 and so is z; no host round trip to ask)
    return (total[0] / total[1].clamp(min=1)).clamp(min=0).to(log_ratios.dtype)


def _mismatched(prompt_of: dict, answer_of: dict, width: int | None) -> dict:
    """`prompt_of`'s prompt (the tokens before its first target) followed by `answer_of`'s answer, at most `width`
    tokens (None: all)."""
    start = _first_target(prompt_of["labels"])
    other = _first_target(answer_of["labels"])
    ids = prompt_of["input_ids"][:start] + answer_of["input_ids"][other:]
    labels = [IGNORE] * start + answer_of["labels"][other:]
    return {"input_ids": ids[:width], "labels": labels[:width]}


def _first_target(labels: list[int]) -> int:
    return next(i for i, lab in enumerate(labels) if lab != IGNORE)


def _rows(batch: dict, rows: slice, width: int | None = None) -> dict:
    """`batch`'s rows `rows` (its token tensors only), their first `width` columns (None: all)."""
    return {k: batch[k][rows, :width] for k in ("input_ids", "attention_mask", "labels")}
