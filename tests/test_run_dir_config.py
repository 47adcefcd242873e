"""A run's output directory in place of its YAML (`scaletune eval OUTPUT_DIR`): run.json's config, relative
paths read from where the run started, output_dir the directory given, overrides on top; refusals for a
directory that is no run."""

from __future__ import annotations

import json
import os
import shutil

import yaml

from stutil import assert_clean_error, run_cli


def _relative_run(make_config, tmp_path, monkeypatch, capsys, task="causal_lm"):
    """A run trained from tmp_path with its data, model and output_dir given as relative paths (and an
    override): what a user's `cd project && scaletune train run.yaml k=v` records."""
    path = make_config(task)
    raw = yaml.safe_load(path.read_text())
    for section, key in (("data", "train"), ("data", "eval"), ("model", "name_or_path")):
        raw[section][key] = os.path.relpath(raw[section][key], tmp_path)
    raw["output_dir"] = "runs/first"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["train", path.name, "train.max_steps=3", "train.learning_rate=1e-3"], capsys)
    assert code == 0, err
    return path, tmp_path / "runs" / "first"


def _resume_from_elsewhere(run, where, monkeypatch, capsys) -> None:
    """`train RUN --resume auto train.max_steps=5` from directory `where`: it goes on from the run's step-3
    checkpoint (its config not refused as another run's)."""
    monkeypatch.chdir(where)
    code, _, err = run_cli(["train", str(run), "--resume", "auto", "train.max_steps=5"], capsys)
    assert code == 0, err
    assert "checkpoints/step-3" in json.loads((run / "run.json").read_text())["resumed_from"]


