#!/usr/bin/env python
"""Same model, same preference pairs, same optimisation: scaletune `task: dpo` vs TRL DPOTrainer + peft LoRA.

    python benchmarks/dpo_bench.py --data ../shared/data/alpaca_demo/dpo_en_demo.json
    python benchmarks/dpo_bench.py --smoke          # tiny model, generated pairs, seconds
    python benchmarks/dpo_bench.py --task reward    # scaletune `task: reward` vs TRL RewardTrainer + peft

What is held equal (see benchmarks/README.md):
  * one randomly initialised Llama-architecture model (built once from a LlamaConfig, saved, loaded by both),
    one byte-level BPE tokenizer trained on the data (`scaletune.demo.tiny.train_tokenizer`);
  * the same text: each LLaMA-Factory pair (conversations, chosen, rejected) is rendered once into TRL's plain
    {prompt, chosen, rejected} strings, which both tools read: BOS + prompt (context) + answer + EOS (target);
  * the same pairs in the same steps: a seeded subset of exactly `steps * global_batch` pairs, one epoch; the
    file TRL reads is put in the order scaletune's sampler draws (`epoch_order`, no length grouping) and TRL
    reads it sequentially, so step k of both tools holds the same pairs (the split into micro batches differs:
    scaletune sorts a step's pairs by length; the step's loss and update do not depend on it);
  * truncation: pairs whose prompt is longer than `max_prompt_length` are left out (TRL 1.16 has no
    max_prompt_length), so neither tool cuts a prompt; prompt + answer are cut at `max_length` keeping the
    start (TRL's truncation_mode="keep_start", scaletune's only mode);
  * DPO sigmoid loss, beta 0.1, reference = the base with the adapter disabled (TRL: peft model, ref_model
    None); LoRA r=16, alpha=32, all-linear, dropout 0; float32; AdamW lr, cosine schedule with 1 warmup step,
    weight decay 0, grad clip 1.0; same seed; global batch in micro batches of `micro`.

Measured per tool, each in its own subprocess (peak RSS is per tool): the training loop's wall time (from the
first step), pairs/s, answer tokens/s (target positions of chosen + rejected, counted on the batches each tool
fed its model), peak RSS, first loss (log 2 = 0.6931 for both: the adapter starts at zero, so policy =
reference) and final loss = mean of the last 5 step losses (both log the mean over the step's pairs).

--task reward: scaletune `task: reward` vs TRL RewardTrainer + peft (task_type SEQ_CLS, modules_to_save score),
the same way, with these differences: the model is saved once as a LlamaForSequenceClassification (num_labels 1)
with its randomly initialised score head, which both load, so both start from the same head and the same first
loss (not log 2); each row is BOS + prompt + answer + EOS in both (TRL 1.16 appends the EOS text to plain-text
answers and tokenises prompt + answer as one text; scaletune's rows are task dpo's), the reward is read at the
last non-pad token (pad <pad> != eos, so at the EOS); TRL drops pairs longer than max_length instead of cutting
them, so pairs whose chosen or rejected row exceeds max_length are left out for both; "tokens" counts every
non-pad position of the rows fed (chosen + rejected).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import _clock_callback, _cpu, _hf_common_args, _losses, _peak_rss_mb, start_worker, worker_spec  # noqa: E402

IGNORE = -100
DEFAULT_DATA = "../shared/data/alpaca_demo/dpo_en_demo.json"
TOOLS = ("scaletune", "trl")
LABELS = {"dpo": {"scaletune": "scaletune task: dpo", "trl": "TRL DPOTrainer + peft"},
          "reward": {"scaletune": "scaletune task: reward", "trl": "TRL RewardTrainer + peft"}}
# Llama-architecture sizes (untied LM head). "small" is the default: a real run takes a few minutes on 2 cores.
SIZES = {
    "tiny": dict(hidden=32, layers=2, heads=4, kv_heads=4, intermediate=64, vocab=512),
    "small": dict(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=688, vocab=8000),
    "30m": dict(hidden=384, layers=8, heads=6, kv_heads=6, intermediate=1024, vocab=16000),
}
ROLES = {"human": "User", "gpt": "Assistant", "system": "System"}


# ------------------------------------------------------------------------------------------------
# Data: LLaMA-Factory pairs rendered once into plain-text TRL pairs, read by both tools

def render_pair(rec: dict) -> dict:
    """{prompt, chosen, rejected} strings of a LLaMA-Factory pair. The prompt ends in a newline and the answers
    are stripped, so the prompt/answer boundary is a token boundary: TRL tokenises prompt + answer as one text,
    scaletune prompt and answer apart, and both then get the same tokens."""
    turns = "".join(f"{ROLES[t['from']]}: {t['value'].strip()}\n\n" for t in rec["conversations"])
    return {"prompt": turns + "Assistant:\n", "chosen": rec["chosen"]["value"].strip(),
            "rejected": rec["rejected"]["value"].strip()}


def smoke_pairs(n: int = 24, seed: int = 0) -> list[dict]:
    """Generated pairs in LLaMA-Factory's layout (what --data holds), for --smoke."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta model train data token loss step batch adapter layer weight fox dog".split()
    say = lambda k: " ".join(rng.choices(words, k=rng.randint(1, k)))  # noqa: E731
    return [{"conversations": [{"from": "human", "value": f"Question {i}: {say(12)}"}],
             "chosen": {"from": "gpt", "value": say(20)}, "rejected": {"from": "gpt", "value": "no " + say(20)}}
            for i in range(n)]


