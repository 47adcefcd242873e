#!/usr/bin/env python
"""LoRA MFU on one GPU: a Llama-architecture model built from config (1b / 8b sizes of bench.py), bf16,
packing, sequence length 2048, trained with `scaletune train`; prints tokens/s and the MFU scaletune logs.

    python benchmarks/gpu_mfu.py --size 1b --data alpaca.json --steps 20 --micro 4 --workdir /tmp/mfu

The weights are random (nothing to download); throughput does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SIZES  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["1b", "8b"], default="1b")
    ap.add_argument("--data", required=True, help="Alpaca-format JSON list")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--micro", type=int, default=4, help="packed rows per micro-batch")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "varlen"])
    ap.add_argument("--workdir", default="/tmp/scaletune-mfu")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=YAML",
                    help="override a run-config value, e.g. --set train.torch_compile=true (repeatable)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="instead of timing, profile this many steps (after 3 warm-up steps) with torch.profiler "
                         "and print where the GPU time goes")
    ap.add_argument("--reuse-model", action="store_true",
                    help="keep the model already built in --workdir for this size (saves rebuilding an 8B)")
    ap.add_argument("--hf-batch", default="",
                    help="also run (b) HF Trainer + peft with dynamic padding, this many examples per step "
                         "(comma-separated: a sweep; a size that runs out of memory is reported as such)")
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from scaletune.config import apply_overrides
    from scaletune.demo.tiny import train_tokenizer

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    size = SIZES[args.size]
    records = json.loads(Path(args.data).read_text())
    tok = train_tokenizer([f"{r['instruction']} {r.get('input', '')} {r['output']}" for r in records], "bpe", 8000)
    config = LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                         num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                         num_key_value_heads=size["kv_heads"], max_position_embeddings=args.seq,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    model_dir = work / f"llama-{args.size}"
    if not (args.reuse_model and (model_dir / "config.json").exists()
            and all(getattr(LlamaConfig.from_pretrained(model_dir), k) == getattr(config, k)
                    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(str(model_dir), safe_serialization=True)
        tok.save_pretrained(str(model_dir))
        del model
        torch.cuda.empty_cache()
    # Alpaca responses are short: use the whole record as text so packed rows are full of targets.
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}"}) + "\n"
                            for r in records))
    run = {"task": "causal_lm",
           "model": {"name_or_path": str(model_dir), "dtype": "bfloat16", "attn_implementation": args.attn},
           "peft": {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
           "data": {"train": str(data), "format": "text", "max_length": args.seq, "packing": True, "cache": False},
           "train": {"global_batch_size": args.micro * args.accum, "micro_batch_size": args.micro,
                     "max_steps": args.steps, "epochs": 100, "learning_rate": 1e-4, "mixed_precision": "bf16",
                     "log_every": 5, "eval_every": None, "save_every": None, "report_to": []},
           "output_dir": str(work / "run")}
    apply_overrides(run, args.set)  # scaletune's own --set parser
    cfg_path = work / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(run, sort_keys=False))
    env = {**os.environ, "SCALETUNE_NO_PROGRESS": "1"}
    if args.profile:
        run["train"]["max_steps"] = 3 + args.profile
        cfg_path.write_text(yaml.safe_dump(run, sort_keys=False))
        os.environ.update(env)
        return profile_run(cfg_path, args.profile)
    subprocess.run([sys.executable, "-m", "scaletune", "train", str(cfg_path), "--overwrite"], env=env, check=True)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    # Skip the warm-up (compilation) steps: rows after step 3 whose logging interval began after it.
    every = run["train"]["log_every"]
    train = [r for r in rows if r.get("event") == "train" and r["step"] > max(3, every)]
    if not train:
        raise SystemExit(f"--steps {args.steps}: no logged step after the warm-up; use more than {max(3, every)}")
    keys = ("tokens_per_s", "target_tokens_per_s", "mfu", "peak_mem_mb")
    summary = {k: statistics.median(r[k] for r in train if k in r) for k in keys if any(k in r for r in train)}
    summary["cuda_alloc_retries"] = train[-1].get("cuda_alloc_retries") if train else None
    summary["final_loss"] = train[-1].get("loss") if train else None
    print(json.dumps({"size": args.size, "seq": args.seq, "micro": args.micro, "accum": args.accum,
                      "gpu": torch.cuda.get_device_name(), "steps_measured": len(train), **summary}, indent=1))
    for hf_batch in [int(b) for b in args.hf_batch.split(",") if b]:
        try:
            hf = hf_trainer(args, hf_batch, model_dir, data)
        except torch.OutOfMemoryError:
            hf = None
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        ratio = summary["target_tokens_per_s"] / hf if hf else None
        print(json.dumps({"hf_batch": hf_batch, "hf_trainer_target_tokens_per_s": hf or "out of memory",
                          "scaletune_target_tokens_per_s": summary.get("target_tokens_per_s"),
                          "scaletune_over_hf": ratio}))
    return 0


def profile_run(cfg_path: Path, steps: int) -> int:
    """Train in this process with torch.profiler active for `steps` steps after 3 warm-up steps; print the
    GPU time by kernel family and the top kernels. Benchmark-only: wraps a scaletune method."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from scaletune.cli import main as cli_main
    from scaletune.nonfinite import NonfiniteGuard

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=0, warmup=3, active=steps, repeat=1))
    marks: list[float] = []
    orig_settle = NonfiniteGuard.settle

    def settle_and_mark(self, boundary: bool):  # noqa: ANN001, ANN202
        out = orig_settle(self, boundary)  # called once per step, after its optimizer step is queued
        if len(marks) in (2, 2 + steps):  # the profiled window's ends: wait for the GPU there only
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        prof.step()
        return out

    NonfiniteGuard.settle = settle_and_mark
    from scaletune.tasks import chunked_ce

    head_ce = chunked_ce.head_cross_entropy

    def labelled_head_ce(*args):  # noqa: ANN002, ANN202 - the LM head + loss as one range in the profile
        with torch.profiler.record_function("scaletune.chunked_loss"):
            return head_ce(*args)

    chunked_ce.head_cross_entropy = labelled_head_ce  # looked up at call time by tasks/causal_lm.py
    with prof:
        cli_main(["train", str(cfg_path), "--overwrite"])
    wall = marks[-1] - marks[2]
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0
               and not e.key.startswith("ProfilerStep")]  # the step marker spans its kernels: not one
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    families: dict[str, float] = {}
    for e in kernels:
        name = e.key.lower()
        fam = next((f for f in ("flash", "fmha", "attention", "gemm", "gemv", "cutlass", "nvjet", "elementwise",
                                "reduce", "softmax", "copy", "cat", "index", "foreach", "norm") if f in name), "other")
        families[fam] = families.get(fam, 0.0) + e.self_device_time_total / 1e6
    print(f"profiled {steps} steps: wall {wall:.3f} s, GPU kernels busy {busy:.3f} s ({100 * busy / wall:.0f}%)")
    for fam, sec in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:12s} {sec:8.3f} s  {100 * sec / wall:5.1f}% of wall")
    for e in prof.key_averages():  # forward only: its backward is a saved-gradient multiply
        if e.key == "scaletune.chunked_loss":
            sec = e.device_time_total / 1e6
            print(f"  chunked loss (LM head GEMMs + elementwise, all chunks) {sec:8.3f} s  {100 * sec / wall:5.1f}% of wall")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90))
    return 0


