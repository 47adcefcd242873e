"""`scaletune eval --generate` (causal_lm): each eval example's answer generated as `predict` generates it, scored
against the example's reference by SQuAD-style exact match and token F1; refused where it cannot work."""

from __future__ import annotations

import json

import pytest

from scaletune.errors import DataError
from scaletune.generation_metrics import exact_match, normalize_answer, reference_answer, rouge_l, token_f1

from stutil import assert_clean_error, run_cli, write_jsonl


def _trained(make_config, capsys, task: str = "causal_lm", **sections):
    path = make_config(task, train={"max_steps": 2}, **sections)
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    return path


def test_answers_are_normalised_as_squad_does():
    assert normalize_answer("  The  Cat, sat on an   old MAT!  ") == "cat sat on old mat"
    assert normalize_answer("Theory: a «anthem»") == "theory anthem"  # (articles only as whole words)
    assert exact_match("The Eiffel Tower.", "eiffel   tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    # SQuAD removes all of string.punctuation, whose $+<=>^`|~ Unicode calls symbols, not punctuation
    assert normalize_answer("$5 x^2 a|b `c` ~d <e>=f+g") == "5 x2 ab c d efg"
    assert exact_match("$5", "5") == 1.0
    # 2 shared tokens: precision 2/3, recall 2/2
    assert token_f1("in Paris France", "Paris, France") == pytest.approx(0.8)
    assert token_f1("alpha alpha", "alpha bravo") == pytest.approx(0.5)  # (a repeated token counts once a match)
    assert token_f1("bravo", "charlie") == 0.0
    assert token_f1("", "the") == 1.0 and token_f1("", "alpha") == 0.0  # (both empty once normalised: agree)


def test_rouge_l_is_the_longest_common_subsequence_f1():
    """ROUGE-L counts shared tokens in order: "paris france" in "France, then Paris" shares 2 tokens for token F1,
    but a common subsequence of 1."""
    import itertools
    import random

    assert rouge_l("The capital is Paris, France.", "capital Paris France") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert rouge_l("paris france", "France, then Paris") == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert token_f1("paris france", "France, then Paris") == pytest.approx(0.8)
    assert rouge_l("", "the") == 1.0 and rouge_l("", "alpha") == 0.0 and rouge_l("alpha", "bravo") == 0.0

    def brute_lcs(a: list, b: list) -> int:  # (every subsequence of a, longest first, tried against b)
        for n in range(min(len(a), len(b)), 0, -1):
            for picked in itertools.combinations(a, n):
                it = iter(b)
                if all(word in it for word in picked):
                    return n
        return 0

    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("wxyz") for _ in range(rng.randint(1, 7))]
        b = [rng.choice("wxyz") for _ in range(rng.randint(1, 7))]
        n = brute_lcs(a, b)
        want = 0.0 if not n else 2 * (n / len(a)) * (n / len(b)) / (n / len(a) + n / len(b))
        assert rouge_l(" ".join(a), " ".join(b)) == pytest.approx(want), (a, b)
        assert rouge_l(" ".join(a), " ".join(b)) <= token_f1(" ".join(a), " ".join(b)) + 1e-12


def test_the_reference_is_the_final_assistant_turn():
    assert reference_answer({"instruction": "q", "input": "", "output": "A1"}) == "A1"
    assert reference_answer({"prompt": "p", "completion": " c"}) == " c"
    turns = [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"},
             {"from": "gpt", "value": "a2"}]
    assert reference_answer({"conversations": turns, "__where__": "f:1"}) == "a2"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert reference_answer({"messages": messages}) == "a"
    with pytest.raises(DataError, match="f.jsonl:3: --generate: the conversation ends in a user turn"):
        reference_answer({"messages": [*messages, {"role": "user", "content": "and?"}], "__where__": "f.jsonl:3"})
    # a conversation's first question beside it as `prompt`, as in ultrachat_200k (training reads the record as the
    # conversation): its final turn, and the conversation is the prompt (a KeyError's traceback and the bare first
    # question, before)
    assert reference_answer({"prompt": "q", "messages": messages, "__where__": "f.jsonl:4"}) == "a"
    with pytest.raises(DataError, match=r"f.jsonl:4: --generate: a string 'prompt' makes this a prompt_completion "
                                        r"record, whose reference answer is its 'completion', which it lacks"):
        reference_answer({"prompt": "q", "__where__": "f.jsonl:4"})
    with pytest.raises(DataError, match="f.jsonl:5: --generate: a plain-text record .* has no reference answer"):
        reference_answer({"text": "alpha bravo", "__where__": "f.jsonl:5"})  # ('messages' must be a list, before)


def test_generated_lines_are_predicts_completions_and_give_the_metrics(make_config, capsys, tmp_path):
    path = _trained(make_config, capsys)
    evalf = tmp_path / "data" / "eval.jsonl"
    records = [json.loads(line) for line in evalf.read_text().splitlines()]
    target = tmp_path / "gen.jsonl"
    code, out, err = run_cli(["eval", path, "--generate", "--max-new-tokens", 6, "--predictions", target], capsys)
    assert code == 0, err
    metrics, lines = json.loads(out), [json.loads(line) for line in target.read_text().splitlines()]
    code, out, err = run_cli(["predict", path, "--input", evalf, "--max-new-tokens", 6], capsys)
    assert code == 0, err
    completions = [json.loads(line)["completion"] for line in out.splitlines()]
    assert [ln["line"] for ln in lines] == [f"{evalf}:{i}" for i in range(1, 17)]
    assert [ln["generated"] for ln in lines] == completions and any(completions)
    assert [ln["reference"] for ln in lines] == [r["output"] for r in records]
    assert all(ln["exact_match"] == exact_match(ln["generated"], ln["reference"])
               and ln["token_f1"] == token_f1(ln["generated"], ln["reference"])
               and ln["rouge_l"] == rouge_l(ln["generated"], ln["reference"]) for ln in lines)
    assert metrics["generated_examples"] == 16
    assert metrics["exact_match"] == pytest.approx(sum(ln["exact_match"] for ln in lines) / 16)
    assert metrics["token_f1"] == pytest.approx(sum(ln["token_f1"] for ln in lines) / 16)
    assert metrics["rouge_l"] == pytest.approx(sum(ln["rouge_l"] for ln in lines) / 16)
    # the loss metrics are eval's own, as without --generate
    code, out, err = run_cli(["eval", path], capsys)
    assert code == 0, err
    assert {k: v for k, v in metrics.items() if k not in ("exact_match", "token_f1", "rouge_l",
                                                                   "generated_examples")} \
        == json.loads(out)


