"""`scaletune eval` and `merge` of a trained run: the held-out split, --data, --out and --adapter are
checked before anything loads, and their errors name the option."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from stutil import assert_clean_error, cls_records, run_cli, write_jsonl


def test_train_predict_eval_merge_roundtrip(capsys, make_config, tmp_path):
    path = make_config("causal_lm", train={"max_steps": 3})
    code, out, err = run_cli(["train", path], capsys)
    assert code == 0, err
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer.json").is_file()
    inp = tmp_path / "prompts.txt"
    inp.write_text("Reverse the order of these words.\n")
    code, out, err = run_cli(["predict", path, "--input", inp, "--max-new-tokens", "5"], capsys)
    assert code == 0, err
    assert json.loads(out.splitlines()[0])["prompt"] == "Reverse the order of these words."
    code, out, err = run_cli(["eval", path], capsys)
    assert code == 0 and "perplexity" in json.loads(out)
    code, out, err = run_cli(["merge", path, "--out", tmp_path / "merged"], capsys)
    assert code == 0, err
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = yaml.safe_load(path.read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(cfg["model"]["name_or_path"])
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)
    code, _, err = run_cli(["merge", path, "--out", tmp_path / "merged"], capsys)
    assert_clean_error(code, err, "is not empty")


def test_eval_of_a_held_out_split_is_the_split_the_run_held_out(capsys, make_config, tmp_path):
    """data.eval_fraction's split follows train.seed: `eval` with another seed or fraction, or for a run that
    held nothing out, scored (exit 0) on examples the adapter trained on. Those are refused before loading;
    the run's own split gives the run's final eval."""
    path = make_config("seq_cls", data={"eval": None, "eval_fraction": 0.25}, train={"max_steps": 2, "seed": 7})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in final if r.get("event") == "eval"][-1]
    code, out, err = run_cli(["eval", path], capsys)
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(final["loss"], rel=1e-5)
    adapter = tmp_path / "run" / "adapter"
    code, _, err = run_cli(["eval", path, "train.seed=8"], capsys)
    assert_clean_error(code, err, f"the adapter at {adapter} was trained holding out a different split",
                       "seed 7 (given: 8)", "data.eval_fraction=0.25 train.seed=7")
    code, _, err = run_cli(["eval", path, "data.eval_fraction=0.5"], capsys)
    assert_clean_error(code, err, "eval_fraction 0.25 (given: 0.5)")
    # a cap the run did not have: named as YAML writes it (null, not Python's None), and the hint drops it
    code, _, err = run_cli(["eval", path, "data.max_samples=3"], capsys)
    assert_clean_error(code, err, "max_samples null (given: 3)", "train.seed=7 data.max_samples=null")
    code, out, err = run_cli(["eval", path, "train.seed=8", "--data", str(tmp_path / "data" / "eval.jsonl")], capsys)
    assert code == 0, err  # a file of its own: no split to match
    code, _, err = run_cli(["eval", path, f"data.train=[{tmp_path / 'data' / 'train.jsonl'}]"], capsys)
    assert code == 0, err  # a list of that one file splits as the file does
    copy = tmp_path / "elsewhere.jsonl"  # the same data at another path (another machine): compared by content
    shutil.copy(tmp_path / "data" / "train.jsonl", copy)
    assert run_cli(["eval", path, f"data.train={copy}"], capsys)[0] == 0
    code, _, err = run_cli(["eval", path, f"data.train={copy}", "train.seed=8"], capsys)
    assert_clean_error(code, err, "seed 7 (given: 8)")
    code, _, err = run_cli(["eval", path, f"data.train=[{copy},{tmp_path / 'data' / 'train.jsonl'}]"], capsys)
    # the file twice: its examples split among twice as many, so ones it trained on are held out
    assert_clean_error(code, err, "shares sources with the data the adapter at")
    # an adapter saved before adapters recorded their split: its run's run.json says which it was
    meta_file = adapter / "scaletune.json"
    meta = json.loads(meta_file.read_text())
    del meta["held_out"]
    meta_file.write_text(json.dumps(meta))
    code, _, err = run_cli(["eval", path, "train.seed=8"], capsys)
    assert_clean_error(code, err, "seed 7 (given: 8)")
    assert run_cli(["eval", path], capsys)[0] == 0
    whole = make_config("seq_cls", train={"max_steps": 1}, output_dir=str(tmp_path / "whole"))
    code, _, err = run_cli(["train", whole], capsys)
    assert code == 0, err
    code, _, err = run_cli(["eval", whole, "data.eval=null", "data.eval_fraction=0.25"], capsys)
    assert_clean_error(code, err, "was trained on all of its training file", "--data FILE")


def test_merge_out_that_cannot_be_created_is_refused_before_loading(capsys, make_config, tmp_path):
    """--out under a file, or a dangling symbolic link, failed in save_pretrained after the whole load and
    merge, with a traceback; now one line, exit 2, before anything is loaded (no run is needed for it)."""
    path = make_config("causal_lm")
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out, wanted in ((tmp_path / "a_file" / "merged", f"{tmp_path / 'a_file'} is not a directory"),
                        (tmp_path / "dangling", f"a symbolic link to {tmp_path / 'nowhere'}, which does not exist")):
        code, _, err = run_cli(["merge", path, "--out", out], capsys)
        assert_clean_error(code, err, wanted)
    assert (tmp_path / "a_file").read_text() == "mine"


def test_merge_refuses_an_out_filled_while_it_merged(capsys, make_config, tmp_path, monkeypatch):
    """--out is checked again just before the merged model is written: a file put into it after the argument
    check, while the model loaded and merged (by the user, another merge), was overwritten by the merged
    model's file of the same name."""
    from types import SimpleNamespace

    import scaletune.merge as merge

    path = make_config("causal_lm")
    out = tmp_path / "merged"
    out.mkdir()  # empty: the argument check lets it through

    class Merged:
        def save_pretrained(self, directory, **_):
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "config.json").write_text("merged")

    class Adapter:
        peft_config: dict = {}

        def merge_and_unload(self):
            (out / "config.json").write_text("the user's")
            return Merged()

    tok = SimpleNamespace(chat_template="{{ messages }}", save_pretrained=lambda directory: None)
    monkeypatch.setattr(merge, "load_trained", lambda *a, **kw: (Adapter(), tok, None, None, tmp_path))
    code, _, err = run_cli(["merge", path, "--out", out], capsys)
    assert_clean_error(code, err, f"--out {out} is not empty; choose a new directory")
    assert os.listdir(out) == ["config.json"] and (out / "config.json").read_text() == "the user's"


