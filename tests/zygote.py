"""Fork server for tests that start many short `scaletune` runs: it imports the training stack once
(~10 s of imports per process start on a 2-core CI machine), then forks a fresh child per request.
A child runs `scaletune <argv>` exactly as `python -m scaletune` would (or a helper script, as
`python script args` would), in its own session so a test can signal or kill its process group.
Nothing has run a torch op in this process before a fork (no thread pools to inherit).

Protocol, one JSON object per line on stdin, one answer per line on stdout:
  {"run": argv, "env": {...}, "stdout": path, "stderr": path} -> child pid
  {"script": path, "args": [...], "env": ..., "stdout": ..., "stderr": ...} -> child pid
  {"poll": pid}  -> exit code (negative: killed by that signal), or null while it runs
  {"wait": pid}  -> exit code
"""

from __future__ import annotations

import json
import os
import runpy
import sys

import peft  # noqa: F401  (the imports a `scaletune train` process pays for)
import transformers  # noqa: F401

import scaletune.loop  # noqa: F401
import scaletune.train  # noqa: F401
from scaletune.cli import main


def child(req: dict) -> None:
    os.setsid()
    os.environ.clear()
    os.environ.update(req["env"])
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if req.get("stdout") else null
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    code = 1
    try:
        if "script" in req:
            sys.argv = [req["script"], *req["args"]]
            sys.path.insert(0, os.path.dirname(os.path.abspath(req["script"])))
            runpy.run_path(req["script"], run_name="__main__")
            code = 0
        else:
            code = main(req["run"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
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
        if "run" in req or "script" in req:
            pid = os.fork()
            if pid == 0:
                child(req)
            answer: object = pid
        else:
            pid = req.get("poll", req.get("wait"))
            done, status = os.waitpid(pid, os.WNOHANG if "poll" in req else 0)
            answer = os.waitstatus_to_exitcode(status) if done else None
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
