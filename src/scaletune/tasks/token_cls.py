"""token_cls: named-entity recognition; each word's label goes to its first sub-token.

Words past `data.max_length` get no sub-token, so the model never sees them. Training simply has no
targets there; evaluation still scores them, as predicted "O" (what `predict` outputs for them), so
recall is measured on the whole sentence the way a user would measure it, not on the part that fit.
A word the tokenizer gives no sub-token at all (a zero-width space) is tagged from its neighbours
(`fill_blank_words`): inside the entity when the words on both sides are one entity going on, else "O";
eval scores it so, in its place, as `predict` tags it.
With data.too_long: split, a sentence longer than max_length is cut at word boundaries into windows
(`word_windows`), each an example; eval scores, and `predict` tags, each sentence whole, its windows' words
stitched in order, so an entity across a window boundary is one entity and no word is cut.
A tokenizer whose word-start mark comes from the space before a word (byte-level BPE: GPT-2, RoBERTa, Llama 3,
Qwen 2; Gemma) is given each word with a space before it (`word_inputs`), in training, eval and `predict` alike, so
every word is tokenised in its word-start ("Ġ", "▁") form.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ..data.readers import WHERE, fields_of
from ..errors import ConfigError, DataError
from .base import (
    IGNORE,
    TOO_LONG,
    TRUNCATED,
    Task,
    ce_sum,
    collect_labels,
    id_names_for,
    named_by_id,
    overflowed,
    pad_batch,
    register,
    unknown_label,
)
from .words import cjk_char_level

_TOKEN_COLUMNS = ("tokens", "words")
_TAG_COLUMNS = ("tags", "ner_tags", "labels")


_LIST_COLUMNS = ("cut_tags", "blank_at", "blank_tags")  # eval-only lists of word ids / tags, padded by collate


@register("token_cls")
class TokenCls(Task):
    peft_task_type = "TOKEN_CLS"
    # (`window`: data.too_long: split's index of the example among its sentence's windows)
    eval_only_columns = (*_LIST_COLUMNS, "window")
    id_names: list[str] | None = None  # integer tags: the name of each id (data.labels)
    # training's Chinese/Japanese words are single characters (True), longer (False), or absent (None):
    # `predict` splits raw text so (words.cjk_char_level); an adapter's scaletune.json keeps it
    cjk_chars: bool | None = None

    def auto_model_class(self) -> Any:
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    def setup(self, records: list[dict], cfg: Any, source: str, key: str = "data.train") -> list[str] | None:
        first = records[0]
        self.tokens = cfg.data.tokens_column or next((c for c in _TOKEN_COLUMNS if c in first), None)
        self.tags = cfg.data.tags_column or next((c for c in _TAG_COLUMNS if c in first), None)
        if self.tokens not in first or self.tags not in first:
            raise DataError(f"{first.get(WHERE, source)}: token_cls needs a word-list column ({_TOKEN_COLUMNS}) "
                            f"and a tag-list column ({_TAG_COLUMNS}), or a CoNLL file; found "
                            f"{sorted(k for k in first if k != WHERE)}")
        for rec in records:
            self._check(rec)
        if key == "data.train":  # (an eval file keeps the adapter's: predict splits raw text by training's words)
            self.cjk_chars = cjk_char_level(rec[self.tokens] for rec in records)
        found = collect_labels(records, self.tags, is_list=True)
        self.id_names = id_names_for(found, cfg.data.labels)  # HF datasets' ner_tags: ids into data.labels' names
        if cfg.data.labels is not None:
            return [str(x) for x in cfg.data.labels]
        if all(tag.isdecimal() for tag in found):  # seqeval would read "1" as an entity type with no B-/I- prefix: every score would be 0
            raise DataError(f"{source}: the tags in column {self.tags!r} are integer ids ({', '.join(found[:6])}"
                            f"{', ...' if len(found) > 6 else ''}); entity scores need the tag names: set "
                            "data.labels to them in id order, e.g. data.labels: [O, B-PER, I-PER, B-LOC, I-LOC]")
        return found

    def _check(self, rec: dict) -> None:
        where = rec.get(WHERE, "?")
        words, tags = rec.get(self.tokens), rec.get(self.tags)
        for col in (self.tokens, self.tags):
            if col not in rec:  # (an eval file of another shape: say so, not "must be lists")
                raise DataError(f"{where}: no column {col!r}; the record has {fields_of(rec)}")
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
        tags = [named_by_id(t, self.id_names, record.get(WHERE, "?"), "tag") for t in record[self.tags]]
        unknown = [t for t, name in zip(record[self.tags], tags) if name not in label2id]
        if unknown:
            raise unknown_label(record.get(WHERE, "?"), "tag", unknown[0], label2id)
        if cfg.data.too_long == "split":
            return self._windows(record[self.tokens], tags, tokenizer, cfg.data.max_length, label2id)
        enc, (word_ids,) = tokenise_words(tokenizer, [record[self.tokens]], cfg.data.max_length)
        cut = overflowed(enc, cfg.data.max_length)
        labels = _word_labels(word_ids, tags, label2id)
        n_cut = words_cut(word_ids, len(tags), cut)
        # only the cut words' gold tags travel with the example (most sentences fit: an empty list)
        cut_tags = [label2id[t] for t in tags[len(tags) - n_cut:]]
        return {"input_ids": enc["input_ids"][0], "labels": labels, "cut_tags": cut_tags,
                **_blank_words(word_ids, tags, label2id, 0, len(tags) - n_cut), TRUNCATED: cut}

    @staticmethod
    def _windows(words: list[str], tags: list[str], tokenizer: Any, max_length: int,
                 label2id: dict) -> list[dict]:
        """data.too_long: split's examples of one sentence, one per `word_windows` window: labelled as a whole
        sentence is, nothing cut (`cut_tags` empty), `window` its index; the first says the sentence was too
        long (TOO_LONG) where there are more, and a window holding part of one over-long word is TRUNCATED."""
        windows = word_windows(tokenizer, words, max_length)
        out = []
        for k, (start, end, ids, word_ids, cut) in enumerate(windows):
            out.append({"input_ids": ids, "labels": _word_labels(word_ids, tags, label2id), "cut_tags": [],
                        **_blank_words(word_ids, tags, label2id, start, end), "window": k,
                        TRUNCATED: cut, TOO_LONG: k == 0 and len(windows) > 1})
        return out

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """`pad_batch` plus `cut_tags`, `blank_at` and `blank_tags` (padded with IGNORE), which eval needs to
        score the words the model never saw, and each example's `window` (0 unless split), to stitch sentences."""
        batch = pad_batch(examples, pad_id)
        if not any(key in examples[0] for key in self.eval_only_columns):
            return batch  # a training batch: the training split does not keep them (build_datasets)
        for key in _LIST_COLUMNS:
            batch[key] = _pad_lists([e.get(key) or [] for e in examples])
        batch["window"] = torch.tensor([e.get("window", 0) for e in examples], dtype=torch.long)
        return batch

    def eval_warning(self, dataset: Any, labels: list[str] | None, cfg: Any) -> str | None:
        counts = truncation_counts([[scoring_tag(labels[i]) for i in cut] for cut in dataset["cut_tags"]])
        if not counts["sentences_truncated"]:
            return None
        return (f"token_cls: {counts['sentences_truncated']} of {len(dataset)} eval sentences exceed "
                f"data.max_length={cfg.data.max_length} sub-tokens; their {counts['words_truncated']} words beyond "
                f"it are scored as \"O\", so {counts['entities_truncated']} gold entities that reach past it count "
                "as missed (raise data.max_length to score them)")

    def loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self._loss(model, batch, None, 0.0)

    def train_loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self._loss(model, batch, self._class_weights, self._label_smoothing)

    @staticmethod
    def _loss(model: Any, batch: dict, weights: torch.Tensor | None,
              smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed cross-entropy of the labelled sub-tokens, each times its tag's weight if `weights`, with label
        smoothing `smoothing`; logits)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return ce_sum(logits, batch["labels"], weights, smoothing), logits

    def predictions(self, logits: torch.Tensor, batch: dict) -> list:
        """Per example: (predicted ids of the words in the window, their gold ids, gold ids of the cut words,
        its index among its sentence's windows: `stitched` joins them). A window word with no sub-token has the
        prediction None, in its place among the others."""
        out = []
        for pred, gold, cut, blank_at, blank_tags, window in zip(
                logits.argmax(-1).tolist(), batch["labels"].tolist(), batch["cut_tags"].tolist(),
                batch["blank_at"].tolist(), batch["blank_tags"].tolist(), batch["window"].tolist()):
            keep = [(p, g) for p, g in zip(pred, gold) if g != IGNORE]
            words_pred, words_gold = [p for p, _ in keep], [g for _, g in keep]
            # ascending word positions: inserting each at its own index leaves the earlier ones in place
            for at, tag in zip(blank_at, blank_tags):
                if at != IGNORE:
                    words_pred.insert(at, None)
                    words_gold.insert(at, tag)
            out.append((words_pred, words_gold, [t for t in cut if t != IGNORE], window))
        return out

    def joined_examples(self, records: list[dict], examples: list[tuple]) -> tuple[list[dict], list[tuple]]:
        """One (record, (prediction, extra)) per sentence: data.too_long: split's windows `stitched`."""
        starts = [i for i, (pred, _) in enumerate(examples) if not pred[3]]
        preds = stitched([pred for pred, _ in examples])
        return [records[i] for i in starts], [(pred, examples[i][1]) for pred, i in zip(preds, starts)]

    def example_line(self, pred: Any, extra: Any, record: dict, labels: list[str] | None) -> dict:
        """The words, their gold tags and the tags as eval scored them (a word past max_length "O", one with no
        sub-token its neighbours'), whether every tag agrees, and "truncated_words" where max_length cut words
        off: their "O" is no prediction of the model's, as `predict`'s line for the same words says."""
        words_pred, words_gold, cut, *_ = pred
        predicted = fill_blank_words([None if i is None else labels[i] for i in words_pred]) + ["O"] * len(cut)
        gold = [labels[i] for i in words_gold + cut]
        line = {"tokens": record.get(self.tokens), "tags": gold, "predicted": predicted, "correct": predicted == gold}
        if cut:
            line["truncated_words"] = len(cut)
        return line

    def metrics(self, preds: list, loss_sum: float, n_targets: int, labels: list[str] | None) -> dict:
        from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

        # every gold word is scored as `predict` tags it: a word cut off by max_length is predicted "O", one
        # with no sub-token (None) takes its neighbours' entity (fill_blank_words)
        names = [scoring_tag(name) for name in labels]
        preds = stitched(preds)  # (data.too_long: split: each sentence scored whole, as `predict` tags it)
        y_pred = [fill_blank_words([None if i is None else names[i] for i in p]) + ["O"] * len(cut)
                  for p, _, cut in preds]
        y_true = [[names[i] for i in g + cut] for _, g, cut in preds]
        report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
        return {"loss": loss_sum / max(n_targets, 1),
                "precision": precision_score(y_true, y_pred, zero_division=0),
                "recall": recall_score(y_true, y_pred, zero_division=0),
                "f1": f1_score(y_true, y_pred, zero_division=0),
                "token_accuracy": accuracy_score(y_true, y_pred),
                "per_type": {k: {m: float(v[m]) for m in ("precision", "recall", "f1-score", "support")}
                             for k, v in report.items() if k not in ("micro avg", "macro avg", "weighted avg")},
                **truncation_counts([[names[i] for i in cut] for _, _, cut in preds])}


