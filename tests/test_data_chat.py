"""causal_lm formats: the prompt is masked and the answers trained (alpaca, ShareGPT, messages), chat
templates, mixed formats, tool calls, and the records and settings each format refuses."""

from __future__ import annotations

import pytest

from scaletune.data import build_datasets
from scaletune.errors import DataError
from scaletune.model import load_tokenizer
from scaletune.tasks import IGNORE, get_task

from stutil import data_config as _cfg
from stutil import write_jsonl


def test_alpaca_prompt_is_masked_and_response_trained(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "input": "", "output": "hi there"}] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    tok = load_tokenizer(cfg)
    task = get_task("causal_lm")
    ex = build_datasets(cfg, task, tok)["train"][0]
    ids, labels = ex["input_ids"], ex["labels"]
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    prompt = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE])
    assert trained == "hi there</s>"
    assert "Say hi" in prompt and "hi there" not in prompt
    cfg2 = _cfg(tmp_path, tiny_llama, data=data, train_on_prompt=True)
    ex2 = build_datasets(cfg2, get_task("causal_lm"), tok)["train"][0]
    assert sum(lab != IGNORE for lab in ex2["labels"]) == len(ids) - 1  # all but BOS


@pytest.mark.parametrize("fmt,record", [
    ("sharegpt", {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                                    {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}),
    ("messages", {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
                               {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                               {"role": "assistant", "content": "a2"}]}),
])
def test_chat_formats_train_only_assistant_turns(tmp_path, tiny_llama, fmt, record):
    data = write_jsonl(tmp_path / "c.jsonl", [record] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    tok = load_tokenizer(cfg)
    task = get_task("causal_lm")
    ex = build_datasets(cfg, task, tok)["train"][0]
    assert task.format.name == fmt
    trained = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    assert "a1" in trained and "a2" in trained and "q1" not in trained and "q2" not in trained


@pytest.mark.parametrize("template", [False, True])
def test_messages_weight_0_turn_is_context_not_target(tmp_path, tiny_llama, template):
    """OpenAI's fine-tuning format: an assistant turn with weight 0 is in the prompt but not trained."""
    record = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "weight": 0},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "weight": 1}]}
    data = write_jsonl(tmp_path / "c.jsonl", [record] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    tok = load_tokenizer(cfg)
    if template:
        tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    ex = build_datasets(cfg, get_task("causal_lm"), tok)["train"][0]
    trained = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    text = tok.decode(ex["input_ids"])
    assert "a1" in text and "a1" not in trained
    assert "a2" in trained and "q2" not in trained


@pytest.mark.parametrize("turns,message", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}],
     r"c.jsonl:1: messages\[1\].weight must be 0 or 1, got 0.5"),
    ([{"role": "user", "content": "q", "weight": 0}, {"role": "assistant", "content": "a"}],
     r"c.jsonl:1: messages\[0\].weight: only assistant turns are trained.*this one is user"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}],
     r"c.jsonl:1: every assistant turn has weight 0: nothing to learn from"),
])
def test_messages_weight_errors_name_the_line_and_turn(tmp_path, tiny_llama, turns, message):
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": turns}])
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    with pytest.raises(DataError, match=message):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


