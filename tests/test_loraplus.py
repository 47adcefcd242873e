"""train.loraplus_lr_ratio (LoRA+): LoRA's B matrices in a parameter group of their own at ratio x the
learning rate, on the same schedule; a resume continues exactly; only for LoRA."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from scaletune.cli import main
from scaletune.config import load_config
from scaletune.loop import fit
from scaletune.stopflag import StopFlag
from scaletune.train import setup

from stutil import StopAt, read_metrics


def _path(make_config, tmp_path, name, ratio):
    return make_config("causal_lm", n=32, output_dir=str(tmp_path / name),
                       train={"max_steps": 4, "save_every": 2, "eval_every": None, "global_batch_size": 8,
                              "warmup_steps": 1, "lr_scheduler": "linear", "loraplus_lr_ratio": ratio})


def test_b_matrices_learn_at_ratio_times_the_rate_and_resume_exactly(make_config, tmp_path):
    run, _ = setup(load_config(_path(make_config, tmp_path, "whole", 16.0)))
    names = {id(p): n for n, p in run.model.named_parameters()}
    groups = run.optimizer.param_groups
    b_group = [g for g in groups if any(".lora_B." in names[id(p)] for p in g["params"])]
    assert len(b_group) == 1 and all(".lora_B." in names[id(p)] for p in b_group[0]["params"])
    assert not any(".lora_B." in names[id(p)] for g in groups if g is not b_group[0] for p in g["params"])
    peaks = dict(zip(map(id, groups), run.scheduler.base_lrs))  # one schedule, each group's own peak
    assert peaks[id(b_group[0])] == 16 * run.cfg.train.learning_rate
    assert all(peak == run.cfg.train.learning_rate for g, peak in zip(groups, run.scheduler.base_lrs)
               if g is not b_group[0])
    assert fit(run, StopFlag()) == "done"
    whole = load_file(str(run.output_dir / "adapter" / "adapter_model.safetensors"))
    logged = [r["lr"] for r in read_metrics(run.output_dir)]

    path = _path(make_config, tmp_path, "cut", 16.0)
    run, _ = setup(load_config(path))
    assert fit(run, StopAt(run, 2)) == "preempted"
    run, _ = setup(load_config(path), resume="auto")
    assert fit(run, StopFlag()) == "done"
    resumed = load_file(str(run.output_dir / "adapter" / "adapter_model.safetensors"))
    for key, w in whole.items():
        assert torch.equal(resumed[key], w), key
    assert [r["lr"] for r in read_metrics(run.output_dir)] == logged

    plain, _ = setup(load_config(_path(make_config, tmp_path, "plain", None)))
    assert fit(plain, StopFlag()) == "done"
    other = load_file(str(plain.output_dir / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(other[k], w) for k, w in whole.items() if "lora_B" in k)


def test_only_for_lora(make_config, capsys):
    path = make_config("causal_lm", peft={"method": "ia3", "target_modules": ["q_proj", "v_proj", "down_proj"],
                                          "feedforward_modules": ["down_proj"]},
                       train={"loraplus_lr_ratio": 16})
    assert main(["train", str(path)]) == 2
    assert "train.loraplus_lr_ratio: LoRA+ sets the learning rate of LoRA's B matrices; peft.method is ia3" in \
        capsys.readouterr().err
