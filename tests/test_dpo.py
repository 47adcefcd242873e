"""task dpo: the loss against a computation by hand from the model's logits (adapter on and off), log 2 at step 0,
training raising the reward accuracy, both data layouts and their truncation, bad pairs and configs refused.
(The step's mean over pairs at any micro-batch size and resume: test_train.py, parametrised over dpo.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from scaletune.config import load_config
from scaletune.data.render import to_segments
from scaletune.errors import DataError
from scaletune.evaluate import evaluate
from scaletune.tasks import get_task
from scaletune.train import setup

from stutil import assert_clean_error, data_config, metrics_around_training, run_cli, task_config_problems, write_jsonl


def _logp_by_hand(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its targets (`labels` != -100, shifted by one): log_softmax + gather."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    picked = torch.log_softmax(logits, -1).gather(2, target.clamp(min=0)[..., None])[..., 0]
    return (picked * (target != -100)).sum(1)


def _randomise_lora_b(model) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def test_loss_equals_the_dpo_formula_from_logits_with_and_without_the_adapter(make_config):
    run, _ = setup(load_config(make_config("dpo", train={"dpo_beta": 0.3})))
    model = run.model.eval()
    _randomise_lora_b(model)
    examples = [run.data["train"][i] for i in range(5)]
    batch = run.task.collate(examples, run.tokenizer.pad_token_id)
    with torch.no_grad():
        loss, rewards = run.task.loss_sum(model, batch)
        # chosen rows 0..4, rejected rows 5..9, as the collator puts them
        tensors = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        policy = _logp_by_hand(model, *tensors)
        with model.disable_adapter():
            reference = _logp_by_hand(model, *tensors)
            # (the base without peft's wrapper: disable_adapter gives it)
            base = _logp_by_hand(model.get_base_model(), *tensors)
    torch.testing.assert_close(reference, base, rtol=0, atol=0)
    chosen, rejected = (0.3 * (policy - reference)).view(2, 5)
    expected = -F.logsigmoid(chosen - rejected).sum()
    assert len({len(e["input_ids"]) for e in examples}) > 1  # (padding is in play)
    # float32: the task takes only the target positions' logits (another matmul shape), so the answers' summed
    # log-probabilities (~ -50 here) agree to float32 rounding, a few 1e-6 in the rewards
    torch.testing.assert_close(rewards, torch.stack([chosen, rejected], 1), rtol=0, atol=2e-5)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)
    assert rewards.abs().max() > 1e-2  # (the adapter changes the log-probabilities: the test can fail)
    assert run.task.count_targets(batch) == 5


def test_at_step_0_the_policy_is_the_reference_so_the_loss_is_log_2(make_config):
    """LoRA's B starts at zero: the adapter changes nothing, every reward is 0 and no pair is ranked right."""
    run, _ = setup(load_config(make_config("dpo")))
    metrics = evaluate(run.accelerator, run.model, run.task, run.data["eval"], None, 4, run.tokenizer.pad_token_id)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["pairs"] == 16 and metrics["reward_accuracy"] == 0.0
    assert metrics["reward_margin"] == metrics["chosen_reward"] == metrics["rejected_reward"] == 0.0


def test_training_raises_the_reward_accuracy_and_margin_on_the_training_pairs(make_config):
    before, after = metrics_around_training(make_config, "dpo", dpo_beta=0.5)
    assert before["reward_accuracy"] == 0.0 and after["reward_accuracy"] >= 0.9, after
    assert after["reward_margin"] > 1.0 and after["loss"] < 0.3, after


def _encoded(tmp_path, tiny_llama, records: list[dict], **data) -> tuple[list, object]:
    cfg = data_config(tmp_path, tiny_llama, "dpo", write_jsonl(tmp_path / "pairs.jsonl", records), **data)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    task = get_task("dpo")
    task.setup(records, cfg, "pairs.jsonl")
    return [task.encode(r, tokenizer, cfg, None) for r in records], tokenizer


def _answer(tokenizer, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100])


