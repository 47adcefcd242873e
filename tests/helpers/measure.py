"""Measure the real per-rank model-state bytes of one training step (for tests/test_plan.py).

Usage (1 process or under `accelerate launch`):  python measure.py RUN.yaml OUT.json

Builds the run with `scaletune.train.setup`, trains `train.max_steps` steps with `scaletune.loop.fit`,
and counts the tensors that actually exist on this rank:

* frozen / trainable: parameter storage of the module. Under ZeRO-3 that is each parameter's
  `ds_tensor` partition plus the full `data` of parameters ZeRO-3 keeps whole ("persistent"); under
  ZeRO-1/2 the trainables live in DeepSpeed's padded flat buffer (`bit16_groups_flat`).
* master: DeepSpeed's fp32 master partitions (the params of its inner torch optimizer).
* grads: every gradient alive when the inner torch optimizer's `step` runs (the peak point for
  gradients: module `.grad` plus, under DeepSpeed, the fp32 partition gradients).
* optimizer: every tensor in the inner torch optimizer's `state` right after the first step (params and
  master are counted at the same moment).

Rank 0 writes the counts, the peak of live tensor bytes during training, and ru_maxrss before setup and
after the step (KiB) to OUT.json. The tensor peak is the CPU analogue of `torch.cuda.max_memory_allocated`:
the bytes held by parameters when `fit` starts plus the highest running sum of the allocation/free events
the torch profiler records while it runs. Unlike RSS it does not depend on the allocator or the machine.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run as a script
from stutil import compiling_with, tensor_peak_bytes  # noqa: E402


class Counter:
    """Bytes per category, each storage counted once (views into DeepSpeed's flat buffers, and a
    ZeRO-3 fp32 master that *is* the fp32 partition, must not be counted twice)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.total: dict[str, int] = {}

    def add(self, category: str, t: Any) -> None:
        if not torch.is_tensor(t) or t.numel() == 0:
            self.total.setdefault(category, 0)
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.seen:
            self.seen.add(key)
            self.total[category] = self.total.get(category, 0) + storage.nbytes()
        else:
            self.total.setdefault(category, 0)


def _inner(opt: Any) -> Any:
    while hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _engine(run: Any) -> Any:
    wrapped = getattr(run.accelerator, "deepspeed_engine_wrapped", None)
    return wrapped.engine if wrapped is not None else None


def count_states(run: Any) -> dict[str, int]:
    """Bytes of frozen / trainable module storage, fp32 master and optimizer state on this rank."""
    engine = _engine(run)
    inner = _inner(run.optimizer)
    c = Counter()
    model = run.accelerator.unwrap_model(run.model)
    for p in model.parameters():
        category = "trainable" if p.requires_grad else "frozen"
        c.add(category, p.data)
        c.add(category, getattr(p, "ds_tensor", None))  # ZeRO-3 partition (empty attribute otherwise)
    if engine is not None:
        # ZeRO-1/2 keep trainables in padded flat buffers; the params above are views into them, so only
        # the padding is new here (counted under "trainable").
        for flat in getattr(engine.optimizer, "bit16_groups_flat", []):
            c.add("trainable", flat)
        for group in inner.param_groups:
            for p in group["params"]:
                c.add("master", p)
        for p in inner.state:  # ZeRO-3 may have emptied param_groups
            c.add("master", p)
    for st in inner.state.values():
        for v in st.values():
            c.add("optimizer", v)
    return c.total


def measure(cfg_path: str) -> tuple[dict, Any]:
    """Train the run at `cfg_path` for its max_steps and count this rank's tensors (see module doc)."""
    from scaletune.config import load_config
    from scaletune.loop import fit
    from scaletune.train import StopFlag, setup

    cfg = load_config(cfg_path)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run, _ = setup(cfg, overwrite=True)
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    inner = _inner(run.optimizer)
    model = run.accelerator.unwrap_model(run.model)
    seen: dict[str, int] = {}
    original_step = inner.step

    def counting_step(*args: Any, **kwargs: Any) -> Any:
        # Gradients are at their peak here: all micro-batches accumulated, nothing freed yet.
        c = Counter()
        for p in model.parameters():
            c.add("grads", p.grad)
        for group in inner.param_groups:
            for p in group["params"]:
                c.add("grads", p.grad)
        seen["grads"] = max(seen.get("grads", 0), c.total.get("grads", 0))
        out = original_step(*args, **kwargs)
        # Params and optimizer states as they are mid-training (the final adapter save re-partitions
        # ZeRO-3 params, which would hide the whole copies of persistent params).
        seen.setdefault("states", count_states(run))
        return out

    inner.step = counting_step
    at_start = Counter()
    for p in model.parameters():
        at_start.add("live", p.data)
        at_start.add("live", getattr(p, "ds_tensor", None))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fit(run, StopFlag())
    peak = tensor_peak_bytes(prof)
    counts = seen["states"]
    result = {"frozen": counts.get("frozen", 0), "trainable": counts.get("trainable", 0),
              "master": counts.get("master", 0), "grads": seen.get("grads", 0),
              "optimizer": counts.get("optimizer", 0), "world_size": run.accelerator.num_processes,
              "tensor_peak_bytes": at_start.total.get("live", 0) + peak,
              "chunked_loss_used": getattr(run.task, "_head", None) is not None,
              "rss_before_kib": rss_before, "rss_setup_kib": rss_setup,
              "rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    return result, run


def main() -> int:
    cfg_path, out_path = sys.argv[1], sys.argv[2]
    backend = os.environ.get("MEASURE_COMPILE_BACKEND")
    if backend:
        # train.torch_compile with another backend: "aot_eager_decomp_partition" runs the partitioner
        # inductor uses (so the same tensors are saved for backward) without generating C++ (minutes on CPU)
        torch.nn.Module.compile = compiling_with(backend)
    result, run = measure(cfg_path)
    if run.accelerator.is_main_process:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return 0


if __name__ == "__main__":
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR2)  # `kill -USR2 <pid>` prints every thread's stack (hang triage)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
