"""The PEFT method matrix: every supported method x task trains, saves, reloads in plain peft and
predicts the same; unsupported combinations are refused up front; AdaLoRA really re-allocates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from scaletune.config import from_dict, load_config
from scaletune.errors import ConfigError
from scaletune.loop import fit
from scaletune.methods import MATRIX, matrix_markdown, problems
from scaletune.train import StopFlag, setup

from stutil import StopAt, method_keys, read_metrics

ROOT = Path(__file__).resolve().parents[1]
CASES = [(m, t) for m, row in MATRIX.items() for t in row.tasks]


def _write(make_config, task: str, name: str, tmp_path: Path, **train) -> Path:
    # 8 examples = one global batch: every step sees the same batch, so "loss goes down" is a
    # reliable learnability check in a handful of steps for every method.
    path = make_config(task, n=8, train={"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 8,
                                         "learning_rate": 2e-2, **train})
    raw = yaml.safe_load(path.read_text())
    raw["peft"] = method_keys(name, task)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name,task", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_method_trains_saves_and_reloads_in_plain_peft(make_config, tmp_path, name, task):
    from peft import PeftModel

    import scaletune.adapters  # noqa: F401  (registers bottleneck_adapter with peft)

    # Methods with few parameters and no adapter on the pooler need more steps to move a fresh head.
    slow = task in ("seq_cls", "seq_regression") and name in ("adalora", "ia3", "vera", "ln_tuning", "prefix_tuning",
                                                              "prompt_tuning", "bottleneck_adapter")
    lr = 3e-1 if name == "prompt_tuning" else 5e-2  # prompt tuning is usually run at lr ~0.3
    steps = 30
    if name == "ln_tuning":  # norm gains alone barely move the tiny random encoder's pooled text: slower, longer
        lr, steps = 2e-2, 60
    path = _write(make_config, task, name, tmp_path, **({"max_steps": steps, "learning_rate": lr} if slow else {}))
    cfg = load_config(path)
    if name == "prefix_tuning" and task in ("seq_cls", "seq_regression") and _peft_prefix_forward_fails(cfg):
        # this transformers renamed the encoder's cache argument and this peft cannot run the pair
        # at all: scaletune must refuse it before training, naming the way out
        with pytest.raises(ConfigError, match=rf"prefix_tuning with task {task}: peft .*`past_key_values`.*"
                                              r"transformers<5.24"):
            setup(cfg)
        return
    run, _ = setup(cfg)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    assert fit(run, StopFlag()) == "done"
    losses = [r["loss"] for r in read_metrics(run.output_dir)]
    if name == "prompt_tuning" and task in ("seq_cls", "seq_regression"):
        # BERT pools position 0, which becomes a virtual token: on a random tiny encoder that
        # representation barely depends on the text, so only check that every trainable moved.
        after = dict(run.model.named_parameters())
        assert all(not torch.equal(before[n], after[n].detach()) for n in before)
    else:
        assert losses[-1] < losses[0], losses
    # same predictions from the in-memory model and from base + adapter loaded by plain peft
    model = run.accelerator.unwrap_model(run.model).eval()
    meta = json.loads((run.output_dir / "adapter/scaletune.json").read_text())
    kwargs = run.task.model_kwargs(meta["labels"])
    base = run.task.auto_model_class().from_pretrained(cfg.model.name_or_path, **kwargs)
    loaded = PeftModel.from_pretrained(base, str(run.output_dir / "adapter")).eval()
    batch = run.task.collate([run.data["eval"][i] for i in range(4)], run.tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-4)
        if MATRIX[name].merges:  # (the README table's merge column: scaletune merge is merge_and_unload)
            expected = loaded(**inputs).logits
            torch.testing.assert_close(loaded.merge_and_unload()(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
        else:  # refused, as `scaletune merge` catches it (merge.py)
            with pytest.raises((ValueError, NotImplementedError, AttributeError)):
                loaded.merge_and_unload()


def _peft_prefix_forward_fails(cfg) -> bool:
    """Whether plain peft (no scaletune code) fails the first forward of a prefix-tuned classifier."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(cfg.model.name_or_path, num_labels=2)
    model = get_peft_model(base, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    try:
        model(input_ids=torch.tensor([[2, 5, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    except ValueError as exc:
        assert "past key values" in str(exc)
        return True
    return False


def test_unsupported_combinations_refused_with_reason():
    base = {"model": {"name_or_path": "m"}, "data": {"train": "x"}}
    with pytest.raises(ConfigError, match=r"prompt_tuning with task token_cls is not supported \(virtual input"):
        from_dict({**base, "task": "token_cls", "peft": {"method": "prompt_tuning"}})
    for stage in (1, 2, 3):  # under ZeRO-2 its allocator raised at step 1: DeepSpeed had stepped already
        with pytest.raises(ConfigError, match=rf"adalora with distributed.zero_stage={stage}: its rank "
                                              r"re-allocation reads the gradients .* use distributed.zero_stage: 0"):
            from_dict({**base, "task": "causal_lm", "peft": {"method": "adalora"},
                       "distributed": {"zero_stage": stage}})
    cfg = from_dict({**base, "task": "causal_lm", "peft": {"method": "lora", "use_dora": True}})
    assert problems(cfg) == []
    # (under 2-process ZeRO-3 DeepSpeed's optimizer set-up failed on peft's copies of the partitioned norm layers)
    with pytest.raises(ConfigError, match=r"ln_tuning with distributed.zero_stage=3: peft deep-copies .* use ZeRO-2"):
        from_dict({**base, "task": "causal_lm", "peft": {"method": "ln_tuning"}, "distributed": {"zero_stage": 3}})
    four_bit = {"quantization": "4bit", "dtype": "bfloat16"}
    for method in ("loha", "lokr"):  # they crashed at the first step: peft sized them from the packed weight
        with pytest.raises(ConfigError, match=rf"{method} with model.quantization=4bit: peft sizes its factors"):
            from_dict({**base, "task": "causal_lm", "model": {"name_or_path": "m", **four_bit},
                       "train": {"mixed_precision": "bf16"}, "peft": {"method": method}})
    assert problems(from_dict({**base, "task": "causal_lm", "model": {"name_or_path": "m", **four_bit},
                               "train": {"mixed_precision": "bf16"}, "peft": {"method": "lora"}})) == []


def test_merge_of_a_prompt_learning_adapter_says_why_and_what_to_use(make_config, tmp_path, capsys):
    from scaletune.cli import main

    path = _write(make_config, "causal_lm", "prompt_tuning", tmp_path, max_steps=1)
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["merge", str(path), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "prompt_tuning cannot be merged into the base weights: it adds virtual tokens" in err
    assert "hint: use the adapter as it is" in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()


def test_an_adalora_schedule_longer_than_the_run_names_its_keys_and_the_run_length(make_config, tmp_path, capsys):
    """AdaLoRA's total_step is filled in from the run's steps: tinit + tfinal that leave no budgeting phase in them
    are named with that length, not with peft's "increase total_step" (a key the config never set)."""
    from scaletune.cli import main

    path = _write(make_config, "causal_lm", "adalora", tmp_path, max_steps=3)  # (tinit 1, tfinal 2)
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "peft.tinit (1) and peft.tfinal (2) leave AdaLoRA no steps" in err and "run's 3 optimizer steps" in err
    assert "Traceback" not in err and "total_step`" not in err, err


def test_readme_matrix_is_generated_from_the_code():
    assert matrix_markdown() in (ROOT / "README.md").read_text()


def test_adalora_reallocates_ranks_and_regularises(make_config, tmp_path):
    from scaletune import methods

    path = _write(make_config, "causal_lm", "adalora", tmp_path, max_steps=12)
    raw = yaml.safe_load(path.read_text())
    raw["peft"].update(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, orth_reg_weight=0.5)
    path.write_text(yaml.safe_dump(raw))
    run, _ = setup(load_config(path))
    ada = run.accelerator.unwrap_model(run.model).base_model
    assert ada.peft_config["default"].total_step == 12  # scaletune fills the schedule length in
    reg = methods.extra_loss(run.model)
    assert reg is not None and float(reg) > 0  # the regulariser is part of the objective
    calls = []
    original = ada.update_and_allocate
    ada.update_and_allocate = lambda step: (calls.append(step), original(step))[1]
    fit(run, StopFlag())
    assert calls == list(range(12))  # once per optimizer step
    pattern = ada.peft_config["default"].rank_pattern
    assert pattern, "no rank pattern: budget was never allocated"
    ranks = [int(torch.as_tensor(v).sum()) for v in pattern.values()]
    assert max(ranks) <= 6 and sum(ranks) < 6 * len(ranks), ranks  # ranks were cut from init_r
    saved = json.loads((run.output_dir / "adapter/adapter_config.json").read_text())
    assert saved["rank_pattern"]
    # loading it (eval, predict, merge) does not print the whole pattern as "ignored" (peft 0.21 warns)
    import warnings

    from scaletune.model import load_model

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_model(run.cfg, run.task, None, run.tokenizer, adapter_path=str(run.output_dir / "adapter"))
    assert not [w for w in seen if "rank_pattern" in str(w.message)], [str(w.message)[:200] for w in seen]


@pytest.mark.parametrize("stop_at", [5, 10], ids=["while-allocating", "after-final-allocation"])
def test_adalora_resume_is_exact(make_config, tmp_path, stop_at):
    """AdaLoRA keeps state outside the optimizer: importance averages and, once final, the rank pattern
    that masks every later step. A run stopped and resumed must end with the same adapter and pattern."""
    from safetensors.torch import load_file

    runs = {}
    for name, stop in (("full", None), ("split", stop_at)):
        path = _write(make_config, "causal_lm", "adalora", tmp_path, max_steps=12, save_every=None)
        raw = yaml.safe_load(path.read_text())
        raw["peft"].update(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2)
        raw["output_dir"] = str(tmp_path / name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        run, _ = setup(load_config(path))
        if stop is not None:
            assert fit(run, StopAt(run, stop)) == "preempted"
            run, used = setup(load_config(path), resume="auto")
            assert used.name == f"step-{stop}"
        assert fit(run, StopFlag()) == "done"
        runs[name] = run.output_dir
    a = load_file(str(runs["full"] / "adapter/adapter_model.safetensors"))
    b = load_file(str(runs["split"] / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    pattern = [json.loads((runs[n] / "adapter/adapter_config.json").read_text())["rank_pattern"] for n in runs]
    assert pattern[0] and pattern[0] == pattern[1]


@pytest.mark.parametrize("peft", [{"method": "prompt_tuning", "num_virtual_tokens": 4},
                                  {"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
                                  {"method": "prefix_tuning", "num_virtual_tokens": 4},
                                  {"method": "lora", "r": 4}], ids=lambda p: p["method"])
def test_causal_lm_loss_scores_each_token_from_the_position_before_it(make_config, peft):
    """Prompt and p-tuning prepend their virtual tokens to the logits: the loss must read token t+1's
    prediction at position t + num_virtual_tokens (it read t, training every position 5 tokens ahead)."""
    import torch.nn.functional as F

    path = make_config("causal_lm", n=8)
    raw = yaml.safe_load(path.read_text())
    raw["peft"] = peft
    path.write_text(yaml.safe_dump(raw))
    run, _ = setup(load_config(path))
    model = run.model.eval()
    batch = run.task.collate([run.data["train"][i] for i in range(2)], run.tokenizer.pad_token_id)
    with torch.no_grad():
        loss, _ = run.task.loss_sum(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    width = batch["input_ids"].shape[1]
    own = full[:, -width:][:, :-1]  # the logits of the real tokens, whatever came before them
    expected = F.cross_entropy(own.reshape(-1, own.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(loss, expected)


def test_a_prompt_encoder_stands_in_with_the_masters_only_where_their_shapes_are_whole(tiny_llama, tmp_path):
    """The saved prompt embedding comes from float32 masters where the module holds 16-bit copies (ZeRO-1/2);
    a ZeRO-3 partition (empty shapes) is left as peft saves it rather than failing the run's last save."""
    from peft import PromptTuningConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from scaletune.trainable_state import prompt_encoders_holding

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    key = "prompt_encoder.default.embedding.weight"
    live = model.prompt_encoder["default"].embedding.weight
    masters = {key: torch.randn(live.shape, dtype=torch.float32)}
    model.prompt_encoder["default"].to(torch.bfloat16)  # (what DeepSpeed bf16 holds)
    with prompt_encoders_holding(model, masters):
        model.save_pretrained(tmp_path / "a", state_dict=masters)
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")["prompt_embeddings"]
    assert saved.dtype == torch.float32 and torch.equal(saved, masters[key])
    assert model.prompt_encoder["default"].embedding.weight.dtype == torch.bfloat16  # (the module is left as it was)
    with prompt_encoders_holding(model, {key: torch.zeros(0)}):  # a partition's shape: no stand-in, no failure
        model.save_pretrained(tmp_path / "b")
    assert load_file(tmp_path / "b" / "adapter_model.safetensors")["prompt_embeddings"].dtype == torch.bfloat16


def test_ia3_on_all_linear_layers_reloads_in_plain_peft(make_config, tmp_path):
    """peft names all-linear's targets in full but IA3's feedforward modules by their short default (down_proj):
    its saved adapter_config.json failed peft's own check on load. Saved in full, it loads, with down_proj
    scaled as a feedforward module (its input, not its output) as in training."""
    from peft import PeftModel

    path = make_config("causal_lm", n=8, train={"global_batch_size": 8, "max_steps": 2, "learning_rate": 5e-2})
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "peft": {"method": "ia3", "target_modules": "all-linear"}}))
    run, _ = setup(load_config(path))
    assert fit(run, StopFlag()) == "done"
    model = run.accelerator.unwrap_model(run.model).eval()
    base = run.task.auto_model_class().from_pretrained(load_config(path).model.name_or_path)
    loaded = PeftModel.from_pretrained(base, str(run.output_dir / "adapter")).eval()
    ff = {n for n, m in loaded.named_modules() if getattr(m, "is_feedforward", False)}
    assert ff and all(n.endswith("mlp.down_proj") for n in ff)
    batch = run.task.collate([run.data["eval"][i] for i in range(4)], run.tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
