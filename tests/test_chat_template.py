"""data.chat_template: the conversation rendering chosen in the config is the one trained on and the one
the adapter's tokenizer carries into predict; bad choices are one error naming them."""

from __future__ import annotations

import pytest

from scaletune.cli import main
from scaletune.config import load_config
from scaletune.data.templates import CHATML
from scaletune.model import read_tokenizer
from scaletune.train import setup


def _decoded(run, i=0):
    ex = run.data["train"][i]
    tok = run.tokenizer
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    return tok.decode(ex["input_ids"]), tok.decode(trained)


def test_chatml_is_trained_on_and_travels_with_the_adapter(make_config, tmp_path):
    path = make_config("causal_lm", n=16, data={"chat_template": "chatml", "packing": False, "max_length": 512},
                       train={"max_steps": 1, "eval_every": None})
    run, _ = setup(load_config(path))
    text, trained = _decoded(run)
    assert "<|im_start|>user\nReverse the order of these words." in text.replace(" <", "<")
    assert "<|im_start|>assistant\n" in text.replace(" <", "<")
    # the answer, its <|im_end|> and the eos token are trained on; the user turn and headers are not
    assert "Reverse" not in trained and trained.rstrip().endswith(run.tokenizer.eos_token)
    assert "im_end" in trained
    from scaletune.loop import fit
    from scaletune.stopflag import StopFlag

    assert fit(run, StopFlag()) == "done"
    saved = read_tokenizer(run.cfg, str(run.output_dir / "adapter"))
    assert saved.chat_template == CHATML  # predict renders prompts as training did


def test_default_overrides_the_tokenizers_own_template(make_config, tmp_path):
    import shutil

    yaml_path = make_config("causal_lm", n=8, train={"max_steps": 1})
    base = load_config(yaml_path).model.name_or_path
    templated = tmp_path / "templated"  # a model whose tokenizer has a (ChatML) template of its own
    shutil.copytree(base, templated)
    tok = read_tokenizer(load_config(yaml_path), str(templated))
    tok.chat_template = CHATML
    tok.save_pretrained(str(templated))
    own = make_config("causal_lm", n=8, model={"name_or_path": str(templated)}, train={"max_steps": 1})
    run, _ = setup(load_config(own), overwrite=True)
    assert "<|im_start|>" in _decoded(run)[0]
    default = make_config("causal_lm", n=8, model={"name_or_path": str(templated)},
                          data={"chat_template": "default"}, train={"max_steps": 1})
    run, _ = setup(load_config(default), overwrite=True)
    assert "### Instruction:" in _decoded(run)[0] and run.tokenizer.chat_template is None
    mine = make_config("causal_lm", n=8, data={"chat_template": CHATML_FILE(tmp_path)}, train={"max_steps": 1})
    run, _ = setup(load_config(mine), overwrite=True)
    assert "[[user]]" in _decoded(run)[0]


def CHATML_FILE(tmp_path):  # a user's own template file
    f = tmp_path / "mine.jinja"
    f.write_text("{% for m in messages %}[[{{ m['role'] }}]] {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                 "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}[[assistant]] {% endif %}")
    return str(f)


@pytest.mark.parametrize(("value", "wanted"), [
    ("chatmlx", "data.chat_template: 'chatmlx' is neither chatml | default nor a template file"),
    ("DIR", "is a directory)"),
    ("", "data.chat_template: empty; give chatml | default or a template file"),  # (was "is a directory")
    ("LOOP", "too many levels of symbolic links)"),
    ("  \n", "broken.jinja is empty"),
    ("{% for m in messages %}{{ m['content'] }", "broken.jinja:1: "),  # does not parse
    # parses, then fails on the data: each named as the template's failure on that record
    ("{{ 1/0 }}", "the chat template failed while rendering this conversation: ZeroDivisionError"),
    ("{{ messages + 1 }}", "the chat template failed while rendering this conversation: TypeError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "the chat template failed while rendering this "
                                                       "conversation: RecursionError"),
])
def test_a_bad_template_is_one_error(make_config, tmp_path, capsys, value, wanted):
    if value == "DIR":
        value = str(tmp_path)
    elif value == "LOOP":
        (tmp_path / "loop.jinja").symlink_to(tmp_path / "loop.jinja")
        value = str(tmp_path / "loop.jinja")
    elif value not in ("chatmlx", ""):
        (tmp_path / "broken.jinja").write_text(value)
        value = str(tmp_path / "broken.jinja")
    path = make_config("causal_lm", n=8, data={"chat_template": value})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert wanted in err and "Traceback" not in err, err


