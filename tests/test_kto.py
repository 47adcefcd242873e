"""task kto: the loss against the paper's formula computed by hand from the model's logits (adapter on and off, the
reference point from mismatched prompt/answer rows), 0.5 at step 0, training separating desirable from
undesirable rewards, both data layouts, bad records and configs refused."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from scaletune.config import load_config
from scaletune.errors import DataError
from scaletune.evaluate import evaluate
from scaletune.tasks import get_task
from scaletune.train import setup

from stutil import assert_clean_error, data_config, metrics_around_training, run_cli, task_config_problems, write_jsonl


def _logp_by_hand(model, ids: list[list[int]], labels: list[list[int]]) -> torch.Tensor:
    """Each row's summed log-probability of its targets, one unpadded row at a time: log_softmax + gather."""
    out = []
    for row, lab in zip(ids, labels):
        logits = model(input_ids=torch.tensor([row])).logits[0, :-1].float()
        target = torch.tensor(lab[1:])
        picked = torch.log_softmax(logits, -1).gather(1, target.clamp(min=0)[:, None])[:, 0]
        out.append((picked * (target != -100)).sum())
    return torch.stack(out)


def _randomise_lora_b(model) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def _split(example: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, answer ids, answer labels): the answer starts at the first target."""
    start = next(i for i, lab in enumerate(example["labels"]) if lab != -100)
    return example["input_ids"][:start], example["input_ids"][start:], example["labels"][start:]


def _by_hand(run, model, examples: list[dict]) -> tuple:
    """loss_sum's (loss, out) on `examples` and, by hand with each row unpadded, the answers' log-ratios (policy -
    reference), the reference point z over the mismatched rows (prompt i followed by answer i+1, cyclically) and
    those rows' ids."""
    n = len(examples)
    batch = run.task.collate(examples, run.tokenizer.pad_token_id)
    parts = [_split(e) for e in examples]
    ids, labels = [e["input_ids"] for e in examples], [e["labels"] for e in examples]
    kl_ids = [parts[i][0] + parts[(i + 1) % n][1] for i in range(n)]
    kl_labels = [[-100] * len(parts[i][0]) + parts[(i + 1) % n][2] for i in range(n)]
    with torch.no_grad():
        loss, out = run.task.loss_sum(model, batch)
        policy, kl_policy = _logp_by_hand(model, ids, labels), _logp_by_hand(model, kl_ids, kl_labels)
        with model.disable_adapter():
            reference, kl_reference = _logp_by_hand(model, ids, labels), _logp_by_hand(model, kl_ids, kl_labels)
    return loss, out, policy - reference, (kl_policy - kl_reference).mean().clamp(min=0), kl_ids, batch


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.5)])
def test_loss_equals_the_kto_formula_from_logits_with_and_without_the_adapter(make_config, weights):
    beta = 0.3
    run, _ = setup(load_config(make_config("kto", train={"dpo_beta": beta, "kto_desirable_weight": weights[0],
                                                         "kto_undesirable_weight": weights[1]})))
    model = run.model.eval()
    _randomise_lora_b(model)
    examples = [run.data["train"][i] for i in range(5)]
    loss, out, log_ratios, z, kl_ids, batch = _by_hand(run, model, examples)
    assert all(len(r) <= max(len(e["input_ids"]) for e in examples) for r in kl_ids)  # (no row wider than these)
    r = beta * log_ratios
    desirable = torch.tensor([e["desirable"] for e in examples], dtype=torch.bool)
    expected = torch.where(desirable, weights[0] * (1 - torch.sigmoid(r - beta * z)),
                           weights[1] * (1 - torch.sigmoid(beta * z - r)))
    assert desirable.any() and not desirable.all() and z > 1e-3  # (both kinds, and a reference point in play)
    assert len({len(e["input_ids"]) for e in examples}) > 1  # (padding is in play)
    torch.testing.assert_close(out[:, 0], r, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out[:, 2], z.expand(5), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(loss, expected.sum(), rtol=1e-5, atol=1e-5)
    assert r.abs().max() > 1e-2 and run.task.count_targets(batch) == 5


def test_a_mismatched_row_keeps_its_whole_answer_when_longer_than_the_examples(tmp_path, make_config):
    """One example with a long prompt and a short answer, the next with a short prompt and a long answer: the first's
    prompt followed by the second's answer is wider than either example, and is cut only at data.max_length (as
    TRL cuts it): z is the mean log-ratio of whole answers, as the rewards it is set against are. Cut to the
    examples' width it lost the answer's end (z 0 instead of TRL's 0.26 on 4 such examples)."""
    beta = 0.3
    records = [{"prompt": "Question: one two three four five six seven eight nine ten eleven?\nAnswer:",
                "completion": " no", "label": False},
               {"prompt": "Hi\n", "completion": "ALPHA BETA and then a lot of extra words that go on and on and on",
                "label": True}]
    path = make_config("kto", train={"dpo_beta": beta, "micro_batch_size": 2, "global_batch_size": 2},
                       data={"train": str(write_jsonl(tmp_path / "long.jsonl", records)), "eval": None})
    run, _ = setup(load_config(path))
    model = run.model.eval()
    _randomise_lora_b(model)
    examples = [run.data["train"][i] for i in range(2)]
    _, out, log_ratios, z, kl_ids, _ = _by_hand(run, model, examples)
    assert max(map(len, kl_ids)) > max(len(e["input_ids"]) for e in examples)  # (the case in point)
    assert z > 1e-3
    torch.testing.assert_close(out[:, 2], z.expand(2), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out[:, 0], beta * log_ratios, rtol=1e-5, atol=2e-5)


def test_a_micro_batch_of_one_has_no_reference_point(make_config):
    """A one-example micro-batch (an eval's last) has no mismatched pair: z is 0. It still runs the KL forward
    (on its own row, unused), so that every rank runs as many forwards as the others: ZeRO-3 gathers each
    layer's weights in every forward, from all ranks."""
    run, _ = setup(load_config(make_config("kto")))
    model = run.model.eval()
    _randomise_lora_b(model)
    batch = run.task.collate([run.data["train"][0]], run.tokenizer.pad_token_id)
    assert len(batch["input_ids"]) == 2  # (the example, and its stand-in mismatched row)
    forwards = []
    hook = model.get_base_model().register_forward_hook(lambda *_: forwards.append(1))
    with torch.no_grad():
        loss, out = run.task.loss_sum(model, batch)
    hook.remove()
    assert len(forwards) == 3  # (reference, KL estimate, policy: as in any micro-batch)
    assert out[0, 2] == 0 and out[0, 1] == 1  # z = 0; example 0 is desirable
    torch.testing.assert_close(loss, 1 - torch.sigmoid(out[0, 0]))


def test_at_step_0_the_policy_is_the_reference_so_the_loss_is_a_half(make_config):
    run, _ = setup(load_config(make_config("kto")))
    metrics = evaluate(run.accelerator, run.model, run.task, run.data["eval"], None, 4, run.tokenizer.pad_token_id)
    assert metrics["loss"] == pytest.approx(0.5, abs=1e-7) and metrics["examples"] == 16
    assert metrics["desirable_reward"] == metrics["undesirable_reward"] == metrics["kl"] == 0.0


def test_training_separates_desirable_from_undesirable_rewards(make_config):
    before, after = metrics_around_training(make_config, "kto", dpo_beta=0.5)
    assert before["reward_margin"] == 0.0 and before["loss"] == pytest.approx(0.5, abs=1e-7)
    assert after["desirable_reward"] > 0 > after["undesirable_reward"], after
    assert after["reward_margin"] > 1.0 and after["loss"] < 0.3, after


def _encoded(tmp_path, tiny_llama, records: list[dict], **data) -> tuple[list, object]:
    cfg = data_config(tmp_path, tiny_llama, "kto", write_jsonl(tmp_path / "feedback.jsonl", records), **data)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    task = get_task("kto")
    task.setup(records, cfg, "feedback.jsonl")
    return [task.encode(r, tokenizer, cfg, None) for r in records], tokenizer


@pytest.mark.parametrize("layout", ["llamafactory_messages", "llamafactory_sharegpt", "trl_messages", "trl_strings"])
@pytest.mark.parametrize("label", [True, False])
def test_each_layout_trains_only_the_answer_and_keeps_its_label(tmp_path, tiny_llama, layout, label):
    prompt, answer = "Reverse: alpha bravo", "bravo alpha"
    record = {"llamafactory_messages": {"messages": [{"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "Hello"},
                                                     {"role": "user", "content": prompt},
                                                     {"role": "assistant", "content": answer}]},
              "llamafactory_sharegpt": {"conversations": [{"from": "human", "value": "Hi"},
                                                          {"from": "gpt", "value": "Hello"},
                                                          {"from": "human", "value": prompt},
                                                          {"from": "gpt", "value": answer}]},
              "trl_messages": {"prompt": [{"role": "user", "content": prompt}],
                               "completion": [{"role": "assistant", "content": answer}]},
              "trl_strings": {"prompt": prompt + "\n", "completion": answer}}[layout]
    (ex,), tokenizer = _encoded(tmp_path, tiny_llama, [{**record, "label": label}])
    prompt_ids, _, answer_labels = _split(ex)
    assert tokenizer.decode([lab for lab in answer_labels if lab != -100]) == answer + tokenizer.eos_token
    assert prompt in tokenizer.decode(prompt_ids)  # (the first "Hello": context, never a target)
    assert ex["desirable"] == int(label)


def _pairs_and_examples(layout: str, n: int) -> tuple[list[dict], list[dict]]:
    """`n` preference pairs in `layout` and, written by hand, the unpaired feedback records they amount to: each
    pair's prompt with its chosen answer (label true), then with its rejected one (false)."""
    pairs, examples = [], []
    for i in range(n):
        q, good, bad = f"Reverse: alpha{i} bravo", f"bravo alpha{i}", f"alpha{i} bravo"
        user, said = {"role": "user", "content": q}, [{"role": "assistant", "content": a} for a in (good, bad)]
        if layout == "sharegpt":
            turns = [{"from": "human", "value": q}]
            pairs.append({"conversations": turns, "system": "Be brief.", "chosen": {"from": "gpt", "value": good},
                          "rejected": {"from": "gpt", "value": bad}})
            examples += [{"conversations": [*turns, {"from": "gpt", "value": a}], "system": "Be brief.", "label": lab}
                         for a, lab in ((good, True), (bad, False))]
        elif layout in ("trl_messages", "implicit_messages"):
            pairs.append({"prompt": [user], "chosen": said[:1], "rejected": said[1:]} if layout == "trl_messages"
                         else {"chosen": [user, said[0]], "rejected": [user, said[1]]})
            examples += [{"prompt": [user], "completion": [a], "label": lab} for a, lab in zip(said, (True, False))]
        else:  # (implicit: the text both begin with is the prompt)
            pairs.append({"prompt": q + "\n", "chosen": good, "rejected": bad} if layout == "trl_strings"
                         else {"chosen": f"{q}\n{good}", "rejected": f"{q}\n{bad}"})
            examples += [{"prompt": q + "\n", "completion": a, "label": lab} for a, lab in ((good, True), (bad, False))]
    return pairs, examples


@pytest.mark.parametrize("layout", ["sharegpt", "trl_messages", "trl_strings", "implicit_messages",
                                    "implicit_strings"])
def test_preference_pairs_are_two_examples_each_as_trls_unpair_makes_them(tmp_path, tiny_llama, layout):
    """A file of N pairs (any layout dpo reads) trains on 2N examples, the chosen answers desirable and the
    rejected not, each encoded as the unpaired record of the same prompt and answer is."""
    from scaletune.data import build_datasets

    pairs, examples = _pairs_and_examples(layout, 3)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    built = []
    for name, records in (("pairs", pairs), ("examples", examples)):
        cfg = data_config(tmp_path, tiny_llama, "kto", write_jsonl(tmp_path / f"{name}.jsonl", records))
        built.append(build_datasets(cfg, get_task("kto"), tokenizer)["train"])
    from_pairs, from_examples = built
    assert len(from_pairs) == 6 and from_pairs["desirable"] == [1, 0, 1, 0, 1, 0]
    for column in ("input_ids", "labels", "desirable"):
        assert from_pairs[column] == from_examples[column]


def test_the_demo_layout_reads_llamafactory_kto_data():
    """LLaMA-Factory's kto_en_demo.json's layout: messages ending in the judged answer, a boolean label."""
    from scaletune.data.feedback import layout, to_example

    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": False}
    converted, desirable = to_example(rec)
    assert layout(rec) == "messages" and desirable is False
    assert [m.get("train", True) is not None for m in converted["messages"]] == [True, True]


@pytest.mark.parametrize("record, says", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "a feedback example needs label"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": "true"},
     "field 'label' must be true (a desirable answer) or false"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": 1},
     "field 'label' must be true"),
    ({"messages": [{"role": "user", "content": "q"}], "label": True},
     "the conversation must end in one assistant answer"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "assistant", "content": "b"}], "label": True}, "its turns are: user assistant assistant"),
    ({"prompt": "q", "completion": " ", "label": True}, "field 'completion' is empty"),
    ({"prompt": "q", "label": True}, "a feedback example needs completion"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "label": True}, "a preference pair ('chosen', 'rejected') takes "
                                                                     "no 'label'"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are the same answer"),
    ({"chosen": "Yes.", "rejected": "No."}, "'chosen' and 'rejected' share no prompt"),
])
def test_a_bad_record_is_refused_naming_its_file_and_line(make_config, tmp_path, capsys, record, says):
    path = make_config("kto", n=8, data={"eval": None})
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": True}
    if "prompt" in record or isinstance(record.get("chosen"), str):
        good = {"prompt": "q", "completion": "a", "label": False}
    write_jsonl(tmp_path / "data/train.jsonl", [good, good, record])
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "train.jsonl:3", says)


