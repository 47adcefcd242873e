"""Fork server for the kill tests: imports scaletune's training stack once (~10 s per process start on
a 2-core CI machine, 20+ starts per kill test), then forks a fresh child per request, which runs
`scaletune <argv>` exactly as `python -m scaletune` would, in its own session so the test can kill its
process group. Nothing has run a torch op in this process before a fork (no thread pools to inherit).

Protocol, one JSON object per line on stdin, one answer per line on stdout:
  {"run": argv, "env": {...}, "stderr": path} -> child pid
  {"poll": pid}  -> exit code (negative: killed by that signal), or null while it runs
  {"wait": pid}  -> exit code
"""

from __future__ import annotations

import json
import os
import sys

import peft  # noqa: F401  (the imports a `scaletune train` process pays for)
import transformers  # noqa: F401

import scaletune.loop  # noqa: F401
import scaletune.train  # noqa: F401
from scaletune.cli import main


def child(argv: list[str], env: dict, stderr: str) -> None:
    os.setsid()
    os.environ.clear()
    os.environ.update(env)
    null = os.open(os.devnull, os.O_RDWR)
    err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(err, 2)
    code = 1
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - report like the interpreter would, then exit
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)


def serve() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        if "run" in req:
            pid = os.fork()
            if pid == 0:
                child(req["run"], req["env"], req["stderr"])
            answer: object = pid
        else:
            pid = req.get("poll", req.get("wait"))
            done, status = os.waitpid(pid, os.WNOHANG if "poll" in req else 0)
            answer = os.waitstatus_to_exitcode(status) if done else None
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
