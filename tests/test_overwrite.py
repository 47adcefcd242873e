"""Replacing a run with --overwrite: the old run is kept aside (named in `.replaced_run`) until the new one
finishes, through failures, preemption, symlinked and near-the-name-limit output dirs, and a disk that cannot
record it; an output_dir holding the run's own data is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scaletune import faults
from scaletune.checkpoint import checkpoint_dirs
from scaletune.cli import _resume_hint, build_parser, main
from scaletune.config import load_config
from scaletune.loop import fit
from scaletune.outdir import replaced_runs
from scaletune.train import StopFlag, setup

from stutil import StopAt, read_metrics


def _overwrite_config(make_config) -> Path:
    """4 steps, a checkpoint every 2: a run to replace, and a run that can fail or stop half-way."""
    return make_config("causal_lm", n=32, train={"max_steps": 4, "save_every": 2})


def test_overwrite_keeps_the_old_run_aside_while_the_new_one_fails(make_config, tmp_path, monkeypatch, caplog):
    """A replacing run that fails at step 3 leaves the old run whole in the hidden sibling named in
    `.replaced_run`, the log and the Ctrl-C hint; the next replacing run that finishes deletes it, and
    the failed run it replaced too."""
    path = _overwrite_config(make_config)
    assert main(["train", str(path)]) == 0
    out = tmp_path / "run"
    old_adapter = (out / "adapter/adapter_model.safetensors").read_bytes()
    monkeypatch.setenv("SCALETUNE_FAULT", "nan@3")
    faults._plan.cache_clear()
    try:
        with caplog.at_level("INFO", logger="scaletune"):
            assert main(["train", str(path), "--overwrite"]) == 2
    finally:
        monkeypatch.delenv("SCALETUNE_FAULT")
        faults._plan.cache_clear()
    (aside,) = [Path(line) for line in (out / ".replaced_run").read_text().splitlines()]
    assert aside.parent == tmp_path and aside.name.startswith(".run.replaced-")
    assert (aside / "adapter/adapter_model.safetensors").read_bytes() == old_adapter
    assert [p.name for p in checkpoint_dirs(aside)] == ["step-4", "step-2"]
    assert f"kept at {aside}" in caplog.text
    assert f"kept at {aside}" in _resume_hint(build_parser().parse_args(["train", str(path)]))
    assert not (out / "adapter").exists()  # the failed run's partial output is what is in output_dir
    assert main(["train", str(path), "--overwrite"]) == 0
    assert not list(tmp_path.glob(".run.replaced-*")) and not (out / ".replaced_run").exists()


def test_overwrite_that_finishes_leaves_only_the_new_run(make_config, tmp_path, capsys):
    path = _overwrite_config(make_config)
    assert main(["train", str(path)]) == 0
    out = tmp_path / "run"
    (out / "report.html").write_text("`scaletune report` of the old run")
    capsys.readouterr()
    assert main(["train", str(path), "--overwrite", "train.max_steps=2"]) == 0
    assert "deleted the run --overwrite replaced" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["adapter", "checkpoints", "metrics.jsonl", "run.json"]
    assert [p.name for p in checkpoint_dirs(out)] == ["step-2"]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert not list(tmp_path.glob(".run.replaced-*"))


@pytest.mark.parametrize("key", ["train", "eval"])
def test_overwrite_refuses_an_output_dir_holding_the_runs_own_data(make_config, tmp_path, capsys, key):
    """--overwrite deletes the whole old output_dir once the new run finishes: with data.train (or data.eval)
    inside it, the run trained on the file and then deleted it. Refused, naming the file; nothing moves."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")  # an earlier run's output, which --overwrite may otherwise replace
    path = make_config("causal_lm", n=16, train={"max_steps": 1})
    data = out / "mine.jsonl"
    data.write_text((tmp_path / "data" / f"{key}.jsonl").read_text())
    before = data.read_bytes()
    capsys.readouterr()
    assert main(["train", str(path), f"data.{key}={data}", "--overwrite"]) == 2
    assert f"--overwrite would delete {out}, but data.{key} ({data}) is inside it" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["mine.jsonl", "run.json"] and data.read_bytes() == before
    assert not list(tmp_path.glob(".run.replaced-*"))


