"""Start `scaletune` runs (or helper scripts) as children of tests/zygote.py instead of fresh
interpreters: the same code path and a real process of its own, without ~10 s of imports each."""

from __future__ import annotations

import atexit
import json
import os
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


def start(argv: list[str], env: dict, log: Path) -> Forked:
    """`scaletune <argv>` forked; stderr goes to `log`, stdout to `log` + ".out"."""
    return Forked({"run": argv, "env": env}, log)


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
