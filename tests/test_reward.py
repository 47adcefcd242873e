"""task reward: the pairwise loss by hand from the model's rewards, a padded row's reward its own, the metrics by
hand, training ranking the training pairs, the saved adapter (with its head) scoring the same in `eval` and
`predict`, its rows the very rows dpo builds, bad pairs, predict lines and configs refused.
(The method matrix: test_methods.py, whose cases cover every method x task, reward's too.)"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoTokenizer

from scaletune.config import load_config
from scaletune.tasks import get_task
from scaletune.tasks.reward import reward_metrics
from scaletune.train import setup

from stutil import (
    assert_clean_error,
    data_config,
    dpo_records,
    metrics_around_training,
    read_metrics,
    run_cli,
    task_config_problems,
    write_jsonl,
)


def _randomise(model) -> None:
    """LoRA's B away from zero and the score head redrawn: rows then get rewards far apart."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ("score" in name and p.requires_grad):
                p.normal_(0, 0.5)


def test_the_loss_is_the_pairwise_formula_from_each_rows_reward_alone(make_config):
    """The rows of 5 pairs (lengths differ: padding is in play) in one forward give each row the reward it gets
    alone, unpadded; the loss is -log sigmoid(r_c - r_r) + c (r_c + r_r)^2 summed over the pairs."""
    run, _ = setup(load_config(make_config("reward", train={"reward_center_weight": 0.05})))
    model = run.model.eval()
    _randomise(model)
    pad = run.tokenizer.pad_token_id
    assert model.config.pad_token_id == pad  # (transformers finds each row's last token by the collator's pad)
    examples = [run.data["train"][i] for i in range(5)]
    batch = run.task.collate(examples, pad)
    rows = [e["input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
    assert len({len(r) for r in rows}) > 1 and (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        loss, pairs = run.task.loss_sum(model, batch)
        alone = torch.stack([model(input_ids=torch.tensor([r])).logits[0, 0] for r in rows])
    torch.testing.assert_close(pairs, alone.view(2, 5).T, rtol=0, atol=1e-5)
    chosen, rejected = alone.view(2, 5)
    expected = (-F.logsigmoid(chosen - rejected) + 0.05 * (chosen + rejected) ** 2).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert (chosen - rejected).abs().max() > 0.1  # (rewards differ: the test can fail)
    assert run.task.count_targets(batch) == 5


def test_a_padded_rows_reward_is_read_at_its_last_token_not_at_a_pad(make_config):
    """The same row padded by 7 pad tokens, and with a different token in their place (had the reward been read
    at the row's end, its width, that token would change it): the reward is the unpadded row's."""
    run, _ = setup(load_config(make_config("reward")))
    model = run.model.eval()
    _randomise(model)
    pad = run.tokenizer.pad_token_id
    row = run.data["train"][0]["input_ids"]
    with torch.no_grad():
        alone = run.task.rewards(model, run.task.collate([run.data["train"][0]], pad))[0]
        padded = torch.tensor([row + [pad] * 7])
        mask = torch.tensor([[1] * len(row) + [0] * 7])
        got = run.task.rewards(model, {"input_ids": padded, "attention_mask": mask})
        other = model(input_ids=torch.tensor([row + [5] * 7])).logits[0, 0]
    torch.testing.assert_close(got[0], alone, rtol=0, atol=1e-5)
    assert (other - alone).abs() > 1e-3


def test_accuracy_margin_and_mean_rewards_by_hand():
    preds = [(1.0, 0.0), (0.0, 2.0), (3.0, 3.0), (0.5, -0.5)]  # won, lost, a tie (no win), won
    m = reward_metrics(preds, 0.7, 4)
    assert m["accuracy"] == 0.5 and m["loss"] == 0.7 and m["pairs"] == 4
    assert m["reward_margin"] == pytest.approx((1 - 2 + 0 + 1) / 4)
    assert m["chosen_reward"] == pytest.approx(4.5 / 4) and m["rejected_reward"] == pytest.approx(4.5 / 4)
    assert get_task("reward").metrics(preds, 2.8, 4, None) == {**m, "loss": 0.7}


def test_training_ranks_the_training_pairs(make_config):
    before, after = metrics_around_training(make_config, "reward")
    assert after["accuracy"] >= 0.9 and after["accuracy"] > before["accuracy"], (before, after)
    assert after["reward_margin"] > 1.0 and after["loss"] < min(0.3, before["loss"]), (before, after)


def test_the_saved_adapter_and_head_score_as_training_did_in_eval_and_predict(make_config, tmp_path, capsys):
    """`eval` of the saved adapter reproduces the run's last eval; `predict` of a pair's chosen side (as a
    conversation ending in it) gives the reward `eval --predictions` gave that pair's chosen answer."""
    path = make_config("reward", n=16, train={"max_steps": 6, "eval_every": 6, "learning_rate": 5e-3})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    logged = read_metrics(tmp_path / "run", "eval")[-1]
    code, out, err = run_cli(["eval", path, "--predictions", tmp_path / "pred.jsonl"], capsys)
    assert code == 0, err
    scored = json.loads(out[out.index("{"):])
    for key in ("loss", "accuracy", "reward_margin", "chosen_reward", "rejected_reward"):
        assert scored[key] == pytest.approx(logged[key], abs=1e-5), key
    assert abs(scored["reward_margin"]) > 1e-3  # (the head moved: a fresh one would not reproduce it)
    lines = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    record = dpo_records(16, seed=1)[0]  # (data/eval.jsonl's first pair)
    # (its chosen side as ShareGPT, its rejected one as messages: both chats, rendered alike)
    inputs = [{"conversations": [*record["conversations"], record["chosen"]]},
              {"messages": [{"role": "user", "content": record["conversations"][0]["value"]},
                            {"role": "assistant", "content": record["rejected"]["value"]}]}]
    write_jsonl(tmp_path / "in.jsonl", inputs)
    code, out, err = run_cli(["predict", path, "--input", tmp_path / "in.jsonl"], capsys)
    assert code == 0, err
    got = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert got[0]["reward"] == pytest.approx(lines[0]["chosen_reward"], abs=1e-5)
    assert got[1]["reward"] == pytest.approx(lines[0]["rejected_reward"], abs=1e-5)


def test_rows_are_dpos_rows(tmp_path, tiny_llama):
    """Each pair's chosen and rejected rows are the token sequences dpo trains on (both layouts' renderings)."""
    records = dpo_records(3) + [{"prompt": "Reverse: a b\n", "chosen": "b a", "rejected": "a b"}]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    encoded: dict[str, list] = {}
    for task_name in ("dpo", "reward"):
        for recs in (records[:3], records[3:]):  # (one layout a run)
            cfg = data_config(tmp_path, tiny_llama, task_name, write_jsonl(tmp_path / "p.jsonl", recs))
            task = get_task(task_name)
            task.setup(recs, cfg, "p.jsonl")
            encoded.setdefault(task_name, []).extend(task.encode(r, tokenizer, cfg, None) for r in recs)
    assert [row.pop("margin") for row in encoded["reward"]] == [0.0] * 4  # (the pairs have none)
    assert encoded["reward"] == encoded["dpo"] and len(encoded["dpo"]) == 4 and all(encoded["dpo"])


def test_a_pairs_margin_is_taken_off_its_reward_difference(make_config, tmp_path, caplog):
    """TRL's `margin` column: per pair -log sigmoid(r_c - r_r - m), m 0 where a pair has none or a null one (a
    table row); read, not warned about as an ignored field."""
    path = make_config("reward", data={"eval": None})
    records = dpo_records(5)
    margins = [1.5, None, "absent", 0, -0.5]
    for rec, m in zip(records, margins):
        if m != "absent":
            rec["margin"] = m
    write_jsonl(tmp_path / "data/train.jsonl", records * 4)
    with caplog.at_level("WARNING"):
        run, _ = setup(load_config(path))
    assert "ignored" not in caplog.text
    model = run.model.eval()
    _randomise(model)
    examples = [run.data["train"][i] for i in range(len(run.data["train"]))][:6]
    batch = run.task.collate(examples, run.tokenizer.pad_token_id)
    by_text = {tuple(r["input_ids"]): m for r, m in zip(examples, batch["margin"].tolist())}
    assert sorted(set(by_text.values())) == [-0.5, 0.0, 1.5]
    with torch.no_grad():
        loss, pairs = run.task.loss_sum(model, batch)
    expected = -F.logsigmoid(pairs[:, 0] - pairs[:, 1] - batch["margin"]).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert (loss - (-F.logsigmoid(pairs[:, 0] - pairs[:, 1]).sum())).abs() > 1e-3  # (the margins count)


@pytest.mark.parametrize("margin", ["big", True, [1], float("nan")], ids=["text", "bool", "list", "nan"])
def test_a_margin_that_is_no_finite_number_is_refused_naming_its_line(make_config, tmp_path, capsys, margin):
    path = make_config("reward", n=8, data={"eval": None})
    good = {"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2}
    write_jsonl(tmp_path / "data/train.jsonl", [good, {**good, "margin": margin}])
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "train.jsonl:2", "`margin` must be a finite number")


def test_a_record_that_is_no_pair_is_refused_naming_its_file_and_line(make_config, tmp_path, capsys):
    path = make_config("reward", n=8, data={"eval": None})
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    write_jsonl(tmp_path / "data/train.jsonl", [good, good, {"prompt": "q", "completion": "a"}])
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "train.jsonl:3", "a preference pair needs chosen, rejected")


def test_a_predict_line_without_an_answer_or_in_the_other_rendering_is_refused(make_config, tmp_path, capsys):
    path = make_config("reward", n=8, train={"max_steps": 1}, data={"eval": None})
    assert run_cli(["train", path], capsys)[0] == 0
    for line, says in (({"text": "just a text"}, "no prompt and answer to score"),
                       ({"messages": [{"role": "user", "content": "q"}]}, "'messages' must end in the answer"),
                       ({"prompt": "q", "completion": "a"}, "the line is plain text, but this reward model was "
                                                            "trained on chats")):
        write_jsonl(tmp_path / "in.jsonl", [{"prompt": [{"role": "user", "content": "q"}],
                                             "completion": [{"role": "assistant", "content": "a"}]}, line])
        code, _, err = run_cli(["predict", path, "--input", tmp_path / "in.jsonl"], capsys)
        assert_clean_error(code, err, "in.jsonl:2", says)
        if "plain text" in says:  # (the hint offered the very shape refused)
            assert "plain-text pairs" not in err and '{"messages"' in err, err


@pytest.mark.parametrize("task, changes, says", [
    ("reward", {"train": {"reward_center_weight": -0.1}}, "train.reward_center_weight: must be a number >= 0"),
    ("dpo", {"train": {"reward_center_weight": 0.01}}, "train.reward_center_weight: only read by task reward, not dpo"),
    ("reward", {"train": {"dpo_beta": 0.5}}, "train.dpo_beta: only read by tasks dpo and kto"),
    ("reward", {"peft": {"method": "p_tuning"}}, "peft.method=p_tuning with task reward: peft passes the model "
                                                 "embeddings"),
    ("reward", {"peft": {"method": "prompt_tuning"}}, "prompt_tuning with task reward is not supported"),
    ("reward", {"train": {"best_metric": "reward_accuracy"}}, "'reward_accuracy' is not a reward eval metric"),
    ("reward", {"train": {"eval_generate": True}, "data": {"eval": "e.jsonl"}},
     "train.eval_generate: reward's eval scores given answers"),
])
def test_bad_reward_configs_are_refused(task, changes, says):
    assert any(says in p for p in task_config_problems(task, **changes)), task_config_problems(task, **changes)


def test_reward_reads_chat_templates_and_max_prompt_length():
    assert task_config_problems("reward", data={"max_prompt_length": 16, "chat_template": "chatml"}) == []
    assert task_config_problems("reward", train={"best_metric": "accuracy"}, data={"eval": "e.jsonl"}) == []


def test_a_predict_line_with_an_empty_answer_is_named_as_such(make_config, tmp_path, capsys):
    """The predict line's answer is no training pair's `chosen`: the message says what is wrong with the line
    (it said "field 'chosen' is empty (nothing to learn from)")."""
    path = make_config("reward", n=8, train={"max_steps": 1}, data={"eval": None})
    assert run_cli(["train", path], capsys)[0] == 0
    for line in ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": " "}]},
                 {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}):
        write_jsonl(tmp_path / "in.jsonl", [line])
        code, _, err = run_cli(["predict", path, "--input", tmp_path / "in.jsonl"], capsys)
        assert_clean_error(code, err, "in.jsonl:1", "the answer to score is empty")
        assert "chosen" not in err and "learn" not in err


def test_a_base_whose_config_pads_with_another_id_than_the_tokenizer_scores_a_padded_row_as_alone(
        make_config, tiny_llama, tmp_path):
    """config.json's pad_token_id 0 (BOS) where the tokenizer has no pad token (so rows are padded with its eos):
    transformers reads a row's reward at its last token that is not config.pad_token_id, which was the padding
    of every shorter row of a batch; the config takes the collator's pad."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    conf = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**conf, "pad_token_id": 0}))
    tok = json.loads((base / "tokenizer_config.json").read_text())
    tok.pop("pad_token", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tok))
    run, _ = setup(load_config(make_config("reward", model={"name_or_path": str(base)})))
    model = run.model.eval()
    _randomise(model)
    pad = run.tokenizer.pad_token_id
    assert pad == run.tokenizer.eos_token_id != 0
    examples = [run.data["train"][i] for i in range(5)]
    rows = [e["input_ids"] for e in examples]
    assert len({len(r) for r in rows}) > 1
    with torch.no_grad():
        batched = run.task.rewards(model, run.task.collate(examples, pad))[:5]
        alone = torch.stack([model(input_ids=torch.tensor([r])).logits[0, 0] for r in rows])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


def test_a_predict_line_whose_prompt_fills_max_length_gets_no_reward(make_config, tmp_path, capsys):
    """Two answers to a prompt longer than data.max_length: their rows held no answer token, so both got the
    prompt's reward (a tie whatever the answers); the line says it scored nothing, as training skips the pair."""
    path = make_config("reward", n=8, train={"max_steps": 1}, data={"eval": None})
    assert run_cli(["train", path], capsys)[0] == 0
    prompt = [{"role": "user", "content": "a long question " * 60}]
    lines = [{"messages": [*prompt, {"role": "assistant", "content": answer}]} for answer in ("yes", "no way")]
    lines.append({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}]})
    write_jsonl(tmp_path / "in.jsonl", lines)
    code, out, err = run_cli(["predict", path, "--input", tmp_path / "in.jsonl", "data.max_length=64"], capsys)
    assert code == 0, err
    got = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert [g["reward"] for g in got[:2]] == [None, None]
    assert "data.max_length=64" in got[0]["unscored"]
    assert isinstance(got[2]["reward"], float) and "unscored" not in got[2]


