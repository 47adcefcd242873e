"""`model.new_special_tokens`: tokens added to the tokenizer, the embeddings resized with mean-initialised rows
that train (peft's trainable tokens), and the adapter's life cycle with them: eval, predict, merge, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer

from stutil import assert_clean_error, problems_of, run_cli, write_jsonl

TOKENS = ["<|im_start|>", "<|im_end|>"]
CHAT = {"chat_template": "chatml"}  # (renders every turn between the two tokens)


def _config(make_config, **sections):
    """A causal_lm run on chatml-rendered data with the two ChatML markers as new tokens."""
    model = {"new_special_tokens": TOKENS, **sections.pop("model", {})}
    return make_config("causal_lm", model=model, data=CHAT, **sections)


def _run_config(path: Path):
    from scaletune.config import configure

    return configure(yaml.safe_load(path.read_text()))


def _base_table(cfg) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path).get_input_embeddings().weight.detach()


def test_tokens_are_single_ids_and_new_rows_start_at_the_mean(make_config):
    from scaletune.model import load_model, load_tokenizer
    from scaletune.tasks import get_task

    cfg = _run_config(_config(make_config))
    tok = load_tokenizer(cfg)
    ids = tok.convert_tokens_to_ids(TOKENS)
    text = "<|im_start|>user\nhi<|im_end|>"
    encoded = tok(text, add_special_tokens=False)["input_ids"]
    assert encoded[0] == ids[0] and encoded[-1] == ids[1] and ids[1] == ids[0] + 1 == len(tok) - 1
    base = _base_table(cfg)
    task = get_task(cfg.task)
    task.configure(cfg)
    model = load_model(cfg, task, None, tok, total_steps=4)
    inner = model.get_base_model()
    table = inner.get_input_embeddings()
    assert table.weight.shape[0] == len(tok) == base.shape[0] + 2
    weight = inner.get_input_embeddings().get_merged_weights(["default"]) if hasattr(table, "get_merged_weights") \
        else table.weight
    torch.testing.assert_close(weight[ids], base.mean(0).expand(2, -1), rtol=0, atol=1e-6)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "trainable_tokens" in n]
    assert len(trainable) == 2  # the input embedding's rows and the (untied) LM head's
    # a token the tokenizer had already is not added again
    cfg.model.new_special_tokens = ["<|im_start|>", "<pad>"]
    again = load_tokenizer(cfg)
    assert len(again) == len(tok) - 1 and again.convert_tokens_to_ids("<pad>") < base.shape[0]


def test_cache_key_changes_with_the_tokens(make_config):
    from scaletune.data import fingerprint
    from scaletune.model import load_tokenizer

    cfg = _run_config(_config(make_config))
    with_tokens = fingerprint(cfg, load_tokenizer(cfg))
    cfg.model.new_special_tokens = None
    assert fingerprint(cfg, load_tokenizer(cfg)) != with_tokens


def test_life_cycle_train_eval_predict_merge(capsys, make_config, tmp_path):
    path = _config(make_config, train={"max_steps": 4, "eval_every": 4})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    cfg = _run_config(path)
    base = _base_table(cfg)
    adapter = tmp_path / "run" / "adapter"
    meta = json.loads((adapter / "scaletune.json").read_text())["new_special_tokens"]
    ids = meta["trained"]
    assert meta["rows"] == base.shape[0] + 2 and len(ids) == 2
    saved = load_file(adapter / "adapter_model.safetensors")
    assert not any(k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight") for k in saved)  # rows only
    rows = next(v for k, v in saved.items() if "embed_tokens" in k and "trainable_tokens" in k)
    assert rows.shape == (2, base.shape[1])
    assert (rows - base.mean(0)).abs().max() > 1e-3  # trained away from the mean
    # eval of the saved adapter gives the loss of training's last eval: the rows are saved and reloaded
    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in final if r.get("event") == "eval"][-1]
    code, out, err = run_cli(["eval", path], capsys)
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(final["loss"], rel=1e-5)
    inp = tmp_path / "prompts.txt"
    inp.write_text("Say <|im_end|> twice.\n")
    code, out, err = run_cli(["predict", path, "--input", inp, "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    assert "completion" in json.loads(out.splitlines()[0])
    code, _, err = run_cli(["merge", path, "--out", tmp_path / "merged"], capsys)
    assert code == 0, err
    _check_merged(cfg, tmp_path / "merged", ids, base)


def _check_merged(cfg, merged_dir: Path, ids: list[int], base: torch.Tensor) -> None:
    """The merged model, loaded plainly, has the trained rows (the others the base's) and computes what base +
    adapter computes on a text holding the new tokens; its tokenizer has them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scaletune.infer import load_trained

    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert tok.convert_tokens_to_ids(TOKENS) == ids
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    table = merged.get_input_embeddings().weight.detach()
    assert torch.equal(table[:base.shape[0]], base)  # only the new rows were trained
    assert (table[ids] - base.mean(0)).abs().max() > 1e-3
    peft_model = load_trained(cfg, None)[0]
    text = "<|im_start|>user\nReverse these words<|im_end|>\n<|im_start|>assistant\n"
    batch = torch.tensor([tok(text)["input_ids"]])
    assert set(ids) <= set(batch[0].tolist())
    with torch.no_grad():
        torch.testing.assert_close(merged(batch).logits, peft_model(batch).logits, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_train_one_table(capsys, make_config, tmp_path, tiny_llama):
    """A model whose LM head shares the input embedding (Qwen's small models, Gemma): peft ties the head's new
    rows to the embedding's, and the merged model keeps one table with the trained rows."""
    import shutil

    tied = tmp_path / "tied"
    shutil.copytree(tiny_llama, tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    path = make_config("causal_lm", model={"name_or_path": str(tied), "new_special_tokens": TOKENS}, data=CHAT,
                       train={"max_steps": 4})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    code, _, err = run_cli(["merge", path, "--out", tmp_path / "merged"], capsys)
    assert code == 0, err
    cfg = _run_config(path)
    ids = json.loads((tmp_path / "run" / "adapter" / "scaletune.json").read_text())["new_special_tokens"]["trained"]
    _check_merged(cfg, tmp_path / "merged", ids, _base_table(cfg))
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight)


def test_resume_matches_an_uninterrupted_run(make_config, tmp_path):
    """Preempted at step 3 and resumed, the run ends with the adapter (new rows included) an uninterrupted run
    ends with, bit for bit: the resumed run adds the tokens and resizes the base as the first did."""
    from scaletune.config import load_config
    from scaletune.loop import fit
    from scaletune.train import StopFlag, setup

    from stutil import StopAt

    adapters = {}
    for name in ("full", "split"):
        path = _config(make_config, n=16, train={"max_steps": 5, "lr_scheduler": "constant"},
                       output_dir=str(tmp_path / name))
        run, _ = setup(load_config(path))
        if name == "split":
            assert fit(run, StopAt(run, 3)) == "preempted"
            run, _ = setup(load_config(path), resume="auto")
        assert fit(run, StopFlag()) == "done"
        adapters[name] = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert any("trainable_tokens" in k for k in adapters["full"])
    for key, value in adapters["full"].items():
        torch.testing.assert_close(adapters["split"][key], value, rtol=0, atol=0)


@pytest.mark.parametrize(("task", "method"), [("seq_cls", "lora"), ("token_cls", "lora"), ("reward", "lora"), ("causal_lm", "adalora"),
                                             ("causal_lm", "dora")])
def test_other_tasks_and_methods_train_and_reload_the_rows(capsys, make_config, tmp_path, task, method):
    """The classifiers (input embeddings only, no LM head) and the other LoRA-family methods: the rows train,
    are saved, and `eval` reloads them (its loss is the last eval's of training)."""
    from stutil import method_keys

    data = CHAT if task == "causal_lm" else {}
    path = make_config(task, model={"new_special_tokens": TOKENS}, data=data, train={"max_steps": 4, "eval_every": 4})
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "peft": method_keys(method, task)}))  # (the method's keys alone)
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    adapter = tmp_path / "run" / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")
    assert any("embeddings" in k or "embed_tokens" in k for k in saved if "trainable_tokens" in k), list(saved)
    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in final if r.get("event") == "eval"][-1]
    code, out, err = run_cli(["eval", path], capsys)
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(final["loss"], rel=1e-5)


