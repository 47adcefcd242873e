"""ZeRO cases through the product CLI beyond test_scale_out.py's loss curves (2 CPU processes, gloo; DeepSpeed
on CPU), each checked against a forked single-process run where there is one:

* a non-finite step is skipped under ZeRO-2/3 as in one process; a second optimizer group (DoRA) is
  checkpointed under ZeRO-1/2 with the single-process weights and Adam moments; a ZeRO-3 resume of a tensor
  whose size is no multiple of the world size ends as the uninterrupted run;
* QLoRA (4-bit base) trains under ZeRO-3; bf16 trains on CPU (1 process, ZeRO-2, whose adapters hold the
  float32 masters, prompt tuning's too, and ZeRO-3 with a module trained in full); invalid combinations
  (8-bit + ZeRO-3, fp16 on CPU) are refused with exit 2 before any process is launched;
* Adafactor trains and resumes exactly under ZeRO-2 (optimizer offloaded) and ZeRO-3; train.eval_generate's
  ranks share the answers, which equal one process's, as a launched `eval --generate`'s do; tasks dpo and kto
  (forwards with the adapter off) follow the single-process loss curve and eval under ZeRO-3;
* model.new_special_tokens trains the new embedding rows under ZeRO-2 as one process does (curve, eval, the saved
  rows), and is refused under ZeRO-3 before any process is launched.

The CLI runners and the `world` fixture (tiny Llama, data, `world.cfg` run configs) are test_scale_out.py's;
this module has a world of its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.distributed

# the CLI runners of test_scale_out.py (importing it skips this module where DeepSpeed is missing, as it skips)
import test_scale_out  # noqa: E402
from test_scale_out import (  # noqa: E402
    _accelerate,
    _scaletune,
    assert_same_curve,
    copy_checkpoint,
    losses,
    run_forked,
    run_launched,
)

import stutil as helpers  # noqa: E402  (tests/ is on sys.path via tests/conftest.py)

world = test_scale_out.world  # its fixture, by name: a world of this module's own (module scope)


# ------------------------------------------------------------------------------------------------
# optimizer state under ZeRO: a skipped non-finite step, a second parameter group, an odd-sized tensor


@pytest.mark.parametrize("stage", [2, 3])
def test_a_non_finite_step_is_skipped_under_zero(world, stage):
    """DeepSpeed steps inside accelerate's backward, before scaletune's guard looks at the step, so under
    ZeRO a non-finite update is kept out by DeepSpeed's own overflow check: the run with a NaN loss at
    step 3 (train.on_nonfinite: skip) follows the single-process run that skips that step, to the same
    final adapter, and counts the skip the same way."""
    from safetensors.torch import load_file

    steps = 5
    cfg = world.cfg(f"nan_z{stage}", train={"max_steps": steps, "save_every": steps, "on_nonfinite": "skip",
                                            "max_nonfinite_skips": 2})
    ref, got = world.root / f"nan_single_{stage}", world.root / f"nan_zero{stage}"
    run_forked(world, ["train", str(cfg), f"output_dir={ref}"], SCALETUNE_FAULT="nan@3")
    run_launched(world, _accelerate(f"cpu_2proc_zero{stage}.yaml", str(cfg), f"output_dir={got}",
                               f"distributed.zero_stage={stage}"), SCALETUNE_FAULT="nan@3")
    for run in (ref, got):
        assert [r["step"] for r in helpers.read_metrics(run, "nonfinite")] == [3], run
        state = json.loads((run / "checkpoints" / f"step-{steps}" / "state.json").read_text())
        assert state["counters"]["nonfinite_skips"] == 1, run
    assert_same_curve(losses(ref), losses(got), [1, 2, 4, 5])
    want = load_file(str(ref / "checkpoints" / f"step-{steps}" / "trainable.safetensors"))
    have = load_file(str(got / "checkpoints" / f"step-{steps}" / "trainable.safetensors"))
    assert sorted(want) == sorted(have)
    for name, w in want.items():
        assert torch.isfinite(have[name]).all(), name
        torch.testing.assert_close(have[name], w, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_second_optimizer_group_is_checkpointed_under_zero_1_and_2(world, stage):
    """DoRA's magnitudes (1-D: the no-weight-decay group, as a classifier's bias or a saved norm is) make a
    second parameter group. ZeRO-1/2 linked parameters to their optimizer state after the first group's
    first step only, and the run crashed at its first checkpoint ("exp_avg not found"). Its checkpoint now
    holds the single-process run's weights and Adam moments (ZeRO-1 through `scaletune launch`, ZeRO-2
    through the raw accelerate launch)."""
    from safetensors.torch import load_file

    steps = 3
    cfg = world.cfg(f"dora_z{stage}", peft={"use_dora": True}, train={"max_steps": steps, "save_every": steps,
                                                                       "weight_decay": 0.1})
    ref, got = world.root / f"dora_single_{stage}", world.root / f"dora_zero{stage}"
    run_forked(world, ["train", str(cfg), f"output_dir={ref}"])
    if stage == 1:
        run_launched(world, _scaletune("launch", str(cfg), f"output_dir={got}", "distributed.zero_stage=1",
                                       "--nproc", "2", "--master-port", str(helpers.free_port())))
    else:
        run_launched(world, _accelerate("cpu_2proc_zero2.yaml", str(cfg), f"output_dir={got}",
                                        "distributed.zero_stage=2"))
    assert_same_curve(losses(ref), losses(got), range(1, steps + 1))
    for part in ("trainable", "optimizer"):
        want = load_file(str(ref / "checkpoints" / f"step-{steps}" / f"{part}.safetensors"))
        have = load_file(str(got / "checkpoints" / f"step-{steps}" / f"{part}.safetensors"))
        assert sorted(have) == sorted(want) and any("magnitude" in k for k in want), part
        for name, w in want.items():
            torch.testing.assert_close(have[name], w, rtol=1e-4, atol=1e-6, msg=name)


def test_zero3_resumes_a_tensor_whose_size_is_no_multiple_of_the_world_size(world, make_config, tmp_path):
    """A 3-label NER head's bias (3 elements) on 2 ranks: DeepSpeed's whole-tensor setter sliced rank 1's
    padded partition past the end, and every resume into ZeRO-3 of such a run failed ("does not fit this
    run's model"). Resumed from step 2, it now ends as the uninterrupted ZeRO-3 run does."""
    from safetensors.torch import load_file

    path = make_config("token_cls", train={"max_steps": 3, "save_every": 2, "save_total_limit": None,
                                           "global_batch_size": 8, "micro_batch_size": 2},
                       distributed={"zero_stage": 3})
    full, part = tmp_path / "full", tmp_path / "part"
    port = str(helpers.free_port())
    run_launched(world, _scaletune("launch", str(path), f"output_dir={full}", "--nproc", "2", "--master-port", port))
    copy_checkpoint(full, 2, part)
    run_launched(world, _scaletune("launch", str(path), f"output_dir={part}", "--resume", "auto", "--nproc", "2",
                              "--master-port", str(helpers.free_port())))
    assert_same_curve(losses(full), losses(part), [3])
    want = load_file(str(full / "checkpoints" / "step-3" / "trainable.safetensors"))
    have = load_file(str(part / "checkpoints" / "step-3" / "trainable.safetensors"))
    assert any(v.numel() % 2 for v in want.values())  # the case: an odd-sized trainable tensor
    for name, w in want.items():
        torch.testing.assert_close(have[name], w, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(("stage", "offload"), [(2, "optimizer"), (3, "none")])
def test_adafactor_trains_and_resumes_under_zero(world, stage, offload):
    """transformers' Adafactor as DeepSpeed's client optimizer (on its flat fp32 partitions, so unfactored:
    one exp_avg_sq per element), under ZeRO-2 offloaded to the host (DeepSpeed's CPU Adam not forced on it;
    without offload the same optimizer steps the same partitions on the device) and under ZeRO-3: a run
    resumed from its step-2 checkpoint ends where the uninterrupted run does, and the checkpoint holds
    Adafactor's state."""
    from safetensors.torch import load_file

    cfg = world.cfg(f"adafactor_z{stage}", train={"optimizer": "adafactor", "max_steps": 3, "save_every": 2,
                                                  "learning_rate": 1e-2},
                    distributed={"zero_stage": stage, "offload": offload})
    full, part = world.root / f"adafactor_full_z{stage}", world.root / f"adafactor_part_z{stage}"
    for out, extra in ((full, []), (part, ["--resume", "auto"])):
        if extra:
            copy_checkpoint(full, 2, part)
        run_launched(world, _scaletune("launch", str(cfg), f"output_dir={out}", *extra, "--nproc", "2",
                                  "--master-port", str(helpers.free_port())))
    assert_same_curve(losses(full), losses(part), [3])
    saved = load_file(str(full / "checkpoints" / "step-2" / "optimizer.safetensors"))
    assert saved and all(k.endswith("::exp_avg_sq") for k in saved)
    want = load_file(str(full / "checkpoints" / "step-3" / "trainable.safetensors"))
    have = load_file(str(part / "checkpoints" / "step-3" / "trainable.safetensors"))
    start = load_file(str(full / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert any(not torch.equal(want[n], v) for n, v in start.items())  # step 3 trained
    for name, w in want.items():
        torch.testing.assert_close(have[name], w, rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------------
# quantization, mixed precision, refused combinations

BF16 = {"model": {"dtype": "bfloat16"}, "train": {"mixed_precision": "bf16", "max_steps": 3, "save_every": None}}


def _assert_trained_adapter(run_dir: Path, steps: int) -> None:
    from safetensors.torch import load_file

    got = losses(run_dir)
    assert sorted(got) == list(range(1, steps + 1)) and all(v == v and v < 100 for v in got.values()), got
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(v.numel() > 0 for v in adapter.values())
    assert any("lora_B" in k and v.float().abs().sum() > 0 for k, v in adapter.items())


def test_qlora_trains_under_zero3(world):
    pytest.importorskip("bitsandbytes")
    cfg = world.cfg("qlora", model={"dtype": "bfloat16", "quantization": "4bit"},
                    train={"mixed_precision": "bf16", "max_steps": 3, "save_every": None},
                    distributed={"zero_stage": 3})
    out = world.root / "qlora_zero3"
    run_launched(world, _accelerate("cpu_2proc_zero3.yaml", str(cfg), f"output_dir={out}"))
    _assert_trained_adapter(out, 3)


def test_bf16_single_process(world):
    out = world.root / "bf16_single"
    run_forked(world, ["train", str(world.cfg("bf16", **BF16)), f"output_dir={out}"])
    _assert_trained_adapter(out, 3)


def test_bf16_zero2(world):
    """bf16 under ZeRO-2 trains; its adapter holds the float32 weights DeepSpeed keeps as masters (the
    module's bf16 copies were saved before), as a single-process bf16 run's adapter does, and equal to
    the final checkpoint's."""
    from safetensors.torch import load_file

    out = world.root / "bf16_zero2"
    cfg = world.cfg("bf16_z2", **BF16, distributed={"zero_stage": 2})
    run_launched(world, _accelerate("cpu_2proc_zero2.yaml", str(cfg), f"output_dir={out}"))
    _assert_trained_adapter(out, 3)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    ckpt = load_file(str(out / "checkpoints" / "step-3" / "trainable.safetensors"))
    mapped = {k.replace(".default.", "."): v for k, v in ckpt.items()}
    assert sorted(adapter) == sorted(mapped)
    for k, v in adapter.items():
        assert v.dtype == torch.float32 and torch.equal(v, mapped[k]), k


def test_bf16_zero2_prompt_tuning_saves_its_float32_masters(world):
    """peft saves a prompt-learning adapter by running its prompt encoder, whose weights under DeepSpeed bf16
    are the 16-bit copies: the adapter (and each checkpoint's) was bf16, off the float32 masters the run
    trained by up to ~5e-3. Now it holds the masters, as a single-process run's does."""
    import yaml
    from safetensors.torch import load_file

    out = world.root / "bf16_zero2_prompt"
    cfg = world.cfg("bf16_z2_prompt", **BF16, distributed={"zero_stage": 2})
    raw = yaml.safe_load(cfg.read_text())
    raw["peft"] = helpers.method_keys("prompt_tuning", "causal_lm")
    raw["train"]["learning_rate"] = 5e-2  # (moves the embedding well off bf16's grid in 3 steps)
    cfg.write_text(yaml.safe_dump(raw))
    run_launched(world, _accelerate("cpu_2proc_zero2.yaml", str(cfg), f"output_dir={out}"))
    master = load_file(str(out / "checkpoints" / "step-3" / "trainable.safetensors"))
    master = master["prompt_encoder.default.embedding.weight"]
    assert not torch.equal(master, master.bfloat16().float())  # else the test could not tell
    for adapter in (out / "adapter", out / "checkpoints" / "step-3" / "adapter"):
        saved = load_file(str(adapter / "adapter_model.safetensors"))["prompt_embeddings"]
        assert saved.dtype == torch.float32 and torch.equal(saved, master), adapter


def test_bf16_zero3_trains_a_full_module_copy(world):
    """A module trained in full (peft's modules_to_save: a norm here, a classifier head in every seq_cls run)
    under ZeRO-3 bf16: DeepSpeed computes in bf16 without autocast, and the float32 copy failed at its first
    matmul ("expected m1 and m2 to have the same dtype"), so classification could not run under ZeRO-3 bf16."""
    out = world.root / "bf16_zero3_copy"
    cfg = world.cfg("bf16_z3_copy", model={"dtype": "bfloat16"},
                    train={"mixed_precision": "bf16", "max_steps": 3, "save_every": None},
                    peft={"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["norm"]},
                    distributed={"zero_stage": 3})
    run_launched(world, _accelerate("cpu_2proc_zero3.yaml", str(cfg), f"output_dir={out}"))
    _assert_trained_adapter(out, 3)
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    norms = [k for k in adapter if k.endswith("norm.weight")]
    assert norms and all(adapter[k].dtype == torch.float32 and adapter[k].numel() for k in norms), norms


@pytest.mark.parametrize("how", ["train", "launch"])
@pytest.mark.parametrize("combo", ["8bit_zero3", "fp16_cpu"])
def test_invalid_combination_refused_before_launch(world, how, combo):
    if combo == "8bit_zero3":
        cfg = world.cfg(combo, model={"dtype": "bfloat16", "quantization": "8bit"},
                        train={"mixed_precision": "bf16"}, distributed={"zero_stage": 3})
        needle = "ZeRO-3 cannot shard int8 weights"
    else:
        if torch.cuda.is_available():
            pytest.skip("fp16 is allowed with CUDA")
        cfg = world.cfg(combo, model={"dtype": "float32"}, train={"mixed_precision": "fp16"},
                        distributed={"zero_stage": 2})
        needle = "fp16 needs a CUDA GPU"
    out = world.root / f"refused_{combo}_{how}"
    extra = ["--nproc", "2", "--master-port", str(helpers.free_port())] if how == "launch" else []
    text = run_forked(world, [how, str(cfg), f"output_dir={out}", *extra], expect=2)
    assert needle in text and "Traceback" not in text
    assert " launch --" not in text, "an accelerate command was started before the refusal"
    assert not out.exists()


def test_eval_generate_under_zero2_answers_as_one_process_does(world):
    """train.eval_generate with 2 ranks: each generates a share of the answers with its whole copy of the model
    (DeepSpeed's engine unwrapped), the main process writes them all, in the eval data's order, the answers
    one process gives the final adapter (`eval --generate`), scored the same."""
    out = world.root / "generate_z2"
    cfg = world.cfg("generate_z2", data={"eval_fraction": 0.1},
                    train={"max_steps": 2, "eval_every": 2, "eval_generate": 5, "eval_max_new_tokens": 4},
                    distributed={"zero_stage": 2})
    run_launched(world, _accelerate("cpu_2proc_zero2.yaml", str(cfg), f"output_dir={out}"))
    lines = [json.loads(x) for x in (out / "generations" / "step-2.jsonl").read_text().splitlines()]
    evals = [r for r in helpers.read_metrics(out, "eval") if "exact_match" in r]
    assert len(lines) == 5 and [r["generated_examples"] for r in evals] == [5]
    target = world.root / "generate_z2.jsonl"
    run_forked(world, ["eval", str(cfg), f"output_dir={out}", "distributed.zero_stage=0", "--generate",
                              "--max-new-tokens", "4", "--predictions", str(target), "--json"])
    scored = [json.loads(x) for x in target.read_text().splitlines()]
    assert [(ln["line"], ln["generated"]) for ln in lines] == [(ln["line"], ln["generated"]) for ln in scored[:5]]
    assert any(ln["generated"] for ln in lines)
    assert evals[0]["token_f1"] == pytest.approx(sum(ln["token_f1"] for ln in scored[:5]) / 5)
    # `eval --generate` launched over 2 processes: the same lines, written once
    shared = world.root / "generate_z2_2proc.jsonl"
    run_launched(world, [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
                    str(test_scale_out.REPO / "launch" / "cpu_2proc.yaml"), "--main_process_port",
                    str(helpers.free_port()), "-m", "scaletune", "eval", str(cfg), f"output_dir={out}",
                    "distributed.zero_stage=0", "--generate", "--max-new-tokens", "4", "--predictions", str(shared)])
    assert [json.loads(x) for x in shared.read_text().splitlines()] == scored


@pytest.mark.parametrize(("task", "start"), [("dpo", 0.6931), ("kto", 0.5), ("reward", None)])
def test_preference_tasks_under_zero3_follow_one_process(world, task, start):
    """dpo's and kto's references are the model with the adapter switched off: under ZeRO-3 (each rank holding a
    part of every weight, gathered for each forward, from all ranks) their two and three forwards a micro-batch
    give the single-process run's loss curve (which has left its step-0 value by then: the adapter moved) and
    eval (kto: the 2-process DDP run's, its z being the mean over both ranks' mismatched rows); 5 eval examples on
    2 ranks leave one rank a micro-batch of one (kto: no mismatched pair, still its forwards and z's all-reduce).
    reward: the same pairs scored by a head trained in full beside the adapter (modules_to_save), partitioned too."""
    import yaml

    records = {"dpo": helpers.dpo_records, "kto": helpers.kto_records, "reward": helpers.dpo_records}[task]
    data = {"train": str(helpers.write_jsonl(world.root / f"{task}.jsonl", records(48))),
            "eval": str(helpers.write_jsonl(world.root / f"{task}_eval.jsonl", records(5, seed=1)))}
    cfg = world.cfg(task, data=data, train={"max_steps": 3, "eval_every": 3})
    cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "task": task}, sort_keys=False))
    one, zero3 = world.root / f"{task}_one", world.root / f"{task}_zero3"
    if task != "kto":
        run_forked(world, ["train", str(cfg), f"output_dir={one}"])
    else:  # (kto's z pools both ranks' micro-batches, one process's each its own: DDP's 2 ranks are the baseline)
        run_launched(world, _scaletune("launch", str(cfg), f"output_dir={one}", "distributed.zero_stage=0", "--nproc",
                                  "2", "--master-port", str(helpers.free_port())))
    run_launched(world, _scaletune("launch", str(cfg), f"output_dir={zero3}", "distributed.zero_stage=3",
                                   "--nproc", "2", "--master-port", str(helpers.free_port())))
    assert start is None or abs(losses(one)[3] - start) > 1e-3
    evals = [helpers.read_metrics(run, "eval")[-1] for run in (one, zero3)]
    assert evals[1]["loss"] == pytest.approx(evals[0]["loss"], rel=1e-4)
    assert_same_curve(losses(one), losses(zero3), range(1, 4))


# ------------------------------------------------------------------------------------------------
# model.new_special_tokens: the resized embedding's new rows, trained as peft's trainable tokens

NEW_TOKENS = ["<|im_start|>", "<|im_end|>"]


def test_new_special_tokens_under_zero2_follow_one_process(world):
    """model.new_special_tokens (chatml rendering every turn between the two new tokens) under ZeRO-2: the loss
    curve and eval follow one process's, and the saved adapter's trained rows (the input embedding's and the
    untied LM head's trainable-token deltas) are non-empty and equal one process's."""
    from safetensors.torch import load_file

    evalf = helpers.write_jsonl(world.root / "new_tokens_eval.jsonl", helpers.alpaca_records(5, seed=1))
    cfg = world.cfg("new_tokens_z2", model={"new_special_tokens": NEW_TOKENS},
                    data={"chat_template": "chatml", "eval": str(evalf)},
                    train={"max_steps": 3, "eval_every": 3, "save_every": None})
    one, zero = world.root / "new_tokens_one", world.root / "new_tokens_zero2"
    run_forked(world, ["train", str(cfg), f"output_dir={one}"])
    run_launched(world, _scaletune("launch", str(cfg), f"output_dir={zero}", "distributed.zero_stage=2", "--nproc", "2",
                              "--master-port", str(helpers.free_port())))
    assert_same_curve(losses(one), losses(zero), range(1, 4))
    evals = [helpers.read_metrics(run, "eval")[-1] for run in (one, zero)]
    assert evals[1]["loss"] == pytest.approx(evals[0]["loss"], rel=1e-4)
    want = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    have = load_file(str(zero / "adapter" / "adapter_model.safetensors"))
    assert sorted(have) == sorted(want)
    rows = [k for k in want if "trainable_tokens_delta" in k]
    assert len(rows) == 2 and all(have[k].shape == (2, 32) for k in rows), rows  # embed_tokens' and lm_head's
    mean = load_file(str(world.model / "model.safetensors"))["model.embed_tokens.weight"].mean(0)
    assert (have[rows[0]] - mean).abs().max() > 1e-3  # trained away from their start
    for name, w in want.items():
        torch.testing.assert_close(have[name], w, rtol=1e-4, atol=1e-6, msg=name)
    meta = [json.loads((run / "adapter" / "scaletune.json").read_text())["new_special_tokens"] for run in (one, zero)]
    assert meta[0] == meta[1] and meta[0]["trained"]


@pytest.mark.parametrize("how", ["train", "launch"])
def test_new_special_tokens_under_zero3_are_refused_before_launch(world, how):
    """peft's trainable tokens read the whole embedding table, which ZeRO-3 partitions (their set-up gathers it
    onto a CUDA device only, their forward reads it outside the table's own forward): refused by the config check,
    exit 2, before any process is launched."""
    cfg = world.cfg("new_tokens_z3", model={"new_special_tokens": NEW_TOKENS}, data={"chat_template": "chatml"},
                    distributed={"zero_stage": 3})
    out = world.root / f"new_tokens_zero3_{how}"
    extra = ["--nproc", "2", "--master-port", str(helpers.free_port())] if how == "launch" else []
    text = run_forked(world, [how, str(cfg), f"output_dir={out}", *extra], expect=2)
    assert "model.new_special_tokens: not with distributed.zero_stage=3" in text and "Traceback" not in text
    assert " launch --" not in text, "an accelerate command was started before the refusal"
    assert not out.exists()