def test_adapter_may_be_a_checkpoint_dir(capsys, make_config, tmp_path, caplog):
    """--adapter checkpoints/step-N (the adapter is in its adapter/) works for eval, predict and merge, with
    an info line saying which directory was loaded (was: "no trained adapter ... pass --adapter")."""
    path = make_config("causal_lm", train={"max_steps": 2})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    step = tmp_path / "run" / "checkpoints" / "step-2"
    inp = tmp_path / "prompts.txt"
    inp.write_text("alpha bravo\n")
    for args in (["eval", path], ["predict", path, "--input", inp, "--max-new-tokens", "2"],
                 ["merge", path, "--out", tmp_path / "merged"]):
        caplog.clear()
        with caplog.at_level("INFO", logger="scaletune"):
            code, out, err = run_cli([*args, "--adapter", step], capsys)
        assert code == 0, err
        assert f"--adapter {step}: using the adapter in its adapter/ subfolder" in caplog.text, args[0]
    assert (tmp_path / "merged" / "config.json").is_file()
    # checkpoints/latest (a file naming the newest checkpoint) is followed; it was refused as "a file"
    code, _, err = run_cli(["eval", path, "--adapter", tmp_path / "run" / "checkpoints" / "latest"], capsys)
    assert code == 0, err
    # a run killed before its adapter/ was written: the error names the checkpoint to pass
    shutil.rmtree(tmp_path / "run" / "adapter")
    code, _, err = run_cli(["eval", path], capsys)
    assert_clean_error(code, err, "no trained adapter at", f"(e.g. --adapter {step}, the newest checkpoint)")


