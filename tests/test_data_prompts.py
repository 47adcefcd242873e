"""Training tokenises what `predict` feeds the model: BOS, segments joined as one text (SentencePiece,
BPE merges across the prompt's end), the prompt before the answer, and text-pair segment ids."""

from __future__ import annotations

import pytest
import torch

from scaletune.data import build_datasets
from scaletune.data.formats import FORMATS
from scaletune.data.render import to_segments
from scaletune.errors import DataError
from scaletune.model import load_tokenizer
from scaletune.tasks import IGNORE, get_task

from stutil import data_config as _cfg
from stutil import write_jsonl


def test_bos_leads_exactly_where_the_tokenizer_puts_it(tmp_path, tiny_llama):
    """Training, `predict` and a merged model's user calling `tokenizer(prompt)` see the same first token: BOS
    where the tokenizer adds it itself (Llama-style, as the suite's tiny one), none where it has a BOS it does
    not add (GPT-NeoX style). scaletune used to add BOS wherever the tokenizer had one."""
    import shutil

    from tokenizers import processors

    from scaletune.generation import prompt_ids, prompt_segments

    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "input": "", "output": "hi there"}] * 2)
    neox = tmp_path / "neox"  # the same model, its tokenizer no longer adding BOS
    shutil.copytree(tiny_llama, neox)
    tok = load_tokenizer(_cfg(tmp_path, neox, data=data))
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save_pretrained(neox)
    for model, leads in ((tiny_llama, True), (neox, False)):
        cfg = _cfg(tmp_path, model, data=data)
        tok = load_tokenizer(cfg)
        ids = build_datasets(cfg, get_task("causal_lm"), tok)["train"][0]["input_ids"]
        prompt = prompt_ids(tok, prompt_segments({"text": "Say hi"}, tok)[1])
        plain = tok(tok.decode(prompt, skip_special_tokens=True))["input_ids"]  # as a transformers user would
        assert (ids[0] == tok.bos_token_id) is leads and (prompt[0] == tok.bos_token_id) is leads, model
        assert plain == prompt and ids[:len(prompt)] == prompt, model


def _with_tokenizer(tmp_path, tiny_llama, name, pre_tokenizer, decoder, texts):
    """The tiny Llama with a BPE tokenizer of its own, trained on `texts` (tokenising tests only: its ids may
    pass the model's vocabulary)."""
    import shutil

    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    from stutil import corpus

    model = tmp_path / name
    shutil.copytree(tiny_llama, model)
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / file).unlink(missing_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoder
    tok.train_from_iterator(corpus() + texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                                                   show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(model)
    return model


def test_segments_tokenise_as_their_joined_text_with_a_sentencepiece_tokenizer(tmp_path, tiny_llama):
    """A Metaspace tokenizer (Llama 2, Mistral) starts each call with a word mark: answers tokenised apart
    from their prompt began with a stray '\u2581' that `predict` (the prompt in one call) never produces."""
    from tokenizers import decoders, pre_tokenizers

    spm = _with_tokenizer(tmp_path, tiny_llama, "spm", pre_tokenizers.Metaspace(prepend_scheme="first"),
                          decoders.Metaspace(prepend_scheme="first"),
                          ["### Instruction:\n### Response:\n Say hi there. Add 2 and 3: 5"])
    record = {"instruction": "Add 2 and 3.", "input": "", "output": "5", "history": [["Say hi", "hi there"]]}
    data = write_jsonl(tmp_path / "a.jsonl", [record] * 2)
    cfg = _cfg(tmp_path, spm, data=data)
    tok = load_tokenizer(cfg)
    task = get_task("causal_lm")
    ex = build_datasets(cfg, task, tok)["train"][0]
    text = "".join(t for t, _ in to_segments(task.format.convert(record), tok, "?"))
    assert ex["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    answers = [tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])]
    assert answers == ["hi there</s> 5</s>"] or answers == ["hi there</s>5</s>"], answers


@pytest.mark.parametrize("prompt", ["The capital of France is ", "Q: capital of France?\nA:", "Q:\n"])
def test_training_gives_the_model_predicts_prompt(tmp_path, tiny_llama, prompt):
    """What precedes an answer in training is what `predict` gives the model: a prompt ending in a space
    (one token with the answer's first word in the joined text) stays tokenised apart from its answer."""
    from tokenizers import decoders, pre_tokenizers

    from scaletune.generation import prompt_ids, prompt_segments

    # merges such as " Paris": with a space-ended prompt the joined text has one token across the two
    bpe = _with_tokenizer(tmp_path, tiny_llama, "bpe", pre_tokenizers.ByteLevel(add_prefix_space=False),
                          decoders.ByteLevel(), ["The capital of France is Paris"] * 50)
    record = {"prompt": prompt, "completion": "Paris"}
    cfg = _cfg(tmp_path, bpe, data=write_jsonl(tmp_path / "p.jsonl", [record] * 2))
    tok = load_tokenizer(cfg)
    ex = build_datasets(cfg, get_task("causal_lm"), tok)["train"][0]
    given = prompt_ids(tok, prompt_segments({"prompt": prompt}, tok, "prompt_completion")[1])
    assert ex["input_ids"][:len(given)] == given and all(lab == IGNORE for lab in ex["labels"][:len(given)])
    assert tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]) == "Paris</s>"


# One record a causal_lm format with a prompt (`text` has none: it is all target), answer last
PROMPTED = {
    "alpaca": {"instruction": "Translate to French", "input": "hello", "system": "Be terse",
               "history": [["hi", "hello there"]], "output": "bonjour"},
    "sharegpt": {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]},
    "messages": {"messages": [{"role": "system", "content": "Be terse"}, {"role": "user", "content": "Name a colour."},
                              {"role": "assistant", "content": "Blue."}]},
    "prompt_completion": {"prompt": "2 + 2 =", "completion": " 4"},
}
# Each PROMPTED record's answer, the one its predict line leaves out: eval --generate's reference (Format.answer)
ANSWERED = {"alpaca": "bonjour", "sharegpt": "Blue.", "messages": "Blue.", "prompt_completion": " 4"}


