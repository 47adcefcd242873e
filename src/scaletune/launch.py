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
SIGTERM or SIGUSR1 to the launcher reaches the ranks (torchrun forwards TERM; USR1 is forwarded here),
which checkpoint, and the launch exits 124 naming the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import runlock
from .distributed import deepspeed_config_name, deepspeed_config_path
from .errors import EXIT_INTERRUPTED, EXIT_PEER, EXIT_PREEMPTED, EXIT_USAGE, ConfigError, UserError, problems_count


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
    if nnodes > 1:
        # torchrun's static rendezvous kept node 0 waiting 600 s, silently, for a node that never came (lost
        # while starting, or given another --master-port); now it gives up when the other nodes would
        cmd += ["--rdzv_conf", f"timeout={int(cfg.distributed.timeout_s)}"]
    path = str(config_path)
    path = f"./{path}" if path.startswith("-") else path  # (`-r.yaml` would read as an option of train)
    cmd += ["-m", "scaletune", "train", *list(train_args or []), path, *list(overrides)]
    return cmd


def _refuse_for_this_machine(cfg: Any, world: int, cpu: bool | None) -> None:
    """Raise ConfigError for problems that depend on this machine's hardware (CUDA or not)."""
    from .rules import cross_field_problems

    if cpu is None:
        import torch

        has_cuda = torch.cuda.is_available()
    else:
        has_cuda = not cpu
    problems = cross_field_problems(cfg, world_size=world, has_cuda=has_cuda)
    if problems:
        raise ConfigError(problems, title=f"{cfg.source_file or 'run config'} cannot run here "
                                           f"({problems_count(len(problems))})")


def preflight(cfg: Any) -> None:
    """Raise ConfigError if this machine lacks what the run config needs installed (DeepSpeed for a ZeRO
    stage, bitsandbytes for a quantized base or an 8-bit optimizer), before any process starts.

    `launch` and `slurm` call it (not for a dry run: what this machine has installed need not be what the
    command is composed for), so a missing package is refused once, here, and not by every process
    after start-up or by the job after its queue wait. The peft section is checked earlier, with the
    rest of the config (load_config's check_peft)."""
    from .model import quantization_config
    from .rules import package_problems

    problems = package_problems(cfg)
    if problems:
        raise ConfigError(problems, title=f"{len(problems)} package(s) the run needs are missing")
    quantization_config(cfg)


def exit_code(codes: list[int]) -> int:
    """The exit code of a launch whose processes ended with `codes` (negative: killed by a signal).

    2 (bad input), 124 (stopped with a checkpoint) or 130 (interrupted: Ctrl-C) when every process that
    exited by itself agrees;
    else 1, as accelerate reports any failure. Processes the launcher killed after the first failure
    say nothing about the cause, so they do not count.
    """
    own = {code for code in codes if code > 0 and code != EXIT_PEER}  # (a peer's stop: another rank's cause)
    if own in ({EXIT_USAGE}, {EXIT_PREEMPTED}, {EXIT_INTERRUPTED}):
        return own.pop()
    return 1


def wait_for_node_0(addr: str, port: int, timeout_s: float, every_s: float = 30.0) -> str | None:
    """Another node's launcher: wait until node 0's rendezvous answers at addr:port, saying so every `every_s`;
    after `timeout_s` (distributed.timeout_s) give up and return what to print (None: node 0 answered).
    torchrun waited silently (a wrong --master-port: nothing printed for minutes) or, where something else
    answered, printed a 20-line C++ trace per retry for 15 minutes. Not a UserError (exit 2, bad input):
    node 0 may as well be down or slow."""
    import socket

    start = last = time.monotonic()
    while True:
        try:
            with socket.create_connection((addr, port), timeout=5):
                return None
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
        now = time.monotonic()
        if now - start >= timeout_s:
            return (f"scaletune launch: node 0 did not answer at --master-addr {addr} --master-port {port} within "
                    f"distributed.timeout_s ({timeout_s:g} s; last: {why}); start node 0 with the same "
                    "--master-addr/--master-port (its address as this node reaches it), and check that the port "
                    "is open between the nodes")
        if now - last >= every_s:
            print(f"scaletune launch: waiting for node 0 at {addr}:{port} ({now - start:.0f} s; {why})",
                  file=sys.stderr, flush=True)
            last = now
        time.sleep(max(0.1, min(2.0, every_s, timeout_s - (now - start))))


def _describe(failures: dict) -> str:
    """One line naming how each failed rank ended (torchrun's ProcessFailure by global rank)."""
    parts = []
    for rank in sorted(failures):
        code = failures[rank].exitcode
        how = f"exited with code {code}" if code > 0 else f"was stopped ({failures[rank].signal_name()})"
        parts.append(f"rank {rank} {how}")
    return ", ".join(parts)


