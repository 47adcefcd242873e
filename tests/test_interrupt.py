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
    from scaletune.data import _workers

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