def test_a_run_reads_one_layout(tmp_path, tiny_llama):
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": True}
    with pytest.raises(DataError, match="is a prompt_completion feedback example, .* a messages feedback example"):
        _encoded(tmp_path, tiny_llama, [chat, {"prompt": "q", "completion": "a", "label": False}])


def _problems(**changes) -> list[str]:
    return task_config_problems("kto", **changes)


@pytest.mark.parametrize("changes, says", [
    ({"train": {"dpo_beta": 0.0}}, "train.dpo_beta: must be a number > 0"),
    ({"train": {"kto_desirable_weight": -1}}, "train.kto_desirable_weight: must be a number >= 0, got -1"),
    ({"train": {"kto_undesirable_weight": -0.5}}, "train.kto_undesirable_weight: must be a number >= 0"),
    ({"train": {"micro_batch_size": 1, "global_batch_size": 4}}, "train.micro_batch_size: kto estimates its "
                                                                 "reference point"),
    ({"train": {"dpo_loss": "ipo"}}, "train.dpo_loss: only read by task dpo, not kto"),
    ({"peft": {"method": "prompt_tuning"}}, "peft.method=prompt_tuning with task kto"),
    ({"peft": {"method": "prefix_tuning"}}, "peft.method=prefix_tuning with task kto"),
    ({"peft": {"method": "p_tuning"}}, "peft.method=p_tuning with task kto"),
    ({"data": {"packing": True}}, "data.packing: only supported for task causal_lm, not kto"),
    ({"train": {"eval_generate": True}}, "train.eval_generate: kto's eval scores given answers"),
    ({"task": "dpo", "train": {"kto_undesirable_weight": 2.0}}, "train.kto_undesirable_weight: only read by task "
                                                                "kto, not dpo"),
    ({"task": "causal_lm", "train": {"dpo_beta": 0.2}}, "train.dpo_beta: only read by tasks dpo and kto"),
])
def test_what_kto_cannot_train_is_refused_with_the_config(changes, says):
    assert any(says in p for p in _problems(**changes)), _problems(**changes)