def run_accelerate(cmd: list[str], usr1: _PassOn | None = None) -> int:
    """Run the composed `accelerate ... launch ARGS` in this process; return the launch's exit code.

    accelerate's CLI would end a failed run with exit 1 and a traceback through torchrun (the ranks
    have already printed their errors): its failure is caught here and summarised in one line. A
    SIGTERM to this process reaches the ranks through torchrun, a SIGUSR1 through `usr1` (a _PassOn that
    `main_launch` installed before it started; else one installed here): either
    way the ranks checkpoint and the launch ends with 124 and the checkpoint's path, which it reads
    from $SCALETUNE_PREEMPT_MARKER (a temporary file of its own when the user has set none).
    """
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(cmd[cmd.index("launch") + 1:])
    # torchrun logs every failed rank as an error with its pid ("failed (exitcode: 124)"), a preemption
    # too; the summary line below says the same per rank, in words.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    marker, own_dir = _preempt_marker()
    before = _marker_state(marker)
    # torchrun installs handlers for TERM/INT/HUP/QUIT and never restores them; USR1 is ours (below)
    saved = _handlers(_LAUNCH_SIGNALS)
    interrupts = None
    try:
        usr1 = usr1 if usr1 is not None else _PassOn.install()
        if args.num_processes == 1 and args.num_machines == 1 and not args.use_deepspeed:
            # accelerate's one-process launcher: a Ctrl-C in this process stopped the rank (SIGTERM, and
            # SIGKILL 5 s later: no checkpoint unless its step and save were quicker). The rank is in the
            # terminal's process group and gets a Ctrl-C itself; this process passes its first on as SIGTERM
            # (a SIGINT sent to it alone still stops the rank, and one keypress is not two Ctrl-Cs there),
            # later ones as SIGINT (a second Ctrl-C: stop at once)
            interrupts = _PassOn.install(signal.SIGINT, first_as=signal.SIGTERM)
        return _launch(launch_command, args, lambda: _checkpoint_written(marker, before))
    finally:
        for passer in (usr1, interrupts):
            if passer is not None:
                passer.stop()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if own_dir is not None:
            os.environ.pop(_MARKER_VAR, None)
            shutil.rmtree(own_dir, ignore_errors=True)


def _launch(launch_command: Any, args: Any, checkpoint: Any) -> int:
    """Call accelerate's `launch_command(args)`; map how it ended to the launch's exit code, with one
    summary line. `checkpoint()` is the path the ranks wrote on a preemption, or None."""
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        launch_command(args)
    except DistError as exc:  # torchrun's rendezvous (the nodes never all met): a 40-line traceback before
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        where = f"node 0's rendezvous ({args.main_process_ip}:{args.main_process_port})"
        # (the store's timeout while the nodes gather; any other store or network failure is said as it is)
        what = (f"the {args.num_machines} nodes did not all meet at {where}" if "waiting for clients" in first
                else f"{type(exc).__name__} at {where}")
        print(f"scaletune launch: {what}: {first}; start every node with the same --nnodes/--master-addr/"
              "--master-port within distributed.timeout_s", file=sys.stderr, flush=True)
        return 1
    except ChildFailedError as exc:  # torchrun: several processes, or DeepSpeed
        code = exit_code([f.exitcode for f in exc.failures.values()])
        print(f"scaletune launch: {_describe(exc.failures)}{_saved(checkpoint() if code == EXIT_PREEMPTED else None)}",
              file=sys.stderr, flush=True)
        return code
    except subprocess.CalledProcessError as exc:  # accelerate's single-process launcher
        code = exit_code([exc.returncode])
        if code == EXIT_PREEMPTED:
            print(f"scaletune launch: the run stopped with code 124{_saved(checkpoint())}", file=sys.stderr, flush=True)
        return code
    except SignalException as exc:  # torchrun stopped the ranks on a signal (accelerate < 1.16 lets it out)
        return _signalled(int(exc.sigval), checkpoint())
    except SystemExit as exc:  # accelerate >= 1.16 turns that signal into sys.exit(128 + signal)
        if not isinstance(exc.code, int) or exc.code <= 128:
            raise
        return _signalled(exc.code - 128, checkpoint())
    return 0


