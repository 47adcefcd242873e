"""reward: a reward model (TRL's RewardTrainer, LLaMA-Factory's `stage: rm`) trained on preference pairs.

The base is a causal LM loaded as a sequence classifier with one output (AutoModelForSequenceClassification,
num_labels=1): its new `score` head is trained in full beside the adapter and saved with it (peft's
modules_to_save, as seq_cls' head). The data is task dpo's: the same layouts (data/preference.py), and each pair's
chosen and rejected rows are the very token sequences dpo builds (`DPO.encode`: the prompt rendered as dpo renders
it, cut as dpo cuts it). A row's reward r is the head's output at its last non-pad token, picked as plain
transformers picks it (the rightmost token that is not the pad id; rows are right-padded), so a merged model
scores in plain transformers (and TRL) as training did. With pad = eos a row's closing eos counts as padding and
its reward is read at the token before it, in training, eval, predict and a merged model alike. Per pair:
    loss = -log sigmoid(r_chosen - r_rejected - m) + c * (r_chosen + r_rejected)^2
m being the pair's `margin` field where it has one (0 otherwise; TRL's RewardTrainer's margin column, as in
Llama 2's reward models: how much better the chosen answer is, so a clearer preference must be won by more),
c train.reward_center_weight (TRL's center_rewards_coefficient, default 0), which keeps the rewards near 0.
`loss_sum` sums over the micro-batch's pairs and `count_targets` counts them: the loop's division makes the step's
loss their mean. Eval: the loss, accuracy (the share of pairs with r_chosen > r_rejected), the mean margin and the
mean chosen and rejected rewards. `predict` scores one prompt + answer a line: {"reward": r}.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..data.preference import FIELDS, one_answer
from ..data.readers import WHERE, fields_of
from ..data.render import to_segments
from ..errors import DataError
from .base import IGNORE, pad_batch, register
from .dpo import DPO, cut_prompt

MARGIN = "margin"  # a pair's field (and column): how much the chosen answer's reward must beat the rejected's by

_CHAT = ("sharegpt", "messages")  # layouts rendered as a chat (the others: plain text, no template)
_TEXT_SHAPE = '{"prompt": TEXT, "completion": TEXT} (plain-text pairs)'
_CHAT_SHAPES = ('a chat ending in the answer: {"messages": [..., {"role": "assistant", ...}]}, {"conversations": '
                '[..., {"from": "gpt", ...}]} or {"prompt": [messages], "completion": [{"role": "assistant", ...}]}')
_PREDICT_SHAPES = f"{_TEXT_SHAPE}, or {_CHAT_SHAPES}"


@register("reward")
class Reward(DPO):
    peft_task_type = "SEQ_CLS"  # (peft then trains and saves the `score` head in full: modules_to_save)
    _fields = {layout: fields | {MARGIN} for layout, fields in FIELDS.items()}
    _center = 0.0  # train.reward_center_weight (`configure`); private: not data, so no dataset cache keeps it

    def auto_model_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self, labels: list[str] | None) -> dict:
        """One output: the reward (no problem_type: a reward model has no targets of its own to regress on)."""
        return {"num_labels": 1}

    def configure(self, cfg: Any) -> None:
        self._center = cfg.train.reward_center_weight

    def enable_chunked_loss(self, model: Any, autocast_dtype: torch.dtype | None = None) -> str | None:
        return None  # (a head of one output holds no vocabulary-sized logits to chunk: nothing to say)

    @staticmethod
    def rewards(model: Any, batch: dict) -> torch.Tensor:
        """Each row's reward (float32): the head's output at the row's last non-pad token (transformers picks it
        by the model config's pad_token_id, which load_model sets to the tokenizer's, the collator's pad)."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits.float().squeeze(-1)

    def encode(self, record: dict, tokenizer: Any, cfg: Any, label2id: dict | None) -> dict | None:
        """dpo's rows of the pair, and its margin (0.0 without one); a DataError naming the record's place if
        the margin is no finite number."""
        row = super().encode(record, tokenizer, cfg, label2id)
        return None if row is None else {**row, MARGIN: pair_margin(record)}

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        batch = super().collate(examples, pad_id)
        batch[MARGIN] = torch.tensor([e[MARGIN] for e in examples], dtype=torch.float32)
        return batch

    def loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed pairwise loss of the batch's pairs, each pair's [chosen reward, rejected reward]); the chosen
        rows are 0..n-1, the rejected n..2n-1 (`DPO.collate`)."""
        rewards = self.rewards(model, batch)
        n = len(rewards) // 2
        pairs = rewards.view(2, n).T  # [pair, (chosen, rejected)]
        loss = -F.logsigmoid(pairs[:, 0] - pairs[:, 1] - batch[MARGIN].to(pairs.device))
        if self._center:
            loss = loss + self._center * pairs.sum(1) ** 2
        return loss.sum(), pairs.detach()

    def metrics(self, preds: list, loss_sum: float, n_targets: int, labels: list[str] | None) -> dict:
        return reward_metrics(preds, loss_sum / max(n_targets, 1), n_targets)

    # --- predict ---
    def predict_input(self, item: dict, tokenizer: Any) -> tuple[str, list]:
        """(the answer, to echo; the segments of its row) for one predict line: a prompt and one answer,
        rendered as training rendered a pair's side. A DataError naming the line's place if it holds no answer,
        or if it is plain text where the adapter was trained on chats (or the other way round)."""
        where = item.get(WHERE, "?")
        rec, kind = _as_answer_record(item)
        trained = self.format.name
        if (kind in _CHAT) != (trained in _CHAT):
            said = "a chat" if kind in _CHAT else "plain text"
            was = "chats (rendered with the chat template)" if trained in _CHAT else "plain-text pairs (no template)"
            # (the hint names only the rendering it was trained on: the other is what was just refused)
            raise DataError(f"{where}: the line is {said}, but this reward model was trained on {was}: its "
                            "rewards would be read from text it never saw",
                            hint=f"give {_CHAT_SHAPES if trained in _CHAT else _TEXT_SHAPE}")
        try:
            side = one_answer(rec, kind)
        except DataError as exc:  # (worded for a training pair: the line's answer is no field `chosen` here)
            raise DataError([p.replace("field 'chosen'", "the answer to score").replace(
                "(nothing to learn from)", "(nothing to score)") for p in exc.problems],
                hint=exc.hint or f"give {_PREDICT_SHAPES}") from None
        answer = side["segments"][-1][0] if "segments" in side else side["messages"][-1]["content"]
        return answer, to_segments(side, tokenizer, where)

    def score_rows(self, model: Any, tokenizer: Any, cfg: Any, inputs: list[tuple[str, list]]) -> list[dict]:
        """{"reward": r} for each (answer, segments) of `inputs` (one batch), its row cut as training cuts one
        (data.max_prompt_length, then data.max_length from the end), "truncated": true where that cut it."""
        rows, cut, unscored = [], [], []
        limit = cfg.data.max_length
        for _, segments in inputs:
            ids, labels, _ = cut_prompt(*self.tokens(segments, tokenizer), cfg, tokenizer)
            cut.append(len(ids) > limit)
            # (a prompt filling max_length leaves no answer token: every answer to it would get one reward, the
            # prompt's; training skips such a pair, as `DPO.encode`)
            unscored.append(not any(lab != IGNORE for lab in labels[1:limit]))
            rows.append({"input_ids": ids[:limit], "labels": labels[:limit]})
        batch = pad_batch(rows, tokenizer.pad_token_id)
        device = next(model.parameters()).device
        scores = self.rewards(model, {k: v.to(device) for k, v in batch.items()}).tolist()
        why = (f"the prompt fills data.max_length={limit} tokens: no token of the answer is left to score (raise "
               "data.max_length, or set data.max_prompt_length)")
        return [{"reward": None, "truncated": True, "unscored": why} if u else
                {"reward": r, **({"truncated": True} if c else {})} for r, c, u in zip(scores, cut, unscored)]


def reward_metrics(preds: list, loss: float, n_pairs: int) -> dict:
    """Scores of (chosen reward, rejected reward) pairs: loss, accuracy (the share of pairs whose chosen answer
    gets the higher reward; a tie is no win), reward_margin (the mean chosen - rejected) and the mean rewards."""
    n = max(len(preds), 1)
    margins = [c - r for c, r in preds]
    return {"loss": loss, "accuracy": sum(m > 0 for m in margins) / n, "reward_margin": sum(margins) / n,
            "chosen_reward": sum(c for c, _ in preds) / n, "rejected_reward": sum(r for _, r in preds) / n,
            "pairs": n_pairs}


def pair_margin(record: dict) -> float:
    """Pair `record`'s `margin` (0.0 where it has none, or null: a table row of a pair without one); a DataError
    naming its place if it is not a finite number (a string, a bool, a list)."""
    value = record.get(MARGIN)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise DataError(f"{record.get(WHERE, '?')}: `margin` must be a finite number (how much the chosen answer's "
                        f"reward must beat the rejected one's by), not {value!r}"[:300],
                        hint="give a number such as 1.5, or leave the field out for no margin")
    return float(value)


def _as_answer_record(item: dict) -> tuple[dict, str]:
    """A predict line as (a pair record holding one answer, `chosen`; its layout), for `one_answer`."""
    where = item.get(WHERE, "?")
    for key, role, name in (("messages", "role", "assistant"), ("conversations", "from", "gpt")):
        turns = item.get(key)
        if turns is None:
            continue
        last = turns[-1] if isinstance(turns, list) and turns else None
        if not (isinstance(last, dict) and last.get(role) in (name, "assistant")):
            raise DataError(f"{where}: {key!r} must end in the answer to score, an assistant turn ({role}: {name})",
                            hint=f"give {_PREDICT_SHAPES}")
        if key == "messages":
            return {**item, "prompt": turns[:-1], "chosen": [last]}, "messages"
        return {**item, "conversations": turns[:-1], "chosen": last}, "sharegpt"
    prompt, answer = item.get("prompt"), item.get("completion")
    if isinstance(prompt, str) and isinstance(answer, str):
        return {"prompt": prompt, "chosen": answer, WHERE: where}, "prompt_completion"
    if isinstance(prompt, list) and isinstance(answer, (list, dict)):
        return {"prompt": prompt, "chosen": answer, WHERE: where}, "messages"
    raise DataError(f"{where}: no prompt and answer to score (the line has: {fields_of(item)})",
                    hint=f"give {_PREDICT_SHAPES}")

