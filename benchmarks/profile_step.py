#!/usr/bin/env python
"""Where does a training step's time go? torch.profiler over a few steps of one tool, on bench.py's setup.

    python benchmarks/bench.py --size 30m --repeats 1 --workdir /tmp/b30 --tools scaletune   # builds model + data
    python benchmarks/profile_step.py --workdir /tmp/b30 --tool scaletune --steps 3
    python benchmarks/profile_step.py --workdir /tmp/b30 --tool hf_trainer --steps 3

Prints the top operators by self CPU time (and writes a Chrome trace next to the workdir if --trace).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True, help="a bench.py --workdir (holds model/ and train.json)")
    ap.add_argument("--tool", default="scaletune", choices=["scaletune", "scaletune_packed", "hf_trainer", "trl_packed"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--trace", action="store_true")
    args = ap.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import bench
    from torch.profiler import ProfilerActivity, profile, record_function

    work = Path(args.workdir)
    spec = json.loads(sorted(work.glob("spec_*.json"))[0].read_text())
    spec.update(tool=args.tool, steps=args.steps, result=str(work / f"profile_{args.tool}.json"))
    if args.tool.startswith("scaletune"):
        # scaletune: profile fit() for `steps` steps (packed: global batch in rows, epochs -> max_steps)
        import scaletune.loop as loop
        import scaletune.train as train_mod

        orig_setup = train_mod.setup

        def short_setup(cfg, **kw):
            cfg.train.max_steps = args.steps
            return orig_setup(cfg, **kw)

        train_mod.setup = short_setup
        orig_fit = loop.fit

        def profiled_fit(run, stop):
            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                with record_function("fit"):
                    out = orig_fit(run, stop)
            report(prof, args)
            return out

        loop.fit = profiled_fit
        bench.worker_scaletune(spec, packed=args.tool == "scaletune_packed")
    else:
        from transformers import Trainer

        orig_train = Trainer.train

        def profiled_train(self, *a, **kw):
            self.args.max_steps = args.steps
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = orig_train(self, *a, **kw)
            report(prof, args)
            return out

        Trainer.train = profiled_train
        (bench.worker_hf if args.tool == "hf_trainer" else bench.worker_trl)(spec)
    res = json.loads(Path(spec["result"]).read_text())
    print(f"{args.tool}: {res['steps']} steps in {res['train_s']:.2f}s (profiled), "
          f"{res['target_tokens']} target tokens")
    return 0


def report(prof, args) -> None:
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    if args.trace:
        path = Path(args.workdir) / f"trace_{args.tool}.json"
        prof.export_chrome_trace(str(path))
        print(f"trace: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
