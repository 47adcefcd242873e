"""Start `scaletune` runs (or helper scripts) as children of tests/zygote.py instead of fresh
interpreters: the same code path and a real process of its own, without ~10 s of imports each."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ZYGOTE = Path(__file__).with_name("zygote.py")


class Zygote:
    """zygote.py, started once per test process on first use."""

    _proc: subprocess.Popen | None = None

    @classmethod
    def ask(cls, request: dict) -> object:
        if cls._proc is None or cls._proc.poll() is not None:
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            cls._proc = subprocess.Popen([sys.executable, str(ZYGOTE)], env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
            atexit.register(cls._proc.kill)
        cls._proc.stdin.write(json.dumps(request) + "\n")
        cls._proc.stdin.flush()
        return json.loads(cls._proc.stdout.readline())


class Forked:
    """A forked run with the part of subprocess.Popen's interface the tests use. It is a real process
    in its own session: signals and SIGKILL reach it like any other run."""

    def __init__(self, request: dict, log: Path):
        self.log, self.returncode = log, None
        self.stdout_path = log.with_suffix(log.suffix + ".out")
        self.pid = Zygote.ask({**request, "stdout": str(self.stdout_path), "stderr": str(log)})

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = Zygote.ask({"poll": self.pid})
        return self.returncode

    def communicate(self, timeout: float) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"forked run {self.pid}", timeout)
            time.sleep(0.05)
        return self.stdout_path.read_text(), self.log.read_text()


def start(argv: list[str], env: dict, log: Path, cwd: Path | None = None) -> Forked:
    """`scaletune <argv>` forked; stderr goes to `log`, stdout to `log` + ".out"."""
    return Forked({"run": argv, "env": env, "cwd": str(cwd) if cwd else None}, log)


def run(argv: list[str], env: dict, log: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`scaletune <argv>` forked, waited for, returned like subprocess.run(capture_output=True) would."""
    return _finish(start(argv, env, log), ["scaletune", *argv], timeout)


def run_script(script: Path, args: list[str], env: dict, log: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python script args`, forked, waited for (like subprocess.run(capture_output=True))."""
    proc = Forked({"script": str(script), "args": args, "env": env}, log)
    return _finish(proc, [str(script), *args], timeout)


def _finish(proc: Forked, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill(proc: Forked) -> None:
    """SIGKILL the child's process group and reap it (the zygote is its parent)."""
    os.killpg(proc.pid, 9)
    Zygote.ask({"wait": proc.pid})


def run_ranks(script: Path, args: list[str], env: dict, world: int, logdir: Path, timeout: float = 300) -> None:
    """`script args` as `world` torch.distributed ranks on this machine (the environment torchrun gives
    its workers), forked. Raises with the ranks' output if any fails."""
    from stutil import free_port

    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                    "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(Forked({"script": str(script), "args": args, "env": rank_env}, logdir / f"rank{rank}.log"))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)
    if any(p.returncode != 0 for p in procs):
        logs = "\n".join(f"--- rank {i} (exit {p.returncode})\n{p.log.read_text()[-4000:]}" for i, p in enumerate(procs))
        raise AssertionError(f"{script.name} {' '.join(args)} failed at world size {world}:\n{logs}")


def launch(cmd: list[str], env: dict, logdir: Path, cwd: Path, timeout: float = 420,
           rank_args: dict[int, list[str]] | None = None, nodes: int = 1) -> subprocess.CompletedProcess:
    """A one-node launch, `cmd` being `accelerate launch ARGS (-m scaletune | SCRIPT) ARGS...` (or `python -m`
    accelerate's CLI or its launch module) or `python -m scaletune launch ...`, with its ranks forked here
    instead of started by accelerate and torchrun.

    What the ranks get is what that launch would give them: `scaletune launch`'s accelerate command is its
    own (composed by a dry run in this process, which also validates the config), the environment is
    accelerate's (its launch parser and env builders), then torchrun's per-rank variables. `rank_args` adds
    arguments to some ranks' command lines, and `nodes` deals the ranks out to that many nodes' local ranks
    (what launchers on several nodes, given other overrides, would start).
    The exit code is `scaletune launch`'s for those ranks; the output is the printed command (for `scaletune
    launch`), then each rank's stdout and stderr. For tests of what training does under DDP/ZeRO; how
    processes start, stop and fail is for real launches (tests/distributed/test_launch_*.py)."""
    import io
    import shlex

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    from scaletune.cli import main
    from scaletune.launch import exit_code

    printed = ""
    if cmd[1:3] == ["-m", "scaletune"]:  # scaletune launch: its own command, from a dry run
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), _chdir(cwd):
            assert main([*cmd[cmd.index("launch"):], "--dry-run"]) == 0, buf.getvalue()
        printed = buf.getvalue()
        cmd = shlex.split(printed.strip().splitlines()[-1])
    at = next(i for i, a in enumerate(cmd) if a == "launch" or a.endswith("accelerate.commands.launch"))
    args = launch_command_parser().parse_args(cmd[at + 1:])
    script, script_args = args.training_script, list(args.training_script_args)
    assert not args.module or script == "scaletune", cmd
    with _chdir(cwd):
        args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    assert args.num_machines in (None, 1), "multi-node launches are real ones"
    if args.use_deepspeed:  # (as accelerate's launch_command sets it before its deepspeed launcher)
        fields = [*(defaults.deepspeed_config if defaults else {})] + ["mixed_precision"] * mixed_precision_from_config
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        built = prepare_deepspeed_cmd_env(args)[1]
    else:
        built = prepare_multi_gpu_env(args)
    accelerate_env = {k: v for k, v in built.items() if os.environ.get(k) != v}
    world, port = int(args.num_processes), str(args.main_process_port)
    procs, per_node = [], world // nodes
    for rank in range(world):
        rank_env = {**env, **accelerate_env, "RANK": str(rank), "LOCAL_RANK": str(rank % per_node),
                    "GROUP_RANK": str(rank // per_node), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(per_node),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        argv = [*script_args, *(rank_args or {}).get(rank, [])]
        request = {"run": argv} if args.module else {"script": str(Path(cwd, script)), "args": argv}
        procs.append(Forked({**request, "env": rank_env, "cwd": str(cwd)}, logdir / f"launch{port}_rank{rank}.log"))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and not any(p.returncode not in (None, 0) for p in procs):
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
            time.sleep(0.05)
        # as torchrun: the first failure stops the other ranks (SIGTERM, SIGKILL 30 s later), else one left alone
        # would wait in a collective
        running = [p for p in procs if p.poll() is None]
        for p in running:
            os.killpg(p.pid, signal.SIGTERM)
        grace = time.monotonic() + 30
        while any(p.poll() is None for p in running) and time.monotonic() < grace:
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)
    out = printed + "".join(f"[forked rank {i}: exit {p.returncode}]\n" + p.stdout_path.read_text() + p.log.read_text()
                            for i, p in enumerate(procs))
    codes = [p.returncode for p in procs]
    return subprocess.CompletedProcess(cmd, exit_code(codes) if any(codes) else 0, out, "")


@contextlib.contextmanager
def _chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
