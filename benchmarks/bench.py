#!/usr/bin/env python
"""Same model, same data, same optimisation: scaletune vs HF Trainer + peft vs TRL SFTTrainer + peft.

    python benchmarks/bench.py --size 30m --data path/to/alpaca.json --repeats 2
    python benchmarks/bench.py --smoke          # tiny model, generated data, < 1 min

What is held equal (see benchmarks/README.md for the reasoning):
  * one randomly initialised Llama-architecture model (built once from a LlamaConfig, saved, loaded by every
    tool), one byte-level BPE tokenizer trained on the data (`scaletune.demo.tiny.train_tokenizer`);
  * the same examples: a seeded subset of exactly `steps * global_batch` records, trained for one epoch, so
    every tool sees every example exactly once and processes the same target (response) tokens;
  * the same text: Alpaca prompt "### Instruction:\\n...\\n\\n### Response:\\n" + output + EOS, BOS first,
    loss on response tokens only, truncation to `max_length`;
  * LoRA r=16, alpha=32, all-linear, dropout 0; float32, no mixed precision; AdamW lr, cosine schedule with
    1 warmup step, weight decay 0, grad clip 1.0; same seed.
  * non-packed tools: `global_batch` examples per optimizer step in micro batches of `micro`
    (gradient accumulation global/micro). Packed tools: the same examples packed into rows of `max_length`
    (best-fit decreasing), `rows_per_step = round(rows / steps)` rows per step, so they take about the same
    number of optimizer steps over the same tokens.

Measured per tool, each run in its own subprocess (so peak RSS is per tool), tools interleaved per repeat:
  wall time of the training loop only (model load + tokenisation reported separately as setup),
  target tokens = label positions that enter the loss (counted on the batches actually fed to the model),
  target tok/s = target tokens / loop time, peak RSS (ru_maxrss), final loss = mean of the last 5 step losses
  (all three tools log the token-mean loss over the whole optimizer step).

Baselines (transformers.Trainer, trl) are imported only inside this script, never by scaletune.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

IGNORE = -100
DEFAULT_DATA = "../shared/data/alpaca_demo/alpaca_en_demo.json"

# Llama-architecture sizes (untied LM head, as Llama models). vocab = model vocabulary (the BPE tokenizer is
# trained to at most this size; the embedding / LM head always have `vocab` rows, like padded vocabularies).
SIZES = {
    "tiny": dict(hidden=32, layers=2, heads=4, kv_heads=4, intermediate=64, vocab=512),
    "30m": dict(hidden=384, layers=8, heads=6, kv_heads=6, intermediate=1024, vocab=16000),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=32000),
    "8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=32000),
}
TOOLS = ("scaletune", "scaletune_packed", "scaletune_lowmem", "hf_trainer", "trl_packed")
LABELS = {"scaletune": "scaletune (dyn. pad + length groups)", "scaletune_packed": "scaletune (packing)",
          "scaletune_lowmem": "scaletune (dyn. pad, release_cpu_memory)",
          "hf_trainer": "(b) HF Trainer + peft (dyn. pad)", "trl_packed": "(c) TRL SFTTrainer + peft (packing)"}


# ------------------------------------------------------------------------------------------------
# Shared prompt format (identical to scaletune's built-in Alpaca rendering for tokenizers without a
# chat template: src/scaletune/data/formats.py::_render_default)

def prompt_text(rec: dict) -> str:
    extra = rec.get("input") or ""
    user = f"{rec['instruction']}\n\n{extra}" if extra.strip() else rec["instruction"]
    system = rec.get("system") or ""
    return (f"{system}\n\n" if system else "") + f"### Instruction:\n{user}\n\n### Response:\n"


def encode(rec: dict, tok, max_length: int) -> dict:
    """BOS + prompt (masked) + output + EOS (trained), truncated to max_length."""
    p = tok(prompt_text(rec), add_special_tokens=False)["input_ids"]
    c = tok(rec["output"] + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = [tok.bos_token_id] + p + c
    labels = [IGNORE] * (1 + len(p)) + c
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def count_targets(labels) -> int:
    """Label positions that enter a causal-LM loss (labels are shifted: position 0 is never a target)."""
    return int((labels[..., 1:] != IGNORE).sum())


class CountingCollator:
    """Wraps a collator and counts the target tokens of every batch it produces."""

    def __init__(self, inner):
        self.inner, self.targets, self.batches = inner, 0, 0

    def __call__(self, features):
        batch = self.inner(features)
        self.targets += count_targets(batch["labels"])
        self.batches += 1
        return batch


def smoke_records(n: int = 32, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ("alpha beta gamma delta model train data token loss step batch adapter layer weight small large "
             "quick brown fox jumps over lazy dog").split()
    out = []
    for i in range(n):
        out.append({"instruction": f"Task {i}: " + " ".join(rng.choices(words, k=rng.randint(4, 12))),
                    "input": " ".join(rng.choices(words, k=rng.randint(0, 6))),
                    "output": " ".join(rng.choices(words, k=rng.randint(3, 30)))})
    return out


# ------------------------------------------------------------------------------------------------
# Workers: one tool, one process

def _cpu() -> float:
    """CPU seconds (user + system, all threads) of this process: far less sensitive than wall time to other
    jobs on a shared machine."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _peak_rss_mb() -> float:
    """This process's peak resident set so far, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def _finish(spec: dict, res: dict) -> None:
    res["peak_mb"] = _peak_rss_mb()
    Path(spec["result"]).write_text(json.dumps(res))


def _train_call(spec: dict, res: dict, fn) -> None:
    """Run the training call; with --tensor-peak, inside the torch profiler, recording in res the most tensor
    memory alive at once above what was alive at the start (the CPU analogue of CUDA max_memory_allocated;
    unlike RSS it does not include allocator fragmentation). The profiler slows the run: timings from such
    a run are not comparable."""
    res["setup_peak_mb"] = _peak_rss_mb()
    if not spec.get("tensor_peak"):
        fn()
        return
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    res["tensor_peak_mb"] = peak / 2**20


def _lora_kwargs() -> dict:
    return dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)


def worker_scaletune(spec: dict, packed: bool, lowmem: bool = False) -> None:
    t0 = time.perf_counter()
    import scaletune.loop as loop
    from scaletune.config import apply_overrides, from_dict
    from scaletune.train import StopFlag, setup

    out = Path(spec["workdir"]) / f"out_{spec['tool']}_{os.getpid()}"
    gb = spec["rows_per_step"] if packed else spec["global_batch"]
    micro = gb if packed else spec["micro"]
    raw = {"task": "causal_lm", "model": {"name_or_path": spec["model_dir"], "dtype": "float32"},
           "data": {"train": spec["data"], "format": "alpaca", "max_length": spec["max_length"], "packing": packed,
                    "group_by_length": True, "cache": False},
           "peft": {"method": "lora", **_lora_kwargs()},
           "train": {"global_batch_size": gb, "micro_batch_size": micro, "epochs": 1,
                     "max_steps": None if packed else spec["steps"], "learning_rate": spec["lr"],
                     "lr_scheduler": "cosine", "warmup_steps": 1, "weight_decay": 0.0, "max_grad_norm": 1.0,
                     "mixed_precision": "no", "seed": spec["seed"], "eval_every": None, "save_every": None,
                     "log_every": 1, "report_to": [], "release_cpu_memory": lowmem},
           "output_dir": str(out)}
    apply_overrides(raw, spec.get("set", []))  # --set: an ablation of scaletune's own settings
    cfg = from_dict(raw)
    run, _ = setup(cfg, overwrite=True)
    stamps = {}
    def stop_clock(run, mlog):  # replaces the final checkpoint + adapter save
        stamps.setdefault("end", time.perf_counter())
        stamps.setdefault("cpu", _cpu())

    loop.final_outputs = stop_clock
    t1, c1 = time.perf_counter(), _cpu()
    extra: dict = {}
    _train_call(spec, extra, lambda: loop.fit(run, StopFlag()))
    t2, c2 = stamps.get("end", time.perf_counter()), stamps.get("cpu", _cpu())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["event"] == "train"]
    _finish(spec, {"setup_s": t1 - t0, "train_s": t2 - t1, "cpu_s": c2 - c1, "target_tokens": run.counters["tokens_seen"],
                   "steps": run.step, "losses": losses, **extra})


def _hf_common_args(spec: dict, out: str) -> dict:
    return dict(output_dir=out, learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=1,
                weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", eval_strategy="no",
                report_to=[], seed=spec["seed"], data_seed=spec["seed"], bf16=False, fp16=False, use_cpu=True,
                dataloader_num_workers=0, disable_tqdm=True, num_train_epochs=1)


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _clock_callback(stamps: dict):
    """Start the baselines' clock at their first optimizer step, as scaletune's starts at `fit`:
    Trainer.train() also builds its optimizer, dataloader and accelerate wrappers, which is setup."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            stamps.setdefault("start", (time.perf_counter(), _cpu()))

    return Clock()


