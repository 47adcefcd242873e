"""Submit scaletune training runs to Slurm.

The batch templates live in ``scaletune/resources/slurm/{single,multi}_node.sbatch``
(shipped as package data; ``slurm/*.sbatch`` in the repo are identical copies kept for
people who call ``sbatch`` by hand). ``sbatch`` copies the script at submit time, so the
template path only has to exist while ``sbatch`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

TEMPLATES = ("single_node.sbatch", "multi_node.sbatch")


def template_name(nodes: int) -> str:
    return "multi_node.sbatch" if nodes > 1 else "single_node.sbatch"


@contextlib.contextmanager
def template_path(name: str) -> Iterator[Path]:
    """Yield a filesystem path to a packaged sbatch template."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; expected one of {TEMPLATES}")
    ref = resources.files("scaletune").joinpath("resources", "slurm", name)
    with resources.as_file(ref) as p:
        yield Path(p)


def render_sbatch_command(
    config_path: str | os.PathLike[str],
    nodes: int = 1,
    gpus_per_node: int = 0,
    time: str | None = None,
    partition: str | None = None,
    account: str | None = None,
    extra: Sequence[str] = (),
    *,
    sbatch_args: Sequence[str] = (),
    template: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Build ``sbatch [options] TEMPLATE CONFIG [extra...]``.

    ``extra`` are trainer overrides (``key=value``) forwarded after CONFIG to
    ``scaletune train``; ``sbatch_args`` are additional raw sbatch options (e.g.
    ``["--qos=high"]``). ``template`` defaults to the packaged single/multi-node template
    (its path is only valid inside :func:`template_path`; :func:`main_slurm` handles that).
    """
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    if gpus_per_node < 0:
        raise ValueError(f"gpus_per_node must be >= 0, got {gpus_per_node}")
    cmd = ["sbatch", f"--nodes={nodes}", "--ntasks-per-node=1"]
    if gpus_per_node > 0:
        cmd.append(f"--gres=gpu:{gpus_per_node}")
    if time:
        cmd.append(f"--time={time}")
    if partition:
        cmd.append(f"--partition={partition}")
    if account:
        cmd.append(f"--account={account}")
    cmd.extend(sbatch_args)
    if template is None:
        template = Path("slurm") / template_name(nodes)  # display form; see main_slurm
    cmd.append(str(template))
    cmd.append(str(Path(config_path).resolve()))
    cmd.extend(extra)
    return cmd


def _require_sbatch() -> None:
    """Refuse before anything is created when this machine cannot submit."""
    import shutil

    from .errors import UserError

    if shutil.which("sbatch") is None:
        raise UserError("`sbatch` not found on PATH: this machine has no Slurm client",
                        hint="submit from a Slurm login node, or add --dry-run to print the sbatch command "
                             "(the script it submits is slurm/single_node.sbatch or slurm/multi_node.sbatch)")


def submit(cmd: list[str]) -> int:
    """Run sbatch; its refusal (no controller, bad option, unknown partition) becomes a UserError."""
    from .errors import UserError

    # the templates write to logs/%x-%j.out relative to the submit directory;
    # Slurm silently drops output if that directory does not exist
    logs = Path("logs")
    created = not logs.exists()
    logs.mkdir(exist_ok=True)
    env = dict(os.environ)
    own_env = sys.prefix != sys.base_prefix or os.environ.get("CONDA_PREFIX") == sys.prefix  # (venv, conda env)
    if not env.get("SCALETUNE_VENV") and not env.get("SCALETUNE_PYTHON") and own_env:
        # the job's python (exported by --export=ALL): this virtualenv's, which has scaletune, rather than
        # whatever `python` is on PATH (a venv's scaletune run without activating it: the job found none).
        # Not a system or module python: its path may not exist on the compute nodes, whose PATH finds theirs.
        env["SCALETUNE_PYTHON"] = sys.executable
    # stdout ("Submitted batch job N") is passed through; stderr is kept for the error
    done = subprocess.run(cmd, check=False, stderr=subprocess.PIPE, text=True, env=env)
    if done.returncode == 0:
        sys.stderr.write(done.stderr)  # sbatch's warnings, if any
        return 0
    if created and not any(logs.iterdir()):
        logs.rmdir()  # nothing was submitted: leave the directory as it was
    said = [line for line in done.stderr.splitlines() if line.strip()][-10:] or ["(no message)"]
    raise UserError(said, title=f"sbatch refused the job (exit {done.returncode}): `{shlex.join(cmd)}`",
                    hint="`sinfo` shows whether this machine reaches a Slurm controller; --dry-run prints the "
                         "command without submitting")


SIGNAL_LEAD_S = 300  # the templates' `#SBATCH --signal=B:USR1@300`


def time_limit_seconds(text: str) -> int | None:
    """Slurm's --time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds; None for what it is not
    (UNLIMITED, or a form Slurm itself will judge)."""
    days, _, clock = text.strip().rpartition("-") if "-" in text else ("", "", text.strip())
    parts = clock.split(":")
    if not days.isdigit() and days or not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        return None
    nums = [int(p) for p in parts]
    if days:
        hms = nums + [0] * (3 - len(nums))  # D-HH[:MM[:SS]]
    else:
        hms = {1: [0, nums[0], 0], 2: [0, *nums], 3: nums}[len(nums)]  # MM, MM:SS, HH:MM:SS
    return int(days or 0) * 86400 + hms[0] * 3600 + hms[1] * 60 + hms[2]


# The job's comment (`sbatch --comment`) names its output_dir: a job still in the queue holds no run lock, so
# `scaletune slurm` finds a job submitted for the same output_dir through squeue.
COMMENT = "scaletune output_dir="


def job_name(sbatch_args: Sequence[str]) -> str:
    """The name the job will have: the last --job-name/-J among the sbatch args, else $SBATCH_JOB_NAME, else
    the templates' `#SBATCH --job-name=scaletune` (the name `--dependency=singleton` waits on)."""
    given = []
    for i, arg in enumerate(sbatch_args):
        if arg in ("--job-name", "-J") and i + 1 < len(sbatch_args):  # (the name as the next argument)
            given.append(sbatch_args[i + 1])
        elif m := re.fullmatch(r"(?:--job-name=|-J=?)(.+)", arg):
            given.append(m.group(1))
    return given[-1] if given else os.environ.get("SBATCH_JOB_NAME") or "scaletune"


def queued_job(out: Path, name: str | None = None) -> tuple[str, str] | None:
    """(job id, state) of a job of this user, pending or running, that `scaletune slurm` submitted for `out`
    (only one named `name`, if given); None if there is none or squeue cannot tell."""
    import getpass

    named = ["-n", name] if name else []
    try:
        done = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), *named, "-o", "%i|%T|%k"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    wanted = COMMENT + str(Path(out).resolve())
    for line in done.stdout.splitlines() if done.returncode == 0 else []:
        job, _, rest = line.partition("|")
        state, _, comment = rest.partition("|")
        if comment.strip() == wanted and job.strip() != os.environ.get("SLURM_JOB_ID"):  # (not the job itself)
            return job.strip(), state.strip().lower()
    return None