def test_chat_template_of_tokenizer_is_used(tmp_path, tiny_llama):
    tok = load_tokenizer(_cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}])))
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    from scaletune.data.render import to_segments

    segs = to_segments({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                       tok, "x")
    assert segs == [("<|user|>q</s><|assistant|>", False), ("a</s>", True)]


def test_format_detection_error_lists_options(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    with pytest.raises(DataError, match=r"cannot tell the data format from columns \['answer', 'question'\]"):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


@pytest.mark.parametrize("records,expected", [
    ([{"instruction": "q", "output": "a", "label": True, "kto_tag": "x"}] * 3
     + [{"instruction": "q", "output": "a", "input": "i", "system": "s", "history": [], "label": None}],
     "data.train: fields ignored by format alpaca: kto_tag (3 records), label (3 records)"),
    ([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "s",
       "tools": "[]"}, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
     None),  # tools are read (ShareGPT tool data)
    ([{"prompt": "q", "completion": " a", "label": False}] * 2,
     "data.train: fields ignored by format prompt_completion: label (2 records)"),
    ([{"messages": [{"role": "user", "content": "q", "name": "ann"}, {"role": "assistant", "content": "a",
                                                                      "weight": 1, "name": "bot"}]},
      {"messages": [{"role": "user", "content": "q", "tool_calls": None}, {"role": "assistant", "content": "a"}]}],
     "data.train: fields ignored by format messages: messages[].name (1 record)"),
    ([{"conversations": [{"from": "human", "value": "q", "loss": True}, {"from": "gpt", "value": "a"}]}],
     "data.train: fields ignored by format sharegpt: conversations[].loss (1 record)"),
    ([{"instruction": "q", "input": "", "output": "a", "system": "s", "history": [["u", "v"]]}] * 2, None),
])
def test_fields_a_format_ignores_are_named_once(tmp_path, tiny_llama, caplog, monkeypatch, records, expected):
    """Converting keeps only the fields a format reads; the rest (a KTO label, ShareGPT tools) are named in
    one warning per dataset, with counts, and again when the tokenised cache is reused."""
    monkeypatch.setenv("SCALETUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "a.jsonl", records)
    cfg = _cfg(tmp_path, tiny_llama, data=data, cache=True)
    tok = load_tokenizer(cfg)
    for _ in range(2):  # built, then loaded from the cache
        caplog.clear()
        with caplog.at_level("WARNING", logger="scaletune"):
            build_datasets(cfg, get_task("causal_lm"), tok)
        notes = [r.getMessage() for r in caplog.records if "ignored by format" in r.getMessage()]
        assert notes == ([expected] if expected else [])


def test_ignored_fields_of_the_eval_file_are_named_too(tmp_path, tiny_llama, caplog):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}] * 2)
    evalf = write_jsonl(tmp_path / "e.jsonl", [{"text": "a b c", "source": "web"}] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=train, eval=str(evalf))
    with caplog.at_level("WARNING", logger="scaletune"):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))
    notes = [r.getMessage() for r in caplog.records if "ignored by format" in r.getMessage()]
    assert notes == ["data.eval: fields ignored by format text: source (2 records)"]


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     r"c.jsonl:1: messages\[1\].content is empty \(nothing to learn from\)"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
     r"c.jsonl:1: conversations\[1\].value is empty \(nothing to learn from\)"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": ["x"]},
     r"c.jsonl:1: field 'system' must be a string, got list"),
])
def test_chat_records_with_empty_answers_or_bad_system_are_refused(tmp_path, tiny_llama, record, message):
    """As alpaca's empty output is: an empty answer would teach the model to answer with nothing."""
    data = write_jsonl(tmp_path / "c.jsonl", [record])
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    with pytest.raises(DataError, match=message):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


def test_eval_file_in_another_format_is_named(tmp_path, tiny_llama):
    """Plain text is trained without a template: an eval file of it for a conversation run is refused (a
    conversation format of another kind is read as its own: see the mixed-formats test)."""
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "q", "output": "a"}] * 2)
    evalf = write_jsonl(tmp_path / "e.jsonl", [{"text": "q a"}])
    cfg = _cfg(tmp_path, tiny_llama, data=train, eval=str(evalf))
    with pytest.raises(DataError, match=r"data.eval: .*e.jsonl:1 is a text record, data.train holds alpaca"):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


_CLOSING = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ END }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_a_chat_template_that_refuses_a_conversation_is_a_data_error(tmp_path, tiny_llama):
    """Templates without a system role (Gemma-style) raise from Jinja: one error naming file:line and the
    template's message, not a traceback."""
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "system", "content": "s"},
                                                            {"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]}])
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    tok = load_tokenizer(cfg)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + _CLOSING.replace("{{ END }}", "</s>"))
    with pytest.raises(DataError, match=r"c.jsonl:1: the tokenizer's chat template refused this conversation "
                                        r"\(system -> user -> assistant\): System role not supported"):
        build_datasets(cfg, get_task("causal_lm"), tok)


