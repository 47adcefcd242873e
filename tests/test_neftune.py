"""train.neftune_noise_alpha: noise on the input embeddings of training forwards only, within NEFTune's
bound, replayed exactly by a resumed run."""

from __future__ import annotations

import math

import torch
from safetensors.torch import load_file

from scaletune.config import load_config
from scaletune.loop import fit
from scaletune.stopflag import StopFlag
from scaletune.train import setup

from stutil import StopAt


def _run(make_config, tmp_path, name, alpha, **train):
    path = make_config("causal_lm", n=32, output_dir=str(tmp_path / name),
                       train={"max_steps": 4, "save_every": 2, "eval_every": None, "global_batch_size": 8,
                              "neftune_noise_alpha": alpha, **train})
    return path


def test_noise_is_bounded_and_only_in_training(make_config, tmp_path):
    run, _ = setup(load_config(_run(make_config, tmp_path, "unit", 5.0)))
    embeddings = run.model.get_input_embeddings()
    ids = torch.randint(0, embeddings.num_embeddings, (2, 7))
    clean = torch.nn.functional.embedding(ids, embeddings.weight)
    bound = 5.0 / math.sqrt(7 * clean.shape[-1])
    run.model.train()
    first, second = embeddings(ids), embeddings(ids)
    assert not torch.equal(first, second)
    for noisy in (first, second):
        assert (noisy - clean).abs().max() <= bound * (1 + 1e-6)
        assert (noisy - clean).abs().max() > bound / 2  # uniform over the whole bound, not a tiny jitter
    run.model.eval()
    assert torch.equal(embeddings(ids), clean)


def test_a_resumed_run_replays_the_noise(make_config, tmp_path):
    finals = {}
    for name, alpha in (("whole", 5.0), ("plain", None)):
        run, _ = setup(load_config(_run(make_config, tmp_path, name, alpha)))
        assert fit(run, StopFlag()) == "done"
        finals[name] = load_file(str(run.output_dir / "adapter" / "adapter_model.safetensors"))
    path = _run(make_config, tmp_path, "cut", 5.0)
    run, _ = setup(load_config(path))
    assert fit(run, StopAt(run, 2)) == "preempted"
    run, _ = setup(load_config(path), resume="auto")
    assert run.step == 2 and fit(run, StopFlag()) == "done"
    resumed = load_file(str(run.output_dir / "adapter" / "adapter_model.safetensors"))
    for key, w in finals["whole"].items():
        assert torch.equal(resumed[key], w), key
    assert any(not torch.equal(finals["plain"][k], w) for k, w in finals["whole"].items())  # the noise trained


def test_each_step_draws_new_noise(make_config, tmp_path):
    """The loop reseeds torch's generator at every step from (seed, step, rank). A seed without the step would
    draw the same noise (and dropout masks) at every step: on identical batches the embeddings' output would
    repeat step after step. (The embedding table is frozen, so any difference between steps is the noise.)"""
    from stutil import alpaca_records, write_jsonl

    same = write_jsonl(tmp_path / "same.jsonl", alpaca_records(1) * 16)
    path = make_config("causal_lm", n=16, output_dir=str(tmp_path / "run"), data={"train": str(same)},
                       train={"max_steps": 3, "save_every": None, "eval_every": None, "global_batch_size": 8,
                              "micro_batch_size": 8, "neftune_noise_alpha": 5.0})
    run, _ = setup(load_config(path))
    train = []
    run.model.get_input_embeddings().register_forward_hook(
        lambda m, a, out: train.append(out.detach().clone()) if m.training else None)  # (not the final eval)
    assert fit(run, StopFlag()) == "done"
    assert len(train) == 3 and train[0].shape == train[1].shape == train[2].shape
    assert not torch.equal(train[0], train[1]) and not torch.equal(train[1], train[2])