def fits(pair: dict, tok, max_prompt_length: int, max_length: int | None = None) -> bool:
    """Whether a pair's prompt (BOS included) fits max_prompt_length: longer ones would be cut by scaletune
    (data.max_prompt_length) but not by TRL 1.16, which has no such setting. With max_length (--task reward),
    also whether both rows (BOS + prompt + answer + EOS) fit it: TRL's RewardTrainer drops longer pairs."""
    if len(tok(pair["prompt"])["input_ids"]) > max_prompt_length:
        return False
    return max_length is None or all(len(tok(pair["prompt"] + pair[k] + tok.eos_token)["input_ids"]) <= max_length
                                     for k in ("chosen", "rejected"))


def load_pairs(args) -> list[dict]:
    if args.smoke:
        return [render_pair(r) for r in smoke_pairs(4 * args.steps * args.global_batch, args.seed)]
    path = Path(args.data)
    if not path.is_file():
        raise SystemExit(f"--data {path}: not found (LLaMA-Factory preference JSON: conversations/chosen/rejected)")
    return [render_pair(r) for r in json.loads(path.read_text())]


def scaletune_order(n: int, seed: int, global_batch: int) -> list[int]:
    """The order scaletune's sampler takes n examples in during epoch 0 without length grouping."""
    from scaletune.data.batching import epoch_order

    return epoch_order([0] * n, seed, 0, global_batch, False)


def build_model(args, tok, workdir: Path) -> tuple[str, int]:
    """A random Llama model of --size with `tok`, saved once for both tools; (its folder, its parameters). With
    --task reward a sequence classifier of one output: its random score head is saved too, so both load it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    size = dict(SIZES[args.size])
    config = LlamaConfig(vocab_size=max(size["vocab"], len(tok)), hidden_size=size["hidden"],
                         intermediate_size=size["intermediate"], num_hidden_layers=size["layers"],
                         num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
                         max_position_embeddings=max(args.max_length, 512), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                         **({"num_labels": 1} if args.task == "reward" else {}))
    torch.manual_seed(args.seed)
    model = (LlamaForSequenceClassification if args.task == "reward" else LlamaForCausalLM)(config)
    model_dir = workdir / "model"
    model.save_pretrained(str(model_dir), safe_serialization=True)
    tok.save_pretrained(str(model_dir))
    return str(model_dir), sum(p.numel() for p in model.parameters())


def prepare(args, workdir: Path) -> dict:
    """Tokenizer, model and the exact training pairs (in scaletune's file order and in its step order for
    TRL), written once and shared by both tools."""
    from scaletune.demo.tiny import train_tokenizer

    pairs = load_pairs(args)
    tok = train_tokenizer([p["prompt"] + p["chosen"] + p["rejected"] for p in pairs], "bpe",
                          SIZES[args.size]["vocab"])
    usable = [p for p in pairs
              if fits(p, tok, args.max_prompt_length, args.max_length if args.task == "reward" else None)]
    n = args.steps * args.global_batch
    if len(usable) < n:
        raise SystemExit(f"need {n} pairs with a prompt of at most {args.max_prompt_length} tokens (reward: "
                         f"and rows of at most {args.max_length}) for "
                         f"{args.steps} steps x {args.global_batch}, have {len(usable)} of {len(pairs)}")
    subset = random.Random(args.seed).sample(usable, n)
    order = scaletune_order(n, args.seed, args.global_batch)
    (workdir / "train.json").write_text(json.dumps(subset))
    (workdir / "train_steps.json").write_text(json.dumps([subset[i] for i in order]))
    model_dir, params = build_model(args, tok, workdir)
    return {"model_dir": model_dir, "data": str(workdir / "train.json"),
            "data_in_step_order": str(workdir / "train_steps.json"), "workdir": str(workdir),
            "steps": args.steps, "global_batch": args.global_batch, "micro": args.micro,
            "max_length": args.max_length, "max_prompt_length": args.max_prompt_length, "lr": args.lr,
            "beta": args.beta, "seed": args.seed, "threads": args.threads, "task": args.task,
            "info": {"size": args.size, "params": params, "tokenizer_vocab": len(tok), "pairs": n,
                     "pairs_in_file": len(pairs), "usable": len(usable)}}


# ------------------------------------------------------------------------------------------------
# Workers: one tool, one process

def _lora_kwargs() -> dict:
    return dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)


def row_tokens(batch: dict) -> int:
    """--task reward: the non-pad positions of a batch's rows (chosen and rejected), all of which the model reads."""
    return int(batch["attention_mask"].sum())


