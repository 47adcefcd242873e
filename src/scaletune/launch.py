"""`scaletune launch`: compose and run the `accelerate launch ... -m scaletune train` command.

The command uses explicit accelerate CLI flags rather than the repo's launch/*.yaml files so an
installed package works anywhere; the DeepSpeed JSON comes from the package itself
(src/scaletune/resources/deepspeed/, located with importlib.resources). The repo's configs/deepspeed/
files are identical copies for people who call `accelerate launch` by hand (a test checks they match).

Choices made from the run config's `distributed:` section:

* zero_stage 0, CUDA: `--multi_gpu` when more than one process in total, else a plain single process.
* zero_stage 0, no CUDA: one process -> `--cpu`; several -> `--multi_gpu` as well, only to get the
  torchrun launcher (accelerate's --cpu launcher starts one process unless mpirun is set up); the
  processes then run as a gloo MULTI_CPU world because `accelerator_kwargs` passes cpu=True.
* zero_stage >= 1: `--use_deepspeed --zero_stage N --deepspeed_config_file <packaged json>`, never
  `--cpu` (accelerate refuses --cpu together with --use_deepspeed, and a use_cpu config silently drops
  DeepSpeed); without CUDA the gloo backend is chosen inside the process by `accelerator_kwargs`.
  Multi-node uses `--deepspeed_multinode_launcher standard` (one torchrun per node, no pdsh/ssh).

The printed command is what runs, but it runs inside this process (accelerate's own `launch_command`)
rather than by exec: that way a failed rank ends the launch with its own exit code (2 for bad input,
124 for a preemption checkpoint) and one summary line, not accelerate's exit 1 and torchrun's
ChildFailedError traceback.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from typing import Any

from .distributed import deepspeed_config_name, deepspeed_config_path
from .errors import EXIT_PREEMPTED, EXIT_USAGE


def _accelerate_executable() -> list[str]:
    """`accelerate` from this interpreter's environment (falls back to `python -m`)."""
    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if exe:
        return [exe]
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli"]


def deepspeed_flags(cfg: Any, multinode: bool = False) -> list[str]:
    """The `accelerate launch` DeepSpeed flags for `cfg` ([] for zero_stage 0).

    `--use_deepspeed --zero_stage N --deepspeed_config_file <packaged json>` (+ zero3_init_flag for
    stage 3, + the standard multi-node launcher when `multinode`).
    """
    dist = cfg.distributed
    stage = int(dist.zero_stage)
    name = deepspeed_config_name(stage, str(dist.offload))
    if name is None:
        return []
    flags = [
        "--use_deepspeed",
        "--zero_stage", str(stage),
        "--deepspeed_config_file", str(deepspeed_config_path(name)),
    ]  # fmt: skip
    if multinode:
        # One torchrun per node started by the user/scheduler: no pdsh/ssh hostfile needed.
        flags += ["--deepspeed_multinode_launcher", "standard"]
    if stage == 3:
        # Build big models already partitioned (zero.Init) instead of whole on every rank.
        flags += ["--zero3_init_flag", "true"]
    return flags


def build_launch_command(
    config_path: str,
    overrides: list[str],
    cfg: Any,
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    cpu: bool | None = None,
    train_args: list[str] | None = None,
) -> list[str]:
    """The argv of `accelerate launch ... -m scaletune train CONFIG k=v ...`.

    Args:
        config_path: the run config YAML passed through to `scaletune train`.
        overrides: `key=value` overrides passed through unchanged.
        cfg: the loaded RunConfig (reads `cfg.distributed` and `cfg.train.mixed_precision`).
        nproc: processes per node (GPUs per node).
        nnodes / node_rank / master_addr / master_port: the multi-node rendezvous (same command on
            every node except node_rank).
        cpu: force CPU (True) or GPU (False) launching; None = CPU exactly when torch sees no CUDA.
        train_args: extra `scaletune train` options (e.g. ["--resume", "auto"]), placed before CONFIG.
    """
    if nproc < 1 or nnodes < 1:
        raise ValueError(f"nproc and nnodes must be >= 1 (got nproc={nproc}, nnodes={nnodes})")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank must be in [0, {nnodes}), got {node_rank}")
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    dist = cfg.distributed
    stage = int(dist.zero_stage)
    world = nproc * nnodes

    cmd = [*_accelerate_executable(), "launch"]
    if stage > 0:
        cmd += deepspeed_flags(cfg, multinode=nnodes > 1)
    elif world > 1:
        # torchrun-based launcher; on CPU the processes still run gloo/MULTI_CPU (see module doc).
        cmd += ["--multi_gpu"]
    elif cpu:
        cmd += ["--cpu"]
    # Passed explicitly so a user's default accelerate config cannot inject its own precision (which
    # accelerate would then reject next to a DeepSpeed config file); the trainer sets it again.
    cmd += ["--mixed_precision", str(cfg.train.mixed_precision), "--dynamo_backend", "no"]
    cmd += [
        "--num_processes", str(world),
        "--num_machines", str(nnodes),
        "--machine_rank", str(node_rank),
        "--main_process_ip", str(master_addr),
        "--main_process_port", str(master_port),
    ]  # fmt: skip
    if world > 1 and nnodes == 1 and stage == 0:
        cmd += ["--rdzv_backend", "static"]
    cmd += ["-m", "scaletune", "train", *list(train_args or []), str(config_path), *list(overrides)]
    return cmd