_BARE_SPACES = ("Ġ", "▁")  # a space alone, as byte-level BPE and SentencePiece vocabularies write it
_SPACE_MARKS_WORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> space_marks_words
_BARE_SPACE_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> bare_space_ids


def tokenise_words(tokenizer: Any, sentences: list[list[str]], max_length: int | None,
                   **kwargs: Any) -> tuple[Any, list]:
    """Sentences given as word lists, tokenised as training, eval and `predict` all do (so a tagger sees at
    predict time the ids it was trained on): each word in its word-start form (`word_inputs`), cut at
    `max_length` (None: whole, for `word_windows`). Returns the batch encoding (`kwargs`: padding, tensors) and
    each sentence's word ids with a bare-space first sub-token left out (`labelled_word_ids`): where a word's
    label sits and its tag is read."""
    if not getattr(tokenizer, "is_fast", False):  # (else a ValueError traceback from the first record's word_ids())
        raise ConfigError(f"task token_cls: the tokenizer ({type(tokenizer).__name__}) is a Python (slow) one, which "
                          "cannot say which word each token comes from (word_ids); token_cls needs a fast tokenizer",
                          hint="use a model whose tokenizer has a fast (Rust, tokenizer.json) version")
    # (a raw-text line's TextWords as a plain list: the tokenizer takes lists of str; verbose: a sentence tokenised
    # whole for `word_windows` may exceed the tokenizer's model_max_length, which its windows never do, and
    # transformers would warn that it "will result in indexing errors")
    enc = tokenizer([word_inputs(tokenizer, list(words)) for words in sentences], is_split_into_words=True,
                    truncation=max_length is not None, max_length=max_length, verbose=max_length is not None,
                    **kwargs)
    ids = enc["input_ids"]
    return enc, [labelled_word_ids(tokenizer, ids[i].tolist() if hasattr(ids[i], "tolist") else ids[i],
                                   enc.word_ids(i)) for i in range(len(sentences))]