@pytest.mark.parametrize("layout", ["sharegpt", "trl_messages", "trl_strings"])
def test_each_layout_trains_only_the_answers_after_the_same_prompt(tmp_path, tiny_llama, layout):
    prompt, chosen, rejected = "Reverse: alpha bravo", "bravo alpha", "alpha bravo"
    record = {"sharegpt": {"conversations": [{"from": "system", "value": "Be brief."},
                                             {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                             {"from": "human", "value": prompt}],
                           "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}},
              "trl_messages": {"prompt": [{"role": "user", "content": prompt}],
                               "chosen": [{"role": "assistant", "content": chosen}],
                               "rejected": [{"role": "assistant", "content": rejected}]},
              "trl_strings": {"prompt": prompt + "\n", "chosen": chosen, "rejected": rejected}}[layout]
    (ex,), tokenizer = _encoded(tmp_path, tiny_llama, [record])
    eos = tokenizer.eos_token
    assert _answer(tokenizer, ex["input_ids"], ex["labels"]) == chosen + eos  # (the prompt's "Hello": context)
    assert _answer(tokenizer, ex["rejected_input_ids"], ex["rejected_labels"]) == rejected + eos
    start = ex["labels"].index(next(lab for lab in ex["labels"] if lab != -100))
    assert ex["rejected_input_ids"][:start] == ex["input_ids"][:start]  # the same prompt before both
    assert prompt in tokenizer.decode(ex["input_ids"][:start])


_USER, _SYSTEM = {"role": "user", "content": "Reverse: alpha bravo"}, {"role": "system", "content": "Be brief."}


def _said(content: str) -> dict:
    return {"role": "assistant", "content": content}


@pytest.mark.parametrize("implicit, explicit", [
    # TRL's implicit prompt: the text both begin with, a space before the first difference starting the answers
    ({"chosen": "The sky is blue.", "rejected": "The sky is green."},
     {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}),
    ({"chosen": "Reverse: alpha bravo\nbravo alpha", "rejected": "Reverse: alpha bravo\nalpha bravo"},
     {"prompt": "Reverse: alpha bravo\n", "chosen": "bravo alpha", "rejected": "alpha bravo"}),
    # conversations: the messages both begin with, an earlier answer among them (context, as a prompt's)
    ({"chosen": [_SYSTEM, _USER, _said("bravo alpha"), _USER, _said("again: bravo alpha")],
      "rejected": [_SYSTEM, _USER, _said("bravo alpha"), _USER, _said("alpha bravo")]},
     {"prompt": [_SYSTEM, _USER, _said("bravo alpha"), _USER], "chosen": [_said("again: bravo alpha")],
      "rejected": [_said("alpha bravo")]}),
    ({"chosen": [_USER, _said("bravo alpha")], "rejected": [_USER, _said("alpha bravo")], "prompt": None},
     {"prompt": [_USER], "chosen": [_said("bravo alpha")], "rejected": [_said("alpha bravo")]}),
])
def test_an_implicit_prompt_pair_encodes_as_its_explicit_form(tmp_path, tiny_llama, implicit, explicit):
    """TRL's implicit-prompt pairs (no `prompt`: each answer the whole text or conversation) read as the pair with
    the shared beginning as its prompt; a null `prompt` (a table mixing both forms) is none."""
    (got,), _ = _encoded(tmp_path, tiny_llama, [implicit])
    (want,), _ = _encoded(tmp_path, tiny_llama, [explicit])
    assert got == want and got["labels"] != got["rejected_labels"]


def test_max_length_cuts_the_answers_keeps_the_prompt_and_skips_a_pair_with_no_answer_left(tmp_path, tiny_llama):
    short = {"prompt": "Reverse: a b\n", "chosen": "b a " * 20, "rejected": "a b " * 30}
    long_prompt = {"prompt": "word " * 200, "chosen": "yes", "rejected": "no"}
    (cut, skipped), tokenizer = _encoded(tmp_path, tiny_llama, [short, long_prompt], max_length=24)
    assert skipped is None and cut["truncated"]
    assert len(cut["input_ids"]) == len(cut["rejected_input_ids"]) == 24
    assert tokenizer.decode(cut["input_ids"], skip_special_tokens=True).startswith("Reverse: a b\nb a")
    assert any(lab != -100 for lab in cut["rejected_labels"][1:])


@pytest.mark.parametrize("record, says", [
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}},
     "a preference pair needs rejected"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
      "rejected": {"from": "gpt", "value": "a"}}, "are the same answer"),
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, "field 'chosen' is empty"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "field 'chosen' must be one assistant message"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}],
      "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
     "the prompt ends in an assistant turn"),
    ({"chosen": "Yes, it is.", "rejected": "No."}, "'chosen' and 'rejected' share no prompt"),
    ({"chosen": [{"role": "user", "content": "q"}, _said("a")], "rejected": [{"role": "user", "content": "p"}, _said("b")]},
     "'chosen' and 'rejected' share no prompt"),
    ({"chosen": [{"role": "user", "content": "q"}, _said("a")],
      "rejected": [{"role": "user", "content": "q"}, _said("b"), {"role": "user", "content": "more?"}, _said("c")]},
     "share their first 1 message(s), the prompt; what follows in 'rejected' must be one assistant message, the "
     "answer, and is: assistant user assistant"),
    ({"chosen": [{"role": "user", "content": "q"}, _said("a")], "rejected": "q b"},
     "a pair without a prompt needs 'chosen' and 'rejected' both whole texts (strings) or both conversations"),
])
def test_a_bad_pair_is_refused_naming_its_file_and_line(make_config, tmp_path, capsys, record, says):
    path = make_config("dpo", n=8, data={"eval": None})
    good = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"}} if "conversations" in record else {"prompt": "q", "chosen": "a",
                                                                                          "rejected": "b"}
    if isinstance(record.get("prompt"), list) or isinstance(record.get("chosen"), list) and "prompt" not in record:
        good = {"prompt": [{"role": "user", "content": "q"}], **{k: [_said(k)] for k in ("chosen", "rejected")}}
    if isinstance(record.get("prompt"), list):
        good = {"prompt": record["prompt"], **{k: [{"role": "assistant", "content": k}] for k in ("chosen", "rejected")}}
    write_jsonl(tmp_path / "data/train.jsonl", [good, good, record])
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "train.jsonl:3", says)


