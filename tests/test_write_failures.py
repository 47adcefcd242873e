"""Writes the machine refuses (a full disk, a quota, a read-only filesystem) outside the checkpoint (whose
case is in tests/reliability/test_faults.py): the final adapter, metrics.jsonl, run.json, merge --out,
report --out. Each is one error with exit 2 naming what was being written, leaves no half-written file
that breaks a retry, and the retry works. Also: a damaged adapter file, and data changed under a resume."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

import scaletune.saving as saving_mod
import scaletune.tracking as tracking
from scaletune.cli import main
from scaletune.fileutil import replace_dir, restore_replaced

FULL = OSError(errno.ENOSPC, "No space left on device")


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err and "error:" in err
    for f in fragments:
        assert f in err, err


@pytest.fixture
def cfg(make_config):
    return make_config("causal_lm", train={"max_steps": 4, "save_every": 2, "eval_every": None})


def test_a_full_disk_at_the_final_adapter(cfg, tmp_path, capsys, monkeypatch):
    real = saving_mod.save_adapter

    def full_at_the_end(run, directory, *args, **kwargs):
        if directory.name == ".adapter.tmp":
            (directory / "scaletune.json").parent.mkdir(parents=True, exist_ok=True)
            (directory / "scaletune.json").write_text("")
            raise FULL
        return real(run, directory, *args, **kwargs)

    monkeypatch.setattr(saving_mod, "save_adapter", full_at_the_end)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", cfg], capsys)
    assert_clean_error(code, err, f"could not write {out / 'adapter'}: No space left on device",
                       "then run again with --resume auto", "(it writes adapter/ again)")
    assert not (out / ".adapter.tmp").exists() and not (out / "adapter").exists()
    monkeypatch.setattr(saving_mod, "save_adapter", real)
    code, out_text, err = run_cli(["train", cfg, "--resume", "auto"], capsys)
    assert code == 0, err
    assert "run already complete" in out_text and (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_full_disk_at_metrics_jsonl_and_the_half_line_it_leaves(cfg, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}

    def opener(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            calls["n"] += 1
            if calls["n"] == 3:
                raise FULL
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(tracking, "open", opener, raising=False)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", cfg], capsys)
    assert_clean_error(code, err, f"could not write {out / 'metrics.jsonl'}: No space left on device",
                       "--resume auto")
    monkeypatch.undo()
    with open(out / "metrics.jsonl", "a") as fh:  # what a write cut short by the disk leaves
        fh.write('{"event": "train", "step": 3, "lo')
    code, _, err = run_cli(["train", cfg, "--resume", "auto"], capsys)
    assert code == 0, err
    lines = (out / "metrics.jsonl").read_text().splitlines()
    cut = lines.index('{"event": "train", "step": 3, "lo')  # left as it was; `report` skips it with a note
    assert json.loads(lines[cut + 1])["event"] == "resume"  # was glued onto the half line, unreadable
    assert [json.loads(x)["step"] for x in lines[cut + 1:] if '"event": "train"' in x] == [3, 4]


def test_a_full_disk_at_run_json(cfg, tmp_path, capsys, monkeypatch):
    real = tracking.Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "run.json.tmp":
            real(self, "{")
            raise FULL
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tracking.Path, "write_text", full)
    code, _, err = run_cli(["train", cfg], capsys)
    assert_clean_error(code, err, f"could not write {tmp_path / 'run' / 'run.json'}: No space left on device")
    monkeypatch.undo()
    assert not (tmp_path / "run" / "run.json.tmp").exists()
    code, _, err = run_cli(["train", cfg], capsys)  # nothing left behind that makes the directory "not empty"
    assert code == 0, err


def test_merge_on_a_full_disk_leaves_nothing_and_the_retry_works(cfg, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    assert run_cli(["train", cfg], capsys)[0] == 0
    real = PreTrainedModel.save_pretrained

    def full(self, directory, *args, **kwargs):
        real(self, directory, *args, **kwargs)
        raise FULL

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    merged = tmp_path / "merged"
    code, _, err = run_cli(["merge", cfg, "--out", merged], capsys)
    assert_clean_error(code, err, f"could not write --out {merged}: No space left on device", "run merge again")
    assert not merged.exists() and not list(tmp_path.glob(".merged*"))
    monkeypatch.undo()
    code, _, err = run_cli(["merge", cfg, "--out", merged], capsys)
    assert code == 0 and (merged / "config.json").is_file(), err


def test_report_on_a_full_disk_is_one_error(cfg, tmp_path, capsys, monkeypatch):
    import scaletune.report as report

    assert run_cli(["train", cfg], capsys)[0] == 0

    real = report.make_plots

    def full_after_one(runs, out_dir):  # a first plot written, then the disk is full
        real(runs, out_dir)
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "loss.png"))

    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "mine.png").write_text("a user's file")
    monkeypatch.setattr(report, "make_plots", full_after_one)
    code, _, err = run_cli(["report", tmp_path / "run", "--out", rep], capsys)
    assert_clean_error(code, err, f"could not write {rep / 'loss.png'}: No space left on device")
    assert sorted(p.name for p in rep.iterdir()) == ["mine.png"]  # its partial plots removed, the user's kept


def test_an_unexpected_refused_write_is_one_error(cfg, capsys, monkeypatch):
    """A write with no message of its own (here: the tokenizer's files in the adapter) still ends in one
    error naming the file, exit 2, not a traceback."""
    import scaletune.train as t

    def full(*args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", "/scratch/x/tokenizer.json")

    monkeypatch.setattr(t, "train", full)
    code, _, err = run_cli(["train", cfg], capsys)
    assert_clean_error(code, err, "could not write /scratch/x/tokenizer.json: Disk quota exceeded",
                       "--resume auto")


def test_a_damaged_adapter_file_is_named(cfg, tmp_path, capsys):
    assert run_cli(["train", cfg], capsys)[0] == 0
    weights = tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    for args in (["eval", cfg], ["merge", cfg, "--out", tmp_path / "m"]):
        code, _, err = run_cli(args, capsys)
        assert_clean_error(code, err, f"the adapter at {tmp_path / 'run' / 'adapter'} is damaged",
                           "adapter_model.safetensors", "--adapter OUTPUT_DIR/checkpoints/step-N")
        assert "adapter_config.json" not in err  # only the damaged file is named, not the intact one beside it
    (weights.parent / "adapter_config.json").write_text('{"peft_type": "LO')  # a config cut short is its own
    code, _, err = run_cli(["eval", cfg], capsys)
    assert_clean_error(code, err, "is damaged (adapter_config.json: ")


def test_an_adapter_that_does_not_fit_or_is_incomplete_is_one_error(cfg, tmp_path, capsys):
    """eval / predict / merge on an adapter whose scaletune.json is not scaletune's, which has no weights,
    whose adapter_config.json is not peft's, or which was trained on another base: one error naming it."""
    import shutil

    from scaletune.demo.tiny import build_model_dir

    from stutil import corpus

    assert run_cli(["train", cfg], capsys)[0] == 0
    good = tmp_path / "run" / "adapter"
    cases = []
    for name, damage in [("meta_list", lambda d: (d / "scaletune.json").write_text("[1]")),
                         ("meta_cut", lambda d: (d / "scaletune.json").write_text("{bad")),
                         ("meta_labels", lambda d: (d / "scaletune.json").write_text('{"labels": 5}')),
                         ("no_weights", lambda d: (d / "adapter_model.safetensors").unlink()),
                         ("not_peft", lambda d: (d / "adapter_config.json").write_text('{"peft_type": "BOGUS"}'))]:
        shutil.copytree(good, tmp_path / name)
        damage(tmp_path / name)
        cases.append(tmp_path / name)
    wanted = ["its scaletune.json is not what scaletune writes", "its scaletune.json cannot be read",
              "its scaletune.json is not what scaletune writes", "has no weights (adapter_model.safetensors)",
              "cannot be loaded onto"]
    for adapter, fragment in zip(cases, wanted):
        for args in (["eval", cfg], ["merge", cfg, "--out", tmp_path / "m"]):
            code, _, err = run_cli([*args, "--adapter", adapter], capsys)
            assert_clean_error(code, err, f"the adapter at {adapter}", fragment)
    wider = build_model_dir(tmp_path / "wider", corpus(), arch="llama", hidden=64, layers=2, heads=2, vocab_size=256)
    code, _, err = run_cli(["eval", cfg, f"model.name_or_path={wider}"], capsys)
    assert_clean_error(code, err, f"the adapter at {good} cannot be loaded onto {wider}", "base_model")
    assert not (tmp_path / "m").exists()


def test_a_resume_on_changed_data_says_so(cfg, tmp_path, capsys, caplog):
    assert run_cli(["train", cfg, "train.max_steps=2"], capsys)[0] == 0
    data = tmp_path / "data" / "train.jsonl"
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:40]))
    with caplog.at_level(logging.WARNING, logger="scaletune"):
        code, _, err = run_cli(["train", cfg, "--resume", "auto"], capsys)
    assert code == 0, err
    assert "data.train's contents changed since checkpoint" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scaletune"):
        assert run_cli(["train", cfg, "train.max_steps=6", "--resume", "auto"], capsys)[0] == 0
    assert "contents changed" not in caplog.text  # the same data as its checkpoint (step 4)
    assert json.loads((tmp_path / "run" / "checkpoints" / "step-6" / "state.json").read_text())["train_digest"]