def test_conversation_formats_mix_and_text_is_named(tmp_path, tiny_llama):
    """Sources in alpaca, sharegpt and messages are all chats: a run may mix them (axolotl's and LLaMA-Factory's
    dataset lists do), and data.eval may be in another of them; each record trains as it would alone. Plain text
    is trained without a template: a source of it beside a chat format is named (was "sharegpt.jsonl:1: field
    'instruction' is missing")."""
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "q", "input": "", "output": "a"}] * 2)
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"conversations": [{"from": "human", "value": "q2"},
                                                                      {"from": "gpt", "value": "a2"}]}] * 2)
    messages = write_jsonl(tmp_path / "messages.jsonl", [{"messages": [{"role": "user", "content": "q3"},
                                                                       {"role": "assistant", "content": "a3"}]}])
    tok = load_tokenizer(_cfg(tmp_path, tiny_llama, data=alpaca))
    alone = {p: [(ex["input_ids"], ex["labels"])
                 for ex in build_datasets(_cfg(tmp_path, tiny_llama, data=p), get_task("causal_lm"), tok)["train"]]
             for p in (alpaca, chats, messages)}
    cfg = _cfg(tmp_path, tiny_llama, data=alpaca, eval=str(messages))
    cfg.data.train = [str(alpaca), str(chats)]
    built = build_datasets(cfg, get_task("causal_lm"), tok)
    assert sorted((ex["input_ids"], ex["labels"]) for ex in built["train"]) == sorted(alone[alpaca] + alone[chats])
    assert [(ex["input_ids"], ex["labels"]) for ex in built["eval"]] == alone[messages]
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "q a"}] * 2)
    cfg.data.train, cfg.data.eval = [str(alpaca), str(chats), {"path": str(text), "weight": 2}], None
    # (the text file is named, not the sharegpt one before it, which may be mixed)
    with pytest.raises(DataError, match=f"data.train: {text}:1 is a text record, {alpaca}:1 is alpaca; text and "
                                        "prompt_completion records are not mixed with another format"):
        build_datasets(cfg, get_task("causal_lm"), tok)
    both = write_jsonl(tmp_path / "both.jsonl", [{"instruction": "q", "output": "a"}, {"text": "q a"}])
    cfg.data.train = str(both)  # one file too (its text record failed with alpaca's "field 'instruction'")
    with pytest.raises(DataError, match=f"data.train: {both}:2 is a text record, {both}:1 is alpaca"):
        build_datasets(cfg, get_task("causal_lm"), tok)


@pytest.mark.parametrize("template", [False, True])
def test_a_conversation_opened_by_the_assistant_is_named(tmp_path, tiny_llama, template):
    """A chat template failed on the empty prompt before it (a raw ValueError); the built-in one trained it
    with no prompt at all."""
    record = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a"}]}
    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "c.jsonl", [record] * 2))
    tok = load_tokenizer(cfg)
    if template:
        tok.chat_template = _CLOSING.replace("{{ END }}", "</s>")
    with pytest.raises(DataError, match=r"c.jsonl:1: the conversation starts with an assistant turn to learn") as err:
        build_datasets(cfg, get_task("causal_lm"), tok)
    assert "sharegpt turns have no weight" in str(err.value.hint)  # (weight 0 is the messages format's)
    # a greeting kept as context (weight 0) trains the answer after it
    record["messages"][0]["weight"] = 0
    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "g.jsonl", [record] * 2))
    ex = build_datasets(cfg, get_task("causal_lm"), tok)["train"][0]
    assert tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]).strip() in ("a</s>", "a")


@pytest.mark.parametrize("record,message", [
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "b"}}, r"p.jsonl:2: 'chosen' / 'rejected' make this preference-pair data"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": False},
     r"p.jsonl:2: a true/false 'label' next to the conversation makes this KTO data"),
])
def test_preference_data_is_refused_saying_what_it_is(tmp_path, tiny_llama, record, message):
    """DPO pairs had "no assistant turn to learn from"; KTO's undesirable answers were trained as targets."""
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    data = write_jsonl(tmp_path / "p.jsonl", [plain, record])
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    with pytest.raises(DataError, match=message):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))
    # as an eval file too (KTO's undesirable answers were scored as targets beside plain training data)
    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "t.jsonl", [plain] * 2), eval=str(data))
    with pytest.raises(DataError, match=message):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


@pytest.mark.parametrize("template", [False, True])
def test_weight_0_answer_stays_untrained_with_train_on_prompt(tmp_path, tiny_llama, template):
    record = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "zebra", "weight": 0},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    data = write_jsonl(tmp_path / "c.jsonl", [record] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, train_on_prompt=True)
    tok = load_tokenizer(cfg)
    if template:
        tok.chat_template = _CLOSING.replace("{{ END }}", "</s>")
    ex = build_datasets(cfg, get_task("causal_lm"), tok)["train"][0]
    trained = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    assert "q1" in trained and "q2" in trained and "a2" in trained  # the context is trained, as asked
    assert "zebra" not in trained and "zebra" in tok.decode(ex["input_ids"])