def worker_hf(spec: dict) -> None:
    t0 = time.perf_counter()
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    records = json.loads(Path(spec["data"]).read_text())
    ds = datasets.Dataset.from_list([encode(r, tok, spec["max_length"]) for r in records])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **_lora_kwargs()))
    collator = CountingCollator(DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=IGNORE))
    args = TrainingArguments(per_device_train_batch_size=spec["micro"],
                             gradient_accumulation_steps=spec["global_batch"] // spec["micro"],
                             max_steps=spec["steps"],  # no length grouping (transformers 5 removed it)
                             **_hf_common_args(spec, str(Path(spec["workdir"]) / f"out_hf_{os.getpid()}")))
    stamps: dict = {}
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                      callbacks=[_clock_callback(stamps)])
    extra: dict = {}
    _train_call(spec, extra, trainer.train)
    t2, c2 = time.perf_counter(), _cpu()
    t1, c1 = stamps["start"]
    _finish(spec, {"setup_s": t1 - t0, "train_s": t2 - t1, "cpu_s": c2 - c1, "target_tokens": collator.targets,
                   "steps": trainer.state.global_step, "losses": _losses(trainer), **extra})


def worker_trl(spec: dict) -> None:
    t0 = time.perf_counter()
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    records = json.loads(Path(spec["data"]).read_text())
    # prompt/completion format -> TRL's completion-only loss. BOS spelled out (TRL tokenises without special
    # tokens); TRL appends EOS to the completion itself.
    ds = datasets.Dataset.from_list([{"prompt": tok.bos_token + prompt_text(r), "completion": r["output"]}
                                     for r in records])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    args = SFTConfig(per_device_train_batch_size=spec["rows_per_step"], gradient_accumulation_steps=1,
                     max_steps=-1, max_length=spec["max_length"], packing=True,  # default strategy: bfd (+padding-free)
                     completion_only_loss=True,
                     **_hf_common_args(spec, str(Path(spec["workdir"]) / f"out_trl_{os.getpid()}")))
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=peft.LoraConfig(task_type="CAUSAL_LM", **_lora_kwargs()))
    trainer.data_collator = collator = CountingCollator(trainer.data_collator)  # padding-free forbids passing one
    stamps: dict = {}
    trainer.add_callback(_clock_callback(stamps))
    extra: dict = {}
    _train_call(spec, extra, trainer.train)
    t2, c2 = time.perf_counter(), _cpu()
    t1, c1 = stamps["start"]
    _finish(spec, {"setup_s": t1 - t0, "train_s": t2 - t1, "cpu_s": c2 - c1, "target_tokens": collator.targets,
                   "steps": trainer.state.global_step, "losses": _losses(trainer), **extra,
                   "padding_free": bool(getattr(trainer, "padding_free", False))})