def test_instruction_data_is_refused_as_no_preference_pair(tmp_path, tiny_llama):
    with pytest.raises(DataError, match="a preference pair needs chosen, rejected"):
        _encoded(tmp_path, tiny_llama, [{"instruction": "q", "output": "a"}])


def _problems(**changes) -> list[str]:
    return task_config_problems("dpo", **changes)


@pytest.mark.parametrize("changes, says", [
    ({"train": {"dpo_beta": 0.0}}, "train.dpo_beta: must be a number > 0"),
    ({"train": {"dpo_beta": -1}}, "train.dpo_beta: must be a number > 0"),
    ({"data": {"max_prompt_length": 1024}}, "data.max_prompt_length: must be >= 1 and below data.max_length (1024)"),
    ({"peft": {"method": "prompt_tuning"}}, "peft.method=prompt_tuning with task dpo"),
    ({"peft": {"method": "prefix_tuning"}}, "peft.method=prefix_tuning with task dpo"),
    ({"peft": {"method": "p_tuning"}}, "peft.method=p_tuning with task dpo"),
    ({"data": {"packing": True}}, "data.packing: only supported for task causal_lm, not dpo"),
    ({"train": {"label_smoothing": 0.1}}, "train.label_smoothing"),
    ({"train": {"class_weights": "balanced"}}, "train.class_weights"),
    ({"train": {"eval_generate": True}}, "train.eval_generate: dpo's eval scores given answers"),
    ({"task": "causal_lm", "train": {"dpo_beta": 0.2}}, "train.dpo_beta: only read by tasks dpo and kto, not causal_lm"),
])
def test_what_dpo_cannot_train_is_refused_with_the_config(changes, says):
    assert any(says in p for p in _problems(**changes)), _problems(**changes)