def test_every_format_with_a_prompt_has_a_predict_case():
    """A new format registered in data/formats.py needs a record here (predict must prompt it as training did)."""
    assert set(PROMPTED) == set(FORMATS) - {"text"}


def _predict_line(record: dict) -> dict:
    """`record` as a predict line of its shape: its answer left out (alpaca's output, prompt_completion's
    completion, a conversation's last turn)."""
    line = {k: v for k, v in record.items() if k not in ("output", "completion")}
    for turns in ("conversations", "messages"):
        if turns in line:
            line[turns] = line[turns][:-1]
    return line


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_registered_format_prompts_its_own_predict_lines(name):
    """prompt_segments asks the registry which format a predict line is in (the first whose `prompt` takes it):
    each registered format takes a line of its own shape, whose columns predict's input check accepts, and says
    whether it is a conversation (`chat`: what a chat template renders) as its converter does. eval --generate
    asks the same format for the record's reference answer (`answer`): the one the line left out; `text`, all
    target, has none and says so."""
    from scaletune.generation_metrics import reference_answer
    from scaletune.predict_input import check_prompt_input

    fmt = FORMATS[name]
    records = {**PROMPTED, "text": {"text": "Once upon a time"}}
    if name not in records:
        pytest.fail(f"format {name}: add a record of it to PROMPTED")
    record = {**records[name], "__where__": "p.jsonl:1"}
    line = _predict_line(record)
    check_prompt_input(line)  # (it names `asks` when a line has none of them)
    for plain in (False, True):  # (a model trained on a chat format, on plain text)
        taker = next((f for f in FORMATS.values() if f.prompt(line, plain) is not None), None)
        assert taker is fmt, f"a {name} line is prompted as {getattr(taker, 'name', 'no format')}'s"
    assert fmt.chat == ("messages" in fmt.convert(record))
    if name not in PROMPTED:  # (text: no prompt, so no answer to compare a generated one with)
        with pytest.raises(DataError, match="p.jsonl:1: train.eval_generate: a plain-text record .* no reference"):
            reference_answer(record, "train.eval_generate")
    elif name not in ANSWERED:
        pytest.fail(f"format {name}: add its PROMPTED record's answer to ANSWERED")
    else:
        assert reference_answer(record) == ANSWERED[name]


