"""token_cls with byte-level BPE tokenizers (GPT-2, RoBERTa, Llama 3): each word is tokenised in its word-start
("Ġ") form, as it reads mid-sentence, in training and in `predict` alike; WordPiece and SentencePiece ids stay
as they were. Every tokenizer is trained here on a few sentences (no download)."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
import torch

from scaletune.config import from_dict
from scaletune.tasks import get_task

from stutil import write_jsonl

WORDS = ["Alice", "met", "Bob", "in", "Paris", ",", "2019"]
TAGS = ["B-PER", "O", "B-PER", "O", "B-LOC", "O", "O"]
TEXTS = ["Alice met Bob in Paris, 2019.", "Bob and Alice went to Paris in 2019", "then Alice met Bob"] * 20
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _bpe(pre_tokenizer, specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def _roberta(tmp_path):
    """RoBERTa's own tokenizer class, built from a trained vocabulary and merges."""
    from tokenizers import pre_tokenizers
    from transformers import RobertaTokenizerFast

    tok = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.model.save(str(tmp_path))
    merges = [tuple(line.split()) for line in (tmp_path / "merges.txt").read_text().splitlines()[1:] if line]
    return RobertaTokenizerFast(vocab=json.loads((tmp_path / "vocab.json").read_text()), merges=merges)


def _llama3(tmp_path):
    """Llama 3's shape: a Split by its regex, then ByteLevel without a regex, in the generic backend class."""
    from tokenizers import Regex, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
               ["<|begin_of_text|>", "<|end_of_text|>"])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def _generic_bpe(tmp_path):
    """The test suite's decoder tokenizer (a GPT-2-style ByteLevel in the generic class)."""
    from scaletune.demo.tiny import train_tokenizer

    return train_tokenizer(TEXTS, "bpe", 400)


def _wordpiece(tmp_path):
    from scaletune.demo.tiny import train_tokenizer

    return train_tokenizer(TEXTS, "wordpiece", 400)