def test_a_chat_models_predictions_go_on_to_the_reward_models_predict_as_they_are(make_config, tmp_path, capsys):
    """causal_lm predict of a chat line echoes its conversation with the answer (its reference turn left out) in
    the line's own keys; the reward model's predict reads that output file as it is and scores each answer
    with its whole conversation, as it scores the same conversation written by hand."""
    reward = make_config("reward", n=8, train={"max_steps": 1}, data={"eval": None})
    assert run_cli(["train", reward], capsys)[0] == 0
    chats = [{"conversations": [{"from": "human", "value": r["conversations"][0]["value"]}, r["chosen"]]}
             for r in dpo_records(8)]
    sft = make_config("causal_lm", n=8, train={"max_steps": 1}, data={"eval": None},
                      output_dir=str(tmp_path / "sft"))
    raw = yaml.safe_load(sft.read_text())
    raw["data"]["train"] = str(write_jsonl(tmp_path / "chats.jsonl", chats))
    sft.write_text(yaml.safe_dump(raw))
    assert run_cli(["train", sft], capsys)[0] == 0
    inputs = [chats[0],  # (its reference answer is left out of the echo)
              {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: a b"}]}]
    write_jsonl(tmp_path / "in.jsonl", inputs)
    code, out, err = run_cli(["predict", sft, "--input", tmp_path / "in.jsonl", "--max-new-tokens", 4], capsys)
    assert code == 0, err
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert lines[0]["conversations"] == [chats[0]["conversations"][0], {"from": "gpt", "value": lines[0]["completion"]}]
    assert lines[1]["messages"] == [*inputs[1]["messages"], {"role": "assistant", "content": lines[1]["completion"]}]
    (tmp_path / "generated.jsonl").write_text(out)
    code, out, err = run_cli(["predict", reward, "--input", tmp_path / "generated.jsonl"], capsys)
    assert code == 0, err
    scored = [json.loads(x)["reward"] for x in out.splitlines() if x.startswith("{")]
    by_hand = [{"conversations": lines[0]["conversations"]}, {"messages": lines[1]["messages"]}]
    write_jsonl(tmp_path / "by_hand.jsonl", by_hand)
    code, out, err = run_cli(["predict", reward, "--input", tmp_path / "by_hand.jsonl"], capsys)
    assert code == 0, err
    assert scored == [json.loads(x)["reward"] for x in out.splitlines() if x.startswith("{")]
    assert all(isinstance(r, float) for r in scored)