@pytest.mark.parametrize("name,record", PROMPTED.items(), ids=list(PROMPTED))
def test_predict_prompts_the_way_training_rendered(tmp_path, tiny_llama, name, record):
    """`predict` feeds the model exactly the token prefix training put before the response (system,
    history, input included), for a record of the same shape with its answer removed."""
    from scaletune.generation import generate, prompt_segments
    from scaletune.tasks.base import IGNORE

    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "a.jsonl", [record] * 2), format=name)
    tok = load_tokenizer(cfg)
    task = get_task("causal_lm")
    task.setup([record], cfg, "a.jsonl")
    enc = task.encode(record, tok, cfg, None)
    labels = enc["labels"]
    last_response = max(i for i in range(1, len(labels)) if labels[i] != IGNORE and labels[i - 1] == IGNORE)
    trained_prompt = enc["input_ids"][:last_response]  # everything before the final answer, history included
    query = _predict_line(record)
    seen = {}

    class Model:
        device = torch.device("cpu")

        def generate(self, input_ids, **kw):
            seen["ids"] = input_ids[0].tolist()
            return input_ids

    generate(Model(), tok, prompt_segments(query, tok)[1], 3)
    assert seen["ids"] == trained_prompt


@pytest.mark.parametrize("trained,templated", [("alpaca", True), ("text", False), ("prompt_completion", False)])
def test_plain_line_is_a_user_turn_only_for_models_trained_on_chats(tiny_llama, tmp_path, trained, templated):
    """A model trained on `text` or `prompt_completion` never saw the chat template: a plain input line is
    its prompt as it is, not an "### Instruction:" turn."""
    from scaletune.generation import prompt_segments

    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}]))
    tok = load_tokenizer(cfg)
    prompt, segments = prompt_segments({"text": "Once upon a time"}, tok, trained)
    rendered = "".join(text for text, _ in segments)
    assert prompt == "Once upon a time"
    assert (rendered == "Once upon a time") == (not templated)


def test_text_pairs_train_with_the_segment_ids_predict_uses(tmp_path, tiny_bert):
    """A BERT tokenizer marks the second text with token_type_ids = 1; predict (and any plain transformers
    use of the model) passes them, so training and eval must too."""
    from transformers import AutoModelForSequenceClassification

    from scaletune.tasks.base import pad_batch

    records = [{"text": "alpha bravo", "text_pair": "charlie", "label": "a"},
               {"text": "delta", "text_pair": "echo foxtrot golf", "label": "b"}]
    cfg = _cfg(tmp_path, tiny_bert, task="seq_cls", data=write_jsonl(tmp_path / "p.jsonl", records),
               text_pair_column="text_pair")
    tok = load_tokenizer(cfg)
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]  # as BertTokenizerFast has
    task = get_task("seq_cls")
    train = build_datasets(cfg, task, tok)["train"]
    batch = pad_batch([train[i] for i in range(2)], tok.pad_token_id)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2, type_vocab_size=2).eval()
    with torch.no_grad():
        model.bert.embeddings.token_type_embeddings.weight.normal_()  # segments must matter in this model
        _, logits = task.loss_sum(model, batch)
        for i, r in enumerate(records):
            direct = model(**tok(r["text"], r["text_pair"], return_tensors="pt")).logits[0]
            torch.testing.assert_close(logits[i], direct)


def test_a_conversational_prompt_line_is_predicted_as_its_messages(tiny_llama, tmp_path):
    """A dpo/kto training line's TRL prompt (a list of messages) was refused by predict ("'prompt' must be a
    string"): it prompts as the same messages written as a `messages` line."""
    from scaletune.generation import prompt_ids, prompt_segments
    from scaletune.predict_input import check_prompt_input

    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}]))
    tok = load_tokenizer(cfg)
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."}]
    line = {"prompt": messages, "chosen": [{"role": "assistant", "content": "Blue."}], "__where__": "p.jsonl:1"}
    check_prompt_input(line)
    assert prompt_ids(tok, prompt_segments(line, tok)[1]) == prompt_ids(tok, prompt_segments({"messages": messages},
                                                                                            tok)[1])
    # a conversation with its first question beside it as a `prompt` string (ultrachat_200k, no_robots), which
    # training reads as the conversation: prompted as the conversation, not as that bare question
    talk = [*messages, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another."}]
    for column, turns in (("messages", talk), ("conversations", [{"from": m["role"], "value": m["content"]}
                                                                 for m in talk])):
        line = {"prompt": "Name a colour.", "prompt_id": "7", column: turns, "__where__": "p.jsonl:2"}
        check_prompt_input(line)
        assert prompt_ids(tok, prompt_segments(line, tok)[1]) == prompt_ids(tok, prompt_segments({column: turns},
                                                                                                tok)[1]), column