def word_windows(tokenizer: Any, words: list[str], max_length: int) -> list[tuple[int, int, list[int], list, bool]]:
    """data.too_long: split's windows of one sentence: (first word, end word (exclusive), input ids, labelled
    word ids, whether a word lost sub-tokens), consecutive and each at most `max_length` ids. The sentence is
    tokenised whole and cut at word boundaries, each window its words' ids between the sentence's special tokens,
    so every word has exactly the ids (and label place) it has unsplit. A sentence that fits is one window; a word
    whose sub-tokens alone exceed a window is a window of its own with its first ones (its label is on the first)."""
    enc, (labelled,) = tokenise_words(tokenizer, [words], None)
    ids, raw = enc["input_ids"][0], enc.word_ids(0)
    if len(ids) <= max_length:
        return [(0, len(words), ids, labelled, False)]
    spans: dict[int, tuple[int, int]] = {}  # word -> its sub-tokens' positions [start, end)
    for pos, word in enumerate(raw):
        if word is not None:
            spans[word] = (spans.get(word, (pos, pos))[0], pos + 1)
    head = min(start for start, _ in spans.values())  # special tokens before the words, and after them
    tail = max(end for _, end in spans.values())
    room = max_length - head - (len(ids) - tail)
    if room < 1:
        raise ConfigError(f"data.max_length={max_length} leaves no room for a word beside the tokenizer's "
                          f"{head + len(ids) - tail} special tokens", hint="raise data.max_length")
    bounds, used = [0], 0  # first word of each window; a word of no sub-token stays in the window before it
    for word in range(len(words)):
        size = spans[word][1] - spans[word][0] if word in spans else 0
        if used and size and used + size > room:
            bounds.append(word)
            used = 0
        used += size
    out = []
    for start, end in zip(bounds, bounds[1:] + [len(words)]):
        inside = [spans[w] for w in range(start, end) if w in spans]
        lo, hi = inside[0][0], inside[-1][1]
        keep = min(hi, lo + room)
        out.append((start, end, ids[:head] + ids[lo:keep] + ids[tail:],
                    labelled[:head] + labelled[lo:keep] + labelled[tail:], keep < hi))
    return out