def test_plan_counts_the_new_rows(make_config):
    from scaletune.plan import model_shape

    cfg = _run_config(_config(make_config))
    with_tokens = model_shape(cfg)
    cfg.model.new_special_tokens = None
    without = model_shape(cfg)
    assert with_tokens.vocab == without.vocab + 2
    # two more rows in each of the two tables, frozen; their trainable copies
    assert sum(n for n, *_ in with_tokens.frozen) == sum(n for n, *_ in without.frozen) + 4 * with_tokens.hidden
    assert sum(map(sum, with_tokens.groups)) == sum(map(sum, without.groups)) + 4 * with_tokens.hidden


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"peft": {"method": "ia3"}}, "peft.method ia3 cannot train the new tokens' embedding rows"),
    ({"task": "dpo"}, "task dpo compares with the model with its adapter switched off"),
    ({"peft": {"method": "lora", "trainable_token_indices": [3]}}, "remove peft.trainable_token_indices"),
    ({"model": {"name_or_path": "m", "new_special_tokens": ["<|im_start|>", 3]}}, "expected a non-empty list"),
    ({"distributed": {"zero_stage": 3}}, "not with distributed.zero_stage=3: peft's trainable tokens"),
])
def test_combinations_that_cannot_train_the_rows_are_refused(changes, fragment):
    from stutil import BASE

    raw = {**BASE, "model": {"name_or_path": "m", "new_special_tokens": TOKENS}, **changes}
    assert any(fragment in p for p in problems_of(raw)), problems_of(raw)


