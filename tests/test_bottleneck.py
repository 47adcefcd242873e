"""Houlsby bottleneck adapters (`peft.method: bottleneck_adapter`): a peft tuner registered by scaletune."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

import scaletune.adapters  # noqa: F401  (registers the method with peft)
from scaletune.adapters.bottleneck import MERGE_REFUSED, BottleneckConfig, detect_target_modules
from scaletune.config import from_dict
from scaletune.errors import ConfigError
from scaletune.peft_options import peft_config

HIDDEN, LAYERS = 32, 2  # the conftest tiny models
AUTO = {"CAUSAL_LM": AutoModelForCausalLM, "SEQ_CLS": AutoModelForSequenceClassification,
        "TOKEN_CLS": AutoModelForTokenClassification}


@pytest.fixture()
def models(tiny_llama, tiny_bert):
    return {"llama": tiny_llama, "bert": tiny_bert}


def base_model(path: Path, task: str):
    kwargs = {} if task == "CAUSAL_LM" else {"num_labels": 3}
    torch.manual_seed(1)  # the new classification head is random: make it the same on every load
    return AUTO[task].from_pretrained(str(path), **kwargs).eval()


def batch(seed: int = 0, n: int = 4, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (n, length), generator=g)  # both tiny vocabularies are larger
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some padding, so masked positions are exercised too
    return {"input_ids": ids, "attention_mask": mask}


def adapt(model, task: str, **kwargs):
    return peft.get_peft_model(model, BottleneckConfig(task_type=task, **kwargs))


def perturb(model, seed: int = 0) -> None:
    """Give every trainable weight a random value, so an adapter that was not loaded cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def adapter_param_count(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".bottleneck_" in n)


CASES = [("bert", "SEQ_CLS"), ("bert", "TOKEN_CLS"), ("llama", "CAUSAL_LM"), ("llama", "SEQ_CLS")]


