"""Runs several PEFT methods one after another inside ONE 2-process DeepSpeed launch (a launch costs
~15 s of start-up, a tiny run ~2 s). Usage: matrix_worker.py ROOT_DIR SPEC_JSON; each run writes
ROOT_DIR/<name>/ as `scaletune train` would (metrics.jsonl, adapter/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from accelerate.state import AcceleratorState, GradientState

    from scaletune.config import from_dict
    from scaletune.loop import fit
    from scaletune.train import StopFlag, setup

    root, specs = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    failures = {}
    for name, raw in specs.items():
        raw["output_dir"] = str(root / name)
        try:
            run, _ = setup(from_dict(raw))
            assert fit(run, StopFlag()) == "done"
            del run
        except Exception as exc:  # every rank fails the same way at setup; record it and go on
            failures[name] = f"{type(exc).__name__}: {exc}"[:500]
        # a fresh Accelerator (and DeepSpeed engine) per method in this one process
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    (root / "failures.json").write_text(json.dumps(failures, indent=1))


if __name__ == "__main__":
    main()
