"""Every train.optimizer: its parameter groups (weight decay on/off, LoRA+'s learning rate), the state bytes
`scaletune plan` counts for it, a non-finite step that leaves its weights and state alone, and the configs
that are refused with it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from scaletune import faults, plan
from scaletune.config import from_dict, load_config
from scaletune.errors import ConfigError
from scaletune.loop import fit
from scaletune.optimizers import OPTIMIZERS
from scaletune.train import StopFlag, build_optimizer, setup

NEW = ["paged_adamw_32bit", "adafactor", "lion", "lion_8bit", "paged_lion_8bit"]
RAW = {"task": "causal_lm", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}


def _inner(opt):
    while hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


class _Lora(torch.nn.Module):
    """Parameters named as peft names them: LoRA A and B (64 x 64: bitsandbytes' 8-bit state), a bias, a norm."""

    def __init__(self):
        super().__init__()
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(64, 64, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(64, 64, bias=True)})
        self.norm = torch.nn.LayerNorm(64)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_weight_decay_groups_and_loraplus_work_with_each_optimizer(optimizer):
    """With zero gradients an update is decay alone: A shrinks by lr x wd, LoRA+'s B by 16 x lr x wd, the
    bias and norm (the no-decay group) stay as they are."""
    cfg = from_dict({**RAW, "train": {"optimizer": optimizer, "weight_decay": 0.5, "learning_rate": 0.01,
                                      "loraplus_lr_ratio": 16}})
    model = torch.nn.ModuleDict({"q": _Lora()})
    opt = build_optimizer(cfg, model)
    assert [(g["weight_decay"], g["lr"]) for g in opt.param_groups] == [(0.5, 0.01), (0.0, 0.01), (0.5, 0.16)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    shrink = {"q.lora_A.default.weight": 1 - 0.01 * 0.5, "q.lora_B.default.weight": 1 - 0.16 * 0.5}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] * shrink.get(name, 1.0), rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_plan_counts_the_optimizer_state_one_step_allocates(make_config, optimizer):
    """BERT seq_cls with r=128: LoRA matrices of 4096+ elements (8-bit states), a small classifier matrix and
    its bias (32-bit states; Adafactor's full second moment for the vector). The bytes of every state
    tensor after one step are what plan says (bitsandbytes' shared quantile maps counted per tensor, as
    a checkpoint holds and a resumed run allocates them)."""
    path = make_config("seq_cls", n=16, train={"max_steps": 1, "optimizer": optimizer, "global_batch_size": 4,
                                               "eval_every": None, "save_every": None},
                       peft={"r": 128, "lora_alpha": 16})
    cfg = load_config(path)
    run, _ = setup(cfg, overwrite=True)
    assert fit(run, StopFlag()) == "done"
    states = _inner(run.optimizer).state.values()
    real = sum(v.nbytes for st in states for v in st.values() if torch.is_tensor(v))
    assert real == plan.model_state_bytes(cfg, plan.model_shape(cfg), 1).gpu["optimizer"]


@pytest.mark.parametrize("optimizer", ["adamw", *NEW])
def test_a_skipped_non_finite_step_changes_neither_weights_nor_state(make_config, monkeypatch, tmp_path, optimizer):
    """on_nonfinite: skip with a NaN loss at step 2: the step-2 checkpoint holds the weights, the optimizer
    state and its step count of step 1; the run goes on training at step 3."""
    monkeypatch.setenv("SCALETUNE_FAULT", "nan@2")
    faults._plan.cache_clear()
    path = make_config("causal_lm", n=16, train={"max_steps": 3, "optimizer": optimizer, "on_nonfinite": "skip",
                                                 "save_every": 1, "save_total_limit": None, "global_batch_size": 4,
                                                 "eval_every": None},
                       peft={"r": 128, "lora_alpha": 16})
    try:
        run, _ = setup(load_config(path))
        assert fit(run, StopFlag()) == "done"
    finally:
        faults._plan.cache_clear()
    assert run.counters["nonfinite_skips"] == 1
    ckpts = tmp_path / "run" / "checkpoints"
    for part in ("trainable", "optimizer"):
        one, two, three = (load_file(str(ckpts / f"step-{s}" / f"{part}.safetensors")) for s in (1, 2, 3))
        assert sorted(one) == sorted(two) and one
        for name, value in one.items():
            assert torch.equal(two[name], value), (part, name)
        assert any(not torch.equal(three[n], v) for n, v in one.items()), part  # step 3 trained
    scalars = [json.loads((ckpts / f"step-{s}" / "state.json").read_text())["optimizer_scalars"] for s in (1, 2)]
    assert scalars[0] == scalars[1]


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_32bit", "lion", "lion_8bit", "paged_lion_8bit"])
def test_bitsandbytes_optimizers_are_refused_under_zero(optimizer):
    raw = {**RAW, "train": {"optimizer": optimizer}, "distributed": {"zero_stage": 2, "offload": "optimizer"}}
    with pytest.raises(ConfigError, match=rf"train.optimizer={optimizer} with distributed.zero_stage=2: ZeRO "
                                          r"shards the optimizer state itself.*use optimizer: adamw or adafactor"):
        from_dict(raw)


@pytest.mark.parametrize("offload", ["none", "optimizer"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_adafactor_is_accepted_under_zero(stage, offload):
    raw = {**RAW, "train": {"optimizer": "adafactor"}, "distributed": {"zero_stage": stage, "offload": offload}}
    assert from_dict(raw).train.optimizer == "adafactor"


def test_bitsandbytes_missing_is_named_for_the_new_optimizers(monkeypatch):
    from scaletune import rules

    monkeypatch.setattr(rules, "_missing", lambda package: package == "bitsandbytes")
    for optimizer in NEW:
        cfg = from_dict({**RAW, "train": {"optimizer": optimizer}})
        problems = rules.package_problems(cfg)
        assert (optimizer == "adafactor") is not any(f"train.optimizer={optimizer} needs bitsandbytes" in p
                                                     for p in problems), optimizer