def test_registered_under_the_run_config_name():
    names = {str(getattr(k, "value", k)).lower(): v for k, v in peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    assert names["bottleneck_adapter"] is BottleneckConfig
    assert BottleneckConfig().peft_type == "BOTTLENECK_ADAPTER"


@pytest.mark.parametrize("arch,task", CASES)
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_adapted_model_equals_base_at_init(models, arch, task, placement):
    model = base_model(models[arch], task)
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
        adapted = adapt(model, task, reduction_factor=4, placement=placement).eval()
        torch.testing.assert_close(adapted(**inputs).logits, expected, rtol=0, atol=1e-6)


def test_init_scale_gives_a_small_nonzero_start(tiny_llama):
    model = base_model(tiny_llama, "CAUSAL_LM")
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
        diff = (adapt(model, "CAUSAL_LM", init_scale=1e-3)(**inputs).logits - expected).abs().max().item()
    assert 0 < diff < 1e-2


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("placement,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
@pytest.mark.parametrize("size,width", [({"reduction_factor": 4}, HIDDEN // 4), ({"reduction_factor": 16}, 2),
                                        ({"bottleneck_dim": 5, "reduction_factor": 4}, 5)])
def test_parameter_count(models, arch, placement, per_layer, size, width):
    task = "CAUSAL_LM" if arch == "llama" else "TOKEN_CLS"
    model = adapt(base_model(models[arch], task), task, placement=placement, **size)
    per_adapter = 2 * HIDDEN * width + width + HIDDEN  # down (weight + bias) + up (weight + bias)
    assert adapter_param_count(model) == LAYERS * per_layer * per_adapter
    wrapped = [n for n, m in model.named_modules() if isinstance(m, scaletune.adapters.bottleneck.Linear)]
    assert len(wrapped) == LAYERS * per_layer
    if arch == "bert":
        suffixes = {"attention.output.dense", "output.dense"} if per_layer == 2 else {"output.dense"}
        assert {n.split("layer.0.")[-1] for n in wrapped if "layer.0." in n} == suffixes
    else:
        suffixes = {"self_attn.o_proj", "mlp.down_proj"} if per_layer == 2 else {"mlp.down_proj"}
        assert {n.split("layers.0.")[-1] for n in wrapped if "layers.0." in n} == suffixes
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)
    assert trainable == adapter_param_count(model) + head  # base frozen; only adapters (+ new head) train
    assert (head > 0) == (task == "TOKEN_CLS")


def test_detection_never_targets_heads_or_unknown_layouts():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="set target_modules"):
        detect_target_modules(model)


@pytest.mark.parametrize("arch,task", [("bert", "SEQ_CLS"), ("llama", "CAUSAL_LM")])
def test_loss_goes_down(models, arch, task):
    torch.manual_seed(0)
    model = adapt(base_model(models[arch], task), task, reduction_factor=4).train()
    inputs = batch(n=8)
    inputs["labels"] = inputs["input_ids"] if task == "CAUSAL_LM" else torch.arange(8) % 3
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(6):
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[0] - losses[-1] > 0.05, losses
    # the adapters themselves learned (not only the seq-cls head)
    ups = [p for n, p in model.named_parameters() if "bottleneck_up" in n and n.endswith("weight")]
    assert all(p.abs().sum() > 0 for p in ups)


@pytest.mark.parametrize("arch,task", CASES[:3])
def test_save_and_load_with_plain_peft(models, arch, task, tmp_path):
    model = adapt(base_model(models[arch], task), task, reduction_factor=4, non_linearity="gelu")
    perturb(model)
    model.eval()
    inputs = batch(seed=3)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(str(tmp_path / "adapter"))
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    saved = yaml.safe_load((tmp_path / "adapter/adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK_ADAPTER" and saved["target_modules"]  # exact targets are recorded

    fresh = base_model(models[arch], task)
    with torch.no_grad():
        before = fresh(**inputs).logits
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = loaded(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - before).abs().max() > 1e-3  # the adapter (and head) really were loaded
    assert not any(p.requires_grad for p in loaded.parameters())  # from_pretrained defaults to inference


def test_merge_is_refused_but_unload_works(tiny_llama):
    model = adapt(base_model(tiny_llama, "CAUSAL_LM"), "CAUSAL_LM", reduction_factor=4)
    perturb(model)
    with pytest.raises(ValueError, match="cannot be merged into the base weights") as info:
        model.merge_and_unload()
    assert str(info.value) == MERGE_REFUSED
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    inputs = batch()
    with torch.no_grad():
        with model.disable_adapter():
            without = model(**inputs).logits
        assert (model(**inputs).logits - without).abs().max() > 1e-3
        torch.testing.assert_close(model.unload()(**inputs).logits, without, rtol=0, atol=1e-6)


@pytest.mark.parametrize("settings", [{"non_linearity": "softmax"}, {"placement": "middle"},
                                      {"reduction_factor": 0}, {"bottleneck_dim": 2.5}, {"init_scale": -1.0}])
def test_bad_values_rejected(settings):
    with pytest.raises(ValueError):
        BottleneckConfig(**settings)


def _run_config(make_config, task: str, peft_section: dict, **sections) -> Path:
    """make_config, with the peft section replaced (make_config would merge it into its LoRA defaults)."""
    path = make_config(task, **sections)
    raw = yaml.safe_load(path.read_text())
    raw["peft"] = peft_section
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_run_config_keys_are_checked(make_config):
    path = _run_config(make_config, "seq_cls", {"method": "bottleneck_adapter", "reduction_factr": 4})
    cfg = from_dict(yaml.safe_load(path.read_text()))
    with pytest.raises(ConfigError, match="reduction_factr.*did you mean 'reduction_factor'"):
        peft_config(cfg, "SEQ_CLS")
    cfg.peft = {"method": "bottleneck_adapter", "placement": "middle"}
    with pytest.raises(ConfigError, match="placement must be one of"):
        peft_config(cfg, "SEQ_CLS")
    cfg.peft = {"method": "bottleneck_adapter", "reduction_factor": 4, "non_linearity": "gelu"}
    conf = peft_config(cfg, "SEQ_CLS")
    assert isinstance(conf, BottleneckConfig) and conf.reduction_factor == 4 and conf.non_linearity == "gelu"
    assert conf.exclude_modules == ["classifier", "score"]  # scaletune keeps the new head out of the adapter


def test_train_through_scaletune_then_load_in_a_fresh_python(make_config, tmp_path, capsys):
    from scaletune.cli import main

    path = _run_config(make_config, "seq_cls", {"method": "bottleneck_adapter", "reduction_factor": 4})
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["merge", str(path), "--out", str(tmp_path / "merged")]) == 2
    assert MERGE_REFUSED in capsys.readouterr().err
    # a config naming another method: the refusal names the adapter's (it said "cannot merge a lora adapter")
    assert main(["merge", str(path), "peft={method: lora}", "--out", str(tmp_path / "merged")]) == 2
    assert f"cannot merge a bottleneck_adapter adapter: {MERGE_REFUSED}" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
    adapter = tmp_path / "run" / "adapter"
    conf = yaml.safe_load((adapter / "adapter_config.json").read_text())
    assert conf["peft_type"] == "BOTTLENECK_ADAPTER" and "classifier" in conf["modules_to_save"]
    # A new interpreter: only `import scaletune.adapters` stands between plain peft and the adapter.
    raw = yaml.safe_load(path.read_text())
    script = textwrap.dedent(f"""
        import json, peft, torch, scaletune.adapters
        from transformers import AutoModelForSequenceClassification
        labels = json.load(open({str(adapter / "scaletune.json")!r}))["labels"]
        base = AutoModelForSequenceClassification.from_pretrained({raw["model"]["name_or_path"]!r},
                                                                  num_labels=len(labels))
        model = peft.PeftModel.from_pretrained(base, {str(adapter)!r})
        assert type(model.peft_config["default"]).__name__ == "BottleneckConfig"
        print(tuple(model(torch.tensor([[2, 7, 9, 3]])).logits.shape))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("(1, 2)")


def test_scaletune_commands_in_a_fresh_process_know_the_method(tiny_llama, tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    adapt(base_model(tiny_llama, "CAUSAL_LM"), "CAUSAL_LM", reduction_factor=4).save_pretrained(str(adapter))
    for f in tiny_llama.iterdir():  # the adapter dir carries the tokenizer, as scaletune's own runs do
        if "token" in f.name:
            shutil.copy(f, adapter / f.name)
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    cfg = {"task": "causal_lm", "model": {"name_or_path": str(tiny_llama), "dtype": "float32"},
           "peft": {"method": "bottleneck_adapter"}, "data": {"train": str(data)}, "output_dir": str(tmp_path / "run")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "scaletune", "merge", str(path), "--adapter", str(adapter),
                          "--out", str(tmp_path / "merged")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and MERGE_REFUSED in res.stderr, res.stderr[-3000:]