@pytest.mark.parametrize("end,warned", [("</s>", False), ("</s>\n", False), ("\n", True)])
def test_answers_that_end_in_no_special_token_are_warned(tmp_path, tiny_llama, caplog, end, warned):
    """A chat template that closes no assistant turn trains a model that never stops: said once per dataset."""
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    data = write_jsonl(tmp_path / "c.jsonl", [record] * 3)
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    tok = load_tokenizer(cfg)
    tok.chat_template = _CLOSING.replace("{{ END }}", end)
    with caplog.at_level("WARNING", logger="scaletune"):
        build_datasets(cfg, get_task("causal_lm"), tok)
    notes = [r.getMessage() for r in caplog.records if "does not learn to stop" in r.getMessage()]
    assert notes == (["data.train: 3 of 3 example(s) hold an answer that ends in no end-of-sequence (or other "
                      "special) token" + notes[0].split("special) token", 1)[1]] if warned else []), notes


_GLAIVE = {"conversations": [{"from": "human", "value": "find chicken recipes"},
                             {"from": "function_call", "value": '{"name": "search", "arguments": {"q": "chicken"}}'},
                             {"from": "observation", "value": '{"hits": ["stir fry"]}'},
                             {"from": "gpt", "value": "Try a stir fry."}],
           "tools": '[{"name": "search", "description": "recipe search", "parameters": {"type": "object"}}]'}


def _trained_and_context(tok, ex):
    trained = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    context = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE])
    return trained, context


def test_sharegpt_tools_reach_the_prompt_with_the_built_in_template(tmp_path, tiny_llama):
    """Glaive-style tool data (LLaMA-Factory's ShareGPT + tools): the schemas were dropped and the tool results
    became user instructions. Now the schemas are in the prompt, the call is trained, the result is context."""
    data = write_jsonl(tmp_path / "g.jsonl", [_GLAIVE] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=1024)
    tok = load_tokenizer(cfg)
    trained, context = _trained_and_context(tok, build_datasets(cfg, get_task("causal_lm"), tok)["train"][0])
    assert '"name": "search"' in trained and "Try a stir fry." in trained
    assert "recipe search" in context and "### Tool result:" in context and "stir fry\"]" in context
    assert "recipe search" not in trained and "hits" not in trained


def test_tool_schemas_as_text_keep_non_ascii_names_as_the_calls_write_them(tmp_path, tiny_llama):
    """Chinese tool data (LLaMA-Factory's glaive_toolcall_zh): the schemas in the built-in prompt were
    ASCII-escaped ("\\u5929\\u6c14") while the trained call names the function "天气" as written."""
    record = {"conversations": [{"from": "human", "value": "北京天气"},
                                {"from": "function_call", "value": '{"name": "天气", "arguments": {"城市": "北京"}}'},
                                {"from": "observation", "value": '{"温度": 20}'},
                                {"from": "gpt", "value": "北京20度"}],
              "tools": '[{"name": "天气", "description": "查询天气", "parameters": {"type": "object"}}]'}
    data = write_jsonl(tmp_path / "g.jsonl", [record] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=1024)
    tok = load_tokenizer(cfg)
    trained, context = _trained_and_context(tok, build_datasets(cfg, get_task("causal_lm"), tok)["train"][0])
    assert '[{"name": "天气", "description": "查询天气"' in context, context
    assert '{"name": "天气", "arguments": {"城市": "北京"}}' in trained


def test_built_in_template_puts_the_response_header_before_every_answer(tmp_path, tiny_llama):
    """The answer after a tool result followed the result with no '### Response:' header, so the model learnt
    to answer where `predict` and every other answer put the header; an answer after another answer too."""
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "one"},
                                {"from": "gpt", "value": "two"}]}
    data = write_jsonl(tmp_path / "g.jsonl", [_GLAIVE, record])
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=1024)
    tok = load_tokenizer(cfg)
    for ex, answers in zip(build_datasets(cfg, get_task("causal_lm"), tok)["train"], (2, 2)):
        text = tok.decode(ex["input_ids"])
        assert text.count("### Response:\n") == answers, text
    glaive = tok.decode(build_datasets(cfg, get_task("causal_lm"), tok)["train"][0]["input_ids"])
    assert 'stir fry"]}\n\n### Response:\nTry a stir fry.' in glaive, glaive