def answer_tokens(labels_or_mask, is_mask: bool = False) -> int:
    """Target positions of a batch's rows (chosen and rejected) that enter the log-probabilities: position 0
    predicts nothing after the shift."""
    rest = labels_or_mask[..., 1:]
    return int((rest != 0).sum() if is_mask else (rest != IGNORE).sum())


def worker_scaletune(spec: dict) -> dict:
    t0 = time.perf_counter()
    import scaletune.loop as loop
    from scaletune.config import from_dict
    from scaletune.tasks.dpo import DPO
    from scaletune.train import StopFlag, setup

    reward = spec["task"] == "reward"
    out = Path(spec["workdir"]) / f"out_scaletune_{os.getpid()}"
    raw = {"task": spec["task"], "model": {"name_or_path": spec["model_dir"], "dtype": "float32"},
           "data": {"train": spec["data"], "max_length": spec["max_length"],
                    "max_prompt_length": spec["max_prompt_length"],
                    "group_by_length": False,  # so TRL can take the same pairs in the same steps
                    "cache": False},
           "peft": {"method": "lora", **_lora_kwargs()},
           "train": {"global_batch_size": spec["global_batch"], "micro_batch_size": spec["micro"], "epochs": 1,
                     "max_steps": spec["steps"], "learning_rate": spec["lr"], "lr_scheduler": "cosine",
                     "warmup_steps": 1, "weight_decay": 0.0, "max_grad_norm": 1.0, "mixed_precision": "no",
                     "seed": spec["seed"], "eval_every": None, "save_every": None, "log_every": 1,
                     "report_to": [], **({} if reward else {"dpo_beta": spec["beta"], "dpo_loss": "sigmoid"})},
           "output_dir": str(out)}
    run, _ = setup(from_dict(raw), overwrite=True)
    counted = {"tokens": 0}
    collate = DPO.collate

    def counting_collate(self, examples, pad_id):  # counts what the model is really fed (Reward's is DPO's)
        batch = collate(self, examples, pad_id)
        counted["tokens"] += row_tokens(batch) if reward else answer_tokens(batch["labels"])
        return batch

    DPO.collate = counting_collate
    stamps = {}

    def stop_clock(run, mlog):  # replaces the final checkpoint + adapter save
        stamps.setdefault("end", (time.perf_counter(), _cpu()))

    loop.final_outputs = stop_clock
    t1, c1 = time.perf_counter(), _cpu()
    try:
        loop.fit(run, StopFlag())
    finally:
        DPO.collate = collate
    t2, c2 = stamps.get("end", (time.perf_counter(), _cpu()))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["event"] == "train"]
    return {"setup_s": t1 - t0, "train_s": t2 - t1, "cpu_s": c2 - c1, "pairs": run.step * spec["global_batch"],
            "answer_tokens": counted["tokens"], "steps": run.step, "losses": losses}


def worker_trl(spec: dict) -> dict:
    t0 = time.perf_counter()
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    ds = datasets.Dataset.from_list(json.loads(Path(spec["data_in_step_order"]).read_text()))
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    common = _hf_common_args(spec, str(Path(spec["workdir"]) / f"out_trl_{os.getpid()}"))
    args = DPOConfig(per_device_train_batch_size=spec["micro"],
                     gradient_accumulation_steps=spec["global_batch"] // spec["micro"], max_steps=spec["steps"],
                     train_sampling_strategy="sequential",  # the file is already in scaletune's step order
                     beta=spec["beta"], loss_type=["sigmoid"], max_length=spec["max_length"],
                     truncation_mode="keep_start", precompute_ref_log_probs=False, **common)
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=peft.LoraConfig(task_type="CAUSAL_LM", **_lora_kwargs()))
    return _train_trl(trainer, spec, t0, lambda batch: answer_tokens(batch["completion_mask"], is_mask=True))