def test_adapter_that_is_neither_says_what_was_expected(capsys, make_config, tmp_path):
    path = make_config("causal_lm")
    run = tmp_path / "old-run"
    (run / "checkpoints" / "step-3").mkdir(parents=True)
    (run / "checkpoints" / "step-12").mkdir()
    (tmp_path / "file.json").write_text("{}")
    for adapter, expected in [
        (tmp_path / "nope", "directory not found"),
        (tmp_path / "file.json", "is a file; pass the directory that holds adapter_config.json"),
        (run / "checkpoints" / "step-3", "neither an adapter directory (no adapter_config.json) nor a checkpoint "
                                         "directory (no adapter/adapter_config.json)"),
        (run, f"it holds checkpoints, the newest is {run / 'checkpoints' / 'step-12'}"),
        (run / "checkpoints", f"it holds checkpoints, the newest is {run / 'checkpoints' / 'step-12'}"),
    ]:
        for cmd in ("eval", "predict"):
            code, _, err = run_cli([cmd, path, "--adapter", adapter], capsys)
            assert_clean_error(code, err, f"--adapter {adapter}: ", expected)


def test_eval_data_problems_name_the_data_option(capsys, make_config, tmp_path, monkeypatch, caplog):
    """`eval --data FILE` names --data (not data.train) in its errors and warnings, and tokenises FILE once."""
    from scaletune.tasks.seq_cls import SeqCls

    path = make_config("seq_cls", train={"max_steps": 2}, data={"cache": False})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    nope = tmp_path / "d" / "nope.jsonl"
    code, _, err = run_cli(["eval", path, "--data", nope], capsys)
    assert_clean_error(code, err, f"--data {nope}: file not found")
    assert "data.train" not in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run_cli(["eval", path, "--data", empty], capsys)
    assert_clean_error(code, err, f"--data: {empty} contains no examples")
    code, _, err = run_cli(["eval", path, f"data.eval={empty}"], capsys)
    assert_clean_error(code, err, f"data.eval: {empty} contains no examples")
    rows = cls_records(6, seed=3)
    rows[4] = {"text": 5, "label": "pos"}
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, _, err = run_cli(["eval", path, "--data", bad], capsys)
    assert_clean_error(code, err, f"{bad}:5: column 'text' must be a non-empty string")
    other = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "a", "output": "b"}])  # another task's file
    code, _, err = run_cli(["train", path, f"data.eval={other}", f"output_dir={tmp_path / 'run2'}"], capsys)
    assert_clean_error(code, err, f"{other}:1: no column 'text'; the record has 'instruction', 'output'")
    calls = []
    encode = SeqCls.encode
    monkeypatch.setattr(SeqCls, "encode", lambda self, rec, *a: calls.append(rec) or encode(self, rec, *a))
    words = "bravo charlie delta echo foxtrot golf hotel india juliet"
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": f"alpha {words}", "label": "pos"},
                                                 {"text": words, "label": "neg"}] * 3)
    with caplog.at_level("WARNING", logger="scaletune"):
        code, out, err = run_cli(["eval", path, "--data", data, "data.max_length=8"], capsys)
    assert code == 0 and "accuracy" in json.loads(out), err
    assert len(calls) == 6  # each example once (the file used to be read and tokenised as train and as eval)
    assert "--data: 6 of 6 example(s) are longer than data.max_length=8 tokens" in caplog.text
    assert "data.train" not in caplog.text


def test_a_long_eval_says_it_is_alive(capsys, make_config, tmp_path, monkeypatch):
    """CoNLL's 3,250 validation sentences took minutes on a CPU after the last step line with nothing on
    screen. Off a terminal a line comes every half minute (here time runs 40 s per batch)."""
    path = make_config("causal_lm", n=24, train={"max_steps": 1, "micro_batch_size": 4, "global_batch_size": 4})
    assert run_cli(["train", path], capsys)[0] == 0
    import scaletune.progress

    clock = iter(range(0, 10**6, 40))
    monkeypatch.setattr(scaletune.progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setenv("SCALETUNE_NO_PROGRESS", "0")
    code, out, err = run_cli(["eval", path], capsys)
    assert code == 0 and "perplexity" in json.loads(out)
    done = [tuple(map(int, line.removeprefix("eval: ").removesuffix(" batches").split("/")))
            for line in err.splitlines() if line.startswith("eval: ") and line.endswith(" batches")]
    assert len(done) >= 2 and len({n for _, n in done}) == 1, err  # batch k of the whole set's count
    assert [k for k, _ in done] == sorted({k for k, _ in done}) and done[-1][0] <= done[-1][1]


def test_adapter_records_a_relative_base_path_absolute(capsys, make_config, tmp_path, tiny_bert, monkeypatch, caplog):
    """model.name_or_path `models/bert` (relative to where training ran) is recorded absolute in
    adapter_config.json and scaletune.json: a server loading the adapter from elsewhere finds the base, and
    `eval RUN_DIR` from elsewhere does not warn that the adapter was trained on another base."""
    (tmp_path / "models").mkdir()
    shutil.copytree(tiny_bert, tmp_path / "models" / "bert")
    monkeypatch.chdir(tmp_path)
    path = make_config("seq_cls", model={"name_or_path": "models/bert"}, train={"max_steps": 1})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    adapter = tmp_path / "run" / "adapter"
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tmp_path / "models" / "bert")
    assert json.loads((adapter / "scaletune.json").read_text())["base_model"] == recorded
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    caplog.clear()
    code, out, err = run_cli(["eval", tmp_path / "run"], capsys)
    assert code == 0, err
    assert "was trained on" not in caplog.text + err


