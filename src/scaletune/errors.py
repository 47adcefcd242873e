"""User-facing errors.

Anything caused by what the user gave us (config, data, paths, combinations) is raised as a
`UserError`; the CLI prints it on one screen and exits with code 2. Everything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2
# Distinct code for "stopped on a signal after writing a resumable checkpoint": the Slurm
# templates requeue on it, and nothing else uses it.
EXIT_PREEMPTED = 124
# A rank of a launched run that stopped because another rank failed or stopped answering: the cause is that
# rank's (its own exit code), so `scaletune launch` leaves this one out of the launch's.
EXIT_PEER = 3
EXIT_INTERRUPTED = 130  # Ctrl-C before training began, or twice (128 + SIGINT, as a shell reports it)


class UserError(Exception):
    """One or more problems with the user's input, each naming where it is."""

    def __init__(self, problems: str | list[str], *, title: str | None = None, hint: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.title = title
        self.hint = hint
        super().__init__(self.render())

    def __reduce__(self) -> tuple:
        # Pickled (a tokenising worker's error goes to the main process) with its parts, not the rendered
        # text that Exception keeps as args: that would come back as a problem reading "error: error: ...".
        return _rebuild, (type(self), self.problems, self.title, self.hint, self.__dict__)

    def render(self) -> str:
        if len(self.problems) == 1 and not self.title:
            text = f"error: {self.problems[0]}"
        else:
            head = self.title or "problems found"
            text = f"error: {head}:\n" + "\n".join(f"  - {p}" for p in self.problems)
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


def problems_count(n: int) -> str:
    """'1 problem' / 'N problems', for error titles."""
    return f"{n} problem{'' if n == 1 else 's'}"


class ConfigError(UserError):
    """Problems with the run config."""


class DataError(UserError):
    """Problems with a data file."""


def _rebuild(cls: type, problems: list[str], title: str | None, hint: str | None, state: dict) -> UserError:
    err = cls(problems, title=title, hint=hint)
    err.__dict__.update(state)  # (relayed_from and the like)
    return err


# Where a write can fail because of the machine, not the program: full disk, quota, read-only filesystem,
# permissions, a file too large for the filesystem.
_WRITE_ERRNOS = {28, 122, 30, 13, 1, 27}  # ENOSPC, EDQUOT, EROFS, EACCES, EPERM, EFBIG

RESUME_AFTER_WRITE = ("nothing written before was harmed: free disk space (or fix permissions), then run again with "
                      "--resume auto (it continues from the newest checkpoint, if there is one)")


def failed_write(exc: BaseException) -> bool:
    """Whether `exc` is a write the machine refused (see _WRITE_ERRNOS). safetensors reports those as its
    own error, carrying the OS error's text."""
    if isinstance(exc, OSError):
        return exc.errno in _WRITE_ERRNOS
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" and any(
        s in text for s in ("No space left", "StorageFull", "QuotaExceeded", "ReadOnlyFilesystem",
                            "PermissionDenied", "Permission denied", "Disk quota"))


def write_error(exc: BaseException, target: object, hint: str) -> UserError:
    """A refused write (`failed_write`) as a one-screen error naming what was being written."""
    reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
    return UserError(f"could not write {target}: {reason}", hint=hint)
