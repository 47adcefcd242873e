"""Security properties: remote code off by default, safetensors/JSON only on disk, no unsafe loaders,
no eval/exec, and training writes nowhere but output_dir and the cache."""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

from scaletune.cli import main

SRC = Path(__file__).resolve().parents[2] / "src" / "scaletune"


def _trees():
    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _name(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


# (1) trust_remote_code ---------------------------------------------------------------------------

def test_trust_remote_code_is_off_by_default(tmp_path):
    from scaletune.config import ModelConfig, from_dict

    assert ModelConfig.__dataclass_fields__["trust_remote_code"].default is False
    cfg = from_dict({"task": "causal_lm", "model": {"name_or_path": "x/y"}, "data": {"train": "t.jsonl"}})
    assert cfg.model.trust_remote_code is False


def _capture_from_pretrained(monkeypatch):
    import transformers

    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        orig = cls.from_pretrained.__func__

        def spy(klass, *a, _orig=orig, **kw):
            seen.append((klass.__name__, kw.get("trust_remote_code", "absent")))
            return _orig(klass, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return seen


def test_model_loading_passes_trust_remote_code_false_and_warns_when_on(monkeypatch, caplog, make_config):
    from scaletune.config import load_config
    from scaletune.model import load_model, load_tokenizer
    from scaletune.tasks import get_task

    seen = _capture_from_pretrained(monkeypatch)
    cfg = load_config(make_config("causal_lm"))
    with caplog.at_level(logging.WARNING, logger="scaletune"):
        tok = load_tokenizer(cfg)
        load_model(cfg, get_task("causal_lm"), None, tok)
    assert {v for _, v in seen} == {False}, seen  # passed explicitly, as False
    assert not [r for r in caplog.records if "trust_remote_code" in r.getMessage()]

    seen.clear()
    caplog.clear()
    cfg.model.trust_remote_code = True
    with caplog.at_level(logging.WARNING, logger="scaletune"):
        load_model(cfg, get_task("causal_lm"), None, tok)
    assert {v for _, v in seen} == {True}
    loud = [r for r in caplog.records if "trust_remote_code is ON" in r.getMessage()]
    assert loud and loud[0].levelno >= logging.WARNING


def test_a_models_own_code_runs_only_when_allowed_and_after_the_warning(tiny_llama, tmp_path, caplog):
    """A model directory (a colleague's, a download) whose config.json and tokenizer_config.json name code of
    its own (auto_map): without the flag that code never runs, the library's classes load the model; with it,
    the loud warning comes before the code runs. It came at the weights' load, after the tokenizer's (and
    config's) load had run the model's code."""
    import json
    import shutil

    from scaletune.config import load_config
    from scaletune.model import load_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    for name, auto_map in (("config.json", {"AutoConfig": "own.Config"}),
                           ("tokenizer_config.json", {"AutoTokenizer": [None, "own.Tokenizer"]})):
        conf = json.loads((model / name).read_text())
        (model / name).write_text(json.dumps({**conf, "auto_map": auto_map}))
    # (subclasses: transformers marks the class it loads as the model's own, and would then save the library's
    # own classes' code with every later tokenizer and config)
    (model / "own.py").write_text("import logging\nfrom transformers import LlamaConfig, PreTrainedTokenizerFast\n"
                                  "logging.getLogger('scaletune').warning('MODEL CODE RAN')\n"
                                  "class Config(LlamaConfig):\n    pass\n"
                                  "class Tokenizer(PreTrainedTokenizerFast):\n    pass\n")
    (tmp_path / "t.jsonl").write_text('{"text": "a b c"}\n')
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"task": "causal_lm", "model": {"name_or_path": str(model)},
                                      "data": {"train": str(tmp_path / "t.jsonl")}, "output_dir": str(tmp_path / "o")}))
    with caplog.at_level(logging.WARNING, logger="scaletune"):
        load_tokenizer(load_config(config))
        assert not [r for r in caplog.records if r.getMessage() in ("MODEL CODE RAN",) or "!!!" in r.getMessage()]
        load_tokenizer(load_config(config, ["model.trust_remote_code=true"]))
    said = [r.getMessage() for r in caplog.records]
    assert "MODEL CODE RAN" in said, said
    assert any("trust_remote_code is ON" in m for m in said[:said.index("MODEL CODE RAN")]), said