def worker_trl_reward(spec: dict) -> dict:
    t0 = time.perf_counter()
    import datasets
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    ds = datasets.Dataset.from_list(json.loads(Path(spec["data_in_step_order"]).read_text()))
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=1, dtype=torch.float32)
    common = _hf_common_args(spec, str(Path(spec["workdir"]) / f"out_trl_{os.getpid()}"))
    args = RewardConfig(per_device_train_batch_size=spec["micro"],
                        gradient_accumulation_steps=spec["global_batch"] // spec["micro"], max_steps=spec["steps"],
                        train_sampling_strategy="sequential",  # the file is already in scaletune's step order
                        max_length=spec["max_length"], center_rewards_coefficient=None, **common)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                            peft_config=peft.LoraConfig(task_type="SEQ_CLS", modules_to_save=["score"],
                                                        **_lora_kwargs()))
    return _train_trl(trainer, spec, t0, row_tokens)


def _train_trl(trainer, spec: dict, t0: float, tokens_of) -> dict:
    """Train a TRL trainer, counting `tokens_of(batch)` over the batches its collator really feeds the model, and
    time the loop from the first step (`_clock_callback`): the result the driver tabulates."""
    counted = {"tokens": 0}
    inner = trainer.data_collator

    def counting_collator(features):
        batch = inner(features)
        counted["tokens"] += tokens_of(batch)
        return batch

    trainer.data_collator = counting_collator
    stamps: dict = {}
    trainer.add_callback(_clock_callback(stamps))
    trainer.train()
    t2, c2 = time.perf_counter(), _cpu()
    t1, c1 = stamps["start"]
    return {"setup_s": t1 - t0, "train_s": t2 - t1, "cpu_s": c2 - c1,
            "pairs": trainer.state.global_step * spec["global_batch"], "answer_tokens": counted["tokens"],
            "steps": trainer.state.global_step, "losses": _losses(trainer)}


def run_worker(spec_path: str) -> None:
    spec = worker_spec(spec_path)
    trl = worker_trl_reward if spec["task"] == "reward" else worker_trl
    res = {"scaletune": worker_scaletune, "trl": trl}[spec["tool"]](spec)
    res["peak_mb"] = _peak_rss_mb()
    Path(spec["result"]).write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------------
# Driver

def run_tool(tool: str, spec: dict, workdir: Path, rep: int, env: dict, in_process: bool) -> dict:
    spec = {**spec, "tool": tool, "result": str(workdir / f"result_{tool}_{rep}.json")}
    spec_path = workdir / f"spec_{tool}_{rep}.json"
    spec_path.write_text(json.dumps(spec))
    start_worker(__file__, run_worker, spec_path, env, in_process, f"{tool} (repeat {rep})")
    res = json.loads(Path(spec["result"]).read_text())
    res["first_loss"] = res["losses"][0] if res["losses"] else float("nan")
    res["final_loss"] = statistics.mean(res["losses"][-5:]) if res["losses"] else float("nan")
    res["pairs_s"] = res["pairs"] / res["train_s"]
    res["tok_s"] = res["answer_tokens"] / res["train_s"]
    return res


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    """The median of each measure over the repeats (losses: the first repeat's, every repeat trains alike)."""
    out = {}
    for tool, runs in results.items():
        med = lambda key, runs=runs: statistics.median(r[key] for r in runs)  # noqa: E731
        first = runs[0]
        out[tool] = {"train_s": med("train_s"), "setup_s": med("setup_s"), "cpu_s": med("cpu_s"),
                     "pairs_s": med("pairs_s"), "tok_s": med("tok_s"), "peak_mb": med("peak_mb"),
                     "steps": first["steps"], "pairs": first["pairs"], "answer_tokens": first["answer_tokens"],
                     "first_loss": first["first_loss"], "final_loss": first["final_loss"],
                     "losses": first["losses"], "runs": len(runs)}
    return out