def test_lora_and_best_metric_by_reward_margin_are_accepted():
    assert _problems() == []
    assert _problems(peft={"method": "lora", "use_dora": True}, train={"best_metric": "reward_margin"},
                     data={"eval": "e.jsonl"}) == []


def test_an_eval_without_undesirable_examples_reports_no_undesirable_reward():
    """Eval data with desirable examples only (a small or filtered set, max_length skipping the rest) has no
    undesirable reward to report: NaN, as seq_regression's undefined correlations, not a 0 that reads as measured
    and that best_metric undesirable_reward (lower is better) would keep as the best."""
    metrics = get_task("kto").metrics([[0.3, 1.0, 0.0], [0.1, 1.0, 0.0]], 1.0, 2, None)
    assert metrics["desirable_reward"] == pytest.approx(0.2)
    assert math.isnan(metrics["undesirable_reward"]) and math.isnan(metrics["reward_margin"])


def test_a_table_mixing_pairs_and_examples_reads_each_row_as_it_is(tmp_path, tiny_llama):
    """A parquet (or hub) table holding pairs and unpaired examples has every column in every row, null where a
    row has none: an example's null 'chosen' and 'rejected' make no pair (it was refused as "a preference pair
    takes no 'label'"), as a pair's null 'label' and 'completion' make no example."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scaletune.data import build_datasets

    rows = [{"prompt": "Q: 2+2?\n", "chosen": "4", "rejected": "5", "completion": None, "label": None},
            {"prompt": "Q: 3+3?\n", "chosen": None, "rejected": None, "completion": "6", "label": True},
            {"prompt": "Q: 1+1?\n", "chosen": None, "rejected": None, "completion": "3", "label": False}]
    table = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table)
    cfg = data_config(tmp_path, tiny_llama, "kto", str(table))
    train = build_datasets(cfg, get_task("kto"), AutoTokenizer.from_pretrained(str(tiny_llama)))["train"]
    assert train["desirable"] == [1, 0, 1, 0]