def test_an_adapter_bin_that_would_run_code_is_refused_unread(make_config, tmp_path, capsys):
    """An adapter from elsewhere may come as adapter_model.bin, a pickle: peft reads it with torch's weights-only
    unpickler, which refuses one that calls a function. `predict` says so in one error (it was a traceback)."""
    import torch

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    path = make_config("causal_lm", n=16, train={"max_steps": 1})
    out = tmp_path / "run"
    assert main(["train", str(path), f"output_dir={out}"]) == 0
    (out / "adapter" / "adapter_model.safetensors").unlink()
    torch.save({"w": Payload()}, out / "adapter" / "adapter_model.bin")
    (tmp_path / "in.jsonl").write_text('{"text": "a b"}\n')
    capsys.readouterr()
    assert main(["predict", str(out), "--input", str(tmp_path / "in.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.bin is not plain tensors" in err and "GLOBAL" in err and "Traceback" not in err, err
    assert not (tmp_path / "ran").exists()


# (2)+(5) one short real training run: file types, and where it writes --------------------------

def _snapshot(root: Path) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out[p] = (st.st_mtime_ns, st.st_size)
    return out


def test_training_writes_only_safe_formats_and_only_inside_output_dir_and_cache(make_config, tmp_path):
    cfg_path = make_config("causal_lm", n=32, train={"save_every": 2, "max_steps": 4},
                           data={"cache": True})  # the cache on: its writes must land in SCALETUNE_CACHE
    raw = yaml.safe_load(cfg_path.read_text())
    out = Path(raw["output_dir"])
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    # everything the run can see lives under tmp_path (config, data, output) or the tiny model's tmp dir
    roots = [tmp_path, Path(raw["model"]["name_or_path"])]
    before = {k: v for r in roots for k, v in _snapshot(r).items()}
    env = {**os.environ, "HOME": str(home), "SCALETUNE_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "SCALETUNE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(cache / "hf"), "XDG_CACHE_HOME": str(cache / "xdg"), "MPLCONFIGDIR": str(cache / "mpl")}
    res = subprocess.run([sys.executable, "-m", "scaletune", "train", str(cfg_path)], capture_output=True, text=True,
                         env=env, cwd=str(home), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    after = {k: v for r in roots for k, v in _snapshot(r).items()}
    changed = [p for p, v in after.items() if before.get(p) != v]
    outside = [p for p in changed if not (p.is_relative_to(out) or p.is_relative_to(cache))]
    assert not outside, f"files written outside output_dir and the cache: {outside}"
    assert any(p.is_relative_to(out) for p in changed)

    # (2) checkpoints and adapters: safetensors / JSON (+ tokenizer files, peft README, `latest`) only
    allowed_suffixes = {".safetensors", ".json"}
    allowed_names = {"latest", "README.md", "tokenizer.model", "merges.txt", "vocab.txt"}
    files = [p for d in ("checkpoints", "adapter") for p in (out / d).rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert (out / "checkpoints" / "latest").is_file()
    unsafe = [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}]
    assert not unsafe, unsafe
    odd = [p for p in files if p.suffix not in allowed_suffixes and p.name not in allowed_names]
    assert not odd, odd
    # nothing pickled anywhere in the run directory either
    assert not [p for p in out.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle"}]


# (3)+(4) static scans of src/ -----------------------------------------------------------------------

def test_every_torch_load_uses_weights_only_true():
    offenders = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node.func).endswith("torch.load"):
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    offenders.append(f"{path}:{node.lineno}")
            if isinstance(node, ast.Call) and _name(node.func) in ("pickle.load", "pickle.loads", "dill.load"):
                offenders.append(f"{path}:{node.lineno} ({_name(node.func)})")
    assert not offenders, offenders


def test_no_eval_or_exec_and_yaml_is_safe_loaded():
    offenders = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            if name in ("eval", "exec", "builtins.eval", "builtins.exec", "compile"):
                offenders.append(f"{path}:{node.lineno}: {name}(")
            if name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
                loader = {k.arg: _name(k.value) for k in node.keywords}.get("Loader", "")
                if len(node.args) > 1:
                    loader = _name(node.args[1])
                if "SafeLoader" not in loader:
                    offenders.append(f"{path}:{node.lineno}: {name} without SafeLoader")
    assert not offenders, offenders
    reader = (SRC / "config_file.py").read_text()  # the run config's YAML: a SafeLoader, overrides safe_load
    assert "(yaml.SafeLoader)" in reader and "yaml.safe_load(" in reader


def test_yaml_python_tags_are_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"task: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["train", str(cfg)]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    assert not marker.exists()


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    """Nine levels of ten aliases: a 400-byte file that stands for 10**9 strings. Every walk over the config
    (validation, an error quoting the value) wrote them all out: minutes of CPU and gigabytes before any
    message. A self-referencing alias is refused too. Ordinary aliases (a shared block) still load."""
    import time

    levels = ['a0: &a0 "x"'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\ntask: causal_lm\ndata: {train: *a9}\n")
    start = time.monotonic()
    assert main(["plan", str(bomb)]) == 2
    err = capsys.readouterr().err
    assert "holds more than 100,000 values (each use of a YAML alias" in err and time.monotonic() - start < 5, err
    # the same within one command-line override's value
    levels = ["&v0 x"] + [f"&v{i} [{', '.join([f'*v{i - 1}'] * 10)}]" for i in range(1, 7)]
    plain = tmp_path / "plain.yaml"
    plain.write_text("task: causal_lm\ndata: {train: t.jsonl}\n")
    assert main(["plan", str(plain), f"data.train=[{', '.join(levels)}]"]) == 2
    assert "holds more than 100,000 values" in capsys.readouterr().err
    loop = tmp_path / "loop.yaml"
    loop.write_text("task: causal_lm\ndata: {train: &t [*t]}\n")
    assert main(["plan", str(loop)]) == 2
    assert "refers to a value that holds it" in capsys.readouterr().err
    # and within an override's value: refused, not a RecursionError traceback from the walks after it
    assert main(["plan", str(plain), "data.train=&t [*t]"]) == 2
    assert "override 'data.train=&t [*t]'" in capsys.readouterr().err
    shared = tmp_path / "shared.yaml"
    shared.write_text("base: &b {r: 4}\ntask: causal_lm\npeft: *b\n")
    from scaletune.config_file import read_yaml

    assert read_yaml(shared)[0]["peft"] == {"r": 4}


def test_report_replaces_a_link_planted_at_report_html(tmp_path):
    """A link at RUN_DIR/report.html (a group-writable run directory) must not make `scaletune report`
    overwrite the file it names."""
    import json

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {"task": "causal_lm"}, "started": 1}))
    (run / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1, "time": 1.0, "loss": 2.0}) + "\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run / "report.html").symlink_to(victim)
    assert main(["report", str(run)]) == 0
    assert victim.read_text() == "precious"
    assert not (run / "report.html").is_symlink() and "<html" in (run / "report.html").read_text().lower()


def test_overwrite_takes_only_a_directory_holding_nothing_but_a_run(make_config, tmp_path, capsys):
    """--overwrite sets the old output_dir aside and deletes it, all of it, once the new run finishes. A home or
    project directory with some tool's checkpoints/ (or adapter/) counted as a run: the user's files went with
    it. Now it must hold a run.json scaletune wrote and nothing scaletune did not write; else it is refused,
    naming what is there, and nothing moves."""
    path = make_config("causal_lm", n=16, train={"max_steps": 1})
    home = tmp_path / "home"
    (home / "checkpoints").mkdir(parents=True)
    (home / "thesis.tex").write_text("precious")
    capsys.readouterr()
    assert main(["train", str(path), f"output_dir={home}", "--overwrite"]) == 2
    assert "it holds files scaletune did not write (thesis.tex)" in capsys.readouterr().err
    tool = tmp_path / "tool"
    (tool / "checkpoints").mkdir(parents=True)
    assert main(["train", str(path), f"output_dir={tool}", "--overwrite"]) == 2
    assert "it has no run.json (not a scaletune run's output)" in capsys.readouterr().err
    (tool / "run.json").write_text("{}")
    assert main(["train", str(path), f"output_dir={tool}", "--overwrite"]) == 2
    assert "its run.json was not written by scaletune" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["train", str(path), f"output_dir={out}"]) == 0
    (out / "notes.txt").write_text("the user's, beside the run")
    capsys.readouterr()
    assert main(["train", str(path), f"output_dir={out}", "--overwrite"]) == 2
    assert "it holds files scaletune did not write (notes.txt)" in capsys.readouterr().err
    assert (home / "thesis.tex").read_text() == "precious" and (out / "notes.txt").exists()
    assert not list(tmp_path.glob(".*.replaced-*"))