_TOOL_TEMPLATE = ("{% if tools %}<|tools|>{% for t in tools %}{{ t.function.name }}:{{ t.function.description }};"
                  "{% endfor %}</s>{% endif %}{% for m in messages %}<|{{ m.role }}|>"
                  "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }}"
                  "({{ c.function.arguments | tojson }}){% endfor %}{% else %}{{ m.content }}{% endif %}</s>"
                  "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_sharegpt_tools_go_to_a_chat_template_that_takes_them(tmp_path, tiny_llama):
    template = _TOOL_TEMPLATE
    data = write_jsonl(tmp_path / "g.jsonl", [_GLAIVE] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=1024)
    tok = load_tokenizer(cfg)
    tok.chat_template = template
    trained, context = _trained_and_context(tok, build_datasets(cfg, get_task("causal_lm"), tok)["train"][0])
    assert 'CALL search({"q": "chicken"})' in trained and "Try a stir fry." in trained
    assert "search:recipe search;" in context and '<|tool|>{"hits"' in context
    assert '"name": "search"' not in trained + context  # the call as the template writes it, not twice


def test_sharegpt_tools_with_a_template_without_tool_support_are_text_with_a_warning(tmp_path, tiny_llama, caplog):
    import scaletune.data.render as render

    render._told_tools_as_text = False
    data = write_jsonl(tmp_path / "g.jsonl", [_GLAIVE] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=1024)
    tok = load_tokenizer(cfg)
    tok.chat_template = _CLOSING.replace("{{ END }}", "</s>")
    with caplog.at_level("WARNING", logger="scaletune"):
        ex = build_datasets(cfg, get_task("causal_lm"), tok)["train"][0]
    trained, context = _trained_and_context(tok, ex)
    assert "chat template takes no tools" in caplog.text
    assert '"name": "search"' in trained and "recipe search" in context and '<|user|>{"hits"' in context


_OPENAI = {"messages": [{"role": "user", "content": "weather in Paris?"},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"id": "c1", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
                        {"role": "assistant", "content": "It is 21 degrees."}],
           "tools": [{"type": "function", "function": {"name": "get_weather", "description": "current weather",
                                                       "parameters": {"type": "object"}}}]}


@pytest.mark.parametrize("native", [False, True])
def test_openai_tool_calls_in_messages(tmp_path, tiny_llama, caplog, native):
    """OpenAI's fine-tuning format with tools: a call's content is null (was refused: "content must be a
    string"), its arguments a JSON string; the call is trained, the schemas and the result are context."""
    data = write_jsonl(tmp_path / "o.jsonl", [_OPENAI] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=1024)
    tok = load_tokenizer(cfg)
    if native:
        tok.chat_template = _TOOL_TEMPLATE
    with caplog.at_level("WARNING", logger="scaletune"):
        trained, context = _trained_and_context(tok, build_datasets(cfg, get_task("causal_lm"), tok)["train"][0])
    assert "ignored" not in caplog.text
    assert "It is 21 degrees." in trained and "current weather" in context and "temp" in context
    if native:
        assert 'CALL get_weather({"city": "Paris"})' in trained
    else:
        assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in trained


def test_a_function_call_that_is_not_json_names_its_turn(tmp_path, tiny_llama):
    bad = {**_GLAIVE, "conversations": [_GLAIVE["conversations"][0], {"from": "function_call", "value": "search"}]}
    data = write_jsonl(tmp_path / "g.jsonl", [bad])
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    with pytest.raises(DataError, match=r"g.jsonl:1: conversations\[1\] \(function_call\) must be a JSON object"):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


@pytest.mark.parametrize("records,extra,message", [
    ([{"prompt": "q", "completion": "a"}], {"chat_template": "chatml"},
     r"data.chat_template: .*t.jsonl holds prompt_completion records, which are not conversations"),
    ([{"text": "plain text"}], {"chat_template": "chatml"},
     r"data.chat_template: .*t.jsonl holds text records, which are not conversations"),
    ([{"text": "plain text"}], {"train_on_prompt": True}, r"data.train_on_prompt: .*t.jsonl holds text records"),
])
def test_a_setting_the_detected_format_ignores_is_refused(tmp_path, tiny_llama, records, extra, message):
    """With data.format auto the format is known only from the data: a chat template the records never
    meet (the token ids were the same with and without it) is refused there."""
    from scaletune.errors import ConfigError

    data = write_jsonl(tmp_path / "t.jsonl", records * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, **extra)
    with pytest.raises(ConfigError, match=message):
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


def test_a_chat_template_that_drops_the_answers_is_named(tmp_path, tiny_llama):
    """A template that writes only the user turns left every example without targets, reported as "no
    target tokens within max_length": the fix it pointed at (a longer max_length) could not help."""
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]}] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    tok = load_tokenizer(cfg)
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(DataError, match=r"c.jsonl:1: the chat template renders assistant turn messages\[1\] as nothing"):
        build_datasets(cfg, get_task("causal_lm"), tok)


