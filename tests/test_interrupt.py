"""Ctrl-C while the data is tokenised by worker processes ends the command (found by a concurrency
helper: `scaletune train` printed "interrupted" and then hung for good, about one time in five)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# The real CLI with a command whose work is a tokenising pool interrupted while its workers write large
# results back: a worker killed mid-write leaves the pool's manager thread reading the rest for ever, and
# a plain interpreter exit joins that thread (the delays are where it hung here, on 2 cores).
SCRIPT = textwrap.dedent("""
    import sys, time
    import scaletune.cli as cli
    from scaletune.data.encode import _workers

    def piece(_):
        return b"x" * (400 << 20)

    delay = float(sys.argv[1])

    def interrupted_tokenising(args):
        with _workers(2) as pool:
            for i in range(2):
                pool.submit(piece, i)
            time.sleep(delay)
            raise KeyboardInterrupt

    cli.dispatch = interrupted_tokenising
    sys.argv = ["scaletune", "plan", "run.yaml"]
    sys.exit(cli.main())
""")


@pytest.mark.parametrize("delay", [0.5, 1.5, 2.0])
def test_an_interrupt_while_tokenising_ends_the_command(delay, tmp_path):
    script = tmp_path / "interrupt.py"
    script.write_text(SCRIPT)
    try:
        done = subprocess.run([sys.executable, str(script), str(delay)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the interrupted command did not exit")
    assert done.returncode == 130 and "interrupted" in done.stderr, done.stderr


@pytest.fixture()
def signals_kept():
    """The test process's own INT/USR1/TERM handlers, put back after a test that installs a StopFlag."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_ctrl_c_in_the_loop_is_one_stop_a_second_one_interrupts(signals_kept, capfd):
    """The first Ctrl-C asks for a checkpoint at the step's end, saying so once; a launcher's SIGTERM after it
    does not rename the stop; a second Ctrl-C interrupts."""
    import os
    import signal

    from scaletune import stopflag

    flag = stopflag.StopFlag()
    flag.catch_interrupts()
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.signal == signal.SIGINT
    assert capfd.readouterr().err.count("Ctrl-C: stopping at the end of this step") == 1
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    flag.release_interrupts()
    assert signal.getsignal(signal.SIGINT) is not flag._interrupt


def test_the_loop_gives_ctrl_c_back_to_the_handler_it_had(signals_kept):
    """Once the loop ends (`release_interrupts`, or `settle` after the final save) Ctrl-C does what it did before:
    the handler SIGINT had then, not Python's default in its place; catching twice does not take the loop's own
    handler for the earlier one; and a later loop in the same process (the demo's) catches Ctrl-C again."""
    import signal

    from scaletune.stopflag import StopFlag

    def before(signum, frame):
        pass

    signal.signal(signal.SIGINT, before)
    flag = StopFlag()
    flag.catch_interrupts()
    flag.catch_interrupts()
    assert signal.getsignal(signal.SIGINT) == flag._interrupt
    flag.release_interrupts()
    assert signal.getsignal(signal.SIGINT) is before
    flag.catch_interrupts()
    assert signal.getsignal(signal.SIGINT) == flag._interrupt
    flag.settle()
    assert signal.getsignal(signal.SIGINT) is before


def test_only_the_first_rank_says_it_stops_on_ctrl_c(signals_kept, capfd, monkeypatch):
    """Every rank of a launch gets the Ctrl-C and stops on it; the line saying so comes from rank 0 alone."""
    import os
    import signal

    from scaletune.stopflag import StopFlag

    monkeypatch.setenv("RANK", "2")
    flag = StopFlag()
    flag.catch_interrupts()
    os.kill(os.getpid(), signal.SIGINT)
    flag.release_interrupts()
    assert flag.signal == signal.SIGINT and "Ctrl-C" not in capfd.readouterr().err


def test_a_one_process_launch_passes_its_first_ctrl_c_on_as_a_stop(monkeypatch):
    """The rank of a one-process launch gets the terminal's Ctrl-C itself; the launcher's copy, passed on as
    SIGINT, reached it too, a second Ctrl-C (an abort without checkpoint) whenever it landed after the first
    was handled. The launcher passes its first on as SIGTERM (a stop, which a SIGINT sent to the launcher alone
    still needs), later ones as SIGINT."""
    import signal
    import time

    from scaletune import launch

    sent = []
    monkeypatch.setattr(launch, "rank_pids", lambda parent: [4242])
    monkeypatch.setattr(launch, "catches", lambda pid, signum: True)
    monkeypatch.setattr(launch.os, "kill", lambda pid, signum: sent.append((pid, signum)))
    passer = launch._PassOn(first_as=signal.SIGTERM)
    try:
        passer.handler(signal.SIGINT, None)
        deadline = time.monotonic() + 5
        while not sent and time.monotonic() < deadline:
            time.sleep(0.05)
        passer.handler(signal.SIGINT, None)
        while len(sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        passer.stop()
    assert sent == [(4242, signal.SIGTERM), (4242, signal.SIGINT)]


def test_an_ignored_sigint_stays_ignored_and_forked_workers_keep_quiet(signals_kept, capfd):
    """A run started with SIGINT ignored (`cmd &` in a script) does not begin stopping on it with the loop; and
    DataLoader workers, forked after the loop caught Ctrl-C, inherit the handler: each printed the line."""
    import os
    import signal

    from scaletune.stopflag import StopFlag

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    flag = StopFlag()
    flag.catch_interrupts()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    signal.signal(signal.SIGINT, signal.default_int_handler)
    flag = StopFlag()
    flag.catch_interrupts()
    pid = os.fork()
    if pid == 0:  # a worker: the terminal's Ctrl-C reaches it too
        try:
            flag._interrupt(signal.SIGINT, None)
        finally:
            os._exit(0 if flag.signal is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and "Ctrl-C" not in capfd.readouterr().err
    flag.release_interrupts()


def test_the_demo_stopped_by_ctrl_c_is_not_reported_as_finished(monkeypatch, tmp_path, capsys):
    """The demo went on after a Ctrl-C stop: it scored the half-trained model, named an adapter never written
    and exited 0."""
    import signal

    import scaletune.loop as loop
    from scaletune.demo import run_demo

    monkeypatch.setattr(loop, "fit", lambda run, stop: setattr(stop, "signal", signal.SIGINT) or "preempted")
    assert run_demo(str(tmp_path / "demo"), steps=2) == 130
    out = capsys.readouterr().out
    assert "held-out set" not in out and "stopped at step 0 of 2" in out, out[-1500:]
    # the command to start it again is this demo's (its --out and --steps), not a bare `scaletune demo` into runs/demo
    assert f"run `scaletune demo --out {tmp_path / 'demo'} --steps 2` to start it again" in out, out[-1500:]