def test_refusal_is_one_screen(capsys, make_config):
    path = make_config("causal_lm", model={"new_special_tokens": TOKENS}, peft={"method": "ia3"})
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "model.new_special_tokens: peft.method ia3")


def _trained(capsys, make_config, tmp_path, **sections) -> tuple[Path, Path]:
    """(config, adapter dir) of a short causal_lm run with the two ChatML markers as new tokens."""
    path = _config(make_config, train={"max_steps": 2}, **sections)
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    return path, tmp_path / "run" / "adapter"


@pytest.mark.parametrize("damage", ["deleted", "no_record"])
def test_an_adapter_without_its_record_is_one_error(capsys, make_config, tmp_path, damage):
    """An adapter whose scaletune.json (or its new tokens' record) is gone: peft indexed the base's table past
    its rows with a bare IndexError; now one error naming the adapter and what is missing, before loading."""
    path, adapter = _trained(capsys, make_config, tmp_path)
    meta_file = adapter / "scaletune.json"
    if damage == "deleted":
        meta_file.unlink()
    else:
        meta = json.loads(meta_file.read_text())
        del meta["new_special_tokens"]
        meta_file.write_text(json.dumps(meta))
    missing = "its scaletune.json is missing" if damage == "deleted" else "has no new_special_tokens record"
    for argv in (["eval", path], ["merge", path, "--out", tmp_path / "merged"]):
        code, _, err = run_cli(argv, capsys)
        assert_clean_error(code, err, f"the adapter at {adapter}", missing, "copy scaletune.json back")
    assert not (tmp_path / "merged").exists()


def test_init_adapter_with_the_same_tokens_starts_from_its_rows(capsys, make_config, tmp_path):
    """model.init_adapter of a run that added the same tokens: the new run's trainable rows start at the ones the
    init adapter trained (not at the mean), its LoRA weights too, and it trains."""
    from scaletune.config import load_config
    from scaletune.loop import fit
    from scaletune.train import StopFlag, setup

    _, adapter = _trained(capsys, make_config, tmp_path)
    init = tmp_path / "init"
    adapter.rename(init)
    saved = load_file(init / "adapter_model.safetensors")
    path = _config(make_config, model={"new_special_tokens": TOKENS, "init_adapter": str(init)},
                   train={"max_steps": 2}, output_dir=str(tmp_path / "second"))
    run, _ = setup(load_config(path))
    params = {n.replace(".default", ""): p for n, p in run.model.named_parameters() if p.requires_grad}
    rows = [k for k in saved if "trainable_tokens_delta" in k]
    assert len(rows) == 2
    for key, value in saved.items():
        torch.testing.assert_close(params[key].detach(), value, rtol=0, atol=0, msg=key)
    assert fit(run, StopFlag()) == "done"
    second = load_file(tmp_path / "second" / "adapter" / "adapter_model.safetensors")
    assert sorted(second) == sorted(saved) and any(not torch.equal(second[k], saved[k]) for k in rows)


@pytest.mark.parametrize(("tokens", "fragment"), [
    (["<|im_start|>", "<|im_sep|>"], "set model.new_special_tokens: ['<|im_start|>', '<|im_end|>']"),
    (list(reversed(TOKENS)), "(in that order: the same ids)"),
    (None, "this run lists none"),
])
def test_init_adapter_with_other_tokens_is_refused(capsys, make_config, tmp_path, tokens, fragment):
    """Other tokens (or the same in another order: other ids), or none, than the init adapter trained rows for:
    refused at the config check, naming the adapter's tokens."""
    _, adapter = _trained(capsys, make_config, tmp_path)
    path = _config(make_config, model={"new_special_tokens": tokens, "init_adapter": str(adapter)},
                   output_dir=str(tmp_path / "second"))
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, f"model.init_adapter: {adapter} was trained with model.new_special_tokens", fragment)


def test_init_adapter_without_tokens_is_refused_for_a_run_adding_them(capsys, make_config, tmp_path):
    """An adapter trained without new tokens as the start of a run that adds some: its rows would start at the
    mean unannounced while the run's config says it continues the adapter; refused, naming both."""
    path = make_config("causal_lm", data=CHAT, train={"max_steps": 2})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    adapter = tmp_path / "run" / "adapter"
    second = _config(make_config, model={"new_special_tokens": TOKENS, "init_adapter": str(adapter)},
                     output_dir=str(tmp_path / "second"))
    code, _, err = run_cli(["train", second], capsys)
    assert_clean_error(code, err, "was trained with no model.new_special_tokens", "drop model.new_special_tokens")