def test_a_run_set_aside_but_never_recorded_is_named(make_config, tmp_path, caplog):
    """An --overwrite killed between moving the old run aside and recording it left a hidden copy nothing
    mentioned or deleted; a later start in that output_dir names it (and leaves it alone)."""
    path = _overwrite_config(make_config)
    assert main(["train", str(path)]) == 0
    orphan = tmp_path / ".run.replaced-20260101-000000"
    (tmp_path / "run").rename(orphan)  # where the kill left it: set aside, no record in a new run/
    caplog.clear()
    assert main(["train", str(path), "train.max_steps=2"]) == 0
    assert f"{orphan} holds the run an earlier --overwrite of {tmp_path / 'run'} set aside" in caplog.text
    assert (orphan / "adapter").is_dir()
    caplog.clear()  # a replacement's own, recorded, copy is not named so
    assert main(["train", str(path), "train.max_steps=2", "--overwrite"]) == 0
    assert caplog.text.count("set aside before it was stopped") == 1


def test_a_run_named_near_the_name_limit_can_be_replaced(make_config, tmp_path, capsys):
    """The hidden sibling `.NAME.replaced-...` of a 250-byte run name passed the file system's 255: such a
    run could never be replaced ("could not prepare ...: File name too long")."""
    path = _overwrite_config(make_config)
    out = tmp_path / ("r" * 250)
    assert main(["train", str(path), f"output_dir={out}", "train.max_steps=2"]) == 0
    assert main(["train", str(path), f"output_dir={out}", "train.max_steps=2", "--overwrite"]) == 0, \
        capsys.readouterr().err
    assert [p.name for p in checkpoint_dirs(out)] == ["step-2"] and not list(tmp_path.glob(".r*.replaced-*"))


def test_a_dangling_symlink_as_output_dir_is_named(make_config, tmp_path, capsys):
    path = _overwrite_config(make_config)
    (tmp_path / "run").symlink_to(tmp_path / "gone")
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err  # (was "could not prepare ...: File exists" and a disk-space hint)
    assert f"output_dir: {tmp_path / 'run'} is a symbolic link to {tmp_path / 'gone'}, which does not exist" in err


def test_overwrite_through_a_symlinked_output_dir_keeps_the_link(make_config, tmp_path, capsys):
    """output_dir a link to scratch space: the new run goes where the link points, the old one is set
    aside there and deleted at the finish (renaming the link would move the run to local disk)."""
    path = _overwrite_config(make_config)
    out, scratch = tmp_path / "run", tmp_path / "scratch" / "run"
    scratch.mkdir(parents=True)
    out.symlink_to(scratch, target_is_directory=True)
    assert main(["train", str(path)]) == 0
    assert main(["train", str(path), "--overwrite", "train.max_steps=2"]) == 0
    assert out.is_symlink() and out.resolve() == scratch.resolve()
    assert [p.name for p in checkpoint_dirs(scratch)] == ["step-2"]
    assert "could not delete" not in capsys.readouterr().err
    assert not list(scratch.parent.glob(".run.replaced-*")) and not list(tmp_path.glob(".run.replaced-*"))


def test_overwrite_preempted_then_resumed_deletes_the_old_run_when_it_finishes(make_config, tmp_path, capsys):
    """The aside path is in a file, not in memory: the `--resume auto` run that finishes deletes it."""
    path = _overwrite_config(make_config)
    run, _ = setup(load_config(path))
    assert fit(run, StopFlag()) == "done"
    run, _ = setup(load_config(path), overwrite=True)
    (aside,) = replaced_runs(run.output_dir)
    capsys.readouterr()
    assert fit(run, StopAt(run, 2)) == "preempted"
    assert f"kept at {aside}" in capsys.readouterr().out  # the preemption message says where
    assert (aside / "adapter/adapter_model.safetensors").is_file()
    run, used = setup(load_config(path), resume="auto")
    assert used.name == "step-2" and replaced_runs(run.output_dir) == [aside]
    assert fit(run, StopFlag()) == "done"
    assert not aside.exists() and not (run.output_dir / ".replaced_run").exists()