def _signal_lead(sbatch_args: list[str]) -> int:
    """The seconds before the limit at which the job is told to checkpoint (an --sbatch-arg=--signal wins)."""
    lead = SIGNAL_LEAD_S
    for arg in sbatch_args:
        if arg.startswith("--signal=") and "@" in arg and arg.rsplit("@", 1)[1].isdigit():
            lead = int(arg.rsplit("@", 1)[1])
    return lead


def main_slurm(args: argparse.Namespace, output_dir: str | None = None) -> int:
    """``scaletune slurm CONFIG [key=value ...] [--nodes N --gpus-per-node G ...] [--dry-run]``.

    Reads from `args` (the CLI's namespace): config, overrides, nodes, gpus_per_node, time, partition,
    account, sbatch_args (raw sbatch options), dry_run. The config is validated by the caller; `output_dir`
    (the run config's) goes into the job's comment (see `queued_job`).
    """
    from .errors import ConfigError  # (imported here: tests/slurm load this file alone, by path)

    sbatch_args = list(getattr(args, "sbatch_args", []) or [])
    # A limit given as --sbatch-arg=--time=5 (or -t5) is checked too; sbatch takes the last one given, and
    # the sbatch args come after --time on its command line.
    raw = [m.group(1) for a in sbatch_args if (m := re.fullmatch(r"(?:--time=|-t=?)(.+)", a))]
    given = raw[-1] if raw else args.time
    option = "--sbatch-arg=--time" if raw else "--time"
    text = (given or "").strip()
    # Slurm's "no limit": UNLIMITED / INFINITE / -1, or any form of zero (0, 00:00:00)
    named = text.lower() in ("unlimited", "infinite", "-1")
    limit = time_limit_seconds(text) if text and not named else None
    if text and limit is None and not named:
        # (sbatch would refuse it at submission; --dry-run would not say)
        raise ConfigError(f"{option} {given!r} is not a Slurm time limit: minutes, MM:SS, HH:MM:SS, D-HH, "
                          "D-HH:MM, D-HH:MM:SS or UNLIMITED")
    lead = _signal_lead(sbatch_args)
    if limit and limit <= lead:
        raise ConfigError(f"{option} {given}: the job is told to checkpoint {lead} s before its time limit "
                          "(#SBATCH --signal=B:USR1@" f"{lead}), so it would stop itself at start and requeue "
                          "without progress, again and again",
                          hint=f"give a --time longer than {lead} s, or a shorter lead: --sbatch-arg=--signal=B:USR1@60")
    if not getattr(args, "dry_run", False):
        _require_sbatch()
    name = template_name(args.nodes)
    with template_path(name) as tpl:
        cmd = render_sbatch_command(
            args.config,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            time=args.time,
            partition=args.partition,
            account=args.account,
            extra=list(args.overrides),
            sbatch_args=[*sbatch_args, *([] if any(a.startswith("--comment") for a in sbatch_args) else
                                         [f"--comment={COMMENT}{Path(output_dir).resolve()}"] if output_dir else [])],
            template=tpl,
        )
        print(shlex.join(cmd), flush=True)
        if getattr(args, "dry_run", False):
            return 0
        return submit(cmd)