def _sentencepiece(tmp_path, metaspace: bool = True):
    """Llama 2's shape: "▁" marks a word's start, by a Metaspace pre-tokenizer (transformers 5's LlamaTokenizer)
    or by normalizers with no pre-tokenizer (the hub's Llama 2 tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _space_isolated(tmp_path):
    """Byte-level BPE whose pre-tokenizer keeps a space as a piece of its own: " a" is "Ġ" then "a", so a word's
    ids are the same with or without a space before it, and one there would only add a "Ġ" token."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
               ["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _reloaded(build, tmp_path):
    """The tokenizer as a run loads it: saved, then read back by AutoTokenizer (as with the adapter)."""
    from transformers import AutoTokenizer

    build(tmp_path / "src").save_pretrained(str(tmp_path / "tok"))
    return AutoTokenizer.from_pretrained(str(tmp_path / "tok"))


def _encode(tok, words: list[str], tags: list[str]) -> dict:
    task = get_task("token_cls")
    cfg = SimpleNamespace(data=SimpleNamespace(tokens_column=None, tags_column=None, labels=None, max_length=64,
                                               too_long="truncate"))
    labels = task.setup([{"tokens": words, "tags": tags}], cfg, "test")
    return task.encode({"tokens": words, "tags": tags}, tok, cfg, {name: i for i, name in enumerate(labels)})


@pytest.mark.parametrize("build", [_roberta, _llama3, _generic_bpe], ids=["roberta", "llama3", "gpt2-generic"])
def test_byte_level_words_get_their_word_start_form(tmp_path, build):
    """Each word is tokenised as in the sentence with a space before it: "ĠAlice", "ĠParis" (words used to be
    tokenised alone, each as a text's first word: "Alice", "Par" "is"); each word's tag sits on its first
    sub-token."""
    (tmp_path / "src").mkdir()
    tok = _reloaded(build, tmp_path)
    enc = _encode(tok, WORDS, TAGS)
    assert enc["input_ids"] == tok(" " + " ".join(WORDS))["input_ids"]
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    assert "ĠAlice" in pieces and "ĠParis" in pieces, pieces
    firsts = [piece for piece, label in zip(pieces, enc["labels"]) if label != -100]
    assert len(firsts) == len(WORDS) and all(p.startswith("Ġ") for p, w in zip(firsts, WORDS) if w.isalpha())
    assert "Ġ" not in firsts, firsts  # (a bare space is no word's label: test_a_bare_space_...)


def test_a_bare_space_sub_token_is_not_its_words_label(tmp_path):
    """Llama 3's split keeps digits from the space before them (" 2019" is "Ġ" "201" "9"), and a small vocabulary
    lacks "Ġ,": the ids stay the running text's, but the word is labelled in training, and its tag read in
    predict, on its first sub-token that is more than that bare "Ġ" (one token for every such word, which a
    causal model reads before the word)."""
    from scaletune.labelling import tag as _tag

    (tmp_path / "src").mkdir()
    tok = _reloaded(_llama3, tmp_path)
    enc = _encode(tok, WORDS, TAGS)
    assert enc["input_ids"] == tok(" " + " ".join(WORDS))["input_ids"]
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    labelled = [piece for piece, label in zip(pieces, enc["labels"]) if label != -100]
    assert labelled[WORDS.index("2019")] == "201" and "Ġ" not in labelled, labelled
    space = tok.convert_tokens_to_ids("Ġ")
    tok.pad_token = tok.eos_token  # (load_tokenizer sets one; _tag pads its batch)

    class SpaceSaysLoc:  # "B-LOC" on a bare "Ġ", "O" everywhere else
        device = torch.device("cpu")

        def __call__(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
            return SimpleNamespace(logits=torch.stack([input_ids != space, input_ids == space], -1).float())

    assert _tag(SpaceSaysLoc(), tok, ["O", "B-LOC"], 64, [WORDS])[0]["tags"] == ["O"] * len(WORDS)


def _qwen2(tmp_path):
    """Qwen 2's shape: Llama 3's split and ByteLevel, but no BOS token, so a sentence's first word is at 0."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
               ["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.mark.parametrize(("build", "words", "tags", "want"), [
    (_llama3, ["Paris", ","], ["B-LOC", "O"], ["ĠParis", ","]),  # the last word's "Ġ" "," (no "Ġ," learned)
    (_qwen2, ["2019"], ["B-LOC"], ["201"]),  # no BOS: the "Ġ" at position 0 is the first word's
])
def test_a_bare_space_is_skipped_at_either_end_of_the_sentence(tmp_path, build, words, tags, want):
    """The bare "Ġ" of the sentence's last word (no EOS after it), and of its first word where no BOS comes
    before it, is no label's place either: the label sits on the word's next sub-token."""
    (tmp_path / "src").mkdir()
    tok = _reloaded(build, tmp_path)
    enc = _encode(tok, words, tags)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    assert "Ġ" in pieces, pieces  # (the case under test: a word split after its space)
    assert [piece for piece, label in zip(pieces, enc["labels"]) if label != -100] == want, pieces


def test_a_word_start_sub_token_keeps_its_words_label(tmp_path):
    """Only a bare "Ġ" is passed over: "ĠParis" "ian" (a word the vocabulary lacks) is labelled on "ĠParis",
    its first sub-token, as every other word is; and a word given with its space already is not given two."""
    (tmp_path / "src").mkdir()
    tok = _reloaded(_llama3, tmp_path)
    enc = _encode(tok, ["Alice", "Parisian"], ["B-PER", "B-MISC"])
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    labelled = [piece for piece, label in zip(pieces, enc["labels"]) if label != -100]
    assert len(pieces) > 4 and labelled == ["ĠAlice", "ĠParis"], pieces
    assert _encode(tok, [" Alice", "met"], ["B-PER", "O"])["input_ids"] == \
        _encode(tok, ["Alice", "met"], ["B-PER", "O"])["input_ids"]


@pytest.mark.parametrize("build", [_wordpiece, _sentencepiece, lambda p: _sentencepiece(p, metaspace=False),
                                   _space_isolated],
                         ids=["wordpiece", "metaspace", "sentencepiece-normalizer", "space-isolated-bpe"])
def test_wordpiece_and_sentencepiece_ids_are_unchanged(tmp_path, build):
    """Tokenizers that mark words otherwise keep the ids of the words as given (a space put before each word
    would give Llama 2's normalizers "▁▁Alice")."""
    (tmp_path / "src").mkdir()
    tok = _reloaded(build, tmp_path)
    assert _encode(tok, WORDS, TAGS)["input_ids"] == tok(WORDS, is_split_into_words=True)["input_ids"]


class Recorder(torch.nn.Module):
    """A stand-in tagger: records the input ids of every line; all its logits are zero (label 0)."""

    device = torch.device("cpu")

    def __init__(self, n_labels: int):
        super().__init__()
        self.n_labels, self.seen = n_labels, []

    def forward(self, input_ids, attention_mask, **_):
        self.seen += [row[keep.bool()].tolist() for row, keep in zip(input_ids, attention_mask)]
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.n_labels))


def test_predict_tokenises_words_as_training_did(tmp_path, monkeypatch):
    """`predict` gives a byte-level model the ids training gave it, for a word-list line and a plain-text line
    alike: the word-start forms, with the tokenizer saved with the adapter."""
    import scaletune.infer as infer
    from scaletune.data import build_datasets
    from scaletune.demo.tiny import build_model_dir
    from scaletune.model import load_tokenizer

    model_dir = build_model_dir(tmp_path / "llama", TEXTS, arch="llama", hidden=16, layers=1, heads=2,
                                vocab_size=400)
    data = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": WORDS, "tags": TAGS}] * 4)
    cfg = from_dict({"task": "token_cls", "model": {"name_or_path": str(model_dir), "dtype": "float32"},
                     "data": {"train": str(data), "eval": str(data), "cache": False},
                     "train": {"mixed_precision": "no"}, "output_dir": str(tmp_path / "out")})
    tok = load_tokenizer(cfg)
    task = get_task("token_cls")
    sets = build_datasets(cfg, task, tok)
    trained = sets["train"][0]["input_ids"]
    assert trained == tok(" " + " ".join(WORDS))["input_ids"]
    tok.save_pretrained(str(tmp_path / "adapter"))  # what training saves with the adapter, and predict loads
    model = Recorder(len(sets["labels"]))
    monkeypatch.setattr(infer, "load_trained", lambda *a: (model, load_tokenizer(cfg, str(tmp_path / "adapter")),
                                                           task, sets["labels"], tmp_path / "adapter"))
    lines = [json.dumps({"tokens": WORDS}), " ".join(WORDS)]
    got = infer.run_predict(cfg, None, None, 4, out=io.StringIO(), stdin=io.StringIO("\n".join(lines)))
    assert model.seen == [trained, trained]
    assert [g["tokens"] for g in got] == [WORDS, WORDS]


@pytest.mark.parametrize("build,changed", [(_generic_bpe, True), (_wordpiece, False), (_sentencepiece, True)],
                         ids=["byte-level", "wordpiece", "metaspace"])
def test_an_older_token_cls_adapter_is_warned_of_only_where_its_ids_changed(tmp_path, build, changed):
    """Data version 14 changed the ids of byte-level tokenizers (and Gemma's: test_token_cls_families), and 15
    moved the label off a bare "▁" in SentencePiece ones: an adapter or checkpoint recorded at 7 is told it may
    have been trained on other ids or label places with such a tokenizer, and not with WordPiece, whose ids and
    label places are those it was trained on."""
    from scaletune.data import tokenisation, tokenised_differently

    (tmp_path / "src").mkdir()
    tok = _reloaded(build, tmp_path)
    assert tokenisation("token_cls") == "token_cls-15"
    assert (tokenised_differently("token_cls-7", "token_cls", tok) is not None) == changed
    assert tokenised_differently("token_cls-6", "token_cls", tok) is not None  # (older: other changes too)
    assert tokenised_differently("token_cls-7", "token_cls") is not None  # (no tokenizer at hand: may differ)



def test_a_word_that_is_a_bare_space_alone_keeps_its_label():
    """Only a bare space that the word's next sub-token follows is passed over: a word tokenised to "Ġ" alone
    (a whitespace word) is labelled there, or it would have no label at all."""
    from scaletune.tasks.token_cls import labelled_word_ids

    class Tokenizer:  # (a vocabulary with a bare "Ġ", id 5)
        def get_vocab(self) -> dict:
            return {"Ġ": 5, "a": 6}

    assert labelled_word_ids(Tokenizer(), [5, 6, 5, 5, 6], [0, 0, 1, 2, 2]) == [None, 0, 1, None, 2]
