"""Tiny models built from a transformers config, with a tokenizer trained on the fly.

Used by `scaletune demo` and by the test suite: nothing is downloaded, everything is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

SPECIALS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}


def train_tokenizer(texts: Iterable[str], kind: str = "bpe", vocab_size: int = 512) -> Any:
    """A fast tokenizer trained on `texts`: byte-level BPE (decoders) or WordPiece (encoders)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        # each text starts with BOS, as a Llama tokenizer's does (tokenizer(text) and training agree on it)
        bos_id = tok.token_to_id(SPECIALS["bos"])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B:1",
                                                           special_tokens=[("<s>", bos_id)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def build_model_dir(out: str | Path, texts: Iterable[str], *, arch: str = "llama", hidden: int = 64,
                    layers: int = 2, heads: int = 4, vocab_size: int = 512, max_positions: int = 512,
                    seed: int = 0, dropout: float = 0.0, init_std: float = 0.02) -> Path:
    """Write a randomly initialised model + trained tokenizer to `out`, loadable by from_pretrained.

    `init_std` is the weights' standard deviation (transformers' `initializer_range`)."""
    from transformers import AutoModel, BertConfig, LlamaConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts, "bpe" if arch == "llama" else "wordpiece", vocab_size)
    if arch == "llama":
        config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             tie_word_embeddings=False, attention_dropout=dropout, initializer_range=init_std)
    elif arch == "bert":
        config = BertConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_positions,
                            pad_token_id=tok.pad_token_id, hidden_dropout_prob=dropout,
                            attention_probs_dropout_prob=dropout, initializer_range=init_std)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    torch.manual_seed(seed)
    model = AutoModel.from_config(config) if arch == "bert" else _causal(config)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def _causal(config: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)
