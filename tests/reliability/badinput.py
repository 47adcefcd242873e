"""What the bad-input tests (issue 8) share: test_bad_input.py (run configs, overrides, command lines) and
test_bad_input_files.py (data files, model directories, output_dir and checkpoints).

Every case must end with exit code 2 and a one-screen message (<= 25 lines from "error:") naming the
key / file / line, never a traceback, and must leave output_dir as it was (absent, or byte-identical).
The number of cases a module tried is printed at its end (`bad-input cases tried: N (module)`).
A test module takes the fixtures by name: `world = badinput.world`, `_report_count = badinput._report_count`.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from scaletune.cli import main

from stutil import alpaca_records, cls_records, ner_records, write_jsonl

HYP = settings(derandomize=True, deadline=None, max_examples=30, database=None,
               suppress_health_check=list(HealthCheck))
TRIED = {"n": 0}
_ids = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def _report_count(request):
    start = TRIED["n"]  # (the count is shared by the modules: one process may run both)
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    line = f"bad-input cases tried: {TRIED['n'] - start} ({request.module.__name__})"
    if tr is not None:
        tr.write_line(line)
    else:
        print(line)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama, tiny_bert):
    root = tmp_path_factory.mktemp("bad_input")
    old = os.environ.get("SCALETUNE_CACHE")
    os.environ["SCALETUNE_CACHE"] = str(root / "cache")
    good = {"causal_lm": write_jsonl(root / "alpaca.jsonl", alpaca_records(16)),
            "seq_cls": write_jsonl(root / "cls.jsonl", cls_records(16)),
            "token_cls": write_jsonl(root / "ner.jsonl", ner_records(16))}
    models = {"causal_lm": tiny_llama, "seq_cls": tiny_bert, "token_cls": tiny_bert}
    yield {"root": root, "good": good, "models": models}
    if old is None:
        os.environ.pop("SCALETUNE_CACHE", None)
    else:
        os.environ["SCALETUNE_CACHE"] = old


def base_raw(world, task="causal_lm") -> dict:
    n = next(_ids)
    return {"task": task, "model": {"name_or_path": str(world["models"][task]), "dtype": "float32"},
            "peft": {"method": "lora", "r": 4, "target_modules": "all-linear"},
            "data": {"train": str(world["good"][task]), "max_length": 160, "cache": False},
            "train": {"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 2, "mixed_precision": "no",
                      "report_to": [], "eval_every": None, "save_every": None, "warmup_ratio": 0.0},
            "output_dir": str(world["root"] / f"out{n}")}


def snapshot(path: Path):
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(path.rglob("*"))}


def run_main(args) -> tuple[int, str]:
    err = io.StringIO()
    # stdout is left alone: infer.run_predict binds `out=sys.stdout` when first imported
    with contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    return code, err.getvalue()


def check_clean(code, err: str, *fragments: str) -> None:
    assert code == 2, f"exit {code}\n{err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    start = next((i for i, ln in enumerate(lines) if "error:" in ln), None)
    assert start is not None, err
    assert len(lines[start:]) <= 25, err
    for f in fragments:
        assert f in err, f"{f!r} not in:\n{err}"


def expect_bad(world, raw_or_text, *fragments, args=(), cmd="train", out_dir=None) -> str:
    """Write the config, run the CLI in-process, check exit 2 / message / output_dir untouched."""
    TRIED["n"] += 1
    path = world["root"] / f"cfg{next(_ids)}.yaml"
    if isinstance(raw_or_text, dict):
        path.write_text(yaml.safe_dump(raw_or_text, sort_keys=False))
        if out_dir is None and isinstance(raw_or_text.get("output_dir"), str) and raw_or_text["output_dir"]:
            out_dir = raw_or_text["output_dir"]
    elif isinstance(raw_or_text, bytes):
        path.write_bytes(raw_or_text)
    elif isinstance(raw_or_text, str):
        path.write_text(raw_or_text)
    else:  # a Path: use as the config path itself
        path = raw_or_text
    out_dir = Path(out_dir) if out_dir else world["root"] / "never"
    before = snapshot(out_dir)
    code, err = run_main([cmd, path, *args])
    check_clean(code, err, *fragments)
    assert snapshot(out_dir) == before, f"{out_dir} changed by a failing command"
    return err


def mutate(raw: dict, dotted: str, value) -> dict:
    node = raw
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return raw


_DELETE = object()


WORD = st.text(alphabet=string.ascii_letters + "_", min_size=1, max_size=10)