def _signalled(signum: int, checkpoint: str | None) -> int:
    """Exit code and summary line of a launch stopped by signal `signum`: 124 if the ranks saved a
    checkpoint on their way out (torchrun passed the signal on), else 128 + signal as a shell reports."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if checkpoint is None:
        print(f"scaletune launch: stopped by {name}; the ranks saved no checkpoint", file=sys.stderr, flush=True)
        return 128 + signum
    print(f"scaletune launch: stopped by {name}{_saved(checkpoint)}", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED


def _saved(checkpoint: str | None) -> str:
    """The summary's tail naming the preemption checkpoint ('' without one)."""
    return f"; checkpoint {checkpoint} (continue with --resume auto)" if checkpoint else ""


_MARKER_VAR = "SCALETUNE_PREEMPT_MARKER"
# (HUP, QUIT and USR1 are POSIX only: Windows has none of them)
_LAUNCH_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")
                        if hasattr(signal, n))


def _preempt_marker() -> tuple[Path, str | None]:
    """The preemption marker the ranks will write: the user's $SCALETUNE_PREEMPT_MARKER, else a new file
    name in a temporary directory of our own (returned second, to delete), set in the environment the
    ranks inherit."""
    if os.environ.get(_MARKER_VAR):
        return Path(os.environ[_MARKER_VAR]), None
    own_dir = tempfile.mkdtemp(prefix="scaletune-launch-")
    os.environ[_MARKER_VAR] = os.path.join(own_dir, "preempted")
    return Path(os.environ[_MARKER_VAR]), own_dir


def _marker_state(marker: Path) -> tuple[int, int] | None:
    """(mtime_ns, size) of the marker file, None if absent: a user's marker left by an earlier run must
    not pass for this one's."""
    try:
        st = marker.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _checkpoint_written(marker: Path, before: tuple[int, int] | None) -> str | None:
    """The checkpoint path the ranks wrote to `marker` during this launch, or None."""
    now = _marker_state(marker)
    if now is None or now == before:
        return None
    try:
        lines = marker.read_text(encoding="utf-8").splitlines()  # (the path, then the signal: mark_preempted)
    except OSError:
        return None
    return (lines[0].strip() or None) if lines else None


def _handlers(signals: tuple) -> dict:
    """The current handler of each of `signals` (to restore later)."""
    return {sig: signal.getsignal(sig) for sig in signals}