def test_a_resume_across_a_tokenisation_change_says_so(cfg, tmp_path, capsys, caplog, monkeypatch):
    """A checkpoint or adapter whose data another scaletune tokenised (v11 dropped a BOS the tokenizer does not
    add itself; v13 changed the built-in template's rendering) trains or predicts on other token ids than it was
    trained on; the same data file gives the same train_digest, so only the recorded version can tell. An
    upgrade between a run and its resume changed the ids without a word."""
    from scaletune.data import TOKENISATION

    # what a scaletune of data version 10 recorded
    monkeypatch.setattr(saving_mod, "tokenisation", lambda task: f"{task}-10")
    assert run_cli(["train", cfg, "train.max_steps=2"], capsys)[0] == 0
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="scaletune"):
        code, _, err = run_cli(["train", cfg, "--resume", "auto"], capsys)
    assert code == 0, err
    now = TOKENISATION["causal_lm"]
    assert f"tokenised by another scaletune (data version causal_lm-10, now causal_lm-{now})" in caplog.text
    assert "resume with the scaletune that started the run" in caplog.text
    run = tmp_path / "run"
    for adapter, warned in ((run / "checkpoints" / "step-2" / "adapter", True), (run / "adapter", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="scaletune"):
            assert run_cli(["eval", cfg, "--adapter", adapter, f"--data={tmp_path / 'data' / 'train.jsonl'}"],
                           capsys)[0] == 0
        assert ("its inputs here may be tokenised otherwise" in caplog.text) is warned, caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scaletune"):  # merge tokenises nothing: nothing to say
        assert run_cli(["merge", cfg, "--adapter", run / "checkpoints" / "step-2", "--out", tmp_path / "m"],
                       capsys)[0] == 0
    assert "tokenis" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scaletune"):  # a checkpoint of this scaletune's: nothing said
        assert run_cli(["train", cfg, "train.max_steps=6", "--resume", "auto"], capsys)[0] == 0
    assert "tokenis" not in caplog.text


def test_merge_into_an_empty_existing_directory_such_as_the_working_one(cfg, tmp_path, capsys, monkeypatch):
    """An existing empty --out (the working directory, a mount point) cannot be renamed onto: the merged
    files are moved into it."""
    assert run_cli(["train", cfg], capsys)[0] == 0
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    code, _, err = run_cli(["merge", cfg, "--out", "."], capsys)
    assert code == 0, err
    assert (here / "config.json").is_file() and not (here / ".merging").exists()


def test_a_chat_template_that_cannot_be_read_is_named(make_config, tmp_path, capsys, monkeypatch):
    from pathlib import Path

    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    real = Path.read_text

    def refuse(self, *args, **kwargs):
        if self == template:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse)
    path = make_config("causal_lm", data={"chat_template": str(template)})
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, f"data.chat_template: cannot read {template}: Permission denied")


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