def test_a_run_moved_with_its_relative_base_is_not_warned_of_another_base(capsys, make_config, tmp_path, tiny_bert,
                                                                         monkeypatch, caplog):
    """The project directory renamed (or copied to another machine) with its models/bert: the absolute base path
    the adapter recorded names nothing now, and the config's models/bert is that base (was: 'trained on
    /old/models/bert; loading it onto models/bert')."""
    old = tmp_path / "old"
    shutil.copytree(tiny_bert, old / "models" / "bert")
    monkeypatch.chdir(old)
    path = make_config("seq_cls", model={"name_or_path": "models/bert"}, train={"max_steps": 1},
                       output_dir=str(old / "run"))
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old").rename(tmp_path / "new")
    monkeypatch.chdir(tmp_path / "new")
    caplog.clear()
    code, out, err = run_cli(["eval", "run"], capsys)
    assert code == 0, err
    assert "was trained on" not in caplog.text + err


def test_a_plain_peft_causal_adapter_predicts_and_evaluates_as_peft_does(capsys, make_config, tmp_path, caplog):
    """An adapter saved by plain peft (or TRL's SFTTrainer) holds no tokenizer and no scaletune.json. eval and
    predict failed with "model.name_or_path: cannot load a tokenizer from ADAPTER"; they take the base's, and
    with the config's data.format (prompt_completion) a plain line is the prompt as it is, as peft is given it."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_config("causal_lm")
    raw = yaml.safe_load(path.read_text())
    base_dir = raw["model"]["name_or_path"]
    records = [{"prompt": f"Reverse the order of these words. {w} golf\n", "completion": f"golf {w}"}
               for w in ("alpha", "bravo", "delta", "kilo")]
    data = write_jsonl(tmp_path / "pc.jsonl", records)
    raw["data"].update(train=str(data), eval=str(data), format="prompt_completion")
    path.write_text(yaml.safe_dump(raw))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "plain")  # (another r and targets than the config's: its own config is read)
    code, out, err = run_cli(["eval", path, "--adapter", tmp_path / "plain", "--json"], capsys)
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(base_dir)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "plain"))
    total, n = 0.0, 0
    for r in records:  # the eval loss: the completion's tokens and the closing EOS
        prompt = tok(r["prompt"]).input_ids
        ids = tok(r["prompt"] + r["completion"]).input_ids + [tok.eos_token_id]
        with torch.no_grad():
            logits = peft_model.eval()(torch.tensor([ids])).logits[0]
        total += torch.nn.functional.cross_entropy(logits[len(prompt) - 1:-1], torch.tensor(ids[len(prompt):]),
                                                   reduction="sum").item()
        n += len(ids) - len(prompt)
    assert json.loads(out)["loss"] == pytest.approx(total / n, rel=1e-5)
    inp = tmp_path / "in.txt"
    inp.write_text(records[0]["prompt"].strip() + "\n")
    code, out, err = run_cli(["predict", path, "--adapter", tmp_path / "plain", "--input", inp,
                              "--max-new-tokens", "6"], capsys)
    assert code == 0, err
    enc = tok(records[0]["prompt"].strip(), return_tensors="pt")
    gen = peft_model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert json.loads(out)["completion"] == tok.decode(gen[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    # a base it names that is not here: loaded onto the config's, with the warning scaletune's own adapters get
    conf = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps({**conf, "base_model_name_or_path":
                                                                            "/nowhere/llama-7b"}))
    with caplog.at_level("WARNING", logger="scaletune"):
        code, out, err = run_cli(["eval", path, "--adapter", tmp_path / "plain", "--json"], capsys)
    assert code == 0 and json.loads(out)["loss"] == pytest.approx(total / n, rel=1e-5), err
    assert f"was trained on /nowhere/llama-7b; loading it onto {base_dir}" in caplog.text


def test_a_plain_peft_classifier_needs_its_label_names(capsys, make_config, tmp_path):
    """A seq_cls adapter from plain peft (its head in modules_to_save, no scaletune.json) failed eval and predict
    with a TypeError traceback (no labels); now data.labels names its outputs, checked against the head's size,
    and the scores are peft's."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = make_config("seq_cls")
    base_dir = yaml.safe_load(path.read_text())["model"]["name_or_path"]
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2), LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "plain")
    assert "classifier" in json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["modules_to_save"]
    inp = tmp_path / "in.txt"
    inp.write_text("alpha bravo charlie\n")
    for cmd in (["eval", path], ["predict", path, "--input", inp]):
        code, _, err = run_cli([*cmd, "--adapter", tmp_path / "plain"], capsys)
        assert_clean_error(code, err, "data.labels: the adapter at", "has no scaletune.json")
    code, _, err = run_cli(["predict", path, "--input", inp, "--adapter", tmp_path / "plain",
                            "data.labels=[a, b, c]"], capsys)
    assert_clean_error(code, err, "data.labels: 3 labels, but the classifier of the adapter", "has 2 outputs")
    code, out, err = run_cli(["predict", path, "--input", inp, "--adapter", tmp_path / "plain",
                              "data.labels=[neg, pos]"], capsys)
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    with torch.no_grad():
        probs = PeftModel.from_pretrained(base, str(tmp_path / "plain")).eval()(
            **tok("alpha bravo charlie", return_tensors="pt")).logits.softmax(-1)[0]
    line = json.loads(out)
    assert line["label"] == ["neg", "pos"][int(probs.argmax())]
    assert line["score"] == pytest.approx(probs.max().item(), rel=1e-5)
    code, out, err = run_cli(["eval", path, "--adapter", tmp_path / "plain", "data.labels=[neg, pos]", "--json"],
                             capsys)
    assert code == 0 and "accuracy" in json.loads(out), err
    # another task's adapter: a token tagger's head is `classifier` too, and labelled every text as one class
    conf = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps({**conf, "task_type": "TOKEN_CLS"}))
    code, _, err = run_cli(["predict", path, "--input", inp, "--adapter", tmp_path / "plain",
                            "data.labels=[neg, pos]"], capsys)
    assert_clean_error(code, err, "is a peft TOKEN_CLS adapter (adapter_config.json's task_type), task seq_cls "
                                  "needs SEQ_CLS")


