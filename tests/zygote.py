"""Fork server for tests that start many short `scaletune` runs: it imports the training stack once
(~10 s of imports per process start on a 2-core CI machine), then forks a fresh child per request.
A child runs `scaletune <argv>` exactly as `python -m scaletune` would (or a helper script, as
`python script args` would), in its own session so a test can signal or kill its process group.
Nothing has run a torch op in this process before a fork (no thread pools to inherit).

Protocol, one JSON object per line on stdin, one answer per line on stdout:
  {"run": argv, "env": {...}, "stdout": path, "stderr": path, "cwd": dir (optional)} -> child pid
  {"script": path, "args": [...], "env": ..., "stdout": ..., "stderr": ...} -> child pid
  {"poll": pid}  -> exit code (negative: killed by that signal), or null while it runs
  {"wait": pid}  -> exit code
"""

from __future__ import annotations

import json
import os
import runpy
import sys

ANSWERS = sys.stdout  # (the __main__ block moves it off fd 1)


def preload() -> None:
    """The imports a `scaletune train` process pays for (a launched rank's DeepSpeed too, where installed)."""
    import importlib

    for name in ("peft", "transformers", "deepspeed", "scaletune.loop", "scaletune.train", "scaletune.cli"):
        try:
            importlib.import_module(name)
        except ImportError:
            if name != "deepspeed":
                raise


def child(req: dict) -> None:
    os.setsid()
    os.environ.clear()
    os.environ.update(req["env"])
    if req.get("cwd"):
        os.chdir(req["cwd"])
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
            from scaletune.cli import main

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
        ANSWERS.write(json.dumps(answer) + "\n")
        ANSWERS.flush()


if __name__ == "__main__":
    # The answers go out on the stdout this process was given; anything an import prints (DeepSpeed logs its
    # accelerator to stdout) goes to stderr instead of into the protocol.
    ANSWERS = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    preload()
    serve()