def test_a_kill_while_the_adapter_is_replaced_leaves_a_whole_one(cfg, tmp_path, capsys, monkeypatch):
    # adapter/ was deleted (rmtree) before the new one was renamed in: a kill during the deletion left a
    # half-deleted adapter/ (config, no weights), during the rename gap none
    out = tmp_path / "run"
    code, _, err = run_cli(["train", cfg], capsys)
    assert code == 0, err
    real = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        path = Path(path)
        if path.name in ("adapter", ".adapter.old") and path.parent == out and path.exists():
            (path / "adapter_model.safetensors").unlink()
            raise Killed
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_while_deleting)
    with pytest.raises(Killed):
        run_cli(["train", cfg, "--resume", "auto", "train.max_steps=6"], capsys)
    monkeypatch.setattr(shutil, "rmtree", real)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    weights = "adapter_model.safetensors"
    assert (out / "adapter" / weights).read_bytes() == (out / "checkpoints" / "step-6" / "adapter" / weights).read_bytes()


def test_a_kill_between_the_renames_of_a_replaced_directory_is_undone(tmp_path, monkeypatch):
    final, tmp = tmp_path / "best_adapter", tmp_path / ".best_adapter.tmp"
    for d, text in ((final, "old"), (tmp, "new")):
        d.mkdir()
        (d / "f").write_text(text)
    real = os.rename

    def killed_at_the_second(src, dst):
        if Path(src) == tmp:
            raise Killed
        real(src, dst)

    monkeypatch.setattr(os, "rename", killed_at_the_second)
    with pytest.raises(Killed):
        replace_dir(tmp, final)
    monkeypatch.setattr(os, "rename", real)
    assert not final.exists()
    restore_replaced(final)
    assert (final / "f").read_text() == "old" and not (tmp_path / ".best_adapter.old").exists()
    replace_dir(tmp, final)
    assert (final / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["best_adapter"]


def test_an_output_dir_that_is_not_utf8_is_refused_before_training(cfg, tmp_path, capsys):
    # (it trained, then failed with a traceback at the first checkpoint: the tokenizer's save refuses the path)
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/run\xff")
    code, _, err = run_cli(["train", cfg, f"output_dir={out}"], capsys)
    assert_clean_error(code, err, "is not valid UTF-8 (byte ff", "name it in UTF-8")
    assert not os.path.exists(out)


def test_eval_of_a_run_stopped_between_the_renames_names_the_previous_adapter(cfg, tmp_path, capsys):
    """A kill between replace_dir's two renames leaves adapter/ absent and the previous one in .adapter.old
    (until the run's next train puts it back): eval and predict said "no trained adapter ... train first"."""
    out = tmp_path / "run"
    code, _, err = run_cli(["train", cfg], capsys)
    assert code == 0, err
    os.rename(out / "adapter", out / ".adapter.old")
    code, _, err = run_cli(["eval", cfg], capsys)
    assert code == 2 and f"--adapter {out / '.adapter.old'}" in err, err
    code, _, err = run_cli(["eval", cfg, "--adapter", out / "adapter"], capsys)
    assert code == 2 and f"--adapter {out / '.adapter.old'}" in err, err
    code, _, err = run_cli(["eval", cfg, "--adapter", out / ".adapter.old"], capsys)
    assert code == 0, err


def test_a_merge_interrupted_while_writing_can_be_run_again(cfg, tmp_path, capsys, monkeypatch):
    """Ctrl-C (or a kill) while `merge --out DIR` wrote into an existing empty DIR left DIR/.merging behind,
    and the same command again refused DIR as "not empty; choose a new directory"."""
    import transformers

    assert run_cli(["train", cfg], capsys)[0] == 0
    out = tmp_path / "merged"
    out.mkdir()
    real = transformers.PreTrainedTokenizerBase.save_pretrained

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", interrupted)
    assert run_cli(["merge", cfg, "--out", out], capsys)[0] == 130
    assert list(out.iterdir()) == []  # the half-written model went with the interrupt
    (out / ".merging").mkdir()  # what a SIGKILL there leaves
    (out / ".merging" / "config.json").write_text("{}")
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", real)
    code, _, err = run_cli(["merge", cfg, "--out", out], capsys)
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and not (out / ".merging").exists()