def test_overwrite_deletes_the_old_run_with_a_warning_when_it_cannot_be_moved(make_config, tmp_path, monkeypatch,
                                                                              caplog):
    """E.g. a parent directory this user cannot write: the old contents go up front, as they used to."""
    path = make_config("causal_lm", n=32, train={"max_steps": 1})
    run, _ = setup(load_config(path))
    fit(run, StopFlag())

    def refuse(self, target):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "rename", refuse)
    with caplog.at_level("WARNING", logger="scaletune"):
        run, _ = setup(load_config(path), overwrite=True)
    assert "cannot move" in caplog.text and "deleting its contents instead" in caplog.text
    assert os.listdir(run.output_dir) == ["run.json"] and not list(tmp_path.glob(".run.replaced-*"))


def _record_write_fails(monkeypatch) -> None:
    """Writing `.replaced_run` fails as on a full disk, after a byte of it is written; other writes work."""
    import errno

    write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == ".replaced_run":
            write_text(self, "/")
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)


def test_overwrite_that_cannot_record_the_old_run_puts_it_back(make_config, tmp_path, monkeypatch, capsys):
    """No record, no run: the old run goes back in output_dir, untouched, and the error says so."""
    path = make_config("causal_lm", n=32, train={"max_steps": 1})
    assert main(["train", str(path)]) == 0
    out = tmp_path / "run"
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _record_write_fails(monkeypatch)
    capsys.readouterr()
    assert main(["train", str(path), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "No space left on device" in err
    assert f"nothing was replaced: the previous run is back in {out}" in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".run.replaced-*"))


def test_overwrite_that_cannot_record_nor_restore_names_where_the_old_run_is(make_config, tmp_path, monkeypatch):
    from scaletune.errors import UserError

    path = make_config("causal_lm", n=32, train={"max_steps": 1})
    run, _ = setup(load_config(path))
    fit(run, StopFlag())
    _record_write_fails(monkeypatch)
    rename, renames = Path.rename, []

    def once(self, target):  # setting the run aside works; moving it back does not
        renames.append(target)
        if len(renames) > 1:
            raise PermissionError(13, "Permission denied", str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", once)
    with pytest.raises(UserError) as caught:
        setup(load_config(path), overwrite=True)
    (aside,) = tmp_path.glob(".run.replaced-*")
    assert f"the replaced run is safe, kept at {aside}" in str(caught.value)
    assert (aside / "adapter/adapter_model.safetensors").is_file()


def test_a_fresh_start_by_resume_takes_a_dead_attempts_files_but_not_a_finished_runs_adapter(tmp_path):
    """--resume auto with no checkpoint starts afresh where an attempt died early (its run.json, metrics and
    `scaletune report`'s plots); a finished run whose checkpoints were deleted (its adapter/ is there) is refused."""
    import types

    from scaletune.errors import ConfigError
    from scaletune.outdir import check_output_dir

    out = tmp_path / "run"
    out.mkdir()
    # (what the refusal's advice reads: whether --overwrite would replace the directory, by the run's inputs)
    cfg = types.SimpleNamespace(output_dir=str(out), source_file=None,
                                data=types.SimpleNamespace(train="t.jsonl", eval=None, chat_template=None),
                                model=types.SimpleNamespace(name_or_path="m", init_adapter=None))
    (out / "run.json").write_text('{"config_fingerprint": "x"}')
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "loss.png").write_bytes(b"png")
    assert check_output_dir(cfg, "auto", False) is False
    (out / "adapter").mkdir()
    with pytest.raises(ConfigError, match=r"has no checkpoint to resume.*its adapter/ is a finished run's"):
        check_output_dir(cfg, "auto", False)


def test_a_link_where_the_old_run_would_be_set_aside_does_not_cost_it(tmp_path, monkeypatch):
    """A dangling link that holds the set-aside name made the rename fail, and the fallback deleted the old run
    before the new one had finished: the next free name is taken instead."""
    import scaletune.outdir as outdir

    monkeypatch.setattr(outdir.time, "strftime", lambda fmt: "20260101-000000")
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    (tmp_path / ".run.replaced-20260101-000000").symlink_to(tmp_path / "gone")
    outdir.set_aside(out)
    assert (tmp_path / ".run.replaced-20260101-000000-1" / "run.json").exists()
    assert replaced_runs(out) == [tmp_path / ".run.replaced-20260101-000000-1"]