def test_eval_of_a_run_directory_from_elsewhere_is_the_runs_eval(make_config, tmp_path, monkeypatch, capsys):
    path, run = _relative_run(make_config, tmp_path, monkeypatch, capsys)
    code, out, err = run_cli(["eval", path.name, "train.max_steps=3", "train.learning_rate=1e-3", "--json"], capsys)
    assert code == 0, err
    expected = json.loads(out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the relative data and model paths do not exist from here
    code, out, err = run_cli(["eval", str(run), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out) == expected
    # a moved run finds its own adapter (output_dir is the directory given, not the recorded one)
    moved = tmp_path / "moved"
    shutil.move(str(run), moved)
    code, out, err = run_cli(["eval", str(moved), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out) == expected
    # overrides apply on top: another eval set
    other = tmp_path / "other.jsonl"
    other.write_text((tmp_path / "data" / "eval.jsonl").read_text().split("\n", 1)[0] + "\n")
    code, out, err = run_cli(["eval", str(moved), f"data.eval={other}", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["loss"] != expected["loss"]
    # predict reads it the same way
    prompt = tmp_path / "prompt.jsonl"
    prompt.write_text(json.dumps({"instruction": "Add 2 and 5."}) + "\n")
    code, out, err = run_cli(["predict", str(moved), "--input", str(prompt), "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    assert json.loads(out.splitlines()[0])["prompt"] == "Add 2 and 5."


def test_train_resumes_from_its_run_directory(make_config, tmp_path, monkeypatch, capsys):
    """`scaletune train OUTPUT_DIR --resume auto`: the run's own config goes on (its paths made absolute are
    the same files, so the checkpoint is no foreign run's)."""
    _, run = _relative_run(make_config, tmp_path, monkeypatch, capsys)
    _resume_from_elsewhere(run, tmp_path / "data", monkeypatch, capsys)
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 5


def test_a_directory_that_is_no_run_is_refused_in_one_screen(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(["eval", str(empty)], capsys)
    assert_clean_error(code, err, f"run config {empty}: is a directory, expected a YAML file (or a run's output "
                                  "directory, which holds run.json)")
    (empty / "run.json").write_text("{not json")
    code, _, err = run_cli(["eval", str(empty)], capsys)
    assert_clean_error(code, err, f"run config {empty}: a run's output directory, but its run.json is unreadable")
    (empty / "run.json").write_text(json.dumps({"versions": {}}))
    code, _, err = run_cli(["eval", str(empty)], capsys)
    assert_clean_error(code, err, f"run config {empty}: a run's output directory, but its run.json has no 'config' "
                                  "mapping")


def test_train_resumes_a_run_with_a_relative_pattern_item_from_elsewhere(make_config, tmp_path, monkeypatch,
                                                                         capsys):
    """data.train's {path: pattern, weight} item, relative: `train OUTPUT_DIR --resume auto` from another
    directory makes the pattern absolute, and the checkpoint's pattern names the same files (it was refused as
    a different run config: a pattern names no existing path, so it was compared as written)."""
    path = make_config("causal_lm")
    raw = yaml.safe_load(path.read_text())
    train = os.path.relpath(raw["data"]["train"], tmp_path)
    raw["data"]["train"] = [{"path": train[:-len(".jsonl")] + "*.jsonl", "weight": 2}]
    raw["data"]["eval"] = os.path.relpath(raw["data"]["eval"], tmp_path)
    raw["output_dir"] = "runs/pattern"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["train", path.name, "train.max_steps=3"], capsys)
    assert code == 0, err
    _resume_from_elsewhere(tmp_path / "runs" / "pattern", tmp_path / "data", monkeypatch, capsys)


def test_a_run_json_with_odd_resumes_still_reads(tmp_path, capsys):
    """run.json's `resumes` that is no list (edited by hand, truncated by another tool): its config is still the
    run's, and a problem is a one-screen error, never a traceback (`resumes: 5` raised TypeError)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {"task": "causal_lm"}, "cwd": str(tmp_path),
                                              "resumes": 5}))
    code, _, err = run_cli(["eval", str(run)], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "model" in err


def test_train_resumes_a_run_with_a_relative_init_adapter_from_elsewhere(make_config, tmp_path, monkeypatch, capsys):
    """model.init_adapter, relative: `train OUTPUT_DIR --resume auto` from another directory makes it absolute
    (as the data and model paths), and the checkpoint's names the same adapter (it was refused as a different run
    config: init_adapter was not compared by what it names)."""
    _, first = _relative_run(make_config, tmp_path, monkeypatch, capsys)
    path = tmp_path / "causal_lm.yaml"
    code, _, err = run_cli(["train", path.name, "train.max_steps=3", "train.learning_rate=1e-3",
                            "output_dir=runs/second", f"model.init_adapter={os.path.relpath(first, tmp_path)}/adapter"],
                           capsys)
    assert code == 0, err
    _resume_from_elsewhere(tmp_path / "runs" / "second", tmp_path / "data", monkeypatch, capsys)


def test_a_recursive_pattern_is_read_from_where_the_run_started(tmp_path, monkeypatch):
    """data.train's data/**/*.jsonl matches data/a.jsonl too (a recursive glob, as training reads it): the run's
    directory makes it absolute (it was left relative, and an eval from elsewhere found no file)."""
    from scaletune.config_file import read_run_dir

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("{}\n")
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"config": {"data": {"train": ["data/**/*.jsonl"]}},
                                              "cwd": str(tmp_path)}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert read_run_dir(run)["data"]["train"] == [str(tmp_path / "data" / "**" / "*.jsonl")]


def test_train_of_its_run_directory_without_resume_offers_what_works(make_config, tmp_path, monkeypatch, capsys):
    """`train OUTPUT_DIR` (no --resume): its output_dir is the run's own; --overwrite, which the refusal offered,
    would delete the config it reads, and is refused too: the message offers --resume auto and another
    output_dir instead."""
    _, run = _relative_run(make_config, tmp_path, monkeypatch, capsys)
    code, _, err = run_cli(["train", str(run)], capsys)
    assert_clean_error(code, err, f"output_dir: {run} is not empty; resume it with --resume auto (the run "
                                  "directory given for the config is this run's")
    assert "--overwrite" not in err
    code, _, err = run_cli(["train", str(run), f"output_dir={tmp_path / 'second'}", "train.max_steps=1"], capsys)
    assert code == 0, err


def test_train_resumes_its_run_directory_where_loading_lowered_max_length(make_config, tmp_path, capsys):
    """data.max_length above what a BERT takes (its 512 learned positions) is lowered as the run loads: run.json
    recorded the lowered value, the checkpoints the given one, so `train RUN --resume` was refused as another
    run's config (changed: data.max_length: 1024 -> 512)."""
    path = make_config("seq_cls", train={"max_steps": 2, "save_every": 2}, data={"max_length": 1024})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    run = tmp_path / "run"
    code, _, err = run_cli(["train", str(run), "--resume", "auto", "train.max_steps=3"], capsys)
    assert code == 0, err
    assert "checkpoints/step-2" in json.loads((run / "run.json").read_text())["resumed_from"]


def test_train_resumes_an_older_run_directory_whose_run_json_holds_the_lowered_max_length(make_config, tmp_path,
                                                                                         capsys):
    """An older scaletune's run.json kept the config with data.max_length as loading lowered it (512 for a BERT
    given 1024) and had no top-level max_length; its checkpoints kept the given 1024. `train RUN --resume auto`
    of such a run was refused as another run's config (changed: data.max_length: 1024 -> 512)."""
    path = make_config("seq_cls", train={"max_steps": 2, "save_every": 2}, data={"max_length": 1024})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    run = tmp_path / "run"
    info = json.loads((run / "run.json").read_text())
    info["config"]["data"]["max_length"] = info.pop("max_length")  # (as the older version wrote it)
    (run / "run.json").write_text(json.dumps(info))
    code, _, err = run_cli(["train", str(run), "--resume", "auto", "train.max_steps=3"], capsys)
    assert code == 0, err
    assert "checkpoints/step-2" in json.loads((run / "run.json").read_text())["resumed_from"]
