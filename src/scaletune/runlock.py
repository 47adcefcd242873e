"""One run at a time per output_dir: an advisory lock on `output_dir/.scaletune.lock`.

Two runs writing the same output_dir (the same job submitted twice, each with `--resume auto`; a second
terminal) would each resume the other's checkpoints, rotate them away and interleave metrics.jsonl,
with nothing to show for it until the adapters are wrong. The process that writes the run's files (the
global main rank) holds a POSIX record lock (fcntl) for the run's life: the kernel drops it when that
process ends however it ends, so a killed run leaves no stale lock, and NFS carries such locks between
machines (flock is local on many cluster filesystems). A run takes the whole file; `scaletune launch`
(node 0) then keeps byte 0 and its global rank 0 takes byte 1, so the directory stays locked while
either lives: a launcher killed alone leaves its ranks training, and they still keep others out. The
file exists while a run holds it (a killed run leaves it, unlocked: harmless); the output_dir checks do
not count it as a run's content.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no POSIX record locks; a run goes unlocked (as on a filesystem without them)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("scaletune")

LOCK_NAME = ".scaletune.lock"
# Set by the process holding the lock for the processes it starts (the ranks of `scaletune launch`):
# the resolved output_dir it holds. A rank would otherwise find the lock taken by its own launcher.
HELD_ENV = "SCALETUNE_OUTPUT_LOCK_HELD"
# Opened without following a link: a lock file planted as one (in a run directory someone else made) would
# have the run truncate and write the file it names, outside output_dir.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# errnos of a filesystem that does not do record locks (Lustre without -o flock, some FUSE mounts)
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class OutputLock:
    """The held lock of one output_dir; `release` ends it (so does the end of the process)."""

    def __init__(self, out: Path, fd: int, created: list[Path], owner: bool = True) -> None:
        self.out, self.fd, self.created = out, fd, created  # created: the directories it made, deepest first
        self.owner = owner  # False: a rank's share of its launcher's lock (the launcher removes the file)

    def share_with_ranks(self) -> None:
        """Keep byte 0 only: the global rank 0 this launcher starts takes byte 1 (`join`)."""
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 0, 1)

    def _names_mine(self, out: Path) -> bool:
        """Whether `out`'s lock file is the file this lock holds."""
        try:
            return os.path.samestat(os.fstat(self.fd), os.stat(out / LOCK_NAME))
        except OSError:
            return False

    def move_to(self, out: Path) -> None:
        """`--overwrite` has set the locked directory aside and created `out` afresh: lock the new one."""
        if self._names_mine(out):  # it emptied `out` in place (it could not rename): still the file held,
            return  # and closing any descriptor of it would drop the lock
        new = acquire(out)
        if new is not None:
            os.close(self.fd)  # (the old file went with the directory set aside)
            self.out, self.fd, self.created, self.owner = new.out, new.fd, [], True

    def release(self) -> None:
        """Unlock and remove the lock file, and the directories this lock created if nothing else was
        written there (the run failed early): everything is left as it was found."""
        if self.fd < 0:
            return
        if self.owner and self._names_mine(self.out):
            # Removed while still held: a run that opened it meanwhile finds, once it has the lock, that the
            # name no longer leads to its file, and starts over (acquire).
            (self.out / LOCK_NAME).unlink(missing_ok=True)
            for directory in self.created:
                try:
                    directory.rmdir()  # only if empty
                except OSError:
                    break
        os.close(self.fd)
        self.fd = -1


def held_by_parent(out: Path) -> bool:
    """Whether the process that started this one holds `out`'s lock (see HELD_ENV)."""
    try:
        return os.environ.get(HELD_ENV) == str(Path(out).resolve())
    except (OSError, ValueError):  # an unusable path: the output_dir checks say so
        return False


