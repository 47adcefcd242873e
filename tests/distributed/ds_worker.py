"""Worker for tests/distributed/test_state_roundtrip.py (run under `accelerate launch` or plain python).

A tiny LoRA Llama is trained for a few steps on fixed synthetic batches; the global batch of step i
is the same tensor whatever the world size (rank r takes its slice), so a 1-process run and a
2-process run compute the same update. Roles:

* train:  train STEPS steps, gather the trainable state -> <out>/state.pt, take one more step,
          gather the parameters -> <out>/next.pt (rank 0 writes; every rank writes its own gathered
          copy to <out>/rank<r>.pt so the test can check they are identical).
* resume: build a fresh model/optimizer, load_trainable_state(<load>/state.pt), take the step
          STEPS+1 and write the gathered parameters -> <out>/next.pt.

Without DeepSpeed a second role can run in the same process (--then resume:LOAD:OUT) to save a
start-up; a DeepSpeed launch runs one role.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

import torch

STEPS = 3
GLOBAL_BATCH = 4
SEQ = 12
VOCAB = 128


def make_cfg(stage: int, world: int) -> types.SimpleNamespace:
    """Duck-typed stand-in for RunConfig (only .train and .distributed are read)."""
    train = types.SimpleNamespace(
        micro_batch_size=GLOBAL_BATCH // world,
        global_batch_size=GLOBAL_BATCH,
        max_grad_norm=1.0,
        mixed_precision="no",
    )
    dist = types.SimpleNamespace(zero_stage=stage, offload="none", backend=None, timeout_s=1800)
    return types.SimpleNamespace(train=train, distributed=dist)


def build_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).float()
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, lora)
    # LoRA B starts at zero, which would make the first steps trivially equal; randomise it.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    full = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g)
    per = GLOBAL_BATCH // world
    return full[rank * per : (rank + 1) * per]


def run_role(accelerator, stage: int, role: str, out_dir: Path, load: Path | None) -> None:
    """Build a fresh model + optimizer on `accelerator` and run one role (see module docstring)."""
    from scaletune.trainable_state import gather_trainable_state, load_trainable_state, saved_adapter_state

    world = accelerator.num_processes
    rank = accelerator.process_index
    cfg = make_cfg(stage, world)
    model = build_model()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01, betas=(0.9, 0.99)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    if stage == 3 and world > 1:
        lora = [p for n, p in accelerator.unwrap_model(model).named_parameters() if "lora_" in n]
        assert lora and all(p.numel() == 0 for p in lora), "ZeRO-3 did not partition the LoRA weights"

    def one_step(step: int) -> None:
        ids = batch(step, rank, world).to(accelerator.device)
        out = model(input_ids=ids, labels=ids)
        accelerator.backward(out.loss)
        if accelerator.distributed_type.value != "DEEPSPEED":  # DeepSpeed clips inside its step
            accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()

    out_dir.mkdir(parents=True, exist_ok=True)
    if role == "train":
        for step in range(STEPS):
            one_step(step)
        params, opt_state, scalars = gather_trainable_state(accelerator, model, optimizer)
        torch.save({"params": params, "opt": opt_state, "scalars": scalars}, out_dir / f"rank{rank}.pt")
        if rank == 0:
            torch.save({"params": params, "opt": opt_state, "scalars": scalars}, out_dir / "state.pt")
        # The adapter as the trainer saves it (collective under ZeRO-3: every rank calls it).
        adapter_sd = saved_adapter_state(accelerator, model)
        if rank == 0:
            accelerator.unwrap_model(model).save_pretrained(out_dir / "adapter", state_dict=adapter_sd)
    else:
        saved = torch.load(load / "state.pt")
        load_trainable_state(accelerator, model, optimizer, saved["params"], saved["opt"], saved["scalars"])
        # The reload must be exact before any step is taken.
        params, opt_state, scalars = gather_trainable_state(accelerator, model, optimizer)
        for k, v in saved["params"].items():
            torch.testing.assert_close(params[k], v, rtol=0, atol=0)
        for k, v in saved["opt"].items():
            torch.testing.assert_close(opt_state[k], v, rtol=0, atol=0)
        assert scalars == saved["scalars"], (scalars, saved["scalars"])

    one_step(STEPS)
    params, _, scalars = gather_trainable_state(accelerator, model, optimizer)
    if rank == 0:
        torch.save({"params": params, "scalars": scalars}, out_dir / "next.pt")
    accelerator.wait_for_everyone()
    print(f"[rank {rank}] ok role={role} stage={stage} world={world} {scalars}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=["train", "resume"], required=True)
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--load", default=None)
    # Second role in the same (non-DeepSpeed) process, to save a start-up: "resume:LOAD:OUT".
    ap.add_argument("--then", default=None)
    args = ap.parse_args()

    from accelerate import Accelerator

    from scaletune.distributed import accelerator_kwargs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    kwargs = accelerator_kwargs(make_cfg(args.stage, world), grad_accum_steps=1)
    plugin = kwargs.get("deepspeed_plugin")
    if plugin is not None and plugin.deepspeed_config["zero_optimization"]["stage"] == 3:
        # The LoRA matrices are tiny; with the default ("auto" = 10 x hidden) persistence threshold
        # ZeRO-3 would keep them whole on every rank. Force real partitioning.
        plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    accelerator = Accelerator(**kwargs)
    assert accelerator.num_processes == world, (accelerator.num_processes, world)
    run_role(accelerator, args.stage, args.role, Path(args.out), Path(args.load) if args.load else None)
    if args.then:
        assert args.stage == 0, "a DeepSpeed process builds one engine; chain roles only without DeepSpeed"
        role, load, out = args.then.split(":", 2)
        run_role(accelerator, args.stage, role, Path(out), Path(load))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