def test_known_answers_give_known_scores(make_config, capsys, tmp_path, monkeypatch):
    """Every prompt's answer stands in as "alpha bravo": the references decide the scores."""
    import scaletune.generation

    path = _trained(make_config, capsys)
    data = write_jsonl(tmp_path / "known.jsonl", [
        {"instruction": "Reverse.", "input": "bravo alpha", "output": "The Alpha, bravo!"},  # EM 1, F1 1
        {"instruction": "Reverse.", "input": "alpha", "output": "alpha"},  # EM 0, F1 2/3
        {"messages": [{"role": "user", "content": "Reverse: charlie"}, {"role": "assistant", "content": "charlie"}]},
    ])
    asked = []

    def answer(model, tokenizer, prompts, max_new_tokens, sampling=None):
        asked.append(max_new_tokens)
        return ["alpha bravo"] * len(prompts)

    monkeypatch.setattr(scaletune.generation, "generate_batch", answer)
    code, out, err = run_cli(["eval", path, "--data", data, "--generate", "--json"], capsys)
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["generated_examples"] == 3 and asked == [128]  # (the default --max-new-tokens)
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["token_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert metrics["rouge_l"] == pytest.approx((1 + 2 / 3 + 0) / 3)  # (in order where they share tokens)


def test_refusals_name_why(make_config, capsys, tmp_path):
    path = _trained(make_config, capsys)
    code, _, err = run_cli(["eval", path, "--generate", "--max-new-tokens", 0], capsys)
    assert_clean_error(code, err, "--max-new-tokens: must be >= 1, got 0")
    code, _, err = run_cli(["eval", path, "--max-new-tokens", 8], capsys)
    assert_clean_error(code, err, "--max-new-tokens: generation only; give --generate too")
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "alpha bravo charlie"}, {"text": "delta echo"}])
    target = tmp_path / "never.jsonl"
    code, _, err = run_cli(["eval", path, "--data", text, "--generate", "--predictions", target], capsys)
    assert_clean_error(code, err, f"--generate: --data {text} is plain text (pretraining data)")
    assert not target.exists()
    code, _, err = run_cli(["eval", path, "--generate", "data.format=text"], capsys)
    assert_clean_error(code, err, "--generate: data.format: text is plain text")


def test_another_task_is_refused(make_config, capsys):
    path = _trained(make_config, capsys, "seq_cls")
    code, _, err = run_cli(["eval", path, "--generate"], capsys)
    assert_clean_error(code, err, "--generate: seq_cls labels its inputs; only causal_lm generates answers")


@pytest.mark.parametrize("task", ["dpo", "kto", "reward"])
def test_a_preference_task_is_refused_in_its_own_words(task):
    """dpo, kto and reward score given answers in eval (dpo and kto generate in `predict`): not 'labels its inputs'."""
    from types import SimpleNamespace

    from scaletune.errors import UserError
    from scaletune.generation_metrics import check_run

    with pytest.raises(UserError, match=f"--generate: {task}'s eval scores the data's own answers") as err:
        check_run(SimpleNamespace(task=task, data=SimpleNamespace(format=None)))
    assert "labels its inputs" not in str(err.value)


def test_api_evaluate_checks_generate_options_in_its_own_words(make_config):
    from scaletune import api
    from scaletune.errors import UserError

    path = make_config("causal_lm")
    with pytest.raises(UserError, match="max_new_tokens: must be >= 1, got 0"):
        api.evaluate(path, generate=True, max_new_tokens=0)
    with pytest.raises(UserError, match="max_new_tokens: generation only; give generate=True too"):
        api.evaluate(path, max_new_tokens=8)


def test_a_conversation_ending_in_a_tool_call_is_refused():
    """A final function_call / tool_calls turn has empty content: every answer without text would match it."""
    call = json.dumps({"name": "convert", "arguments": {"amount": 1}})
    turns = [{"from": "human", "value": "Convert 1 USD"}, {"from": "function_call", "value": call}]
    with pytest.raises(DataError, match="f.json:2: --generate: the conversation ends in a tool call"):
        reference_answer({"conversations": turns, "__where__": "f.json:2"})
    calls = [{"type": "function", "function": {"name": "convert", "arguments": "{}"}}]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": calls}]
    with pytest.raises(DataError, match="ends in a tool call"):
        reference_answer({"messages": messages, "__where__": "f.json:3"})


def test_a_held_out_split_is_generated_from(make_config, capsys):
    """A run that holds out data.eval_fraction of data.train (as the demo does) is scored on that part."""
    path = _trained(make_config, capsys, data={"eval": None, "eval_fraction": 0.25})
    code, out, err = run_cli(["eval", path, "--generate", "--max-new-tokens", 4, "--json"], capsys)
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["generated_examples"] == 16 and 0 <= metrics["token_f1"] <= 1  # (64 x 0.25)