def test_a_template_that_takes_tools_but_not_tool_calls_gets_the_calls_as_text(tmp_path, tiny_llama):
    """A template that prints `tools` but knows no `tool_calls` would drop each call, and train an empty answer
    in its place: both are needed for tool use to go to the template natively."""
    data = write_jsonl(tmp_path / "g.jsonl", [_GLAIVE] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=1024)
    tok = load_tokenizer(cfg)
    tok.chat_template = "{% if tools %}<|tools|>{{ tools | length }}</s>{% endif %}" + _CLOSING.replace("{{ END }}", "</s>")
    trained, context = _trained_and_context(tok, build_datasets(cfg, get_task("causal_lm"), tok)["train"][0])
    assert '{"name": "search", "arguments": {"q": "chicken"}}' in trained
    assert "<|tools|>" not in context and "recipe search" in context


def test_a_tool_results_tool_call_id_reaches_a_template_that_takes_tools(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "o.jsonl", [_OPENAI] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=1024)
    tok = load_tokenizer(cfg)
    tok.chat_template = _TOOL_TEMPLATE.replace("<|{{ m.role }}|>", "<|{{ m.role }}{{ m.tool_call_id or '' }}|>")
    trained, context = _trained_and_context(tok, build_datasets(cfg, get_task("causal_lm"), tok)["train"][0])
    assert '<|toolc1|>{"temp": 21}' in context


def test_an_error_outside_the_chat_template_is_not_blamed_on_it(tmp_path, tiny_llama, monkeypatch):
    """Only what the template's own code raises is its fault ("fix the template"); an error of transformers' API
    (or scaletune's) propagates as itself."""
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]}] * 2)
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    tok = load_tokenizer(cfg)
    tok.chat_template = _CLOSING.replace("{{ END }}", "</s>")

    def broken(*args, **kwargs):
        raise ValueError("an API error")

    monkeypatch.setattr(tok, "apply_chat_template", broken)
    with pytest.raises(ValueError, match="an API error"):
        build_datasets(cfg, get_task("causal_lm"), tok)


def test_a_format_is_detected_by_all_its_columns_and_a_named_one_checked_for_them(tmp_path):
    from scaletune.data.formats import detect, get_format, ignored_fields

    # a text record with a `prompt` field is text (prompt_completion needs a completion too)
    assert detect([{"text": "a doc", "prompt": "meta"}], "t.jsonl").name == "text"
    assert detect([{"instruction": "q", "text": "a doc"}], "t.jsonl").name == "text"
    with pytest.raises(DataError, match=r"t.jsonl:3: format alpaca needs column\(s\) \['output'\]"):
        get_format("alpaca", [{"instruction": "q", "__where__": "t.jsonl:3"}], "t.jsonl")
    many = [{"text": "a", **{f"f{i:02d}": i for i in range(13)}}]
    line = ignored_fields(detect(many, "t.jsonl"), many, "data.train")
    assert line.endswith("f09 (1 record), and 3 more") and "f10" not in line


# Qwen2.5's and Gemma's shape: a newline after each turn's end marker, before the next turn's header
_NEWLINE_AFTER_END = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                      "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_the_newline_after_an_answers_end_marker_is_not_trained(tmp_path, tiny_llama):
    """The answer is trained up to its end marker (what generation stops at); the newline the template writes
    after it belongs to the next turn's scaffolding (was: a target in every turn)."""
    record = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2 \n"}]}
    runs = _trained_under(tmp_path, tiny_llama, record, _NEWLINE_AFTER_END, ["<|im_start|>", "<|im_end|>"])
    assert runs == ["a1<|im_end|>", "a2 \n<|im_end|>"]  # (the answer's own whitespace is kept)


def _trained_under(tmp_path, model, record: dict, template: str, specials: list[str]) -> list[str]:
    """The trained runs of text of `record` (a messages line) under chat `template`, after checking that the
    text is the template's whole rendering and that predict's prompt is training's, up to the last answer."""
    from scaletune.generation import prompt_ids, prompt_segments

    cfg = _cfg(tmp_path, model, data=write_jsonl(tmp_path / "c.jsonl", [record] * 2))
    tok = load_tokenizer(cfg)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template
    ex = build_datasets(cfg, get_task("causal_lm"), tok)["train"][0]
    ids, labels = ex["input_ids"], ex["labels"]
    runs, run = [], []
    for i, lab in zip(ids + [None], labels + [IGNORE]):
        if lab != IGNORE:
            run.append(i)
        elif run:
            runs.append(tok.decode(run))
            run = []
    assert tok.decode(ids).removeprefix(tok.bos_token) == tok.apply_chat_template(record["messages"], tokenize=False)
    prompt = prompt_ids(tok, prompt_segments(record, tok)[1])
    assert prompt == ids[:len(prompt)] and labels[len(prompt) - 1] == IGNORE and labels[len(prompt)] != IGNORE
    return runs