def test_the_replaced_run_record_names_only_the_output_dirs_own_siblings(tmp_path):
    """.replaced_run is a file in output_dir (copied with it, editable), and the runs it names are deleted when
    the run finishes: a `.x.replaced-y` directory elsewhere, or a link, is not this run's to delete."""
    from scaletune.outdir import discard_replaced, replaced_runs

    out = tmp_path / "runs" / "run"
    out.mkdir(parents=True)
    other = tmp_path / "someone" / ".data.replaced-x"
    other.mkdir(parents=True)
    (other / "f").write_text("precious")
    own = tmp_path / "runs" / ".run.replaced-20260101-000000"
    own.mkdir()
    link = tmp_path / "runs" / ".run.replaced-20260101-000001"
    link.symlink_to(other, target_is_directory=True)
    (out / ".replaced_run").write_text(f"{other}\n{own}\n{link}\n")
    assert replaced_runs(out) == [own]
    discard_replaced(out)
    assert (other / "f").exists() and not own.exists() and link.is_symlink()


def test_a_recorded_run_of_the_same_name_in_another_directory_is_not_deleted(tmp_path):
    """A run directory copied elsewhere takes its .replaced_run along: the `.run.replaced-...` it names beside
    the old place is the original's set-aside run, not one of this copy's siblings, and is not deleted."""
    from scaletune.outdir import replaced_runs

    out = tmp_path / "copy" / "run"
    out.mkdir(parents=True)
    theirs = tmp_path / "original" / ".run.replaced-20260101-000000"
    theirs.mkdir(parents=True)
    own = tmp_path / "copy" / ".run.replaced-20260101-000000"
    own.mkdir()
    (out / ".replaced_run").write_text(f"{theirs}\n{own}\n")
    assert replaced_runs(out) == [own]