def test_a_head_trained_in_full_takes_the_new_rows_with_it(capsys, make_config, tmp_path):
    """peft.modules_to_save [lm_head] (the demo's config) with new tokens: peft refuses trainable tokens on a
    module it also trains in full, so the head's new rows train with the rest of it (it was an error from
    inside peft after tokenising)."""
    path = _config(make_config, peft={"modules_to_save": ["lm_head"]}, train={"max_steps": 2, "eval_every": 2})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    head = [v for k, v in saved.items() if "lm_head" in k and "trainable_tokens" not in k]
    base = _base_table(_run_config(path))
    assert head and head[0].shape[0] == base.shape[0] + 2  # the whole (resized) head
    assert any("embed_tokens" in k and "trainable_tokens" in k for k in saved)  # the input rows as before
    code, _, err = run_cli(["eval", path], capsys)
    assert code == 0, err


def test_the_merged_chatml_template_leads_with_bos_as_training_did(capsys, make_config, tmp_path):
    """A base whose tokenizer adds BOS itself trains each chatml sequence led by BOS; `apply_chat_template(...,
    tokenize=True)` adds no special tokens, so the merged tokenizer's template must render it (it did not: the
    merged model was prompted without the BOS it was trained with, and generated otherwise than `predict`)."""
    from transformers import AutoTokenizer

    from scaletune.model import load_tokenizer
    from scaletune.tasks.causal_lm import leading_bos

    path = _config(make_config, train={"max_steps": 1})
    assert run_cli(["train", path], capsys)[0] == 0
    assert run_cli(["merge", path, "--out", tmp_path / "merged"], capsys)[0] == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert leading_bos(load_tokenizer(_run_config(path))) is not None  # (the case: else nothing to lead with)
    chat = [{"role": "user", "content": "hi"}]
    ids = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tok(text)["input_ids"] and ids[0] == tok.bos_token_id


def test_eval_does_not_say_the_adapters_rows_start_at_the_mean(capsys, make_config, tmp_path, caplog):
    """eval loads the trained rows over the resized base: its log said they "start at the mean embedding and
    train", as if the adapter's rows were not used."""
    path, _ = _trained(capsys, make_config, tmp_path)
    caplog.clear()
    with caplog.at_level("INFO", logger="scaletune"):
        code, _, err = run_cli(["eval", path], capsys)
    assert code == 0, err
    assert "start at the mean embedding" not in caplog.text


def test_a_generated_answer_of_the_references_tokens_matches_it(capsys, make_config, tmp_path, monkeypatch):
    """A reference holding a new token (<think>) against a model that generates exactly its tokens: decoding
    skips special tokens, so the generated text lacks the marker the reference has; exact_match was 0."""
    import scaletune.generation

    path, adapter = _trained(capsys, make_config, tmp_path, model={"new_special_tokens": [*TOKENS, "<think>"]})
    reference = "<think>sum</think> four"
    data = write_jsonl(tmp_path / "think.jsonl", [{"messages": [{"role": "user", "content": "2+2?"},
                                                                {"role": "assistant", "content": reference}]}])
    tok = AutoTokenizer.from_pretrained(adapter)
    answer = tok(reference, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.convert_tokens_to_ids("<think>") in answer
    monkeypatch.setattr(scaletune.generation, "_generate_rows", lambda model, tokenizer, rows, *a, **k: [answer])
    code, out, err = run_cli(["eval", path, "--data", data, "--generate", "--json"], capsys)
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["exact_match"] == 1.0 and metrics["token_f1"] == 1.0


def test_merge_stops_generation_at_the_templates_turn_end(capsys, make_config, tmp_path):
    """A template whose answers end in <|im_end|> and not the tokenizer's EOS (Qwen's on a base whose
    generation_config names only <|endoftext|>): the merged generation_config.json names <|im_end|> among its
    eos_token_id, so `generate` on the merged model stops where predict stops, not at max_new_tokens."""
    template = tmp_path / "qwen_like.jinja"
    template.write_text("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    path = make_config("causal_lm", model={"new_special_tokens": TOKENS}, data={"chat_template": str(template)},
                       train={"max_steps": 2})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    code, _, err = run_cli(["merge", path, "--out", tmp_path / "merged"], capsys)
    assert code == 0, err
    end = AutoTokenizer.from_pretrained(tmp_path / "merged").convert_tokens_to_ids("<|im_end|>")
    base = json.loads((Path(_run_config(path).model.name_or_path) / "generation_config.json").read_text())
    eos = json.loads((tmp_path / "merged" / "generation_config.json").read_text())["eos_token_id"]
    assert eos == [base["eos_token_id"], end]