class _PassOn:
    """SIGUSR1 to the launcher, passed on to every rank, which then checkpoints as if signalled itself; by
    default it would kill the launcher alone and orphan the ranks (torchrun handles TERM/INT/HUP/QUIT, not
    USR1). A rank gets it once it exists and handles it (its StopFlag): a signal that arrives while the
    launcher or a rank is still starting (a Slurm preemption notice at job start) is held until then, rather
    than lost, or killing a rank by the signal's default action."""

    def __init__(self, first_as: int | None = None) -> None:
        self.signum: int | None = None
        self.first_as, self.received = first_as, 0
        self.given: set[int] = set()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    @classmethod
    def install(cls, signum: int | None = None, first_as: int | None = None) -> _PassOn:
        """A _PassOn handling `signum`, default SIGUSR1 (only from the main thread, the one place Python allows a
        handler; nothing where the platform lacks the signal: Windows has no SIGUSR1), passing the first one on
        as `first_as` if given."""
        passer = cls(first_as)
        signum = getattr(signal, "SIGUSR1", None) if signum is None else signum
        if signum is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signum, passer.handler)
        return passer

    def handler(self, signum: int, frame: Any) -> None:
        passed = self.first_as if self.first_as is not None and not self.received else signum
        self.received += 1
        self.signum, self.given = passed, set()  # again for every rank, even one that had an earlier one
        if self.thread is None:
            self.thread = threading.Thread(target=self._pass_on, name="scaletune-pass-on", daemon=True)
            self.thread.start()

    def _pass_on(self) -> None:
        while not self.stopped.wait(0.1):
            signum = self.signum
            for pid in rank_pids(os.getpid()):
                if pid not in self.given and signum is not None and catches(pid, signum):
                    try:
                        os.kill(pid, signum)
                    except ProcessLookupError:
                        pass
                    self.given.add(pid)

    def stop(self) -> None:
        self.stopped.set()


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (Linux's SigCgt mask); False if that cannot be read."""
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def rank_pids(parent: int) -> list[int]:
    """The children of `parent` that run `scaletune train` (the ranks torchrun or accelerate started),
    read from Linux's /proc; any other child (a compiler, a log tailer) is left alone. [] elsewhere."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            # the command name in (...) may hold spaces and parentheses: ppid follows the last ')'
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0") if ppid == parent else []
        except (OSError, IndexError, ValueError):  # gone meanwhile, or not a process directory
            continue
        if b"train" in argv and any(os.path.basename(a) == b"scaletune" for a in argv):
            pids.append(int(entry.name))
    return sorted(pids)


def main_launch(args: Any) -> int:
    """Entry point of `scaletune launch`: validate the config, print the command, run it.

    Reads from `args` (an argparse.Namespace): config, overrides (list), nproc (default: number of
    CUDA devices, else 1), nnodes (1), node_rank (0), master_addr ("127.0.0.1"), master_port (29500),
    optional cpu (None = auto), resume / overwrite / allow_config_change (passed on to
    `scaletune train`), dry_run (print only). The config is validated here, against the launch's world
    size and with its peft options, in one error; so are output_dir and --resume (`train.resume_point`),
    except for a dry run. Returns 0 after a dry run, else the exit code
    of the launched run (see `exit_code`, `run_accelerate`).
    """
    saved = _handlers(tuple(getattr(signal, n) for n in ("SIGUSR1", "SIGTERM") if hasattr(signal, n)))
    usr1 = _PassOn.install()  # first: a SIGUSR1 during the checks and imports below is held for the ranks
    # A SIGTERM during the checks is answered after them: a bad config still ends with its error and exit 2
    # (under Slurm, srun stops the other nodes' launchers once one exits, while they are failing the same way)
    term: list[int] = []
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: term.append(signum))
    refused = False
    try:
        return _main_launch(args, usr1, term, saved[signal.SIGTERM])
    except UserError:
        refused = True
        raise
    finally:
        usr1.stop()
        for sig, handler in saved.items():
            # A refusal's error is printed after this, and the process then exits 2: a SIGTERM meanwhile (srun
            # stopping this node's launcher once another node exited with the same error) ended it with 143.
            # So in a process of its own, a SIGTERM stays deferred (recorded, never answered) to the exit (which
            # follows at once; should it hang, srun's SIGKILL after its kill-wait still ends it).
            if not (refused and sig == signal.SIGTERM and getattr(args, "own_process", False)):
                signal.signal(sig, handler)


def _main_launch(args: Any, usr1: _PassOn, term: list[int], term_handler: Any) -> int:
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
    if dry_run:  # may be composed anywhere
        return _checked_launch(args, cfg, overrides, int(nproc), nnodes, usr1, term, term_handler, dry_run)
    # Hardware-dependent checks too (e.g. fp16 without CUDA), or every process fails the same way after
    # start-up and accelerate reports only "exit 1".
    _refuse_for_this_machine(cfg, int(nproc) * nnodes, getattr(args, "cpu", None))
    preflight(cfg)
    # One run per output_dir (runlock.py): held here, for the ranks this starts, on the node that writes
    lock = runlock.acquire(Path(cfg.output_dir)) if not int(getattr(args, "node_rank", None) or 0) else None
    if lock is not None:
        lock.share_with_ranks()
        os.environ[runlock.HELD_ENV] = str(Path(cfg.output_dir).resolve())
    try:
        return _checked_launch(args, cfg, overrides, int(nproc), nnodes, usr1, term, term_handler, dry_run)
    finally:
        if lock is not None:
            os.environ.pop(runlock.HELD_ENV, None)
            lock.release()


def _checked_launch(args: Any, cfg: Any, overrides: list[str], nproc: int, nnodes: int, usr1: _PassOn,
                    term: list[int], term_handler: Any, dry_run: bool) -> int:
    if not dry_run:
        # output_dir and --resume as train checks them, from the filesystem only: a refusal is one error
        # here, not one per rank after start-up. A dry run may be composed where that directory is not.
        from .train import resume_point

        resume_point(cfg, getattr(args, "resume", None), bool(getattr(args, "overwrite", False)),
                     bool(getattr(args, "allow_config_change", False)))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, term_handler)  # torchrun installs its own once it starts
    if term:
        print("scaletune launch: stopped by SIGTERM before any rank started (nothing to checkpoint)",
              file=sys.stderr, flush=True)
        return 128 + term[0]
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
    if nnodes > 1 and int(getattr(args, "node_rank", None) or 0) > 0:
        gave_up = wait_for_node_0(str(getattr(args, "master_addr", None) or "127.0.0.1"),
                                  int(getattr(args, "master_port", None) or 29500), cfg.distributed.timeout_s)
        if gave_up:
            print(gave_up, file=sys.stderr, flush=True)
            return 1
    from .tracking import LAUNCH_ARGV

    # run.json's argv: the command that was typed (the ranks inherit the environment)
    os.environ[LAUNCH_ARGV] = json.dumps(["scaletune", *getattr(args, "argv", sys.argv[1:])])
    try:
        return run_accelerate(cmd, usr1)
    finally:
        os.environ.pop(LAUNCH_ARGV, None)
