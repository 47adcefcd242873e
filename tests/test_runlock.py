"""One run per output_dir (scaletune/runlock.py): the lock is seen by other processes, survives the ways
`--overwrite` replaces the directory, is ignored by the output_dir checks, and goes with its process.
The end-to-end case (a second `scaletune train` / `scaletune launch` beside a running one) is in
tests/reliability/test_kills.py."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import types
from pathlib import Path

import pytest

from scaletune import outdir, runlock
from scaletune.errors import UserError

CTX = multiprocessing.get_context("fork")


def _try(out: str, conn) -> None:
    try:
        lock = runlock.acquire(Path(out))
        conn.send("locked" if lock else "unlockable")
    except UserError as exc:
        conn.send(str(exc))


def other_process_tries(out: Path) -> str:
    """What `acquire` gives in another process (record locks belong to a process: this one's always win)."""
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=_try, args=(str(out), child))
    proc.start()
    proc.join(60)
    return parent.recv()


def _hold(out: str, ready, release) -> None:
    runlock.acquire(Path(out))
    ready.set()
    release.wait(60)


def test_a_held_output_dir_is_refused_elsewhere_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    lock = runlock.acquire(out)
    assert lock is not None and out.is_dir()
    message = other_process_tries(out)
    assert f"output_dir: {out} is in use by another run (pid {os.getpid()} on " in message
    assert "hint: wait for that run to end" in message
    lock.release()
    assert other_process_tries(out) == "locked"


def test_the_lock_ends_with_its_process_even_when_killed(tmp_path):
    out = tmp_path / "run"
    ready, release = CTX.Event(), CTX.Event()
    holder = CTX.Process(target=_hold, args=(str(out), ready, release))
    holder.start()
    assert ready.wait(60)
    assert "in use by another run" in other_process_tries(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(60)
    assert other_process_tries(out) == "locked"  # no stale lock to clear by hand


def test_release_removes_only_a_directory_the_lock_created_and_left_empty(tmp_path):
    fresh = tmp_path / "fresh"
    runlock.acquire(fresh).release()
    assert not fresh.exists()  # a run that failed before writing anything leaves nothing
    deep = tmp_path / "a" / "b" / "run"
    runlock.acquire(deep).release()
    assert not (tmp_path / "a").exists()  # nor the parents it made
    used = tmp_path / "used"
    lock = runlock.acquire(used)
    (used / "metrics.jsonl").write_text("{}\n")
    lock.release()
    assert sorted(p.name for p in used.iterdir()) == ["metrics.jsonl"]  # the lock file goes
    existing = tmp_path / "existing"
    existing.mkdir()
    runlock.acquire(existing).release()
    assert existing.is_dir() and not any(existing.iterdir())  # the user's (empty) directory stays as it was


def test_a_lock_file_removed_while_being_taken_is_taken_afresh(tmp_path, monkeypatch):
    """The run that held the lock removes its file as it ends; a run that opened that file just before
    would lock a file no longer named, beside a third run locking the new one. It starts over."""
    out = tmp_path / "run"
    out.mkdir()
    lockf, calls = runlock.fcntl.lockf, []

    def racing(fd, op):
        if not calls:
            (out / runlock.LOCK_NAME).unlink()  # the holder ends between this run's open and its lock
        calls.append(fd)
        return lockf(fd, op)

    monkeypatch.setattr(runlock.fcntl, "lockf", racing)
    lock = runlock.acquire(out)
    assert len(calls) == 2
    monkeypatch.undo()
    assert "in use by another run" in other_process_tries(out)
    lock.release()


def _cfg(out: Path) -> types.SimpleNamespace:
    return types.SimpleNamespace(output_dir=str(out), data=types.SimpleNamespace(train="x", eval=None),
                                 model=types.SimpleNamespace(name_or_path="m"))


def test_the_output_dir_checks_do_not_count_the_lock_as_content(tmp_path):
    out = tmp_path / "run"
    lock = runlock.acquire(out)
    assert outdir.check_output_dir(_cfg(out), None, False) is False  # fresh start: "empty"
    assert outdir.check_output_dir(_cfg(out), "auto", False) is False  # --resume auto with nothing to resume
    (out / "metrics.jsonl").write_text("{}\n")  # an attempt killed before its first checkpoint
    assert outdir.check_output_dir(_cfg(out), "auto", False) is False
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):  # and only the lock is ignored
        outdir.check_output_dir(_cfg(out), "auto", False)
    lock.release()


@pytest.mark.parametrize("rename_fails", [False, True], ids=["renamed-aside", "emptied-in-place"])
def test_overwrite_keeps_the_new_directory_locked(tmp_path, monkeypatch, rename_fails):
    """--overwrite renames the locked output_dir aside (the lock goes with it) or, where that fails,
    empties it in place (keeping the lock file: closing any descriptor of it would drop the lock)."""
    out = tmp_path / "run"
    runlock.lock_run(out)
    (out / "run.json").write_text("{}")
    if rename_fails:
        monkeypatch.setattr(Path, "rename", lambda self, target: (_ for _ in ()).throw(OSError(13, "denied")))
    outdir.set_aside(out)
    runlock.after_replace(out)
    assert (out / runlock.LOCK_NAME).exists() and not (out / "run.json").exists()
    assert "in use by another run" in other_process_tries(out)
    runlock.release_run()
    assert other_process_tries(out) == "locked"


