"""What `predict` answers for a classifier's batch (labelling.py), on fixed logits: labels, best-first scores,
--top-k, multi-label thresholds and the "truncated" flag."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import BatchEncoding

from scaletune.labelling import classify, multi_labels, regress


class _Model:
    """A classifier that answers fixed logits (one row per input)."""

    def __init__(self, logits: list[list[float]], problem_type: str | None = None) -> None:
        self.logits, self.device = torch.tensor(logits), torch.device("cpu")
        self.config = SimpleNamespace(problem_type=problem_type)

    def __call__(self, **enc):
        return SimpleNamespace(logits=self.logits)


def _tokenizer(lengths: list[int]):
    """Encodes input i as `lengths[i]` tokens (no Rust encodings: a text filling max_length counts as cut)."""
    def encode(texts, pairs=None, **kwargs):
        width = max(lengths)
        return BatchEncoding({"input_ids": torch.ones(len(texts), width, dtype=torch.long),
                              "attention_mask": torch.tensor([[1] * n + [0] * (width - n) for n in lengths])})

    return encode


def test_top_k_lists_that_many_classes_best_first_ties_in_label_order():
    model = _Model([[0.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    given = [("a", None), ("b", None)]
    lines = classify(model, _tokenizer([3, 3]), ["x", "y", "z"], 8, given, top_k=3)
    assert [[s["label"] for s in line["scores"]] for line in lines] == [["y", "z", "x"], ["x", "y", "z"]]
    assert [line["label"] for line in lines] == ["y", "x"]
    assert lines[0]["score"] == pytest.approx(torch.tensor([0.0, 2.0, 1.0]).softmax(-1)[1].item())
    assert [len(line["scores"]) for line in classify(model, _tokenizer([3, 3]), ["x", "y", "z"], 8, given,
                                                     top_k=2)] == [2, 2]
    assert "scores" not in classify(model, _tokenizer([3, 3]), ["x", "y", "z"], 8, given)[0]


def test_multi_label_threshold_decides_as_eval_does():
    """A class is chosen where its sigmoid exceeds the threshold: a logit of exactly 0 (0.5) is not chosen by
    default, as eval decides it; --threshold moves the cut."""
    logits = torch.tensor([[0.0, math.log(0.4 / 0.6) + 1e-3, 2.0]])
    assert multi_labels(["a", "b", "c"], logits, [("t", None)], None)[0]["labels"] == ["c"]
    low = multi_labels(["a", "b", "c"], logits, [("t", None)], None, threshold=0.4)[0]
    assert low["labels"] == ["a", "b", "c"] and [s["label"] for s in low["scores"]] == ["c", "a", "b"]


def test_a_line_cut_at_max_length_says_truncated_for_every_head():
    given = [("short", None), ("long", None)]
    for lines in (regress(_Model([[0.5], [1.5]]), _tokenizer([3, 8]), 8, given),
                  classify(_Model([[0.0, 1.0], [1.0, 0.0]], "multi_label_classification"), _tokenizer([3, 8]),
                           ["a", "b"], 8, given)):
        assert ["truncated" in line for line in lines] == [False, True]
    assert [line["score"] for line in regress(_Model([[0.5], [1.5]]), _tokenizer([3, 8]), 8, given)] == [0.5, 1.5]
