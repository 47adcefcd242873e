"""Tokenising a large instruction file: time and peak memory for each `data.num_proc`, side by side.

    python benchmarks/tokenise.py --data ../shared/data/alpaca_demo/alpaca_en_demo.json --records 100000
    python benchmarks/tokenise.py --smoke        # generated records, seconds (the test suite runs this)

The records of --data (Alpaca JSON) are repeated, each with a distinct suffix, up to --records and
written as JSONL; a byte-level BPE tokenizer (--vocab) is trained on them. Each `data.num_proc` value
builds the training set (causal_lm, alpaca format, no cache) in a fresh process, which reports its
wall time and peak RSS (ru_maxrss, the forked workers not included: they hold one piece each). The
table gives the ratio to the first value and checks that every build produced the same examples.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(args: argparse.Namespace) -> None:
    from scaletune.config import from_dict
    from scaletune.data import build_datasets
    from scaletune.model import load_tokenizer
    from scaletune.tasks import get_task

    cfg = from_dict({"task": "causal_lm", "model": {"name_or_path": args.model},
                     "data": {"train": args.train, "format": "alpaca", "max_length": args.max_length,
                              "cache": False, "num_proc": args.procs},
                     "output_dir": str(Path(args.train).parent / "out")})
    tokenizer = load_tokenizer(cfg)
    start = time.perf_counter()
    train = build_datasets(cfg, get_task("causal_lm"), tokenizer)["train"]
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for column in ("input_ids", "labels"):
        for batch in train.with_format("numpy").iter(batch_size=10000):
            for row in batch[column]:
                digest.update(row.tobytes())
    print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rows": len(train), "sha256": digest.hexdigest()}))


def _records(args: argparse.Namespace) -> list[dict]:
    if args.smoke:
        words = "alpha beta gamma delta model train data token loss step batch adapter layer weight".split()
        return [{"instruction": f"Repeat {words[i % len(words)]} {i % 7} times.", "input": "",
                 "output": " ".join([words[i % len(words)]] * (i % 7 + 1))} for i in range(60)]
    return json.loads(Path(args.data).read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/alpaca_demo/alpaca_en_demo.json")
    parser.add_argument("--records", type=int, default=100000)
    parser.add_argument("--procs", default="1,2", help="comma-separated data.num_proc values")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--smoke", action="store_true", help="4100 generated records, a 300-token vocabulary")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.procs = int(args.procs)
        _child(args)
        return 0
    if args.smoke:
        args.records, args.vocab, args.max_length = 4100, 300, 64  # three pieces of 2000 records
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tokenise-"))
    work.mkdir(parents=True, exist_ok=True)
    source = _records(args)
    train = work / "train.jsonl"
    with train.open("w") as f:
        for i in range(args.records):
            rec = dict(source[i % len(source)])
            rec["output"] = f"{rec['output']} #{i}"
            f.write(json.dumps(rec) + "\n")
    from scaletune.demo.tiny import build_model_dir

    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in source]
    model = build_model_dir(work / "model", texts, vocab_size=args.vocab, hidden=32, layers=1)
    results = {}
    for procs in [int(p) for p in args.procs.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--child", "--model", str(model), "--train", str(train),
                              "--procs", str(procs), "--max-length", str(args.max_length)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stdout[-2000:] + out.stderr[-4000:], file=sys.stderr)
            return 1
        results[procs] = json.loads(out.stdout.strip().splitlines()[-1])
    first = next(iter(results.values()))
    print(f"{args.records} records ({train.stat().st_size / 2**20:.0f} MB), max_length {args.max_length}, "
          f"vocabulary {args.vocab}; {platform.node()}, {platform.processor() or platform.machine()}")
    print("| data.num_proc | seconds | peak RSS MB | rows | time vs first |")
    print("|---|---|---|---|---|")
    for procs, r in results.items():
        print(f"| {procs} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['rows']} | "
              f"{first['seconds'] / r['seconds']:.2f}x |")
    same = len({r["sha256"] for r in results.values()}) == 1
    print("same examples in every build" if same else "BUILDS DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
