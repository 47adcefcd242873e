"""What `--resume` may start from and write into: nothing the user had is overwritten, an older checkpoint
starts a new path without mixing in the abandoned one, and refusals say what to do."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from scaletune.cli import main

from stutil import StopAt, write_jsonl


def _train(path, *args):
    return main(["train", str(path), *map(str, args)])


@pytest.mark.parametrize("layout", ["foreign file", "finished adapter", "other tool's run.json"])
def test_resume_auto_with_nothing_to_resume_leaves_a_foreign_dir_alone(make_config, tmp_path, capsys, layout):
    """`--resume auto` in a directory with no checkpoint is a fresh start: refused where it would
    overwrite (delete adapter/, replace run.json) what scaletune did not write as a restartable run."""
    path = make_config("causal_lm", train={"max_steps": 2})
    out = tmp_path / "run"
    out.mkdir()
    files = {"run.json": '{"mine": 1}', "metrics.jsonl": "keep\n"}
    if layout == "foreign file":
        files["notes.txt"] = "my notes"
    elif layout == "finished adapter":  # a finished run whose checkpoints were deleted to save space
        files["run.json"] = '{"config_fingerprint": "x"}'
        (out / "adapter").mkdir()
        files["adapter/adapter_config.json"] = "{}"
    for name, text in files.items():
        (out / name).write_text(text)
    capsys.readouterr()
    assert _train(path, "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "has no checkpoint to resume" in err and "pick a new output_dir" in err
    assert {"foreign file": "notes.txt", "finished adapter": "adapter/",
            "other tool's run.json": "run.json was not written by scaletune"}[layout] in err
    assert {n: (out / n).read_text() for n in files} == files  # untouched
    # the way out it offers works: --overwrite only where it would replace the directory (it refuses one holding
    # files scaletune did not write, which this refusal used to send the user to all the same)
    assert ("pass --overwrite" in err) == (layout == "finished adapter"), err
    if layout != "finished adapter":
        assert "--overwrite would not replace it either" in err
        assert _train(path, "--overwrite") == 2


def test_a_dir_of_the_users_own_files_is_not_offered_resume_or_overwrite(make_config, tmp_path, capsys):
    """A non-empty output_dir that no run wrote: --resume auto and --overwrite both refuse it, so the refusal
    of a plain start offers neither."""
    path = make_config("causal_lm", train={"max_steps": 2})
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert _train(path) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "pick a new output_dir" in err, err
    assert "--resume auto" not in err and "pass --overwrite" not in err, err
    for flag in ("--overwrite", "--resume=auto"):
        assert _train(path, flag) == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint(make_config, tmp_path):
    """What a requeued Slurm job meets when the first attempt died early: run.json + metrics.jsonl only."""
    path = make_config("causal_lm", train={"max_steps": 2})
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"config_fingerprint": "abc", "started": "earlier"}))
    dead = json.dumps({"event": "train", "step": 12, "loss": 9.9}) + "\n"  # the dead attempt got further
    (out / "metrics.jsonl").write_text(dead)
    assert _train(path, "--resume", "auto") == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    # the new run's log is its own (its report used to end at the dead attempt's step 12); the old one is kept
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2, steps
    assert [p.read_text() for p in (out / ".abandoned").iterdir()] == [dead]
    import shutil

    for name in ("checkpoints", "adapter"):  # killed early once more: .abandoned/ is the run's own, not foreign
        shutil.rmtree(out / name, ignore_errors=True)
    assert _train(path, "--resume", "auto") == 0
    assert len(list((out / ".abandoned").iterdir())) == 2


def test_resume_from_an_abandoned_checkpoint_sets_aside_its_step_too(make_config, tmp_path, caplog):
    """Back onto a path left earlier (a checkpoint in checkpoints/.abandoned-*/): the other path's
    checkpoints from that step on are moved aside, so this run's saves of steps 4 and 6 are written, not
    skipped as already there, and it ends where the first path ended (an exact resume)."""
    path = make_config("causal_lm", n=32, train={"max_steps": 6, "save_every": 2, "save_total_limit": None})
    out = tmp_path / "run"
    assert _train(path) == 0
    first = load_file(str(out / "checkpoints" / "step-6" / "trainable.safetensors"))
    assert _train(path, "train.learning_rate=0.02", "--allow-config-change",
                  "--resume", out / "checkpoints" / "step-2") == 0
    left = next(p for p in (out / "checkpoints").iterdir() if p.name.startswith(".abandoned-"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="scaletune"):
        assert _train(path, "--resume", left / "step-4") == 0
    assert f"resuming from {left / 'step-4'}: the checkpoints from its step on (step-4, step-6)" in caplog.text
    assert len([p for p in (out / "checkpoints").iterdir() if p.name.startswith(".abandoned-")]) == 2
    again = load_file(str(out / "checkpoints" / "step-6" / "trainable.safetensors"))
    assert again.keys() == first.keys() and all(again[k].equal(first[k]) for k in first)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-6"


def test_resume_and_overwrite_together_are_refused(make_config, tmp_path, capsys):
    path = make_config("causal_lm", train={"max_steps": 2})
    assert _train(path) == 0
    before = (tmp_path / "run" / "run.json").read_text()
    capsys.readouterr()
    assert _train(path, "--resume", "auto", "--overwrite") == 2
    assert "--resume and --overwrite contradict each other" in capsys.readouterr().err
    assert (tmp_path / "run" / "run.json").read_text() == before
    # said first, whatever else is wrong: a changed config's refusal used to hide it until it was undone
    assert _train(path, "train.learning_rate=0.5", "--resume", "auto", "--overwrite") == 2
    assert "--resume and --overwrite contradict each other" in capsys.readouterr().err
    assert _train(path, "--resume", "none", "--overwrite") == 0  # `none`: no resume, as documented


def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside(make_config, tmp_path, caplog):
    """Going back to step 2 with another learning rate: the new path's step-4/6 are written (they used to be
    skipped because the old ones verified), `--resume auto` then finds the new path, and the abandoned
    checkpoints are kept aside, not deleted."""
    path = make_config("causal_lm", n=32, train={"max_steps": 6, "save_every": 2, "save_total_limit": None})
    out = tmp_path / "run"
    assert _train(path) == 0
    old = {n: load_file(str(out / "checkpoints" / n / "trainable.safetensors")) for n in ("step-4", "step-6")}
    caplog.clear()
    with caplog.at_level("WARNING", logger="scaletune"):
        assert _train(path, "train.learning_rate=0.02", "--allow-config-change",
                      "--resume", out / "checkpoints" / "step-2") == 0
    assert "resuming from step-2: the checkpoints after it (step-4, step-6) are not this run's path" in caplog.text
    aside = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".abandoned-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step-4", "step-6"]
    for name, tensors in old.items():
        assert load_file(str(aside[0] / name / "trainable.safetensors")).keys() == tensors.keys()
        new = load_file(str(out / "checkpoints" / name / "trainable.safetensors"))
        assert any(not new[k].equal(tensors[k]) for k in tensors), f"{name} is the abandoned path's"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-6"
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    snapshot = load_file(str(out / "checkpoints" / "step-6" / "adapter" / "adapter_model.safetensors"))
    assert all(final[k].equal(snapshot[k]) for k in final)
    info = json.loads((out / "run.json").read_text())
    assert [(r["from"], r["world_size"]) for r in info["resumes"]] == [(str(out / "checkpoints" / "step-2"), 1)]
    assert info["argv"][-1] != str(out / "checkpoints" / "step-2")  # the first start's command line


def test_resume_past_max_steps_is_refused(make_config, tmp_path, capsys, caplog):
    path = make_config("causal_lm", n=32, train={"max_steps": 4})
    assert _train(path) == 0
    before = (tmp_path / "run" / "run.json").read_text()
    capsys.readouterr()
    assert _train(path, "train.max_steps=2", "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "is at step 4, past this run's 2 steps" in err and "train.max_steps" in err and "step-N" in err
    assert "schedule had" not in caplog.text  # (a rate past the schedule's end means nothing)
    assert (tmp_path / "run" / "run.json").read_text() == before


def test_resume_given_a_run_directory_names_its_newest_checkpoint(make_config, tmp_path, capsys):
    path = make_config("causal_lm", n=32, train={"max_steps": 2})
    assert _train(path) == 0
    capsys.readouterr()
    assert _train(path, "--resume", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "is a run's output directory, not a checkpoint" in err
    assert str(tmp_path / "run" / "checkpoints" / "step-2") in err


def test_config_change_refusal_names_what_changed(make_config, tmp_path, capsys):
    path = make_config("causal_lm", n=32, train={"max_steps": 2}, peft={"r": 4})
    assert _train(path) == 0
    capsys.readouterr()
    assert _train(path, "train.learning_rate=0.5", "peft.r=8", "train.max_steps=4", "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "peft.r: 4 -> 8" in err and "train.learning_rate: 0.0" in err and "-> 0.5" in err
    assert "max_steps" not in err.split("(changed:")[1].split(")")[0]  # a resume may change it


def test_an_adapter_shape_change_allowed_at_resume_is_refused_naming_the_key(make_config, tmp_path, capsys):
    """--allow-config-change with another LoRA rank cannot load the checkpoint: the refusal used to give torch's
    words alone ("shape '[8, ...]' is invalid for input of size ..."), naming no config key."""
    path = make_config("causal_lm", n=32, train={"max_steps": 2}, peft={"r": 4})
    assert _train(path) == 0
    capsys.readouterr()
    assert _train(path, "peft.r=8", "train.max_steps=4", "--allow-config-change", "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "does not fit this run's model and adapter (changed: peft.r: 4 -> 8):" in err, err
    assert "--allow-config-change cannot change the adapter's shape" in err, err


def test_paths_are_compared_by_the_files_they_name(make_config, tmp_path, capsys, monkeypatch):
    """A resume compared data and model paths as text only: the same file named from another working
    directory (or through a link) was refused as a changed config. A path written otherwise is now compared
    by what it names, and a refusal shows that too."""
    import shutil

    path = make_config("causal_lm", n=32, train={"max_steps": 2})
    train_file = tmp_path / "data" / "train.jsonl"
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert _train(path, "data.train=../data/train.jsonl") == 0
    (tmp_path / "link.jsonl").symlink_to(train_file)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert _train(path, "data.train=link.jsonl", "train.max_steps=3", "--resume", "auto") == 0, capsys.readouterr().err
    info = json.loads((tmp_path / "run" / "run.json").read_text())  # where each start read its relative paths from
    assert info["cwd"] == str(tmp_path / "a") and [r["cwd"] for r in info["resumes"]] == [str(tmp_path)]
    other = tmp_path / "b" / "data"
    other.mkdir(parents=True)
    shutil.copy(train_file, other / "train.jsonl")
    with open(other / "train.jsonl", "a") as fh:  # the same name from b/, another file
        fh.write(json.dumps({"instruction": "one more", "output": "example"}) + "\n")
    monkeypatch.chdir(tmp_path / "b" / "data")
    capsys.readouterr()
    assert _train(path, "data.train=../data/train.jsonl", "train.max_steps=4", "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert f'(changed: data.train: "link.jsonl" ({train_file}) -> "../data/train.jsonl" ({other / "train.jsonl"}))' \
        in err, err


def test_config_change_refusal_does_not_name_a_length_the_model_lowered(make_config, tmp_path, capsys):
    """data.max_length above the model's position table (the tiny BERT's 512) is lowered for the run; the
    refusal of a changed learning rate names that change only, not a max_length the user never touched
    (the checkpoint kept the lowered one, and compared it with the config as written)."""
    path = make_config("seq_cls", n=32, train={"max_steps": 2}, data={"max_length": 1024})
    assert _train(path) == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["max_length"] == 512 and info["config"]["data"]["max_length"] == 1024  # (run as given: resumes)
    capsys.readouterr()
    assert _train(path, "train.learning_rate=0.5", "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "(changed: train.learning_rate: " in err and "max_length" not in err, err
    assert _train(path, "train.max_steps=3", "--resume", "auto") == 0  # and unchanged, it resumes


def test_resume_from_another_runs_checkpoint_into_a_dir_with_its_own_is_refused(make_config, tmp_path, capsys):
    path = make_config("causal_lm", n=32, train={"max_steps": 2})
    assert _train(path) == 0
    assert _train(path, f"output_dir={tmp_path / 'b'}") == 0
    capsys.readouterr()
    assert _train(path, "train.max_steps=4", "--resume", tmp_path / "b" / "checkpoints" / "step-2") == 2
    assert "has checkpoints of its own" in capsys.readouterr().err


def test_learning_rate_changed_on_resume_takes_effect(make_config, tmp_path):
    """The scheduler's saved state used to bring back the old peak: --allow-config-change with a new
    learning_rate trained on with the old one."""
    path = make_config("causal_lm", n=32, train={"max_steps": 2, "lr_scheduler": "constant",
                                                  "learning_rate": 1e-3})
    assert _train(path) == 0
    assert _train(path, "train.max_steps=4", "train.learning_rate=0.05", "--allow-config-change",
                  "--resume", "auto") == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in lines if r.get("event") == "train"}
    assert lrs[1] == pytest.approx(1e-3) and lrs[3] == pytest.approx(0.05) and lrs[4] == pytest.approx(0.05)


def test_a_longer_schedule_at_resume_is_announced(make_config, tmp_path, caplog):
    path = make_config("causal_lm", n=32, train={"max_steps": 4, "save_every": 2, "lr_scheduler": "cosine",
                                                  "learning_rate": 1e-2})
    assert _train(path) == 0
    caplog.clear()
    # the same schedule, from mid-way: the rate goes on as it was (an older checkpoint: step 4 is set aside)
    assert _train(path, "--resume", tmp_path / "run" / "checkpoints" / "step-2") == 0
    assert "schedule had" not in caplog.text
    assert _train(path, "train.max_steps=8", "--resume", "auto") == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lr5 = [r["lr"] for r in lines if r.get("event") == "train" and r["step"] == 5][0]
    assert f"resuming after step 4: step 5 trains at lr {lr5:.3g} where the checkpoint's schedule had 0" in caplog.text
    assert "this run's 8 steps" in caplog.text


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "lion",
                                       "lion_8bit", "paged_lion_8bit"])
def test_other_optimizers_state_survives_a_resume(make_config, tmp_path, optimizer):
    """bitsandbytes keeps its moments under its own names (uint8 state1/state2 + absmax/qmap for tensors of
    4096+ elements: r=128 here; fp32 state1/state2 for the 32-bit ones), Adafactor its row and column
    statistics; checkpoints held none of it, so a resumed run restarted them from zero. Resumed at step 3,
    the run ends bit for bit where the uninterrupted one does."""
    import torch

    from scaletune.config import load_config
    from scaletune.loop import fit
    from scaletune.train import StopFlag, setup

    adapters = {}
    for name in ("full", "split"):
        path = make_config("causal_lm", n=16, train={"max_steps": 6, "optimizer": optimizer, "save_every": None,
                                                     "lr_scheduler": "constant", "global_batch_size": 8},
                           peft={"r": 128, "lora_alpha": 16}, output_dir=str(tmp_path / name))
        run, _ = setup(load_config(path))
        if name == "split":
            assert fit(run, StopAt(run, 3)) == "preempted"
            saved = load_file(str(tmp_path / name / "checkpoints" / "step-3" / "optimizer.safetensors"))
            kept = {"adafactor": "::exp_avg_sq_row"}.get(optimizer, "::state1")
            assert any(k.endswith(kept) for k in saved)  # the optimizer's own state
            assert any(v.dtype == torch.uint8 for v in saved.values()) is optimizer.endswith("8bit")
            run, _ = setup(load_config(path), resume="auto")
        assert fit(run, StopFlag()) == "done"
        adapters[name] = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    for k, v in adapters["full"].items():
        torch.testing.assert_close(adapters["split"][k], v, rtol=0, atol=0)


def test_8bit_optimizer_under_zero_is_refused():
    from scaletune.config import from_dict
    from scaletune.errors import ConfigError

    raw = {"task": "causal_lm", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
           "train": {"optimizer": "adamw_8bit"}, "distributed": {"zero_stage": 2}}
    with pytest.raises(ConfigError, match=r"train.optimizer=adamw_8bit with distributed.zero_stage=2: ZeRO shards"):
        from_dict(raw)


def test_resume_auto_with_only_damaged_checkpoints_refuses_to_start_over(make_config, tmp_path, capsys):
    """It used to warn, start from step 0 and overwrite the damaged checkpoints, whose adapter snapshots
    and parameters were intact."""
    path = make_config("causal_lm", n=32, train={"max_steps": 4, "save_every": 2})
    assert _train(path) == 0
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    for c in ckpts:
        with open(c / "optimizer.safetensors", "ab") as fh:
            fh.write(b"junk")
    before = {c.name: (c / "optimizer.safetensors").read_bytes() for c in ckpts}
    capsys.readouterr()
    assert _train(path, "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "none of the checkpoints" in err and "step-4: file optimizer.safetensors does not match its hash" in err
    assert {c.name: (c / "optimizer.safetensors").read_bytes() for c in ckpts} == before


@pytest.mark.parametrize("flags", [{}, {"fused": True}, {"capturable": True}], ids=["plain", "fused", "capturable"])
def test_restored_adam_step_lies_where_torch_keeps_it(flags):
    """A resume builds a fresh optimizer and fills its state. torch keeps a fused or capturable Adam's step
    on the parameter's device (its kernels read it there) and a plain one's on the CPU; a CPU step beside
    CUDA parameters would fail the first fused step after a GPU resume. The parameter is on the meta device
    here, the one device other than the CPU this machine has, with the group flagged as torch would."""
    import torch

    from scaletune.trainable_state import _ensure_adam_state, _write_step

    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    opt = torch.optim.AdamW([p])
    opt.param_groups[0].update(flags)
    _ensure_adam_state(opt)
    _write_step(opt, 7)
    step = opt.state[p]["step"]
    assert step.dtype == torch.float32 and step.device.type == ("meta" if flags else "cpu")
    assert opt.state[p]["exp_avg"].device.type == "meta"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_fused_adam_steps_after_a_gpu_resume():
    """On a GPU: the restored state takes a fused AdamW step (a CPU step tensor would fail here)."""
    import torch

    from scaletune.trainable_state import _ensure_adam_state, _write_step

    p = torch.nn.Parameter(torch.ones(4, device="cuda"))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    _ensure_adam_state(opt)
    _write_step(opt, 5)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["step"].item() == 6 and bool((p < 1).all())


def test_a_checkpoint_whose_saved_config_matches_resumes_though_its_fingerprint_differs(make_config, tmp_path):
    """The fingerprint is a hash of the trajectory keys, so making a key resume-free (train.on_nonfinite
    was not) changes it for every earlier checkpoint: a checkpoint that keeps its config is compared by
    that config, and refused only for a real change."""
    from scaletune import checkpoint as ckpt
    from scaletune.config import load_config
    from scaletune.errors import UserError
    from scaletune.identity import config_changes

    cfg = load_config(str(make_config("causal_lm")), [])
    path = tmp_path / "step-4"
    path.mkdir()
    (path / "state.json").write_text(json.dumps({"step": 4, "config": cfg.to_dict()}, default=str))
    ckpt.write_manifest(path, 4, "fingerprint-of-an-older-recipe")
    ckpt.check_same_config(path, "this-recipe", False, lambda saved, paths: config_changes(saved, cfg))  # accepted
    changed = load_config(str(make_config("causal_lm")), ["train.learning_rate=0.5"])
    with pytest.raises(UserError, match=r"different run config \(changed: train.learning_rate: .* -> 0.5\)"):
        ckpt.check_same_config(path, "this-recipe", False, lambda saved, paths: config_changes(saved, changed))
    (path / "state.json").write_text(json.dumps({"step": 4}))  # no saved config: the fingerprint decides
    # (an upgrade's same config was refused as "a different run config", and told to resume with it)
    with pytest.raises(UserError, match=r"(?s)older scaletune that did not save its run config, and its config "
                                        r"fingerprint differs .*\(fingerprint-of-an-older-recipe vs this-recipe\)"
                                        r".*--allow-config-change"):
        ckpt.check_same_config(path, "this-recipe", False, lambda saved, paths: config_changes(saved, cfg))


def test_a_checkpoint_from_before_a_key_existed_resumes_with_that_key_at_its_default(make_config, tmp_path):
    """A key added in a later scaletune (train.neftune_noise_alpha, train.min_lr_ratio, data.chat_template)
    is missing from an older checkpoint's config: at its default it is what that version did, and the
    resume goes on; set to something else it is a change, named as such."""
    from scaletune import checkpoint as ckpt
    from scaletune.config import load_config
    from scaletune.errors import UserError
    from scaletune.identity import config_changes

    cfg = load_config(str(make_config("causal_lm")), [])
    older = cfg.to_dict()
    for section, key in (("train", "neftune_noise_alpha"), ("train", "min_lr_ratio"), ("data", "chat_template")):
        del older[section][key]
    path = tmp_path / "step-4"
    path.mkdir()
    (path / "state.json").write_text(json.dumps({"step": 4, "config": older}, default=str))
    ckpt.write_manifest(path, 4, "fingerprint-without-the-new-keys")
    assert config_changes(older, cfg) == []
    ckpt.check_same_config(path, "this-recipe", False, lambda saved, paths: config_changes(saved, cfg))  # accepted
    noisy = load_config(str(make_config("causal_lm")), ["train.neftune_noise_alpha=5"])
    with pytest.raises(UserError, match=r'train.neftune_noise_alpha: "\(not set\)" -> 5.0'):
        ckpt.check_same_config(path, "this-recipe", False, lambda saved, paths: config_changes(saved, noisy))


def test_a_checkpoint_from_a_newer_scaletune_says_so():
    from scaletune.config import from_dict
    from scaletune.identity import config_changes

    cfg = from_dict({"task": "causal_lm", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}})
    newer = cfg.to_dict()
    newer["train"]["some_future_key"] = 3
    newer["peft"]["lora_dropout"] = 0.1  # a peft key this config does not set: an ordinary change
    assert config_changes(newer, cfg) == [
        'peft.lora_dropout: 0.1 -> "(not set)"',
        'train.some_future_key: 3 -> (not set): this scaletune has no such key, the checkpoint is from a newer '
        'version']


# What a resume may change, and what it must refuse: each trajectory key below decides which examples are
# trained on, in what order, or with which randomness, so a resume that accepted a change to it would continue
# another run's trajectory under this one's name (train.seed: data order, dropout and NEFTune noise; data.*:
# the examples themselves). The resume-free keys change only when the run stops, evaluates, logs or saves.
TRAJECTORY_CHANGES = [("train", "seed", 43), ("data", "max_length", 512), ("data", "eval_fraction", 0.1),
                      ("data", "group_by_length", False), ("data", "packing", True), ("train", "global_batch_size", 32),
                      ("train", "learning_rate", 1e-3), ("train", "neftune_noise_alpha", 5.0)]
RESUME_FREE_CHANGES = [("train", "max_steps", 500), ("train", "epochs", 5), ("train", "eval_every", 50),
                       ("train", "save_every", 50), ("train", "log_every", 1), ("train", "save_total_limit", 1),
                       ("train", "report_to", []), ("data", "num_workers", 2), ("data", "cache", False),
                       ("distributed", "zero_stage", 2), ("output_dir", None, "runs/other"),
                       ("train", "evals_per_epoch", 4)]


def test_a_resume_refuses_a_changed_trajectory_key_and_accepts_a_resume_free_one(tmp_path):
    """`--resume auto` compares the checkpoint's config with the one given: a changed trajectory key is named
    and refused (had train.seed been resume-free, a resume with another seed would have gone on silently with
    another data order and other noise), while a changed resume-free key changes neither the fingerprint nor
    the comparison."""
    from scaletune import checkpoint as ckpt
    from scaletune.config import from_dict
    from scaletune.errors import UserError
    from scaletune.identity import config_changes, config_fingerprint

    raw = {"task": "causal_lm", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    cfg = from_dict(raw)
    path = tmp_path / "step-4"
    path.mkdir()
    (path / "state.json").write_text(json.dumps({"step": 4, "config": cfg.to_dict()}, default=str))
    ckpt.write_manifest(path, 4, config_fingerprint(cfg))

    def changed(section, key, value):
        if key is None:
            return from_dict({**raw, section: value})
        return from_dict({**raw, section: {**raw.get(section, {}), key: value}})

    for section, key, value in TRAJECTORY_CHANGES:
        new = changed(section, key, value)
        assert getattr(getattr(cfg, section), key) != value  # (a real change)
        diff = config_changes(cfg.to_dict(), new)
        assert len(diff) == 1 and diff[0].startswith(f"{section}.{key}: "), (key, diff)
        assert config_fingerprint(new) != config_fingerprint(cfg), key
        with pytest.raises(UserError, match=rf"different run config \(changed: {section}\.{key}: "):
            ckpt.check_same_config(path, config_fingerprint(new), False,
                                   lambda saved, paths, new=new: config_changes(saved, new))
    for section, key, value in RESUME_FREE_CHANGES:
        new = changed(section, key, value)
        assert new.to_dict() != cfg.to_dict(), (section, key)  # (a real change)
        assert config_changes(cfg.to_dict(), new) == [], (section, key)
        assert config_fingerprint(new) == config_fingerprint(cfg), (section, key)
        ckpt.check_same_config(path, config_fingerprint(new), False,
                               lambda saved, paths, new=new: config_changes(saved, new))  # accepted


def test_a_checkpoint_from_elsewhere_is_copied_in_and_named_latest(tmp_path):
    """Resuming a checkpoint that is not checkpoints/step-N (a left path's, a copy under another name): the
    ones from its step on are set aside and it is copied in as that step, so a requeue killed before the
    first save resumes it, not what else checkpoints/ holds."""
    from scaletune.checkpoint import set_aside_newer

    out = tmp_path / "run"
    for step in (2, 4, 6):
        (out / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (out / "checkpoints" / f"step-{step}" / "state.json").write_text(f"other path {step}")
    resumed = tmp_path / "backup" / "ckpt-four"
    resumed.mkdir(parents=True)
    (resumed / "state.json").write_text("this path 4")
    aside = set_aside_newer(out, resumed, 4)
    assert sorted(p.name for p in aside.iterdir()) == ["step-4", "step-6"]
    assert (aside / "step-4" / "state.json").read_text() == "other path 4"
    assert (out / "checkpoints" / "step-4" / "state.json").read_text() == "this path 4"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-4"
    assert (resumed / "state.json").is_file()  # a copy: the user's directory stays
    assert set_aside_newer(out, out / "checkpoints" / "step-4", 4) is None  # its own step-4 now: nothing to move


def test_a_checkpoint_copied_in_before_anything_moves(tmp_path):
    """The copy of a checkpoint from elsewhere comes first: when it fails (here a dangling link inside it),
    checkpoints/ and `latest` are as they were. A checkpoint inside checkpoints/ under another step's name
    is copied in, not moved aside with the later ones."""
    import pytest

    from scaletune.checkpoint import set_aside_newer

    out = tmp_path / "run"
    for step in (60, 70):
        (out / "checkpoints" / f"step-{step}").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step-70\n")
    broken = tmp_path / "elsewhere" / "step-50"
    broken.mkdir(parents=True)
    (broken / "state.json").symlink_to(tmp_path / "gone")
    with pytest.raises(OSError):
        set_aside_newer(out, broken, 50)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-60", "step-70"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-70"
    misnamed = out / "checkpoints" / "step-65"  # holds step 40's state
    misnamed.mkdir()
    (misnamed / "state.json").write_text("step 40")
    aside = set_aside_newer(out, misnamed, 40)
    assert sorted(p.name for p in aside.iterdir()) == ["step-60", "step-70"]
    assert (out / "checkpoints" / "step-40" / "state.json").read_text() == "step 40" and misnamed.is_dir()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-40"


def test_an_mlflow_run_continues_across_resumes(make_config, tmp_path, monkeypatch):
    """MLflow makes its own run ids: every start of a preempted-and-requeued job opened a new MLflow run.
    The first start's run is found again by scaletune's tag and logged to on."""
    mlflow = pytest.importorskip("mlflow")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS"):
        monkeypatch.delenv(var, raising=False)
    path = make_config("causal_lm", n=32, train={"max_steps": 4, "save_every": 2, "log_every": 1,
                                                 "report_to": ["mlflow"]})
    out = tmp_path / "run"
    monkeypatch.setenv("MLFLOW_TAGS", '{"team": "nlp"}')  # (replaces accelerate's tags: ours must survive it)
    assert _train(path, "train.max_steps=3") == 0
    # a resume may change max_steps: MLflow refuses to change a logged parameter, so none is logged again
    assert _train(path, "--resume", out / "checkpoints" / "step-2") == 0
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["scaletune"], output_format="list")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 3, 4]  # the resume logged step 3 again, into the same run
    assert runs[0].data.params["train.max_steps"] == "3" and runs[0].data.tags["team"] == "nlp"


def _save(out, step: int, value: float):
    """save_checkpoint of a one-tensor "model" whose every entry is `value`, as a single process."""
    from types import SimpleNamespace

    import torch

    from scaletune.checkpoint import save_checkpoint

    def save_adapter(directory):
        directory.mkdir()
        (directory / "adapter_config.json").write_text("{}")

    return save_checkpoint(SimpleNamespace(is_main_process=True, num_processes=1), out, step,
                           trainable={"w": torch.full((8,), value)}, optimizer_state={"m": torch.zeros(8)},
                           state={"step": step}, save_adapter=save_adapter, fingerprint="fp", keep=None)


def _flip_last_byte(path):
    """Damage a file in place, keeping its size (a bit flip on disk, a bad copy)."""
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_checkpoint_damaged_in_place_is_not_resumed(tmp_path, caplog):
    """A byte changed in a checkpoint file, its size the same, must fail verification by its sha256 (a size
    check alone passes it): --resume auto skips it for the older intact one, with a warning."""
    from scaletune.checkpoint import find_resumable, verify

    out = tmp_path / "run"
    intact, damaged = _save(out, 2, 1.0), _save(out, 4, 2.0)
    size = (damaged / "trainable.safetensors").stat().st_size
    _flip_last_byte(damaged / "trainable.safetensors")
    assert (damaged / "trainable.safetensors").stat().st_size == size
    assert verify(intact) is None
    assert verify(damaged) == "file trainable.safetensors does not match its hash"
    with caplog.at_level("WARNING", logger="scaletune"):
        assert find_resumable(out, "fp") == intact
    assert f"skipping checkpoint {damaged}: file trainable.safetensors does not match its hash" in caplog.text


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.safetensors", "state.json"])
def test_a_manifest_that_lists_no_required_file_fails_verification(tmp_path, name):
    """A manifest without one of the files every checkpoint has (written by hand, or by a broken save) must
    not verify: every file it does list matches, so only the required list catches it."""
    from scaletune.checkpoint import MANIFEST, verify

    ckpt = _save(tmp_path / "run", 2, 1.0)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    del manifest["files"][name]
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    assert verify(ckpt) == f"manifest lists no {name}"


def test_a_damaged_checkpoint_of_the_same_step_is_rewritten(tmp_path):
    """A save of step N where checkpoints/step-N exists keeps it only if it verifies (a resumed run stopped
    again re-saves the same state); a damaged step-N (a killed write, a bad copy) is replaced by the new
    save, not kept as the checkpoint a resume would refuse."""
    from scaletune.checkpoint import verify

    out = tmp_path / "run"
    ckpt = _save(out, 2, 1.0)
    assert _save(out, 2, 2.0) == ckpt and load_file(ckpt / "trainable.safetensors")["w"].tolist() == [1.0] * 8  # kept
    _flip_last_byte(ckpt / "optimizer.safetensors")
    assert verify(ckpt) is not None
    assert _save(out, 2, 3.0) == ckpt
    assert verify(ckpt) is None and load_file(ckpt / "trainable.safetensors")["w"].tolist() == [3.0] * 8
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-2"]


def test_a_resume_whose_data_gives_other_labels_is_refused_naming_them(make_config, tmp_path, capsys):
    """The classifier head's rows are the checkpoint's labels in order: a fixed typo in the data (3 labels, now 2)
    failed with a bare shape error, and labels renamed into another sort order trained the wrong rows silently."""
    path = make_config("seq_cls", n=32, train={"max_steps": 2})
    train_file = tmp_path / "data" / "train.jsonl"
    records = [json.loads(line) for line in train_file.read_text().splitlines()]
    write_jsonl(train_file, [{**records[0], "label": "poss"}, *records[1:]])  # a typo: a third label
    assert _train(path) == 0
    write_jsonl(train_file, records)  # typo fixed
    capsys.readouterr()
    assert _train(path, "train.max_steps=3", "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "was trained with the labels ['neg', 'pos', 'poss'], this run's data gives ['neg', 'pos']" in err, err
    # as it says: the checkpoint's labels in data.labels continue it
    assert _train(path, "train.max_steps=3", "data.labels=[neg, pos, poss]", "--allow-config-change",
                  "--resume", "auto") == 0
    # the same number of labels in another order (pos renamed a_pos sorts first): refused, not trained on the
    # wrong rows
    other = f"output_dir={tmp_path / 'run2'}"
    assert _train(path, other) == 0
    for f in (train_file, tmp_path / "data" / "eval.jsonl"):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        write_jsonl(f, [{**r, "label": {"pos": "a_pos"}.get(r["label"], r["label"])} for r in rows])
    capsys.readouterr()
    assert _train(path, other, "train.max_steps=3", "--resume", "auto") == 2
    assert "this run's data gives ['a_pos', 'neg']" in capsys.readouterr().err