def test_links_planted_where_a_run_writes_are_refused_before_anything_is_written(make_config, tmp_path, capsys):
    """A run directory from someone else (copied, unpacked) may hold links where a run writes its own files:
    `train --resume auto` there truncated and rewrote the file a `.scaletune.lock` link named (the lock is taken
    first), and appended metrics to the one a `metrics.jsonl` link named (~/.bashrc, say). Each is refused, one
    error naming the link, its target untouched; a checkpoints/ link to a directory (storage elsewhere) is not."""
    import json

    path = make_config("causal_lm", n=16, train={"max_steps": 1})
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"config": {}, "started": "x"}))
    (out / ".scaletune.lock").symlink_to(victim)
    capsys.readouterr()
    assert main(["train", str(path), f"output_dir={out}", "--resume", "auto"]) == 2
    assert ".scaletune.lock is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "precious"
    (out / ".scaletune.lock").unlink()
    (out / "metrics.jsonl").symlink_to(victim)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (out / "checkpoints").symlink_to(scratch, target_is_directory=True)
    assert main(["train", str(path), f"output_dir={out}", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert f"symbolic links where a run writes its own files (metrics.jsonl -> {victim})" in err
    assert "checkpoints ->" not in err and victim.read_text() == "precious"


def test_the_temporary_files_beside_latest_and_run_json_are_not_written_through(tmp_path):
    """`checkpoints/.latest.tmp` and `run.json.tmp` are written, then moved over `latest` / `run.json`: a link
    left at that name (inside a linked checkpoints/, which a run accepts) overwrote the file it named."""
    from scaletune.checkpoint import _write_latest
    from scaletune.tracking import _replace_json

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / ".latest.tmp").symlink_to(victim)
    _write_latest(out, out / "checkpoints" / "step-4")
    (out / "run.json.tmp").symlink_to(victim)
    _replace_json(out / "run.json", {"a": 1})
    assert victim.read_text() == "precious"
    assert (out / "checkpoints" / "latest").read_text() == "step-4\n" and not (out / "checkpoints" / "latest").is_symlink()
    assert (out / "run.json").read_text().startswith("{") and not (out / "run.json").is_symlink()