def test_a_rank_other_than_0_takes_no_lock(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("RANK", "1")
    runlock.lock_run(out)
    assert not out.exists()


def _launcher(out: str, ready, release, closed) -> None:
    """`scaletune launch`: lock, keep byte 0, start rank 0 with the environment saying so; then lose the
    lock as a killed launcher does (closing the file drops this process's record locks) and wait."""
    lock = runlock.acquire(Path(out))
    lock.share_with_ranks()
    os.environ[runlock.HELD_ENV] = str(Path(out).resolve())
    os.environ["RANK"] = "0"
    rank0 = CTX.Process(target=_rank0, args=(out, ready, release))
    rank0.start()
    assert ready.wait(60)
    os.close(lock.fd)
    closed.set()
    rank0.join(60)


def _rank0(out: str, ready, release) -> None:
    runlock.lock_run(Path(out))
    ready.set()
    release.wait(60)
    runlock.release_run()


def test_ranks_keep_the_output_dir_locked_when_their_launcher_is_gone(tmp_path):
    """The launcher holds the lock for the ranks it starts, and global rank 0 takes its share. A launcher
    killed alone (OOM killer, kill -9) leaves its ranks training into output_dir: they still keep a
    second run out, and once they end the directory is free."""
    out = tmp_path / "run"
    ready, release, closed = CTX.Event(), CTX.Event(), CTX.Event()
    launcher = CTX.Process(target=_launcher, args=(str(out), ready, release, closed))
    launcher.start()
    assert closed.wait(60)
    assert "in use by another run" in other_process_tries(out)  # rank 0's share alone
    release.set()
    launcher.join(60)
    assert other_process_tries(out) == "locked"


def _orphaned_rank0(out: str, ready, release: str) -> None:
    runlock.lock_run(Path(out))
    ready.set()
    # (a file, not an Event: multiprocessing's Event stops waiting once another process using it was killed)
    for _ in range(1200):
        if Path(release).exists():
            break
        time.sleep(0.05)
    runlock.release_run()


def _killed_launcher(out: str, ready, release: str) -> None:
    """`scaletune launch` killed with SIGKILL once its rank 0 holds its share: gone without any cleanup."""
    lock = runlock.acquire(Path(out))
    lock.share_with_ranks()
    os.environ[runlock.HELD_ENV] = str(Path(out).resolve())
    os.environ["RANK"] = "0"
    CTX.Process(target=_orphaned_rank0, args=(out, ready, release)).start()
    assert ready.wait(60)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_refusal_by_the_ranks_of_a_killed_launcher_says_its_pid_has_ended(tmp_path):
    """The lock file names the launcher that took the lock; killed alone, it leaves its ranks holding the
    lock, and an immediate `--resume auto` named a pid that no longer exists as the run in the way."""
    out, release = tmp_path / "run", tmp_path / "release"
    ready = CTX.Event()
    launcher = CTX.Process(target=_killed_launcher, args=(str(out), ready, str(release)))
    launcher.start()
    # (not join(): the orphaned rank inherited the end of the pipe join waits on, which stays open until it ends)
    deadline = time.monotonic() + 60
    while launcher.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert launcher.exitcode == -signal.SIGKILL
        message = other_process_tries(out)
        assert f"in use by another run (pid {launcher.pid} on " in message, message
        assert "that process has ended, the ranks it started still hold the lock" in message, message
    finally:
        release.touch()  # (rank 0, orphaned: not this process's child to join)
    deadline = time.monotonic() + 60
    while other_process_tries(out) != "locked":
        assert time.monotonic() < deadline, "rank 0 never released the lock"
        time.sleep(0.05)


def test_a_ranks_share_ending_leaves_the_launchers_lock_file(tmp_path):
    """Rank 0 ending first must not remove the lock file its launcher still holds: a run started then would
    create and lock a new file of that name beside the launcher's lock."""
    out = tmp_path / "run"
    lock = runlock.acquire(out)
    lock.share_with_ranks()
    share = runlock.join(out)
    assert share is not None and not share.owner
    share.release()  # (in one process this drops both record locks: the file is what is under test)
    assert (out / runlock.LOCK_NAME).exists()
    lock.release()
    assert not (out / runlock.LOCK_NAME).exists()


def test_overwrite_under_a_launcher_locks_the_new_directory_in_the_rank(tmp_path, monkeypatch):
    """A rank whose launcher's lock it could not join (the file was not there) still locks the directory
    --overwrite creates afresh: the launcher's lock went aside with the old one."""
    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setenv(runlock.HELD_ENV, str(out.resolve()))
    runlock.lock_run(out)
    (out / "run.json").write_text("{}")
    outdir.set_aside(out)
    runlock.after_replace(out)
    assert "in use by another run" in other_process_tries(out)
    runlock.release_run()
    assert other_process_tries(out) == "locked"


def test_a_filesystem_without_record_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    """Lustre without -o flock, some FUSE mounts: lockf fails with ENOLCK and the like; the run goes on."""
    import errno

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "lockf", no_locks)
    with caplog.at_level("WARNING", logger="scaletune"):
        assert runlock.acquire(tmp_path / "run") is None
    assert "cannot be locked on this filesystem (No locks available)" in caplog.text