def table(summary: dict[str, dict], task: str = "dpo") -> str:
    what = "tokens" if task == "reward" else "answer tokens"
    lines = [f"| tool | wall s (loop) | setup s | steps | pairs | {what} | pairs/s | {what.replace('tokens', 'tok')}/s "
             "| peak MB | first loss | final loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for tool, s in summary.items():
        lines.append(f"| {LABELS[task][tool]} | {s['train_s']:.2f} | {s['setup_s']:.2f} | {s['steps']} | {s['pairs']} | "
                     f"{s['answer_tokens']} | {s['pairs_s']:.2f} | {s['tok_s']:.1f} | {s['peak_mb']:.0f} | "
                     f"{s['first_loss']:.4f} | {s['final_loss']:.4f} |")
    return "\n".join(lines)


def ratios(summary: dict[str, dict], task: str = "dpo") -> list[str]:
    if not {"scaletune", "trl"} <= set(summary):
        return []
    a, b = summary["scaletune"], summary["trl"]
    steps = min(len(a["losses"]), len(b["losses"]))
    gap = max((abs(x - y) for x, y in zip(a["losses"][:steps], b["losses"][:steps])), default=float("nan"))
    start = "" if task == "reward" else f"; log 2 = {math.log(2):.4f}"
    what = "tok/s" if task == "reward" else "answer tok/s"
    return [f"scaletune / TRL: pairs/s x{a['pairs_s'] / b['pairs_s']:.2f}, {what} x{a['tok_s'] / b['tok_s']:.2f}, "
            f"wall x{b['train_s'] / a['train_s']:.2f} faster, CPU x{b['cpu_s'] / a['cpu_s']:.2f} less, "
            f"peak mem x{a['peak_mb'] / b['peak_mb']:.2f}, "
            f"final loss {a['final_loss'] - b['final_loss']:+.4f} (largest per-step loss gap {gap:.2g}{start})"]


def parse(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--task", choices=sorted(LABELS), default="dpo",
                    help="dpo: vs TRL DPOTrainer; reward: scaletune task reward vs TRL RewardTrainer")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--data", default=DEFAULT_DATA, help="LLaMA-Factory preference JSON (conversations/chosen/rejected)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=4, help="pairs per forward (accumulation = global/micro)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=128,
                    help="pairs with a longer prompt are left out (TRL 1.16 cannot cut prompts alone)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma list from {','.join(TOOLS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    ap.add_argument("--workdir", default=None, help="keep model/data/results here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the summary as JSON here")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, generated pairs, 2 steps, both tools in this process (unless --subprocess)")
    ap.add_argument("--subprocess", action="store_true", help="with --smoke: each tool in its own process")
    args = ap.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.global_batch, args.micro, args.max_length = "tiny", 2, 4, 2, 96
        args.max_prompt_length, args.repeats = 48, 1
    if args.global_batch % args.micro:
        raise SystemExit("--global-batch must be a multiple of --micro")
    return args


def report(summary: dict[str, dict], repeats: int, task: str = "dpo") -> None:
    print(f"\nmedian of {repeats} repeat(s):")
    print(table(summary, task))
    for line in ratios(summary, task):
        print(line)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        run_worker(args.worker)
        return 0
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if bad := [t for t in tools if t not in TOOLS]:
        raise SystemExit(f"unknown tools {bad}; choose from {TOOLS}")
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix=f"scaletune-{args.task}-bench-")
    workdir = Path(args.workdir or tmp.name).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SCALETUNE_NO_PROGRESS": "1", "SCALETUNE_CACHE": str(workdir / "cache"),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "DISABLE_MLFLOW_INTEGRATION": "TRUE", "WANDB_DISABLED": "true", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    spec = prepare(args, workdir)
    info = spec["info"]
    rows = f" and rows of at most {args.max_length}" if args.task == "reward" else ""
    print(f"model: llama {args.size} ({info['params'] / 1e6:.1f}M params, tokenizer {info['tokenizer_vocab']}), "
          f"{info['pairs']} pairs ({info['usable']} of {info['pairs_in_file']} have a prompt of at most "
          f"{args.max_prompt_length} tokens{rows}); prepared in {time.perf_counter() - t0:.1f}s", flush=True)
    results: dict[str, list[dict]] = {t: [] for t in tools}
    for rep in range(args.repeats):
        for tool in tools if rep % 2 == 0 else tools[::-1]:  # interleaved, alternating order
            res = run_tool(tool, spec, workdir, rep, env, in_process=args.smoke and not args.subprocess)
            results[tool].append(res)
            print(f"  repeat {rep + 1} {tool}: loop {res['train_s']:.2f}s (CPU {res['cpu_s']:.1f}s), setup "
                  f"{res['setup_s']:.2f}s, {res['steps']} steps, {res['pairs_s']:.2f} pairs/s, peak "
                  f"{res['peak_mb']:.0f} MB, losses {' '.join(f'{x:.4f}' for x in res['losses'])}", flush=True)
    summary = summarise(results)
    report(summary, args.repeats, args.task)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "summary": summary}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