def worker_spec(spec_path: str) -> dict:
    """A worker process's run spec, with warnings and library logs off and torch on the spec's thread count."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return spec


def run_worker(spec_path: str) -> None:
    spec = worker_spec(spec_path)
    tool = spec["tool"]
    if tool == "scaletune":
        worker_scaletune(spec, packed=False)
    elif tool == "scaletune_packed":
        worker_scaletune(spec, packed=True)
    elif tool == "scaletune_lowmem":
        worker_scaletune(spec, packed=False, lowmem=True)
    elif tool == "hf_trainer":
        worker_hf(spec)
    elif tool == "trl_packed":
        worker_trl(spec)
    else:
        raise SystemExit(f"unknown tool {tool}")


# ------------------------------------------------------------------------------------------------
# Driver

def prepare(args, workdir: Path) -> dict:
    """Tokenizer, model and the exact training subset, written once and shared by every tool."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from scaletune.data.packing import pack_rows
    from scaletune.demo.tiny import train_tokenizer

    if args.smoke:
        records = smoke_records(32, args.seed)
    else:
        path = Path(args.data)
        if not path.is_file():
            raise SystemExit(f"--data {path}: not found (an Alpaca-format JSON list of instruction/input/output)")
        records = json.loads(path.read_text())
    size = dict(SIZES[args.size])
    if args.vocab:
        size["vocab"] = args.vocab
    texts = [prompt_text(r) + r["output"] for r in records]
    tok = train_tokenizer(texts, "bpe", size["vocab"])
    # keep only records with a response token inside max_length, then a seeded subset of steps * global_batch
    usable = [r for r in records if sum(x != IGNORE for x in encode(r, tok, args.max_length)["labels"][1:]) > 0]
    n = args.steps * args.global_batch
    if len(usable) < n:
        raise SystemExit(f"need {n} usable records for {args.steps} steps x {args.global_batch}, have {len(usable)}")
    subset = random.Random(args.seed).sample(usable, n)
    data_path = workdir / "train.json"
    data_path.write_text(json.dumps(subset))
    enc = [encode(r, tok, args.max_length) for r in subset]
    lengths = [len(e["input_ids"]) for e in enc]
    targets = sum(sum(x != IGNORE for x in e["labels"][1:]) for e in enc)
    rows = len(pack_rows(lengths, args.max_length))
    rows_per_step = max(1, round(rows / args.steps))

    config = LlamaConfig(vocab_size=max(size["vocab"], len(tok)), hidden_size=size["hidden"],
                         intermediate_size=size["intermediate"], num_hidden_layers=size["layers"],
                         num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
                         max_position_embeddings=max(args.max_length, 512), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model_dir = workdir / "model"
    model.save_pretrained(str(model_dir), safe_serialization=True)
    tok.save_pretrained(str(model_dir))
    n_params = sum(p.numel() for p in model.parameters())
    del model
    return {"model_dir": str(model_dir), "data": str(data_path), "workdir": str(workdir), "steps": args.steps,
            "global_batch": args.global_batch, "micro": args.micro, "max_length": args.max_length, "lr": args.lr,
            "seed": args.seed, "rows_per_step": rows_per_step, "threads": args.threads,
            "tensor_peak": args.tensor_peak, "set": args.set,
            "info": {"size": args.size, "params": n_params, "vocab": config.vocab_size, "tokenizer_vocab": len(tok),
                     "examples": n, "tokens": sum(lengths), "target_tokens": targets, "mean_len": sum(lengths) / n,
                     "packed_rows": rows, "records_in_file": len(records), **size}}


def start_worker(script: str, run: Callable[[str], None], spec_path: Path, env: dict, in_process: bool, what: str) -> None:
    """One tool's run: `script --worker SPEC` in a process of its own (so peak RSS is the tool's), or `run`
    here with `in_process` (--smoke: checks that every tool runs, not what it measures)."""
    if in_process:
        os.environ.update(env)
        run(str(spec_path))
        return
    proc = subprocess.run([sys.executable, script, "--worker", str(spec_path)], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{what} failed with exit code {proc.returncode}")


def run_tool(tool: str, spec: dict, workdir: Path, rep: int, env: dict, in_process: bool = False) -> dict:
    spec = {**spec, "tool": tool, "result": str(workdir / f"result_{tool}_{rep}.json")}
    spec_path = workdir / f"spec_{tool}_{rep}.json"
    spec_path.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    start_worker(__file__, run_worker, spec_path, env, in_process, f"{tool} (repeat {rep})")
    wall = time.perf_counter() - t0
    res = json.loads(Path(spec["result"]).read_text())
    res["process_s"] = wall
    res["final_loss"] = statistics.mean(res["losses"][-5:]) if res["losses"] else float("nan")
    res["target_tok_s"] = res["target_tokens"] / res["train_s"]
    res["target_tok_cpu_s"] = res["target_tokens"] / res["cpu_s"] if res.get("cpu_s") else float("nan")
    return res


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for tool, runs in results.items():
        med = lambda key, runs=runs: statistics.median(r[key] for r in runs)  # noqa: E731
        timed = [r for r in runs if r.get("cpu_s")]
        cpu = statistics.median(r["cpu_s"] for r in timed) if timed else float("nan")
        out[tool] = {"train_s": med("train_s"), "setup_s": med("setup_s"), "target_tok_s": med("target_tok_s"),
                     "cpu_s": cpu, "target_tok_cpu_s": runs[0]["target_tokens"] / cpu,
                     "peak_mb": med("peak_mb"), "final_loss": med("final_loss"), "steps": runs[0]["steps"],
                     "target_tokens": runs[0]["target_tokens"], "runs": len(runs),
                     "train_s_all": [round(r["train_s"], 2) for r in runs]}
    return out


def table(summary: dict[str, dict]) -> str:
    lines = ["| tool | wall s (loop) | setup s | steps | target tokens | target tok/s | peak MB | final loss "
             "| loop CPU s | target tok/CPU-s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for tool, s in summary.items():
        lines.append(f"| {LABELS[tool]} | {s['train_s']:.2f} | {s['setup_s']:.2f} | {s['steps']} | "
                     f"{s['target_tokens']} | {s['target_tok_s']:.1f} | {s['peak_mb']:.0f} | {s['final_loss']:.4f} | "
                     f"{s['cpu_s']:.3f} | {s['target_tok_cpu_s']:.1f} |")  # smoke loops take a few ms of CPU
    return "\n".join(lines)


def ratios(summary: dict[str, dict]) -> list[str]:
    out = []
    for st in ("scaletune", "scaletune_packed", "scaletune_lowmem"):
        if st not in summary:
            continue
        for base in ("hf_trainer", "trl_packed"):
            if base not in summary:
                continue
            a, b = summary[st], summary[base]
            out.append(f"{LABELS[st]} / {LABELS[base]}: tok/s x{a['target_tok_s'] / b['target_tok_s']:.2f}, "
                       f"tok/CPU-s x{a['target_tok_cpu_s'] / b['target_tok_cpu_s']:.2f}, "
                       f"wall x{b['train_s'] / a['train_s']:.2f} faster, peak mem x{a['peak_mb'] / b['peak_mb']:.2f}, "
                       f"final loss {100 * (a['final_loss'] / b['final_loss'] - 1):+.1f}%")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--size", choices=sorted(SIZES), default="30m")
    ap.add_argument("--data", default=DEFAULT_DATA, help="Alpaca-format JSON list (instruction/input/output)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=4, help="micro batch of the non-packed tools (accumulation = global/micro)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--vocab", type=int, default=None, help="override the size's vocabulary")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma list from {','.join(TOOLS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    ap.add_argument("--workdir", default=None, help="keep model/data/results here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the summary as JSON here")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=YAML",
                    help="override a scaletune run-config value for the scaletune tools, e.g. --set "
                         "train.fused_lora=false (repeatable; the baselines are unaffected)")
    ap.add_argument("--tensor-peak", action="store_true",
                    help="also record each tool's peak of live tensor bytes (torch profiler; slows the loop, so "
                         "timings of such a run are not comparable)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 32 generated records, 2 steps, 1 repeat, tools scaletune/hf_trainer/trl_packed, "
                         "all in this process (unless --subprocess)")
    ap.add_argument("--subprocess", action="store_true",
                    help="with --smoke: run each tool in its own process, as a real measurement does")
    args = ap.parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return 0
    args.in_process = args.smoke and not args.subprocess
    if args.smoke:
        args.size, args.steps, args.global_batch, args.micro, args.max_length, args.vocab = "tiny", 2, 8, 4, 128, 512
        given = argv if argv is not None else sys.argv
        if "--repeats" not in given:
            args.repeats = 1
        if "--tools" not in given:
            args.tools = "scaletune,hf_trainer,trl_packed"
    if args.global_batch % args.micro:
        raise SystemExit("--global-batch must be a multiple of --micro")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        raise SystemExit(f"unknown tools {bad}; choose from {TOOLS}")
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="scaletune-bench-")
        workdir = Path(tmp.name)
    env = {**os.environ, "SCALETUNE_NO_PROGRESS": "1", "SCALETUNE_CACHE": str(workdir / "cache"),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "DISABLE_MLFLOW_INTEGRATION": "TRUE", "WANDB_DISABLED": "true", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    spec = prepare(args, workdir)
    info = spec["info"]
    print(f"model: llama {args.size} ({info['params'] / 1e6:.1f}M params, vocab {info['vocab']}, tokenizer "
          f"{info['tokenizer_vocab']}), {info['examples']} examples, {info['tokens']} tokens "
          f"({info['target_tokens']} target), mean length {info['mean_len']:.0f}, {info['packed_rows']} packed rows "
          f"-> {spec['rows_per_step']} rows/step for packed tools; prepared in {time.perf_counter() - t0:.1f}s",
          flush=True)
    results: dict[str, list[dict]] = {t: [] for t in tools}
    for rep in range(args.repeats):
        order = tools if rep % 2 == 0 else tools[::-1]  # interleave, alternating order
        for tool in order:
            res = run_tool(tool, spec, workdir, rep, env, in_process=args.in_process)
            results[tool].append(res)
            print(f"  repeat {rep + 1} {tool}: loop {res['train_s']:.2f}s (CPU {res.get('cpu_s', float('nan')):.1f}s), "
                  f"setup {res['setup_s']:.2f}s, "
                  f"{res['steps']} steps, {res['target_tokens']} target tokens, {res['target_tok_s']:.1f} tok/s, "
                  f"peak {res['peak_mb']:.0f} MB, final loss {res['final_loss']:.4f}"
                  + (f", tensor peak {res['tensor_peak_mb']:.0f} MB" if "tensor_peak_mb" in res else "")
                  + f" (RSS peak before training: {res.get('setup_peak_mb', float('nan')):.0f} MB)", flush=True)
    summary = summarise(results)
    print()
    print(f"median of {args.repeats} repeat(s):")
    print(table(summary))
    for line in ratios(summary):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "spec": {k: v for k, v in spec.items() if k != "info"},
                                               "summary": summary, "runs": results}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