def _word_labels(word_ids: list, tags: list[str], label2id: dict) -> list[int]:
    """Each token's label: its word's tag id on the word's first (labelled) sub-token, IGNORE elsewhere."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORE if word is None or word == previous else label2id[tags[word]])
        previous = word
    return labels


def _blank_words(word_ids: list, tags: list[str], label2id: dict, start: int, end: int) -> dict:
    """Words start..end (exclusive) with no sub-token (a zero-width space), which `_word_labels` cannot label:
    their places among those words and gold tags travel with the example, so eval scores them in place (an
    entity they sit in is broken, as in `predict`)."""
    seen = set(word_ids)
    blank_at = [i - start for i in range(start, end) if i not in seen]
    return {"blank_at": blank_at, "blank_tags": [label2id[tags[start + i]] for i in blank_at]}


def stitched(preds: list[tuple]) -> list[tuple]:
    """`TokenCls.predictions` rows joined per sentence, in dataset order: a row whose window index (4th) is
    above 0 continues the sentence of the row before (data.too_long: split), its words after that row's.
    (predicted, gold, cut) per sentence."""
    out: list[tuple] = []
    for row in preds:
        if len(row) > 3 and row[3] and out:
            out[-1] = (out[-1][0] + row[0], out[-1][1] + row[1], out[-1][2] + row[2])
        else:
            out.append(tuple(row[:3]))
    return out


def word_inputs(tokenizer: Any, words: list[str]) -> list[str]:
    """The words as `tokenizer(..., is_split_into_words=True)` should get them: with a space before each where
    the space marks a word's start (`space_marks_words`: byte-level BPE's "Ġ", Gemma's "▁"). Such a tokenizer is
    given each word alone, so a bare word is tokenised as a text's first word ("Paris", Gemma's "Pa" "ris"), not
    as it reads mid-sentence and in pretraining ("ĠParis", "▁Paris"), the first word included. HF's remedy,
    loading with add_prefix_space=True, reaches only the GPT-2/RoBERTa classes (the generic TokenizersBackend,
    Llama 3's, ignores it; Gemma's class has none), and Llama 3's ByteLevel after a Split would put a space before
    every split piece; the space added here is what add_prefix_space adds to a plain ByteLevel, and leaves the
    tokenizer (saved with the adapter) as it was."""
    if not space_marks_words(tokenizer):
        return words
    return [w if w.startswith(" ") else " " + w for w in words]


def labelled_word_ids(tokenizer: Any, ids: list[int], word_ids: list) -> list:
    """`word_ids` with a word's first sub-token left out (None, as a special token is) where it is a bare space
    ("Ġ", "▁") and the word has more: the word is labelled, and its tag read, on its next sub-token. That space is
    one token for every such word and says nothing of it, and a causal model reads it before the word: Llama 3's
    and Qwen 2's split keeps digits from the space (" 2019" is "Ġ" "201" "9"), Llama 2's and Mistral's
    SentencePiece splits digits one by one (" 2019" is "▁" "2" "0" "1" "9"), and a vocabulary may lack "Ġ," or
    "▁(". One rule for every tokenizer that has such a token (WordPiece has none)."""
    bare = bare_space_ids(tokenizer)
    if not bare:
        return word_ids
    out = list(word_ids)
    for pos in range(len(out) - 1):
        word = out[pos]
        first = word is not None and (pos == 0 or word_ids[pos - 1] != word)
        if first and ids[pos] in bare and word_ids[pos + 1] == word:
            out[pos] = None
    return out


def bare_space_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of the tokenizer's bare-space tokens ("Ġ", "▁"): the first sub-token `labelled_word_ids` skips."""
    try:
        return _BARE_SPACE_IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # (WordPiece marks a word's inside, not its start: a "Ġ" there is a letter, Maltese's, not a space)
    wordpiece = backend is not None and type(backend.model).__name__ == "WordPiece"
    vocab = {} if wordpiece else tokenizer.get_vocab()
    found = frozenset(vocab[piece] for piece in _BARE_SPACES if piece in vocab)
    try:
        _BARE_SPACE_IDS[tokenizer] = found
    except TypeError:
        pass
    return found


