"""data.train_on_last_turn: only a conversation's last assistant turn is trained (LLaMA-Factory's mask_history)."""

from __future__ import annotations

import pytest
import yaml

from scaletune.data import build_datasets
from scaletune.model import load_tokenizer
from scaletune.tasks import IGNORE, get_task

from stutil import assert_clean_error, run_cli, write_jsonl
from stutil import data_config as _cfg

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _turns(weights: tuple | None = None) -> list[dict]:
    turns = []
    for i in range(3):
        turns.append({"role": "user", "content": f"question {i}"})
        turns.append({"role": "assistant", "content": f"answer number {i}"})
        if weights is not None:
            turns[-1]["weight"] = weights[i]
    return turns


def _built(tmp_path, tiny_llama, name, records, template, **data):
    cfg = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / f"{name}.jsonl", records), **data)
    tok = load_tokenizer(cfg)
    if template:
        tok.chat_template = TEMPLATE
    return build_datasets(cfg, get_task("causal_lm"), tok)["train"], tok


@pytest.mark.parametrize("template", [False, True])
@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca"])
def test_last_turn_only_equals_earlier_answers_given_weight_0(tmp_path, tiny_llama, template, fmt):
    """The same ids, and targets on the last answer alone, as the conversation whose earlier answers have weight 0:
    for each conversation format (sharegpt's turns and alpaca's history have no weights of their own)."""
    if fmt == "messages":
        record = {"messages": _turns()}
    elif fmt == "sharegpt":
        record = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]}
                                    for t in _turns()]}
    else:
        turns = _turns()
        record = {"instruction": turns[4]["content"], "input": "", "output": turns[5]["content"],
                  "history": [[turns[i]["content"], turns[i + 1]["content"]] for i in (0, 2)]}
    last, tok = _built(tmp_path, tiny_llama, "last", [record] * 2, template, train_on_last_turn=True)
    every, _ = _built(tmp_path, tiny_llama, "every", [record] * 2, template)
    weighted, _ = _built(tmp_path, tiny_llama, "weighted", [{"messages": _turns((0, 0, 1))}] * 2, template)
    assert last["input_ids"] == every["input_ids"] == weighted["input_ids"]
    assert last["labels"] == weighted["labels"] != every["labels"]
    trained = tok.decode([i for i, lab in zip(last["input_ids"][0], last["labels"][0]) if lab != IGNORE])
    assert "answer number 2" in trained and "number 0" not in trained and "number 1" not in trained


def test_the_last_trained_answer_is_kept_and_prompts_train_with_train_on_prompt(tmp_path, tiny_llama):
    """A last answer the data gives weight 0 stays context: the last one with weight is trained. With
    train_on_prompt the questions are trained too, the earlier answers still not."""
    last, tok = _built(tmp_path, tiny_llama, "w", [{"messages": _turns((1, 1, 0))}] * 2, False,
                       train_on_last_turn=True, train_on_prompt=True)
    trained = tok.decode([i for i, lab in zip(last["input_ids"][0], last["labels"][0]) if lab != IGNORE])
    assert "answer number 1" in trained and "number 0" not in trained and "number 2" not in trained
    assert all(f"question {i}" in trained for i in range(3))


@pytest.mark.parametrize("case, fragments", [
    ({"data": {"train_on_last_turn": True, "format": "text"}}, ["data.train_on_last_turn", "no turns"]),
    ({"task": "seq_cls", "data": {"train_on_last_turn": True}}, ["data.train_on_last_turn: only used by causal_lm"]),
    ({"data": {"train_on_last_turn": True}, "records": [{"prompt": "p", "completion": "c"}] * 4},
     ["data.train_on_last_turn", "holds prompt_completion records"]),
])
def test_last_turn_refusals(make_config, tmp_path, capsys, case, fragments):
    data = dict(case["data"])
    if "records" in case:
        data["train"] = str(write_jsonl(tmp_path / "pc.jsonl", case["records"]))
        data["eval"] = None
    path = make_config(case.get("task", "causal_lm"), data=data)
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, *fragments)


def test_llama_factory_mask_history_converts(tmp_path, capsys):
    src = tmp_path / "theirs.yaml"
    src.write_text("model_name_or_path: m\nstage: sft\nmask_history: true\n")
    code, _, err = run_cli(["convert", src, "--out", tmp_path / "run.yaml"], capsys)
    assert code == 0, err
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())["data"]["train_on_last_turn"] is True
