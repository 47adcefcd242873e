"""What `predict` answers for the classifier tasks: seq_cls' labels and scores (single- or multi-label), token_cls'
tags and entities, seq_regression's scores, from one batch of inputs through the trained model."""

from __future__ import annotations

import math
from typing import Any

import torch

from . import predict_input


def classify(model: Any, tokenizer: Any, labels: list[str], max_length: int,
              given: list[tuple[str, str | None]], top_k: int | str | None = None,
              threshold: float | None = None) -> list[dict]:
    """{"text", "text_pair" (a pair model only), "label", "score"} for each (text, pair) input, "scores" (the
    `top_k` most probable classes, or all of them for "all", as {"label", "score"}, best first) when asked,
    and "truncated" when max_length cut it. A multi-label model's lines give "labels" and "scores" instead
    (`multi_labels`)."""
    from .tasks.base import overflowed

    texts = [text for text, _ in given]
    pairs = [pair for _, pair in given] if given[0][1] is not None else None  # (a pair model: every line has one)
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=True, padding_side="right",
                    return_tensors="pt")
    logits = model(**enc.to(model.device)).logits.float()
    if is_multi_label(model):
        return [{**line, **({"truncated": True} if overflowed(enc, max_length, i) else {})}
                for i, line in enumerate(multi_labels(labels, logits, given, top_k, threshold))]
    probs = logits.softmax(-1)
    k = probs.shape[-1] if top_k == "all" else min(top_k or 1, probs.shape[-1])
    # a stable sort puts the first of tied classes first, as max() picks it: "label" is "scores"' first entry.
    # One read-back of the batch's best labels and scores (two per line would wait on a GPU twice a line)
    scores, order = (t[:, :k].tolist() for t in probs.sort(dim=-1, descending=True, stable=True))
    out = []
    for i, ((text, pair), ids, top) in enumerate(zip(given, order, scores)):
        echo = {"text": text} if pair is None else {"text": text, "text_pair": pair}
        out.append({**echo, "label": labels[ids[0]], "score": top[0]})
        if top_k is not None:
            out[-1]["scores"] = [{"label": labels[j], "score": p} for j, p in zip(ids, top)]
        if overflowed(enc, max_length, i):  # (the model saw only the first max_length tokens: say so on the line)
            out[-1]["truncated"] = True
    return out


def regress(model: Any, tokenizer: Any, max_length: int, given: list[tuple[str, str | None]]) -> list[dict]:
    """{"text", "text_pair" (a pair model only), "score"} for each (text, pair) input of a seq_regression
    model, and "truncated" when max_length cut it."""
    from .tasks.base import overflowed

    texts = [text for text, _ in given]
    pairs = [pair for _, pair in given] if given[0][1] is not None else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=True, padding_side="right",
                    return_tensors="pt")
    scores = model(**enc.to(model.device)).logits.float()[:, 0].tolist()  # one read-back for the batch
    out = []
    for i, ((text, pair), score) in enumerate(zip(given, scores)):
        echo = {"text": text} if pair is None else {"text": text, "text_pair": pair}
        out.append({**echo, "score": score, **({"truncated": True} if overflowed(enc, max_length, i) else {})})
    return out


def is_multi_label(model: Any) -> bool:
    """Whether the classifier scores each class with a sigmoid of its own (saved in its config)."""
    return getattr(model.config, "problem_type", None) == "multi_label_classification"


def multi_labels(labels: list[str], logits: torch.Tensor, given: list[tuple[str, str | None]],
                  top_k: int | str | None, threshold: float | None = None) -> list[dict]:
    """A multi-label model's lines: "labels", every class whose sigmoid exceeds `threshold` (0.5) in label-set
    order, and "scores" for them (or for the `top_k` best classes, "all": every class, chosen or not), best
    first."""
    # the logit of the threshold: 0.5 is a logit above 0 exactly, as eval decides it (a float32 sigmoid rounds)
    cut = 0.5 if threshold is None else threshold
    chosen = (logits > math.log(cut / (1 - cut))).tolist()
    scores, order = (t.tolist() for t in logits.sigmoid().sort(dim=-1, descending=True, stable=True))
    out = []
    for (text, pair), picked, ids, probs in zip(given, chosen, order, scores):
        k = len(ids) if top_k == "all" else top_k if top_k is not None else sum(picked)
        out.append({"text": text, **({} if pair is None else {"text_pair": pair}),
                    "labels": [name for name, on in zip(labels, picked) if on],
                    "scores": [{"label": labels[j], "score": p} for j, p in zip(ids[:k], probs[:k])]})
    return out