def join(out: Path) -> OutputLock | None:
    """Global rank 0 under `scaletune launch`: take byte 1 of the lock its launcher holds (see the
    module's docstring). None if there is no such file or it cannot be locked (the launcher's byte
    still keeps others out)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(out) / LOCK_NAME, os.O_RDWR | _NOFOLLOW)
    except (OSError, ValueError):
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1)
    except OSError:
        os.close(fd)
        return None
    return OutputLock(Path(out), fd, [], owner=False)


def acquire(out: Path) -> OutputLock | None:
    """Lock `out` for this process (creating the directory if needed), or raise a UserError naming the run
    that holds it. None where nothing can be locked: `out` cannot be created (the output_dir checks report
    that) or its filesystem has no record locks (a warning: then nothing stops a second run)."""
    out = Path(out)
    if fcntl is None:
        log.warning("output_dir: %s cannot be locked on this platform (%s); make sure no other run writes there",
                    out, sys.platform)
        return None
    created: list[Path] | None = None
    for _ in range(100):
        try:
            if created is None:
                created = [d for d in (out, *out.absolute().parents) if not d.exists()]
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        except (OSError, ValueError):  # (ValueError: a NUL byte in the name)
            if os.path.islink(out / LOCK_NAME):  # (not Path.is_symlink: it raises on a name too long)
                raise UserError(f"output_dir: {out / LOCK_NAME} is a symbolic link (to {os.readlink(out / LOCK_NAME)}); "
                                "scaletune's lock file never is, and locking it would overwrite the file it names",
                                hint="remove the link (a run directory copied from someone else may hold more: "
                                     "check it)") from None
            return None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise in_use(out) from None
            if exc.errno in _UNSUPPORTED:
                log.warning("output_dir: %s cannot be locked on this filesystem (%s); make sure no other run "
                            "writes there", out, exc.strerror)
                return None
            raise
        lock = OutputLock(out, fd, created)
        if lock._names_mine(out):
            break
        os.close(fd)  # the run that held it removed it as this one opened it: lock the new file
    else:
        raise UserError(f"output_dir: {out}: cannot take its lock ({LOCK_NAME} keeps being replaced)")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
          "argv": sys.argv, "slurm_job": os.environ.get("SLURM_JOB_ID")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return lock


def in_use(out: Path, hint: str = "wait for that run to end or stop it, or pick another output_dir") -> UserError:
    """The refusal of a second run in `out`, naming the run that holds it."""
    return UserError(f"output_dir: {out} is in use by another run ({_holder(out)}); two runs writing there "
                     "would resume and delete each other's checkpoints", hint=hint)


def check_free(out: Path, hint: str | None = None) -> None:
    """Raise `in_use` if a live run holds `out`'s lock; creates, writes and keeps nothing (a job about to
    be queued is refused now rather than after its wait in the queue). Without `hint`, what a Slurm job about
    to be submitted can do: queue after the holder where it is a job, else wait for it."""
    if fcntl is None:
        return
    try:
        fd = os.open(Path(out) / LOCK_NAME, os.O_RDWR | _NOFOLLOW)
    except (OSError, ValueError):  # no lock file (no run there yet), or nothing to open: the job's checks say
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise in_use(Path(out), hint or _queue_hint(Path(out))) from None
    finally:
        os.close(fd)  # (drops the probe's lock with it)


def _queue_hint(out: Path) -> str:
    """How a job for `out` can follow the run holding it: after its Slurm job, or (a run outside Slurm, which
    no --dependency can wait for) once it has ended."""
    try:
        job = json.loads((out / LOCK_NAME).read_text(encoding="utf-8")).get("slurm_job")
    except (OSError, ValueError, AttributeError):
        job = None
    if isinstance(job, str) and job.isdigit():
        return f"wait for job {job} to end, or queue this one after it: --sbatch-arg=--dependency=afterany:{job}"
    return ("wait for that run to end or stop it, then submit (it is no Slurm job, so --dependency cannot wait "
            "for it), or pick another output_dir")


def _holder(out: Path) -> str:
    """Who holds `out`'s lock, from what it wrote into the lock file."""
    try:
        info = json.loads((out / LOCK_NAME).read_text(encoding="utf-8"))
        command = shlex.join(["scaletune", *map(str, info["argv"][1:])])  # (argv[0]: a path, or __main__.py)
        holder = f"pid {info['pid']} on {info['host']}, started {info['started']}: {command}"
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return "its details are unreadable"
    # The file names the process that took the lock; a `scaletune launch` killed alone (kill -9, the OOM
    # killer) leaves its ranks holding it, and a pid that no longer exists only puzzled the user
    if info["host"] == socket.gethostname() and not _alive(info["pid"]):
        holder += ("; that process has ended, the ranks it started still hold the lock: they stop at their "
                   "next step, with a checkpoint")
    return holder


def _alive(pid: object) -> bool:
    """Whether a process `pid` exists on this machine (True where that cannot be told)."""
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (EPERM: another user's process)
        return True
    return True


_held: OutputLock | None = None  # what `lock_run` / `after_replace` took in this process


def lock_run(out: Path) -> None:
    """`scaletune train`: lock `out` in the process that writes the run's files, the global main rank
    (its share of the lock when its launcher holds it; nothing on the other ranks). `release_run` ends
    it."""
    global _held
    if int(os.environ.get("RANK", "0")) == 0:
        _held = join(out) if held_by_parent(out) else acquire(out)


def after_replace(out: Path) -> None:
    """`--overwrite` has just set the locked output_dir aside and created `out` afresh (main process):
    lock the new directory (this process alone holds it, where its launcher held the old one)."""
    global _held
    if _held is not None:
        _held.move_to(out)
    elif held_by_parent(out):
        _held = acquire(out)


def release_run() -> None:
    """End what `lock_run` and `after_replace` took in this process."""
    global _held
    if _held is not None:
        _held.release()
        _held = None