def hf_trainer(args, batch: int, model_dir: Path, data: Path) -> float:
    """(b): transformers.Trainer + peft, dynamic padding, same model, texts, LoRA and precision; target
    (non-pad, shifted) tokens per second over the steps after the first three."""
    import time

    import datasets
    import peft
    import torch
    from bench import CountingCollator
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"input_ids": tok(t + tok.eos_token, truncation=True, max_length=args.seq)["input_ids"]}
                                     for t in texts])
    attn = "sdpa" if args.attn == "varlen" else args.attn  # varlen is scaletune's
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=attn)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules="all-linear"))
    collator = CountingCollator(DataCollatorForLanguageModeling(tok, mlm=False))
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):  # noqa: ANN001
            torch.cuda.synchronize()
            marks.append((time.perf_counter(), collator.targets))

    targs = TrainingArguments(output_dir=str(data.parent / "hf"), per_device_train_batch_size=batch,
                              max_steps=args.steps, learning_rate=1e-4, bf16=True, logging_steps=1,
                              save_strategy="no", report_to=[], dataloader_num_workers=0, disable_tqdm=True)
    Trainer(model=model, args=targs, train_dataset=ds, data_collator=collator, callbacks=[Clock()]).train()
    (t0, n0), (t1, n1) = marks[2], marks[-1]
    return (n1 - n0) / (t1 - t0)


if __name__ == "__main__":
    sys.exit(main())