# Templates that write a turn otherwise when it is the last one: an empty reasoning block on the final answer
# (as Qwen3's does after the last question), and EOS after the whole conversation only (as Phi-3's)
_LAST_TURN_BLOCK = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
                    "{% if loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{{ m['content'] + '<|im_end|>\n' }}"
                    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
                    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_EOS_AT_THE_END = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


# (as Qwen3's: an answer before the last question is rendered without its reasoning)
_DROPS_EARLIER_REASONING = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% if loop.last %}"
    "{{ m['content'] }}{% else %}{{ m['content'].split('</think>')[-1].lstrip('\n') }}{% endif %}{{ '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_REASONED = ("<think>\nr1\n</think>\n\na1", "<think>\nr2\n</think>\n\na2")


@pytest.mark.parametrize("template, specials, answers, trained", [
    (_LAST_TURN_BLOCK, ["<|im_start|>", "<|im_end|>"], ("a1", "a2"),
     ["a1<|im_end|>", "<think>\n\n</think>\n\na2<|im_end|>"]),
    (_EOS_AT_THE_END, ["<|user|>", "<|assistant|>", "<|end|>"], ("a1", "a2"), ["a1<|end|>", "a2<|end|>\n</s>"]),
    (_DROPS_EARLIER_REASONING, ["<|im_start|>", "<|im_end|>", "<think>", "</think>"], _REASONED,
     ["a1<|im_end|>", "<think>\nr2\n</think>\n\na2<|im_end|>"]),
    # the same reasoned answer twice: the first is found where it is rendered (its answer alone), not in the
    # second, which keeps its reasoning (was refused as not incremental)
    (_DROPS_EARLIER_REASONING, ["<|im_start|>", "<|im_end|>", "<think>", "</think>"], (_REASONED[1],) * 2,
     ["a2<|im_end|>", "<think>\nr2\n</think>\n\na2<|im_end|>"]),
])
def test_a_template_that_writes_the_last_turn_otherwise_trains_each_answer_as_the_whole_renders_it(
        tmp_path, tiny_llama, template, specials, answers, trained):
    """Each answer is the span the whole conversation's rendering gives it (was: refused as not incremental,
    which every multi-turn conversation of Qwen3's and Phi-3's templates was)."""
    record = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": answers[0]},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": answers[1]}]}
    assert _trained_under(tmp_path, tiny_llama, record, template, specials) == trained


def test_a_turn_end_marker_of_plain_text_never_makes_the_next_user_turn_a_target(tmp_path, tiny_llama):
    """A Phi-3-shaped template (EOS after the whole conversation only) whose <|end|> is plain text, not a special
    token: the answer's end is not found, and the conversation is refused as before (was: the answer's target ran
    to the final EOS, the user's next turn trained)."""
    record = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                           {"role": "user", "content": "thanks, bye"}]}
    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "c.jsonl", [record] * 2))
    tok = load_tokenizer(cfg)
    tok.chat_template = _EOS_AT_THE_END
    with pytest.raises(DataError, match="does not render conversations incrementally") as caught:
        build_datasets(cfg, get_task("causal_lm"), tok)
    assert "model.new_special_tokens" in caught.value.hint
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})  # as it says
    ex = build_datasets(cfg, get_task("causal_lm"), tok)["train"][0]
    assert tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]) == "a1<|end|>"


# (as Mistral-7B-Instruct-v0.3's and Mistral-Nemo's: the system prompt goes into the user turn that is the last message,
# so a conversation ending in an answer loses it while the generation prompt before that answer has it)
_SYSTEM_IN_LAST_USER_TURN = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for m in loop_messages %}{% if m['role'] == 'user' %}{% if loop.last and system_message is defined %}"
    "{{ '[INST] ' + system_message + '\n\n' + m['content'] + '[/INST]' }}{% else %}"
    "{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}")