def test_lora_family_methods_and_best_metric_by_reward_are_accepted():
    assert _problems() == []
    assert _problems(peft={"method": "lora", "use_dora": True}, train={"best_metric": "reward_accuracy"},
                     data={"eval": "e.jsonl"}) == []


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo", "simpo", "orpo"])
@pytest.mark.parametrize("sft", [0.0, 0.7])
def test_each_loss_is_its_formula_from_logits(make_config, monkeypatch, kind, sft):
    """train.dpo_loss and dpo_sft_weight against the papers' formulas from log_softmax + gather: per pair, with
    a = the answers' summed (ipo, simpo, orpo: mean per token) log-probabilities and m = beta x the chosen's minus
    the rejected's log-ratio (simpo, orpo: of a itself, there being no reference, which they never compute;
    orpo: the odds p / (1 - p) of p = exp(a))."""
    beta, gamma = 0.3, 0.2
    extra = {"simpo_gamma": gamma} if kind == "simpo" else {}
    run, _ = setup(load_config(make_config("dpo", train={"dpo_beta": beta, "dpo_loss": kind, "dpo_sft_weight": sft,
                                                         **extra})))
    model = run.model.eval()
    _randomise_lora_b(model)
    batch = run.task.collate([run.data["train"][i] for i in range(5)], run.tokenizer.pad_token_id)
    tensors = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        policy = _logp_by_hand(model, *tensors)
        with model.disable_adapter():
            reference = _logp_by_hand(model, *tensors)
        if kind in ("simpo", "orpo"):  # (no reference forward: switching the adapter off would fail the test)
            monkeypatch.setattr(type(model), "disable_adapter", lambda self: pytest.fail("reference computed"))
        loss, rewards = run.task.loss_sum(model, batch)
    counts = (batch["labels"][:, 1:] != -100).sum(1)
    ratio = policy if kind in ("simpo", "orpo") else policy - reference
    if kind in ("ipo", "simpo", "orpo"):
        ratio = ratio / counts
    chosen, rejected = (beta * ratio).view(2, 5)
    m = chosen - rejected
    p_c, p_r = (policy / counts).view(2, 5).exp()  # (orpo: the mean token probabilities' odds)
    odds = torch.log(p_c / (1 - p_c)) - torch.log(p_r / (1 - p_r))
    expected = {"sigmoid": -F.logsigmoid(m), "hinge": torch.relu(1 - m),
                "ipo": (m / beta - 1 / (2 * beta)) ** 2, "simpo": -F.logsigmoid(m - gamma),
                "orpo": -torch.log(p_c) - beta * F.logsigmoid(odds)}[kind]
    expected = expected - sft * policy[:5] / counts[:5]
    torch.testing.assert_close(rewards, torch.stack([chosen, rejected], 1), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(loss, expected.sum(), rtol=1e-5, atol=1e-4)
    assert m.abs().max() > 1e-2


@pytest.mark.parametrize(("kind", "beta"), [("simpo", 2.0), ("orpo", 0.1)])
def test_reference_free_training_raises_the_reward_accuracy(make_config, kind, beta):
    before, after = metrics_around_training(make_config, "dpo", dpo_beta=beta, dpo_loss=kind)
    assert before["reward_accuracy"] < 0.7 <= 0.9 <= after["reward_accuracy"], (before, after)
    assert after["reward_margin"] > 10 * abs(before["reward_margin"]), (before, after)


def test_the_loss_keys_are_checked():
    from stutil import problems_of

    base = {"task": "dpo", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    assert problems_of({**base, "train": {"simpo_gamma": 1.0, "dpo_sft_weight": -1}}) == \
        ["train.dpo_sft_weight: must be a number >= 0, got -1.0",
         "train.simpo_gamma: only read by dpo_loss simpo, not sigmoid"]
    assert problems_of({**base, "task": "causal_lm", "train": {"dpo_loss": "ipo", "dpo_sft_weight": 1}}) == \
        ["train.dpo_loss: only read by task dpo, not causal_lm", "train.dpo_sft_weight: only read by task dpo, not causal_lm"]
    assert any("train.dpo_loss: 'kto' is not one of sigmoid | hinge | ipo | simpo | orpo" in p
               for p in problems_of({**base, "train": {"dpo_loss": "kto"}}))


def test_a_pair_skipped_because_its_prompt_fills_max_length_says_why(tmp_path, tiny_llama, caplog):
    """dpo keeps the prompt whole (TRL and LLaMA-Factory cut it), so long prompts lose whole pairs (most of
    LLaMA-Factory's dpo_en_demo.json at max_length 256 on the demo model): the skip names that, and the way out."""
    from scaletune.data import build_datasets
    from scaletune.model import load_tokenizer

    pairs = [{"prompt": "q\n", "chosen": "yes", "rejected": "no"}] * 3 + [
        {"prompt": "word " * 200, "chosen": "yes", "rejected": "no"}]
    cfg = data_config(tmp_path, tiny_llama, "dpo", write_jsonl(tmp_path / "pairs.jsonl", pairs), max_length=32)
    with caplog.at_level("WARNING", logger="scaletune"):
        built = build_datasets(cfg, get_task("dpo"), load_tokenizer(cfg))
    assert len(built["train"]) == 3
    assert "data.train: 1 example(s) skipped: no target tokens within data.max_length=32 (task dpo keeps each " \
           "prompt whole and cuts only the answers: these prompts fill it; set data.max_prompt_length" \
           in caplog.text, caplog.text


def test_max_prompt_length_is_dpo_and_ktos():
    from scaletune.config import from_dict
    from scaletune.rules import ignored_key_problems

    cfg = from_dict({"task": "causal_lm", "model": {"name_or_path": "m"},
                     "data": {"train": "t.jsonl", "max_prompt_length": 8}})
    assert "data.max_prompt_length: only read by task dpo/kto/reward, not causal_lm" in ignored_key_problems(cfg)


@pytest.mark.parametrize("task", ["dpo", "kto"])
def test_max_prompt_length_keeps_a_long_prompts_end_and_the_answers(tmp_path, tiny_llama, task):
    """data.max_prompt_length=12: a 200-word prompt keeps BOS and its last 11 tokens, right before the answer as
    in the full rendering; the answers are whole; a short prompt is untouched."""
    long, short = "word " * 199 + "finally", "q\n"
    records = [{"prompt": p, "chosen": " yes", "rejected": " no"} if task == "dpo" else
               {"prompt": p, "completion": " yes", "label": True} for p in (long, short)]
    for key in ("max_prompt_length", None):
        cfg = data_config(tmp_path, tiny_llama, task, write_jsonl(tmp_path / "r.jsonl", records), max_length=32,
                          **({key: 12} if key else {}))
        tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
        t = get_task(task)
        t.setup(records, cfg, "r.jsonl")
        encoded = [t.encode(r, tokenizer, cfg, None) for r in records]
        if key is None:
            assert encoded[0] is None  # (the whole prompt fills max_length: the example is lost)
            continue
        full = t.tokens(to_segments(next(iter(_sides(t, records[0]))), tokenizer, "r.jsonl:1"), tokenizer)
        ids, labels = encoded[0]["input_ids"], encoded[0]["labels"]
        start = next(i for i, lab in enumerate(labels) if lab != -100)
        full_start = next(i for i, lab in enumerate(full[1]) if lab != -100)
        assert start == 12 and ids[0] == tokenizer.bos_token_id
        assert ids[1:start] == full[0][full_start - 11:full_start]  # the prompt's end
        assert ids[start:] == full[0][full_start:] and labels[start:] == full[1][full_start:]  # the whole answer
        short_full = t.tokens(to_segments(next(iter(_sides(t, records[1]))), tokenizer, "r.jsonl:2"), tokenizer)
        assert encoded[1]["input_ids"] == short_full[0]


def _sides(task, record):
    """The converted record(s) `task` renders: dpo's chosen side first, kto's one example."""
    if task.name == "dpo":
        from scaletune.data.preference import to_pair

        return to_pair(record)
    from scaletune.data.feedback import to_example

    return [to_example(record)[0]]


def test_the_reference_draws_no_dropout_in_train_mode(make_config, tiny_llama, tmp_path):
    """The reference (adapter off) is a fixed baseline: on a base with attention dropout 0.5, trained in train
    mode, two scorings of one batch agree (the policy's do not: dropout is in play), and every module is left in
    the mode it was in."""
    import json
    import shutil

    from scaletune.tasks.dpo import answer_logps, reference_logps

    base = tmp_path / "dropout_llama"
    shutil.copytree(tiny_llama, base)
    conf = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**conf, "attention_dropout": 0.5}))
    run, _ = setup(load_config(make_config("dpo", model={"name_or_path": str(base), "attn_implementation": "eager"})))
    model = run.model.train()
    model.get_base_model().lm_head.eval()  # (a module left in eval mode stays so)
    batch = run.task.collate([run.data["train"][i] for i in range(4)], run.tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        policy = [answer_logps(model, batch) for _ in range(2)]
    assert not torch.equal(*policy)
    first, second = reference_logps(model, batch), reference_logps(model, batch)
    assert torch.equal(first, second)
    assert not model.get_base_model().lm_head.training
    assert all(m.training for n, m in model.named_modules() if "lm_head" not in n)


def test_eval_prediction_lines_of_a_pair_have_the_reward_tasks_fields():
    """`eval --predictions` of dpo lacked the `correct` a reward model's line has for the same pair: a script
    reading one pipeline's preference stages had to special-case each task."""
    from scaletune.tasks.dpo import DPO
    from scaletune.tasks.reward import Reward

    for pair in ((0.5, 0.2), (-1.0, 0.25), (0.0, 0.0)):
        dpo, reward = DPO().example_line(pair, None, {}, None), Reward().example_line(pair, None, {}, None)
        assert dpo == reward and dpo["correct"] == (pair[0] > pair[1])
