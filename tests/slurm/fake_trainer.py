"""Stand-in for ``scaletune train`` used by tests/slurm (launched by the sbatch templates
through ``accelerate launch`` via SCALETUNE_ENTRY=tests/slurm/fake_trainer.py).

It follows the same contract the templates expect from the real trainer:

    fake_trainer.py CONFIG --resume auto [key=value ...]

* CONFIG is a JSON file: {"out_dir": ..., "steps": N, "step_sleep": seconds}; key=value
  overrides replace top-level keys (ints/floats parsed).
* torch.distributed (gloo) is initialised from the env the launcher provides (RANK,
  WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and an all_reduce is checked.
* On SIGUSR1/SIGTERM: finish the current step, save a checkpoint (the step counter),
  create $SCALETUNE_PREEMPT_MARKER, barrier, exit 124.
* --resume auto: continue from the checkpoint if one exists.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--resume", default="none")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()

    with open(args.config) as f:
        cfg = json.load(f)
    for kv in args.overrides:
        k, v = kv.split("=", 1)
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                pass
        cfg[k] = v

    stop = {"sig": None}

    def on_signal(signum, _frame):
        stop["sig"] = signal.Signals(signum).name
        # record which rank saw which signal (the test checks every rank got it)
        if os.environ.get("FAKE_TRAINER_OUT"):
            name = f"signal.rank{os.environ.get('RANK', '0')}.r{os.environ.get('SCALETUNE_RESTART_COUNT', '0')}"
            with open(os.path.join(os.environ["FAKE_TRAINER_OUT"], name), "a") as f:
                f.write(stop["sig"] + "\n")

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    out_dir = cfg["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    os.environ["FAKE_TRAINER_OUT"] = out_dir
    restart = int(os.environ.get("SCALETUNE_RESTART_COUNT", os.environ.get("SLURM_RESTART_COUNT", "0")))

    t = torch.tensor([float(rank + 1)])
    if world > 1:
        dist.all_reduce(t)
    info = {
        "rank": rank,
        "world_size": world,
        "allreduce": t.item(),
        "host": socket.gethostname(),
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
        "node_id": os.environ.get("SLURM_NODEID"),
        "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
        "restart": restart,
        "argv": sys.argv[1:],
        "cfg": cfg,
    }
    with open(os.path.join(out_dir, f"rank{rank}.r{restart}.json"), "w") as f:
        json.dump(info, f)
    print(f"[fake_trainer] {info}", flush=True)

    ckpt = os.path.join(out_dir, "ckpt.json")
    step = 0
    if args.resume == "auto" and os.path.exists(ckpt):
        with open(ckpt) as f:
            step = json.load(f)["step"]
        print(f"[fake_trainer] rank {rank} resumed from step {step}", flush=True)

    steps, sleep = int(cfg.get("steps", 1)), float(cfg.get("step_sleep", 0.0))
    while step < steps:
        time.sleep(sleep)
        if rank == 0:
            with open(os.path.join(out_dir, "steps.log"), "a") as f:
                f.write(f"{step} {restart}\n")
        step += 1
        flag = torch.tensor([1.0 if stop["sig"] else 0.0])
        if world > 1:
            dist.all_reduce(flag)  # every rank stops at the same step
        if flag.item() > 0 and step < steps:
            if rank == 0:
                with open(ckpt + ".tmp", "w") as f:
                    json.dump({"step": step}, f)
                os.replace(ckpt + ".tmp", ckpt)
                marker = os.environ.get("SCALETUNE_PREEMPT_MARKER")
                if marker:
                    open(marker, "w").close()
            print(f"[fake_trainer] rank {rank} got {stop['sig']}; saved at step {step}, exiting 124", flush=True)
            if world > 1:
                dist.barrier()
                dist.destroy_process_group()
            return 124

    if rank == 0:
        with open(os.path.join(out_dir, "done.json"), "w") as f:
            json.dump({"steps": step, "restart": restart}, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