def _refuse_for_this_machine(cfg: Any, world: int, cpu: bool | None) -> None:
    """Raise ConfigError for problems that depend on this machine's hardware (CUDA or not)."""
    from .errors import ConfigError
    from .rules import cross_field_problems

    if cpu is None:
        import torch

        has_cuda = torch.cuda.is_available()
    else:
        has_cuda = not cpu
    problems = cross_field_problems(cfg, world_size=world, has_cuda=has_cuda)
    if problems:
        raise ConfigError(problems, title=f"run config cannot run here ({len(problems)} problem(s))")


def preflight(cfg: Any, *, environment: bool = True) -> None:
    """Raise ConfigError for what `scaletune train` refuses before loading anything: the peft section,
    and with `environment` the quantization backend (bitsandbytes installed).

    `launch`, `launch-args` and `slurm` call it so a bad setting is refused once, here, and not by
    every process after start-up or by the job after its queue wait. A dry run passes
    environment=False: like the hardware checks, what this machine has installed need not be what
    the command is composed for.
    """
    from .model import peft_config, quantization_config
    from .tasks import get_task

    # the same call as train.setup: AdaLoRA's real step count is only known once the data is read
    peft_config(cfg, get_task(cfg.task).peft_task_type, total_steps=10**9)
    if environment:
        quantization_config(cfg)


def exit_code(codes: list[int]) -> int:
    """The exit code of a launch whose processes ended with `codes` (negative: killed by a signal).

    2 (bad input) or 124 (stopped with a checkpoint) when every process that exited by itself agrees;
    else 1, as accelerate reports any failure. Processes the launcher killed after the first failure
    say nothing about the cause, so they do not count.
    """
    own = {code for code in codes if code > 0}
    if own in ({EXIT_USAGE}, {EXIT_PREEMPTED}):
        return own.pop()
    return 1


def _describe(failures: dict) -> str:
    """One line naming how each failed rank ended (torchrun's ProcessFailure by global rank)."""
    parts = []
    for rank in sorted(failures):
        code = failures[rank].exitcode
        how = f"exited with code {code}" if code > 0 else f"was stopped ({failures[rank].signal_name()})"
        parts.append(f"rank {rank} {how}")
    return ", ".join(parts)


def run_accelerate(cmd: list[str]) -> int:
    """Run the composed `accelerate ... launch ARGS` in this process; return the launch's exit code.

    accelerate's CLI would end a failed run with exit 1 and a traceback through torchrun (the ranks
    have already printed their errors): its failure is caught here and summarised in one line.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(cmd[cmd.index("launch") + 1:])
    try:
        launch_command(args)
    except ChildFailedError as exc:  # torchrun: several processes, or DeepSpeed
        print(f"scaletune launch: {_describe(exc.failures)}", file=sys.stderr, flush=True)
        return exit_code([f.exitcode for f in exc.failures.values()])
    except subprocess.CalledProcessError as exc:  # accelerate's single-process launcher
        return exit_code([exc.returncode])
    return 0


def main_launch(args: Any, cfg: Any = None) -> int:
    """Entry point of `scaletune launch`: validate the config, print the command, run it.

    Reads from `args` (an argparse.Namespace): config, overrides (list), nproc (default: number of
    CUDA devices, else 1), nnodes (1), node_rank (0), master_addr ("127.0.0.1"), master_port (29500),
    optional cpu (None = auto), resume / overwrite / allow_config_change (passed on to
    `scaletune train`), dry_run (print only). `cfg` is accepted but not used: the config is validated
    here, against the launch's world size and with its peft options, in one error. Returns 0 after a dry
    run, else the exit code of the launched run (see `exit_code`).
    """
    from .config import load_config

    overrides = list(getattr(args, "overrides", None) or [])
    nproc = getattr(args, "nproc", None)
    if nproc is None:
        import torch

        nproc = torch.cuda.device_count() or 1
    nnodes = int(getattr(args, "nnodes", None) or 1)
    # Validate before starting N processes (batch divisibility depends on the world size).
    cfg = load_config(args.config, overrides, world_size=int(nproc) * nnodes, check_peft=True)
    dry_run = bool(getattr(args, "dry_run", False))
    if not dry_run:
        # Hardware-dependent checks too (e.g. fp16 without CUDA), or every process fails the same way
        # after start-up and accelerate reports only "exit 1". A dry run may be composed anywhere.
        _refuse_for_this_machine(cfg, int(nproc) * nnodes, getattr(args, "cpu", None))
    preflight(cfg, environment=not dry_run)
    train_args: list[str] = []
    if getattr(args, "resume", None):
        train_args += ["--resume", str(args.resume)]
    if getattr(args, "overwrite", False):
        train_args.append("--overwrite")
    if getattr(args, "allow_config_change", False):
        train_args.append("--allow-config-change")
    cmd = build_launch_command(
        args.config,
        overrides,
        cfg,
        int(nproc),
        nnodes=nnodes,
        node_rank=int(getattr(args, "node_rank", None) or 0),
        master_addr=str(getattr(args, "master_addr", None) or "127.0.0.1"),
        master_port=int(getattr(args, "master_port", None) or 29500),
        cpu=getattr(args, "cpu", None),
        train_args=train_args,
    )
    print(shlex.join(cmd), flush=True)
    if dry_run:
        return 0
    return run_accelerate(cmd)