def test_eval_batch_size_is_used_by_training_and_eval_and_changes_no_metric(capsys, make_config, tmp_path,
                                                                            monkeypatch):
    """train.eval_batch_size sets the eval forward's batch (training's evals and `scaletune eval`); the metrics
    are those of micro_batch_size's batches, to float rounding."""
    import scaletune.evaluate as evaluate

    seen = []
    real = evaluate.eval_batches
    monkeypatch.setattr(evaluate, "eval_batches", lambda lengths, micro, *a: seen.append(micro) or real(lengths, micro, *a))
    path = make_config("seq_cls", train={"max_steps": 2, "eval_batch_size": 16})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    assert seen and set(seen) == {16}
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if r.get("event") == "eval"][-1]
    scores = {}
    for size in (16, 2):
        seen.clear()
        code, out, err = run_cli(["eval", path, "--json", f"train.eval_batch_size={size}"], capsys)
        assert code == 0, err
        assert set(seen) == {size}
        scores[size] = json.loads(out)
    assert scores[16]["accuracy"] == scores[2]["accuracy"] == logged["accuracy"]
    assert scores[16]["loss"] == pytest.approx(scores[2]["loss"], rel=1e-5)
    assert scores[16]["loss"] == pytest.approx(logged["loss"], rel=1e-6)