@pytest.mark.parametrize("task", ["causal_lm", "dpo"])
def test_a_template_that_moves_the_system_prompt_is_refused_showing_where_the_renderings_part(
        tmp_path, tiny_llama, task):
    """Mistral's template drops the system prompt from a conversation ending in an answer: refused as before,
    now quoting where the two renderings part and saying what to do (was: a hint to add special tokens, which
    the template's markers already are)."""
    system = {"role": "system", "content": "Be brief."}
    record = ({"messages": [system, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]}
              if task == "causal_lm" else
              {"prompt": [system, {"role": "user", "content": "q1"}], "chosen": [{"role": "assistant", "content": "a1"}],
               "rejected": [{"role": "assistant", "content": "a2"}]})
    cfg = _cfg(tmp_path, tiny_llama, task, data=write_jsonl(tmp_path / "c.jsonl", [record] * 2))
    tok = load_tokenizer(cfg)
    tok.chat_template = _SYSTEM_IN_LAST_USER_TURN
    with pytest.raises(DataError, match="does not render conversations incrementally") as caught:
        build_datasets(cfg, get_task(task), tok)
    said = str(caught.value)
    assert "'[INST] Be brief.\\n\\nq1[/INST]' where the whole conversation renders '[INST] q1[/INST] a1" in said
    assert "fold the system prompt into the first user turn" in caught.value.hint


def test_a_table_mixing_chat_formats_reads_each_row_in_its_own(tmp_path, tiny_llama):
    """A parquet (or hub) table of alpaca, sharegpt and messages records has every format's columns in each row,
    null where the record had none: a row was taken for the first format whose column it held, null or not
    (alpaca's, refused as "field 'instruction' must be a string, got NoneType"), though JSON lines mixed fine."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
             "conversations": None, "instruction": None, "input": None, "output": None},
            {"messages": None, "conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}],
             "instruction": None, "input": None, "output": None},
            {"messages": None, "conversations": None, "instruction": "q3", "input": "", "output": "a3"}]
    table = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table)
    cfg = _cfg(tmp_path, tiny_llama, data=str(table))
    tok = load_tokenizer(cfg)
    train = build_datasets(cfg, get_task("causal_lm"), tok)["train"]
    assert [_trained_and_context(tok, ex)[0] for ex in train] == ["a1</s>", "a2</s>", "a3</s>"]


@pytest.mark.parametrize("task", ["causal_lm", "dpo"])
def test_a_null_weight_in_a_table_is_no_weight(tmp_path, tiny_llama, task):
    """OpenAI-format messages where some turns have a `weight`: a parquet (or hub) table gives every turn the key,
    null where the turn had none, and each such turn was refused as "weight must be 0 or 1, got None"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    turns = [{"role": "user", "content": "q1", "weight": None}, {"role": "assistant", "content": "a1", "weight": 0},
             {"role": "user", "content": "q2", "weight": None}]
    answer = {"role": "assistant", "content": "a2", "weight": None}
    row = ({"messages": [*turns, answer]} if task == "causal_lm" else
           {"prompt": turns, "chosen": [answer], "rejected": [{**answer, "content": "no"}]})
    table = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([row]), table)
    cfg = _cfg(tmp_path, tiny_llama, task, data=str(table))
    tok = load_tokenizer(cfg)
    ex = build_datasets(cfg, get_task(task), tok)["train"][0]
    trained, context = _trained_and_context(tok, ex)
    assert trained == "a2</s>" and "a1" in context


@pytest.mark.parametrize("content,kind", [([{"type": "text", "text": "hi"}], r"a list of content parts \(text\)"),
                                          ([{"type": "image_url", "image_url": {"url": "x.png"}},
                                            {"type": "text", "text": "what is it?"}],
                                           r"a list of content parts \(image_url, text\)"),
                                          (None, "null")])
def test_content_that_is_no_string_says_what_it_is(tmp_path, tiny_llama, content, kind):
    """OpenAI's content parts ([{"type": "text", "text": ...}], images beside them in vision data) were refused as
    "content must be a string", not saying what the data held nor what to do with it."""
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": content},
                                                            {"role": "assistant", "content": "a"}]}])
    cfg = _cfg(tmp_path, tiny_llama, data=data)
    with pytest.raises(DataError, match=rf"c.jsonl:1: messages\[0\].content must be a string, got {kind}") as info:
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))
    assert ("join the text parts" in str(info.value)) == (content is not None)


def test_openai_legacy_function_calling_is_named_with_how_to_convert(tmp_path, tiny_llama):
    """`functions` / assistant `function_call` / role `function`: it was refused as "content ... got null" or
    "needs role system|user|assistant|tool", with nothing saying it is the legacy form or what the new one is."""
    turns = [{"role": "user", "content": "weather?"},
             {"role": "assistant", "content": None, "function_call": {"name": "w", "arguments": "{}"}},
             {"role": "function", "name": "w", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "f.jsonl", [{"messages": turns}] * 2))
    with pytest.raises(DataError, match=r"f.jsonl:1: messages\[1\] is in OpenAI's legacy function-calling form") as err:
        build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))
    assert "tool_calls" in str(err.value.hint) and "role 'tool'" in str(err.value.hint)
