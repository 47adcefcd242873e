"""Shared fixtures: tiny models built from configs and small synthetic data files (no downloads)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import yaml

# One compute thread per test process: the suite runs on one xdist worker per core and many tests start
# 2-process worlds, so torch's default (a thread per core, spin-waiting) oversubscribes the machine
# (measured: the demo test took 204 s beside a 2-process test instead of 24 s alone).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("SCALETUNE_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The Ctrl-C tests press Ctrl-C as at a terminal. A suite started in the background of a script (`cmd &`, as
# some CI runners do) inherits SIGINT ignored, which every run it starts would keep, as scaletune means to for
# such a run: the tests' processes take Ctrl-C as a terminal's foreground would.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from stutil import (  # noqa: F401,E402
    alpaca_records,
    cls_records,
    corpus,
    dpo_records,
    kto_records,
    ner_records,
    override,
    reg_records,
    tiny_lora_run,
    write_jsonl,
)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from scaletune.demo.tiny import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("models") / "llama", corpus(), arch="llama", hidden=32,
                           layers=2, heads=2, vocab_size=256)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from scaletune.demo.tiny import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("models") / "bert", corpus(), arch="bert", hidden=32,
                           layers=2, heads=2, vocab_size=256)


@pytest.fixture()
def make_config(tmp_path, tiny_llama, tiny_bert):
    """Write a small run config (task + overrides) to tmp and return its path."""

    def make(task: str = "causal_lm", *, n: int = 64, **sections) -> Path:
        data_dir = tmp_path / "data"
        data_dir.mkdir(exist_ok=True)
        if task == "causal_lm":
            train = write_jsonl(data_dir / "train.jsonl", alpaca_records(n))
            evalf = write_jsonl(data_dir / "eval.jsonl", alpaca_records(16, seed=1))
        elif task in ("dpo", "reward"):
            train = write_jsonl(data_dir / "train.jsonl", dpo_records(n))
            evalf = write_jsonl(data_dir / "eval.jsonl", dpo_records(16, seed=1))
        elif task == "kto":
            train = write_jsonl(data_dir / "train.jsonl", kto_records(n))
            evalf = write_jsonl(data_dir / "eval.jsonl", kto_records(16, seed=1))
        elif task == "seq_cls":
            train = write_jsonl(data_dir / "train.jsonl", cls_records(n))
            evalf = write_jsonl(data_dir / "eval.jsonl", cls_records(16, seed=1))
        elif task == "seq_regression":
            train = write_jsonl(data_dir / "train.jsonl", reg_records(n))
            evalf = write_jsonl(data_dir / "eval.jsonl", reg_records(16, seed=1))
        else:
            train = write_jsonl(data_dir / "train.jsonl", ner_records(n))
            evalf = write_jsonl(data_dir / "eval.jsonl", ner_records(16, seed=1))
        model = tiny_llama if task in ("causal_lm", "dpo", "kto", "reward") else tiny_bert
        raw = tiny_lora_run(model, train, task=task, data={"eval": str(evalf)}, train={"micro_batch_size": 4},
                            output_dir=str(tmp_path / "run"))
        raw = override(raw, **sections)
        path = tmp_path / f"{task}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return make


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: `-n auto`'s worker count
def pytest_xdist_auto_num_workers(config) -> int | None:
    """One worker more than the CPUs this process may use (PYTEST_XDIST_AUTO_NUM_WORKERS still decides where
    set). Part of the suite waits rather than computes (launchers and ranks starting, Slurm jobs queueing,
    signals and sleeps), so with a worker per core the CPUs sat partly idle: on the 2-core machine the same
    1954 tests took 17m30s with 2 workers and 16m55s with 3 on fresh clones (15m27s with 3 in a used venv)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cpus + 1


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: used when the suite runs with `-n`
def pytest_xdist_make_scheduler(config, log):
    """Distribute tests over xdist workers, keeping together what shares an expensive fixture.

    The sub-suites (tests/distributed, tests/reliability, tests/slurm) launch multi-process reference
    runs in module-scoped fixtures: each of their files runs whole on one worker, so no run is launched
    twice, and all of tests/slurm runs on one worker (the local cluster is one session fixture; two
    workers must not start two clusters). Top-level test files have no shared state and go test by
    test. (`xdist_group` marks would say the same, but pytest 9.2 changed node ids under xdist 3.8.)
    """
    from xdist.scheduler import LoadScopeScheduling

    class SuiteScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            if path.startswith("tests/slurm/"):
                return "tests/slurm"
            return path if path.count("/") >= 2 else nodeid

    return SuiteScheduling(config, log)


# DeepSpeed JIT-compiles a shared-memory comm op the first time a process group starts (~90 CPU-s, once
# per environment; training never uses it, and there is no switch to skip it). Started here, in the
# background on one core, it is built while the first tests run; otherwise the first two DeepSpeed tests
# build it and wait for each other's lock with a worker idle (torch's extension lock makes a test that
# needs it meanwhile wait, then load the cached build).
_PREBUILD = (
    "from deepspeed.accelerator import get_accelerator\n"
    "b = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
    "import deepspeed.ops\n"
    "if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False):\n"
    "    b.load(verbose=False)\n"
)


def pytest_sessionstart(session):
    import importlib.util
    import subprocess
    import sys

    config = session.config
    if hasattr(config, "workerinput") or importlib.util.find_spec("deepspeed") is None:
        return  # an xdist worker (the controller starts it), or no DeepSpeed
    if "not distributed" in (config.getoption("markexpr", "") or "") or config.getoption("collectonly", False):
        return
    wanted = ("distributed", "reliability", "slurm", "test_plan")
    if config.args and not any(a.rstrip("/").endswith("tests") or any(w in a for w in wanted)
                               for a in map(str, config.args)):
        return  # a run of some fast test files only
    subprocess.Popen([sys.executable, "-c", _PREBUILD], env={**os.environ, "MAX_JOBS": "1"},
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