def test_kto_refuses_an_eval_batch_of_one(capsys, make_config):
    """kto's reference point z is the mean log-ratio of an eval batch's mismatched rows, which a batch of 1 has none
    of: every eval batch's z (and its kl) was 0 and its loss another, as train.micro_batch_size 1 is refused for."""
    path = make_config("kto", train={"eval_batch_size": 1})
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "train.eval_batch_size: kto's evals estimate the reference point")
    code, _, err = run_cli(["train", path, "train.eval_batch_size=2"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["eval", path, "train.eval_batch_size=1"], capsys)
    assert_clean_error(code, err, "train.eval_batch_size: kto's evals")


def test_an_out_of_memory_eval_names_eval_batch_size(capsys, make_config, monkeypatch):
    """An eval's batch is train.eval_batch_size (several times micro_batch_size, as its help suggests): an eval that
    runs out of memory says so and offers to halve it, not micro_batch_size (which no longer sets it) or gradient
    checkpointing (an eval has no backward); a training step's message is as before."""
    from scaletune import faults

    path = make_config("seq_cls", train={"max_steps": 2, "eval_every": 1, "micro_batch_size": 2,
                                         "global_batch_size": 4, "eval_batch_size": 16})
    try:
        for fault, fragments, absent in (
                ("oom-in-eval@1", ["out of memory in an eval after step 1 (eval_batch_size=16, micro_batch_size=2",
                                   "cheapest first: train.eval_batch_size=8 (the evals' batch"],
                 ["train.micro_batch_size=", "gradient_checkpointing"]),
                ("oom@2", ["out of memory at step 2 in a micro-batch of 2 x", "train.micro_batch_size=1"],
                 ["eval_batch_size"])):
            monkeypatch.setenv("SCALETUNE_FAULT", fault)
            faults._plan.cache_clear()
            code, _, err = run_cli(["train", path, "--overwrite"], capsys)
            assert_clean_error(code, err, *fragments)
            assert not any(text in err for text in absent), err
    finally:
        faults._plan.cache_clear()


def test_an_out_of_memory_scaletune_eval_is_one_screen_naming_eval_batch_size(capsys, make_config, monkeypatch):
    """`scaletune eval` of a batch too large for the device: the error and what to lower, not a traceback."""
    import scaletune.evaluate as evaluate

    path = make_config("seq_cls", train={"max_steps": 1, "eval_batch_size": 16})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err

    def too_large(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(evaluate, "evaluate", too_large)
    code, _, err = run_cli(["eval", path], capsys)
    assert_clean_error(code, err, "out of memory in eval (batch 16, max_length=", "Tried to allocate 2.00 GiB",
                       "train.eval_batch_size=8 (an override: `scaletune eval RUN train.eval_batch_size=8`)")


def test_eval_batch_size_is_the_batch_of_generation_and_predict(capsys, make_config, tmp_path, monkeypatch):
    """Generation (eval --generate, predict) decodes train.eval_batch_size prompts at a time where it is set (a
    model whose 16 prompts' caches do not fit), and an out-of-memory predict is one screen naming it."""
    import scaletune.generation

    path = make_config("causal_lm", train={"max_steps": 1})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    inp = write_jsonl(tmp_path / "in.jsonl", [{"instruction": f"Say {i}", "input": ""} for i in range(7)])
    sizes = []
    real = scaletune.generation.generate_batch

    def spy(model, tokenizer, prompts, *args, **kwargs):
        sizes.append(len(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    import scaletune.infer

    for module in (scaletune.generation, scaletune.infer):  # (predict's, and eval's imported when it runs)
        monkeypatch.setattr(module, "generate_batch", spy)
    outs = {}
    for given in ([], ["train.eval_batch_size=3"]):
        sizes.clear()
        code, out, err = run_cli(["predict", path, "--input", inp, "--max-new-tokens", 3, *given], capsys)
        assert code == 0, err
        outs[bool(given)] = out
        assert sizes == ([3, 3, 1] if given else [7])
    assert outs[True] == outs[False]  # (greedy: a completion does not depend on its batch)
    sizes.clear()
    code, _, err = run_cli(["eval", path, "--generate", "--max-new-tokens", 2, "train.eval_batch_size=5"], capsys)
    assert code == 0, err
    assert sizes == [5, 5, 5, 1]  # (the 16 eval examples)

    def too_large(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(scaletune.infer, "generate_batch", too_large)
    code, _, err = run_cli(["predict", path, "--input", inp], capsys)
    assert_clean_error(code, err, "out of memory in predict (batch 16,", "Tried to allocate 3.00 GiB",
                       "`scaletune predict RUN train.eval_batch_size=8`", "--max-new-tokens lower")