def test_another_tools_template_name_points_to_the_tokenizers_own(tmp_path, monkeypatch):
    """LLaMA-Factory's `template: llama3` carried to data.chat_template was refused with no word that null takes
    the tokenizer's own template, which is what a chat model's user wants."""
    from scaletune.data.templates import chat_template_text
    from scaletune.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        chat_template_text("llama3")
    assert str(err.value).endswith("file not found); leave the key out (null) for the tokenizer's own"), err.value
    with pytest.raises(ConfigError) as err:  # a path is a file the user meant: no such pointer
        chat_template_text("templates/mine.jinja")
    assert "tokenizer's own" not in str(err.value)
    # their alpaca template is scaletune's default rendering, which the refusal did not say
    with pytest.raises(ConfigError) as err:
        chat_template_text("alpaca")
    assert str(err.value).endswith("for the tokenizer's own; LLaMA-Factory's and axolotl's alpaca template is "
                                   "scaletune's default (its Alpaca-style rendering)"), err.value


def test_only_for_causal_lm(make_config, capsys):
    path = make_config("seq_cls", data={"chat_template": "chatml"})
    assert main(["train", str(path)]) == 2
    assert "data.chat_template: only used by causal_lm, dpo, kto, reward, not seq_cls" in capsys.readouterr().err


def test_a_template_that_renders_nothing_is_named(make_config, tmp_path, capsys):
    (tmp_path / "empty.jinja").write_text("{% if false %}x{% endif %}")
    path = make_config("causal_lm", n=8, data={"chat_template": str(tmp_path / "empty.jinja")})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "renders assistant turn messages[1] as nothing" in err, err


_CONVERSATIONS = [
    [{"role": "user", "content": "Add 2 and 5."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Add 2 and 5."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "one"}, {"role": "assistant", "content": "two"}],
    [{"role": "system", "content": "S"}, {"role": "assistant", "content": "Welcome."}, {"role": "user", "content": "Q"},
     {"role": "assistant", "content": "A"}],
    [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "{\"name\": \"weather\"}"},
     {"role": "tool", "content": "sunny"}],
]


@pytest.mark.parametrize("messages", _CONVERSATIONS, ids=range(len(_CONVERSATIONS)))
def test_the_built_in_rendering_as_a_chat_template_gives_trainings_text_and_predicts_ids(tiny_llama, messages):
    """A merged model of a run trained with scaletune's own rendering had a tokenizer without a chat template:
    `apply_chat_template` failed, and a user writing the format by hand had to guess it. The template merge saves
    gives the text training rendered (with an answer) and the ids `predict` gives the model (without one)."""
    from transformers import AutoTokenizer

    from scaletune.data.render import _joined, _render_default
    from scaletune.data.templates import alpaca_style_template
    from scaletune.generation import prompt_ids

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert not tok.chat_template
    text = _joined(_render_default(messages, tok.eos_token))
    tok.chat_template = alpaca_style_template(tok)
    assert tok.apply_chat_template(messages, tokenize=False) == tok.bos_token + text
    # the generation prompt: the text before the next answer, after any last turn (user, answer, tool result)
    following = _joined(_render_default([*messages, {"role": "assistant", "content": "NEXT"}], tok.eos_token))
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        tok.bos_token + following[:following.index("NEXT" + tok.eos_token)]
    if messages[-1]["role"] == "user":
        segments = [*_render_default(messages, tok.eos_token), ("", True)]
        got = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert got == prompt_ids(tok, segments)


def test_a_later_stage_on_the_merged_model_renders_tool_data_as_the_sft_did(tiny_llama):
    """SFT with the built-in rendering trains a tool result as `### Tool result:`; a later stage on the merged
    model (DPO, a second SFT) renders with the saved template, which was taken for one without tool support:
    the results became `### Instruction:` user turns, other ids than the model was trained on."""
    from transformers import AutoTokenizer

    from scaletune.data.formats import FORMATS
    from scaletune.data.render import to_segments
    from scaletune.data.templates import alpaca_style_template
    from scaletune.tasks.causal_lm import CausalLM

    rec = {"conversations": [{"from": "human", "value": "Weather?"},
                              {"from": "function_call", "value": "{\"name\": \"weather\", \"arguments\": {}}"},
                              {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}],
           "tools": "[{\"name\": \"weather\", \"description\": \"w\", \"parameters\": {}}]"}
    converted = FORMATS["sharegpt"].convert(rec)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    sft = CausalLM().tokens(to_segments(converted, tok, "x"), tok)
    tok.chat_template = alpaca_style_template(tok)
    assert CausalLM().tokens(to_segments(converted, tok, "x"), tok) == sft


def test_merge_saves_the_built_in_rendering_as_the_chat_template(make_config, tmp_path, capsys):
    from transformers import AutoTokenizer

    path = make_config("causal_lm", train={"max_steps": 1})
    assert main(["train", str(path)]) == 0
    assert main(["merge", str(path), "--out", str(tmp_path / "merged")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text == tok.bos_token + "### Instruction:\nHi\n\n### Response:\n"
    assert not AutoTokenizer.from_pretrained(tmp_path / "run" / "adapter").chat_template  # (predict's own path)
