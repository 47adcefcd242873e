"""Bases with tokenizers unlike the test suite's two: a SentencePiece-style one marking only a text's start, one
without pad/eos/unk tokens, a Python (slow) one, WordPiece under a chat template whose markers it lacks."""

from __future__ import annotations

import pytest

from stutil import corpus, data_config


def _metaspace_first(bos: bool = True):
    """A BPE tokenizer with a SentencePiece word mark only at a text's very start (Metaspace prepend_scheme
    "first", as Mistral v0.3's and Llama 2's converted without legacy), adding BOS itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    texts = [*corpus(), "### Instruction:\n### Response:\n<|im_start|>user\n<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("chosen", [None, "chatml"])
def test_the_merged_template_gives_predicts_ids_where_the_word_mark_is_only_at_a_texts_start(chosen):
    """merge leads the saved chat template with BOS; with this tokenizer "<s>### Instruction" tokenises to `<s>`
    `###`, while training and predict give `<s>` `▁###` (BOS + the text alone): the merged model was prompted
    with other ids than it was trained on."""
    from scaletune.data.render import to_segments
    from scaletune.data.templates import CHATML, alpaca_style_template
    from scaletune.generation import prompt_ids
    from scaletune.merge import bos_led_template

    tok = _metaspace_first()
    messages = [{"role": "user", "content": "Reverse alpha beta"}]
    if chosen:
        tok.chat_template = CHATML
    segments = to_segments({"messages": [*messages, {"role": "assistant", "content": ""}]}, tok, "x")
    want = prompt_ids(tok, segments)
    first = tok.convert_ids_to_tokens(want)[:2]
    assert first[0] == "<s>" and first[1].startswith("▁")  # (the trained word mark after BOS)
    if chosen:
        bos_led_template(tok)
    else:
        tok.chat_template = alpaca_style_template(tok)
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == want


def test_a_tokenizer_without_pad_eos_or_unk_is_refused_naming_it(tmp_path):
    """Nothing to pad with: every run failed at its first batch with a TypeError traceback from the collator."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from scaletune.errors import ConfigError
    from scaletune.model import load_tokenizer

    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=280, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = tmp_path / "model"
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(model)
    LlamaConfig(vocab_size=280, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(model)
    with pytest.raises(ConfigError, match="no pad, eos or unk token"):
        load_tokenizer(data_config(tmp_path, model, data=tmp_path / "train.jsonl"))


def test_token_cls_refuses_a_python_tokenizer_by_name():
    """A slow tokenizer keeps no word ids: the run failed on its first record with transformers' ValueError."""
    from transformers import ByT5Tokenizer

    from scaletune.errors import ConfigError
    from scaletune.tasks.token_cls import tokenise_words

    with pytest.raises(ConfigError, match="ByT5Tokenizer.*fast tokenizer"):
        tokenise_words(ByT5Tokenizer(), [["John", "Smith"]], 16)


def test_an_answer_ending_in_unk_pieces_is_counted_as_unstopped():
    """chatml under a WordPiece tokenizer without eos: <|im_end|> is split into pieces ending in [UNK], which
    counted as the special token that teaches a model to stop, so the warning that nothing does was not given."""
    from scaletune.data.render import to_segments
    from scaletune.data.templates import CHATML
    from scaletune.demo.tiny import train_tokenizer
    from scaletune.tasks.causal_lm import CausalLM

    tok = train_tokenizer(corpus(), "wordpiece", 256)
    tok.chat_template = CHATML
    segments = to_segments({"messages": [{"role": "user", "content": "alpha"},
                                         {"role": "assistant", "content": "beta"}]}, tok, "x")
    ids, _, unstopped = CausalLM().tokens(segments, tok)
    assert tok.convert_ids_to_tokens(ids)[-1] == "[UNK]"
    assert unstopped
