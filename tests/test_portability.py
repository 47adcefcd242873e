"""Platforms this Linux suite does not run on, simulated: macOS (spawned DataLoader workers, ru_maxrss in bytes)
and native Windows (no fcntl, no resource, no SIGUSR1/SIGHUP/SIGQUIT)."""

from __future__ import annotations

import pickle
import subprocess
import sys
import types

import pytest

from scaletune import metrics, runlock


def test_peak_memory_reads_ru_maxrss_in_bytes_on_macos(monkeypatch):
    fake = types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: types.SimpleNamespace(ru_maxrss=512 * 2**20))
    monkeypatch.setitem(sys.modules, "resource", fake)
    monkeypatch.setattr(metrics.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(metrics, "open", _no_proc, raising=False)  # (macOS has no /proc)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert metrics.peak_memory_mb() == 512.0
    monkeypatch.setattr(sys, "platform", "linux")
    fake.getrusage = lambda who: types.SimpleNamespace(ru_maxrss=512 * 2**10)
    assert metrics.peak_memory_mb() == 512.0


def _no_proc(path, *a, **kw):
    raise FileNotFoundError(path)


def test_peak_memory_without_resource_is_unknown_not_a_crash(monkeypatch):
    monkeypatch.setitem(sys.modules, "resource", None)  # (import raises ImportError, as on Windows)
    monkeypatch.setattr(metrics.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(metrics, "open", _no_proc, raising=False)
    assert metrics.peak_memory_mb() != metrics.peak_memory_mb()  # nan


def test_without_record_locks_a_run_goes_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(runlock, "fcntl", None)
    assert runlock.acquire(tmp_path / "out") is None
    assert "cannot be locked on this platform" in caplog.text
    assert runlock.join(tmp_path / "out") is None
    runlock.check_free(tmp_path / "out", hint="")  # nothing to refuse


def test_the_cli_modules_import_and_a_stop_flag_works_without_posix_only_signals():
    """Native Windows has no fcntl, no resource and no SIGUSR1/SIGHUP/SIGQUIT: importing the modules `train`
    and `launch` need, and creating the StopFlag every run creates first, must not fail there."""
    code = (
        "import signal, sys\n"
        "for n in ('SIGUSR1', 'SIGUSR2', 'SIGHUP', 'SIGQUIT'): delattr(signal, n)\n"
        "sys.modules['fcntl'] = sys.modules['resource'] = None\n"
        "from scaletune import runlock, metrics, launch, outdir, stopflag\n"
        "from scaletune.data.encode import _quiet_worker\n"
        "f = stopflag.StopFlag(); f.settle(); _quiet_worker()\n"
        "assert stopflag.STOP_SIGNALS == (signal.SIGTERM,), stopflag.STOP_SIGNALS\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_training_collate_pickles_for_spawned_dataloader_workers(make_config, monkeypatch):
    """macOS and Windows start DataLoader workers with spawn, which pickles collate_fn: a lambda failed with
    "Can't pickle local object 'fit.<locals>.<lambda>'" at the first batch whenever data.num_workers > 0."""
    from scaletune import loop
    from scaletune.config import load_config
    from scaletune.stopflag import StopFlag
    from scaletune.train import setup

    seen = []

    class Captured(Exception):
        pass

    def capture(dataset, collate, **kw):
        seen.append(collate)
        raise Captured

    run, _ = setup(load_config(make_config("causal_lm", n=16, train={"global_batch_size": 8, "micro_batch_size": 8,
                                                                        "max_steps": 1})))
    monkeypatch.setattr(loop, "StepBatches", capture)
    with pytest.raises(Captured):
        loop.fit(run, StopFlag())
    collate = pickle.loads(pickle.dumps(seen[0]))
    batch = collate([run.data["train"][0], run.data["train"][1]])
    assert batch["input_ids"].shape[0] == 2


def test_tokenising_workers_are_forked_on_linux_only(monkeypatch):
    """macOS: a fork of a process that has loaded torch and the system's frameworks may crash (Python's default
    there is spawn), and the workers need fork (they inherit the records): elsewhere the data is tokenised in
    this process."""
    from scaletune.data import encode as data

    monkeypatch.setattr(sys, "platform", "darwin")
    with data._workers(2) as pool:
        assert pool is None
    monkeypatch.setattr(sys, "platform", "linux")
    with data._workers(2) as pool:
        assert pool is not None and pool.submit(int, "7").result() == 7