def tag(model: Any, tokenizer: Any, labels: list[str], max_length: int, sentences: list[list[str]],
        split: bool = False) -> list[dict]:
    """{"tokens", "tags", "entities"} for each sentence, and "truncated_words" when max_length cut words off; a
    sentence split from raw text (predict_input.TextWords) also echoes its "text", and its entities give their
    character offsets in it. `split` (data.too_long: split): a longer sentence is tagged window by window, as
    training and eval saw it, and its tags stitched: no word is cut."""
    from .tasks.base import overflowed
    from .tasks.token_cls import tokenise_words, words_cut

    if split:
        return [tagged(words, tags) for words, tags in zip(sentences, _window_tags(model, tokenizer, labels,
                                                                                   max_length, sentences))]
    enc, labelled = tokenise_words(tokenizer, sentences, max_length, padding=True, padding_side="right",
                                   return_tensors="pt")
    preds = model(**enc.to(model.device)).logits.argmax(-1).tolist()
    out = []
    for i, (words, pred, word_ids) in enumerate(zip(sentences, preds, labelled)):
        tags = word_tags(word_ids, pred, labels, len(words))
        result = tagged(words, tags)
        n_cut = words_cut(word_ids, len(words), overflowed(enc, max_length, i))
        if n_cut:  # their "O" is not a prediction: say so on the line itself
            result["truncated_words"] = n_cut
        out.append(result)
    return out


def tagged(words: list[str], tags: list[str]) -> dict:
    """One sentence's output: its words, tags and entities; raw text's with the text and character offsets."""
    from .tasks.token_cls import entities
    from .tasks.words import char_entities

    found = entities(words, tags)
    if not isinstance(words, predict_input.TextWords):
        return {"tokens": words, "tags": tags, "entities": found}
    return {"text": words.text, "tokens": list(words), "tags": tags,
            "entities": char_entities(found, words.text, words.spans)}


def word_tags(word_ids: list, pred: list[int], labels: list[str], n_words: int) -> list[str]:
    """Each word's tag is its first sub-token's, placed by word index, so a word with no sub-tokens (a
    zero-width space) does not shift the words after it; it is tagged from its neighbours
    (token_cls.fill_blank_words). A word cut off by max_length is "O" (`infer.run_predict` reports cut words in the
    line's "truncated_words")."""
    from .tasks.token_cls import fill_blank_words

    tags: list[str | None] = [None] * n_words
    _place_tags(tags, word_ids, pred, labels)
    return fill_blank_words(tags)


def _place_tags(tags: list, word_ids: list, pred: list[int], labels: list[str]) -> None:
    """Write into `tags` (by word index) each word's tag: the prediction at its first sub-token."""
    for pos in reversed(range(len(word_ids))):  # (backwards: a word's first sub-token is written last)
        if word_ids[pos] is not None:
            tags[word_ids[pos]] = labels[pred[pos]]


def _window_tags(model: Any, tokenizer: Any, labels: list[str], max_length: int,
                 sentences: list[list[str]]) -> list[list[str]]:
    """Each sentence's tags from its data.too_long: split windows (token_cls.word_windows), as many windows a
    forward as there are sentences: each word's from its first sub-token in its window, a word of no sub-token from its neighbours across
    the windows, as eval scores the stitched sentence."""
    from .tasks.base import IGNORE, pad_batch
    from .tasks.token_cls import fill_blank_words, word_windows

    windows = [(i, w) for i, words in enumerate(sentences) for w in word_windows(tokenizer, list(words), max_length)]
    preds: list = []
    step = len(sentences)  # (windows a forward, as many as the lines: a long document is not one huge batch)
    for at in range(0, len(windows), step):
        batch = pad_batch([{"input_ids": ids, "labels": [IGNORE] * len(ids)}
                           for _, (_, _, ids, _, _) in windows[at:at + step]], tokenizer.pad_token_id)
        preds += model(input_ids=batch["input_ids"].to(model.device),
                       attention_mask=batch["attention_mask"].to(model.device)).logits.argmax(-1).tolist()
    tags: list[list[str | None]] = [[None] * len(words) for words in sentences]
    for (i, (_, _, _, word_ids, _)), pred in zip(windows, preds):
        _place_tags(tags[i], word_ids, pred, labels)
    return [fill_blank_words(t) for t in tags]