def space_marks_words(tokenizer: Any) -> bool:
    """Whether a word given alone lacks the word-start mark that a space before it would give it: the tokenizer's
    pipeline (normalizer, pre-tokenizer) leaves "a" as it is but makes " a" one other piece. So it is for byte-level
    BPE ("Ġa": GPT-2, RoBERTa, Llama 3, Qwen 2) and for a normalizer that turns spaces into "▁" without prepending
    one (Gemma; Llama loaded with add_prefix_space=False). WordPiece drops the space, and SentencePiece's Metaspace
    or Prepend("▁") already marks each word alone ("▁a"): both are left alone (a space would give "▁▁a")."""
    try:
        return _SPACE_MARKS_WORDS[tokenizer]
    except (KeyError, TypeError):  # (TypeError: an object without weak references is looked up every time)
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)  # (none: a Python tokenizer, left as it was)
    found = False
    if backend is not None:
        spaced = _pieces(backend, " a")
        found = _pieces(backend, "a") == ["a"] and len(spaced) == 1 and spaced != ["a"]
    try:
        _SPACE_MARKS_WORDS[tokenizer] = found
    except TypeError:
        pass
    return found


def _pieces(backend: Any, text: str) -> list[str]:
    """The pre-tokenized pieces a `tokenizers.Tokenizer` makes of `text`, before its model splits them."""
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    if backend.pre_tokenizer is None:
        return [text]
    return [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


_PREFIXES = ("B-", "I-", "E-", "S-", "L-", "U-")  # IOB, IOBES, BILOU (scoring_tag: L-/U- as E-/S-)


def scoring_tag(tag: str) -> str:
    """The tag as seqeval should read it. IO tagging (`PER`, `LOC`, `O`) has no prefixes, and seqeval would take
    the first letter for one (types "ER", "OC"); as `I-PER` each run of one type is one entity, which is what
    IO tags mean. BILOU's L- and U- are IOBES's E- and S-: seqeval's default mode knows only the latter, and read
    `U-ORG U-ORG` as one organisation and `L-LOC U-LOC` as one location (warning on every such tag)."""
    if tag.startswith(("L-", "U-")):
        return ("E-" if tag[0] == "L" else "S-") + tag[2:]
    return tag if tag == "O" or tag.startswith(_PREFIXES) else f"I-{tag}"


def fill_blank_words(tags: list[str | None]) -> list[str]:
    """Tags for the words with none (None: a word the tokenizer drops, such as a zero-width space): inside the
    entity around it when the word before is in an entity that the next tagged word continues (`John <zwsp>
    Smith` stays one person), else "O"."""
    out: list[str] = []
    for i, tag in enumerate(tags):
        if tag is None:
            before = out[-1] if out else "O"
            after = next((t for t in tags[i + 1:] if t is not None), "O")
            kind = _entity_type(before)
            goes_on = after.startswith(("I-", "E-", "L-")) or not after.startswith(_PREFIXES)  # IO: any non-O
            tag = "O" if kind is None or _entity_type(after) != kind or not goes_on else \
                (f"I-{kind}" if before.startswith(_PREFIXES) else kind)
        out.append(tag)
    return out


def _entity_type(tag: str) -> str | None:
    """PER of B-PER / I-PER / PER (IO tagging); None for O."""
    if tag == "O":
        return None
    return tag[2:] if tag.startswith(_PREFIXES) else tag


def _pad_lists(lists: list[list[int]]) -> torch.Tensor:
    """Lists of ids as one (len(lists), longest) tensor, padded with IGNORE."""
    out = torch.full((len(lists), max(map(len, lists))), IGNORE, dtype=torch.long)
    for i, ids in enumerate(lists):
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def words_cut(word_ids: list, n_words: int, overflowing: bool) -> int:
    """How many trailing words of a sentence `max_length` cut off: those after the last word that kept a
    sub-token (a word whose first sub-token fits keeps its own prediction). 0 when nothing was `overflowing`, so a
    sentence that merely ends in words the tokenizer drops (a zero-width space) is not counted as cut."""
    if not overflowing:
        return 0
    last = max((w for w in word_ids if w is not None), default=-1)
    return n_words - 1 - last


def entities(words: list[str], tags: list[str]) -> list[dict]:
    """The entities a sentence's tags mark, grouped as the eval scores them (seqeval, IO tags read as I-):
    {"text": the words joined by spaces, "type", "start", "end"} with word indices, `end` exclusive."""
    from seqeval.metrics.sequence_labeling import get_entities

    return [{"text": " ".join(words[start:end + 1]), "type": kind, "start": start, "end": end + 1}
            for kind, start, end in get_entities([scoring_tag(t) for t in tags])]


def truncation_counts(cut_tags: list[list[str]]) -> dict:
    """Sentences with words cut, those words, and the gold entities that lose words to the cut, from each
    sentence's cut-off tail of gold tags. An entity that straddles the cut starts its tail with I-/E-,
    which seqeval reads as the start of an entity, so each such entity counts once."""
    from seqeval.metrics.sequence_labeling import get_entities

    return {"sentences_truncated": sum(1 for cut in cut_tags if cut),
            "words_truncated": sum(map(len, cut_tags)),
            "entities_truncated": sum(len(get_entities(cut)) for cut in cut_tags if cut)}
