"""The training loop: loss normalisation, exact resume, each task learns and its adapter reloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from scaletune import faults
from scaletune.checkpoint import checkpoint_dirs
from scaletune.cli import _resume_hint, build_parser, main
from scaletune.config import load_config
from scaletune.loop import fit
from scaletune.outdir import replaced_runs
from scaletune.train import StopFlag, setup

from stutil import StopAt, read_metrics


def _capture_first_step_grads(run):
    grads = {}
    opt = run.optimizer
    original = opt.step

    def step(*a, **k):
        if not grads:
            model = run.accelerator.unwrap_model(run.model)
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return original(*a, **k)

    opt.step = step
    return grads


@pytest.mark.parametrize("task", ["causal_lm", "seq_cls", "token_cls"])
def test_loss_is_mean_over_all_target_tokens_of_the_step(make_config, tmp_path, task):
    """micro 1 x accumulation 4 and micro 4 x accumulation 1 give the same loss and LoRA gradients. Every task's
    `loss_sum` must be a sum over its targets (the loop divides by the step's target count): a per-micro-batch
    mean (seq_cls dividing by its batch's label count) gives micro 4 a quarter of micro 1's loss and gradient."""
    results = {}
    for micro in (1, 4):
        path = make_config(task, train={"global_batch_size": 4, "micro_batch_size": micro, "max_steps": 1,
                                                "max_grad_norm": None},
                           output_dir=str(tmp_path / f"m{micro}"))
        run, _ = setup(load_config(path))
        grads = _capture_first_step_grads(run)
        fit(run, StopFlag())
        results[micro] = (read_metrics(run.output_dir)[0]["loss"], grads)
    (loss1, g1), (loss4, g4) = results[1], results[4]
    assert loss1 == pytest.approx(loss4, rel=1e-5, abs=1e-6)
    assert g1.keys() == g4.keys() and len(g1) > 0
    for name in g1:
        torch.testing.assert_close(g1[name], g4[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in g1.values())


def test_data_has_variable_lengths_so_mean_of_means_would_differ(make_config, tmp_path):
    """Guards the test above: on this data a per-micro-batch mean gives a different loss."""
    path = make_config("causal_lm", train={"global_batch_size": 4, "micro_batch_size": 1, "max_steps": 1})
    run, _ = setup(load_config(path))
    from scaletune.data.batching import epoch_order, step_micro_batches

    lengths = list(run.data["train"]["length"])
    order = epoch_order(lengths, 42, 0, 4, True)
    batches = step_micro_batches(order, lengths, 0, global_batch=4, micro=1, world=1, rank=0)
    counts = [sum(lab != -100 for lab in run.data["train"][b[0]]["labels"][1:]) for b in batches]
    assert len(set(counts)) > 1, counts


def test_cosine_with_min_lr_ends_at_its_floor_and_resumes_on_it(make_config, tmp_path):
    """cosine_with_min_lr: warmup, then cosine from the peak down to min_lr_ratio x peak (not 0); a resume
    continues the same curve."""
    import math

    common = {"global_batch_size": 8, "micro_batch_size": 8, "max_steps": 8, "save_every": 4, "log_every": 1,
              "lr_scheduler": "cosine_with_min_lr", "min_lr_ratio": 0.2, "warmup_steps": 2, "learning_rate": 1e-3}
    path = make_config("causal_lm", n=32, train=common)
    run, _ = setup(load_config(path))
    assert fit(run, StopAt(run, 4)) == "preempted"
    run, _ = setup(load_config(path), resume="auto")
    assert fit(run, StopFlag()) == "done"

    def lam(k):  # the factor step k+1's update uses
        if k < 2:
            return k / 2
        return 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (k - 2) / 6))

    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "run")}
    assert [lrs[s] for s in range(1, 9)] == pytest.approx([1e-3 * lam(s - 1) for s in range(1, 9)], rel=1e-9)
    assert min(list(lrs.values())[2:]) > 0.2e-3 - 1e-12


def test_resume_continues_exactly(make_config, tmp_path):
    """8 uninterrupted steps == 4 steps, stop (signal path), resume auto, 4 more steps. The split run logs
    every 3 steps: each logged loss is the mean of the steps since the last log, the resume at 4 included."""
    common = {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 8, "save_every": 3,
              "lr_scheduler": "cosine", "warmup_steps": 2}
    full = make_config("causal_lm", train=common, output_dir=str(tmp_path / "full"),
                       peft={"lora_dropout": 0.1})
    run, _ = setup(load_config(full))
    assert fit(run, StopFlag()) == "done"
    split = make_config("causal_lm", train={**common, "log_every": 3}, output_dir=str(tmp_path / "split"),
                        peft={"lora_dropout": 0.1})
    run, _ = setup(load_config(split))
    assert fit(run, StopAt(run, 4)) == "preempted"
    assert (tmp_path / "split/checkpoints/latest").read_text().strip() == "step-4"
    run, used = setup(load_config(split), resume="auto")
    assert used.name == "step-4" and run.step == 4
    assert fit(run, StopFlag()) == "done"
    a = read_metrics(tmp_path / "full")
    b = read_metrics(tmp_path / "split")
    assert [r["step"] for r in a] == list(range(1, 9)) and [r["step"] for r in b] == [3, 6, 8]
    step_loss = [r["loss"] for r in a]
    means = [sum(step_loss[i:j]) / (j - i) for i, j in ((0, 3), (3, 6), (6, 8))]
    assert [r["loss"] for r in b] == pytest.approx(means, rel=1e-6)
    assert [a[s - 1]["lr"] for s in (3, 6, 8)] == [r["lr"] for r in b]
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "full/adapter/adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "split/adapter/adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    # save_total_limit (default 3) pruned old ones; the final step is checkpointed
    names = sorted(p.name for p in (tmp_path / "split/checkpoints").iterdir() if p.name.startswith("step-"))
    assert names == ["step-4", "step-6", "step-8"]


def _record_step_lrs(run) -> list[float]:
    """The lr each optimizer update of `run` applies, read when it applies it."""
    used: list[float] = []
    inner = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate's wrapper holds the torch one
    inner.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    return used


def test_logged_lr_is_the_lr_each_step_used(make_config, tmp_path):
    """Linear warmup 2 of 4 steps at peak 1e-2, with gradient accumulation, stopped after step 2 and
    resumed: steps 1-4 update with lr 0, 0.005, 0.01, 0.005, and that is what is logged for them (was the
    next step's lr: 0.005, 0.01, 0.005, 0)."""
    path = make_config("causal_lm", train={"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 4,
                                           "lr_scheduler": "linear", "warmup_steps": 2, "save_every": 2})
    schedule = [0.0, 0.005, 0.01, 0.005]
    run, _ = setup(load_config(path))
    assert run.accum == 2
    before = _record_step_lrs(run)
    assert fit(run, StopAt(run, 2)) == "preempted"
    run, _ = setup(load_config(path), resume="auto")
    assert run.step == 2
    after = _record_step_lrs(run)
    assert fit(run, StopFlag()) == "done"
    assert before + after == pytest.approx(schedule)
    logged = read_metrics(run.output_dir)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [r["lr"] for r in logged] == pytest.approx(schedule)


def test_resume_of_finished_run_does_nothing_more(make_config, tmp_path):
    path = make_config("causal_lm", train={"max_steps": 2})
    run, _ = setup(load_config(path))
    fit(run, StopFlag())
    run, used = setup(load_config(path), resume="auto")
    assert run.step == 2 and used.name == "step-2"
    assert fit(run, StopFlag()) == "done"
    assert [r["step"] for r in read_metrics(run.output_dir)] == [1, 2]


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


def test_setup_says_what_each_epoch_leaves_out_and_when_warmup_covers_the_run(make_config, tmp_path, caplog):
    """The examples that cannot fill a last global batch sit each epoch out: said in the log and run.json
    of a run that reaches an epoch's end (not of a shorter one: it was said of a 3-step run on 100k
    examples). A one-step run with a one-step warmup trains at lr 0: said as a warning."""
    path = make_config("causal_lm", n=30, train={"global_batch_size": 8, "max_steps": 1, "warmup_steps": 1})
    with caplog.at_level("INFO", logger="scaletune"):
        run, _ = setup(load_config(path))
    n = len(run.data["train"])
    assert n % 8 and n // 8 > 1, n
    note = f"{n % 8} of {n} examples do not fill a last global batch of 8 and sit each epoch out"
    assert note not in caplog.text
    assert "reaches at most 0% of train.learning_rate and nothing is trained" in caplog.text
    assert json.loads((run.output_dir / "run.json").read_text())["left_out_per_epoch"] == n % 8
    caplog.clear()
    with caplog.at_level("INFO", logger="scaletune"):
        setup(load_config(path, [f"train.max_steps={n // 8}", "train.warmup_steps=0", f"output_dir={tmp_path / 'r2'}"]))
    assert note in caplog.text


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


def _peft_predictions(cfg_path: Path, task: str, texts):
    """Load base + adapter with plain transformers/peft (no scaletune) and predict."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    cfg = load_config(cfg_path)
    adapter = Path(cfg.output_dir) / "adapter"
    meta = json.loads((adapter / "scaletune.json").read_text())
    cls = AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForTokenClassification
    base = cls.from_pretrained(cfg.model.name_or_path, num_labels=len(meta["labels"]))
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    tok = AutoTokenizer.from_pretrained(str(adapter))
    with torch.no_grad():
        if task == "seq_cls":
            enc = tok(texts, padding=True, return_tensors="pt")
            return model(**enc).logits.argmax(-1).tolist()
        enc = tok(texts, is_split_into_words=True, return_tensors="pt")
        return model(**enc).logits.argmax(-1)[0].tolist()


def test_seq_cls_learns_and_adapter_reloads_in_plain_peft(make_config, tmp_path):
    path = make_config("seq_cls", n=96, train={"global_batch_size": 16, "micro_batch_size": 8, "max_steps": 40,
                                               "learning_rate": 2e-2, "eval_every": 40})
    run, _ = setup(load_config(path))
    fit(run, StopFlag())
    evals = read_metrics(run.output_dir, "eval")
    assert evals[-1]["accuracy"] >= 0.9, evals
    assert set(evals[-1]["per_class"]) == {"neg", "pos"} and "macro_f1" in evals[-1]
    # the classification head is trained and saved with the adapter
    from safetensors.torch import load_file

    saved = load_file(str(run.output_dir / "adapter/adapter_model.safetensors"))
    assert any("classifier" in k for k in saved)
    texts = ["bravo alpha charlie", "bravo charlie delta", "alpha", "echo golf hotel"]
    preds = _peft_predictions(path, "seq_cls", texts)
    import io

    from scaletune.infer import run_predict

    out = io.StringIO()
    ours = run_predict(load_config(path), None, None, 4, out=out, stdin=io.StringIO("\n".join(texts)))
    labels = json.loads((run.output_dir / "adapter/scaletune.json").read_text())["labels"]
    assert [labels[p] for p in preds] == [r["label"] for r in ours]
    assert [r["label"] for r in ours] == ["pos", "neg", "pos", "neg"]


def test_max_length_past_the_position_table_trains_at_the_table_size(make_config, tmp_path, caplog):
    """A BERT has 512 learned positions; its tokenizer states no limit (model_max_length is the 1e30
    "unlimited" sentinel), so only the model config knows. data.max_length 1024 with longer texts used to
    crash the first step ("expanded size of the tensor (1024) must match the existing size (512)")."""
    from stutil import WORDS, write_jsonl

    records = [{"text": " ".join(WORDS * 60), "label": "pos" if i % 2 else "neg"} for i in range(8)]
    train = write_jsonl(tmp_path / "long.jsonl", records)
    path = make_config("seq_cls", data={"train": str(train), "eval": None, "max_length": 1024},
                       train={"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 1})
    with caplog.at_level("WARNING", logger="scaletune"):
        run, _ = setup(load_config(path))
    assert run.tokenizer.model_max_length > 10**20  # the sentinel: the tokenizer did not lower it
    assert "data.max_length=1024 is above the 512 positions of" in caplog.text
    assert run.cfg.data.max_length == 512
    assert max(len(ids) for ids in run.data["train"]["input_ids"]) == 512
    fit(run, StopFlag())
    assert read_metrics(run.output_dir)[-1]["step"] == 1


def test_token_cls_learns_with_seqeval_metrics(make_config, tmp_path):
    path = make_config("token_cls", n=96, train={"global_batch_size": 16, "micro_batch_size": 8, "max_steps": 40,
                                                 "learning_rate": 2e-2, "eval_every": 40})
    run, _ = setup(load_config(path))
    fit(run, StopFlag())
    final = read_metrics(run.output_dir, "eval")[-1]
    assert final["f1"] >= 0.8, final
    assert {"PER", "LOC"} <= set(final["per_type"])
    words = ["Alice", "bravo", "Paris"]
    preds = _peft_predictions(path, "token_cls", words)
    labels = json.loads((run.output_dir / "adapter/scaletune.json").read_text())["labels"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run.output_dir / "adapter"))
    wid = tok(words, is_split_into_words=True).word_ids()
    first = {}
    for pos, w in enumerate(wid):
        if w is not None and w not in first:
            first[w] = labels[preds[pos]]
    assert [first[i] for i in range(3)] == ["B-PER", "O", "B-LOC"]


def test_causal_lm_eval_reports_perplexity_and_loss_drops(make_config, tmp_path):
    path = make_config("causal_lm", n=64, train={"global_batch_size": 8, "micro_batch_size": 8, "max_steps": 30,
                                                 "learning_rate": 2e-2, "eval_every": 15,
                                                 "report_to": ["tensorboard"]})
    run, _ = setup(load_config(path))
    fit(run, StopFlag())
    evals = read_metrics(run.output_dir, "eval")
    assert [e["step"] for e in evals] == [15, 30]
    assert evals[-1]["perplexity"] == pytest.approx(2.718281828 ** evals[-1]["loss"], rel=1e-4)
    train = read_metrics(run.output_dir)
    assert train[-1]["loss"] < train[0]["loss"] * 0.97
    for key in ("tokens_per_s", "target_tokens_per_s", "padding_ratio", "peak_mem_mb", "lr", "grad_norm"):
        assert key in train[0]
    assert list(run.output_dir.rglob("events.out.tfevents*")), "no TensorBoard events written"
    info = json.loads((run.output_dir / "run.json").read_text())
    assert info["world_size"] == 1 and info["config"]["task"] == "causal_lm" and info["versions"]["torch"]


def test_eval_loss_is_the_mean_over_every_eval_target_token(make_config):
    """evaluate() sums the per-target losses of all batches and divides once by the number of targets; a mean
    of per-batch means weights the targets of a small batch (here the last one, a single example) more than
    the others. Reference: each eval example alone, unpadded, through the model's plain logits."""
    from scaletune.evaluate import evaluate
    from scaletune.tasks import IGNORE

    path = make_config("causal_lm", train={"global_batch_size": 8, "micro_batch_size": 8, "max_steps": 1})
    run, _ = setup(load_config(path))
    data = run.data["eval"]
    assert len(data) % 3 == 1  # batches of 3 then 1: unequal target counts
    model = run.accelerator.unwrap_model(run.model)
    total, n = 0.0, 0
    with torch.no_grad():
        model.eval()
        for ex in data:
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(ex["labels"][1:])
            total += float(torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE,
                                                             reduction="sum"))
            n += int((labels != IGNORE).sum())
    got = evaluate(run.accelerator, run.model, run.task, data, run.data["labels"], 3, run.tokenizer.pad_token_id)
    assert got["loss"] == pytest.approx(total / n, rel=1e-5)


def test_eval_batches_cover_every_example_once_at_any_world_size():
    """Every eval example is scored exactly once across the ranks, the last partial batch included (dropping
    it, as training drops an incomplete global batch, would leave up to micro - 1 examples out of every eval
    metric); every rank gets the same number of batches, `None` marking a padding round it runs and discards."""
    import random

    from scaletune.data.batching import eval_batches

    rng = random.Random(0)
    for n in (1, 5, 6, 7, 16):
        lengths = [rng.randint(1, 50) for _ in range(n)]
        for micro in (1, 2, 3, 8):
            for world in (1, 2, 3):
                per_rank = [eval_batches(lengths, micro, world, rank) for rank in range(world)]
                assert len({len(b) for b in per_rank}) == 1, (n, micro, world)
                real = [b for batches in per_rank for b in batches if b is not None]
                assert sorted(i for b in real for i in b) == list(range(n)), (n, micro, world)
                assert all(0 < len(b) <= micro for b in real)
                assert len(real) == -(-n // micro)  # a None is padding only, never a batch left out


def test_eval_batches_group_similar_lengths():
    """Eval batches hold examples of similar length (longest first): in file order half of what eval computed on
    real dev sets was padding. Sorted, no batch's examples could be swapped with another's to pad less."""
    import random

    from scaletune.data.batching import eval_batches

    rng = random.Random(1)
    lengths = [rng.choice([5, 6, 80, 90]) for _ in range(64)]
    batches = eval_batches(lengths, 8, 1, 0)
    padded = sum(8 * max(lengths[i] for i in b) for b in batches)
    in_file_order = sum(8 * max(lengths[i:i + 8]) for i in range(0, 64, 8))
    assert padded < 0.75 * in_file_order
    spans = [(min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches]
    assert all(lo >= hi_next for (lo, _), (_, hi_next) in zip(spans, spans[1:]))  # no overlap: sorted
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest first: memory shows at once


def test_batch_larger_than_packed_rows_says_the_examples_were_packed(make_config, capsys):
    path = make_config("causal_lm", n=6, data={"packing": True, "max_length": 512},
                       train={"global_batch_size": 4, "micro_batch_size": 4})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "larger than the training set (6 usable examples packed into 2 row(s) of data.max_length=512" in err


def test_seq_cls_macro_f1_averages_the_classes_that_occur():
    """A perfect classifier scored on an eval set holding one of three classes had macro_f1 0.333: the two
    absent (and never predicted) classes counted as F1 0. They are left out, as scikit-learn's default does;
    a class that is predicted but absent still counts (those predictions are wrong)."""
    from scaletune.tasks import get_task

    task = get_task("seq_cls")
    perfect = task.metrics([(1, 1)] * 5, 1.0, 5, ["neg", "pos", "neutral"])
    assert perfect["accuracy"] == 1.0 and perfect["macro_f1"] == 1.0
    assert perfect["per_class"]["neg"]["support"] == 0  # the report still lists every class
    wrong = task.metrics([(1, 1)] * 4 + [(2, 1)], 1.0, 5, ["neg", "pos", "neutral"])
    assert wrong["macro_f1"] == pytest.approx((2 * 4 / (4 + 5)) / 2)  # pos: p=1, r=0.8; neutral: 0


def test_a_4bit_base_counts_its_parameters_unpacked(make_config, tmp_path, tiny_llama, monkeypatch):
    """bitsandbytes packs two 4-bit weights per byte (four per bf16 storage element), so numel() saw a
    quarter of a QLoRA base: run.json's total_params and the MFU's FLOPs (Throughput) were that much low."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers import AutoModelForCausalLM

    from scaletune.metrics import Throughput

    path = make_config("causal_lm", n=16, model={"quantization": "4bit", "dtype": "bfloat16"},
                       train={"mixed_precision": "bf16", "max_steps": 1, "global_batch_size": 4})
    AcceleratorState._reset_state(True)  # accelerate keeps one mixed precision per process; this one is bf16
    GradientState._reset_state()
    try:
        run, _ = setup(load_config(path), overwrite=True)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    base = sum(p.numel() for p in plain.parameters())
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    adapter = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert (info["trainable_params"], info["total_params"]) == (adapter, base + adapter)
    monkeypatch.setenv("SCALETUNE_PEAK_TFLOPS", "1")
    speed = Throughput(run.accelerator, run.model)
    lookup = 0 if plain.config.tie_word_embeddings else plain.get_input_embeddings().weight.numel()
    assert lookup and (speed.n_trainable, speed.n_params) == (adapter, base + adapter - lookup)  # (no matmul)


@pytest.mark.parametrize(("task", "bits"), [("seq_cls", "4bit"), ("token_cls", "8bit")])
def test_a_quantized_encoder_trains_its_new_head_unquantized(make_config, tmp_path, task, bits):
    """A BERT-family base quantized for classification / NER: its new head (`classifier`, a bias last) was
    quantized too, as transformers keeps only the last parameter's module out, and bitsandbytes crashed at
    the first step (4bit: an assertion, 8bit: no attribute 'CB'). The head now stays a plain Linear and
    the run trains, saves and evaluates."""
    from scaletune.demo.tiny import build_model_dir

    import forking
    from stutil import corpus

    # 4-bit blocks are 64 wide: the suite's tiny BERT (hidden 32) is too narrow for any 4-bit layer
    bert = build_model_dir(tmp_path / "bert64", corpus(), arch="bert", hidden=64, layers=2, heads=2, vocab_size=256)
    path = make_config(task, n=16, model={"quantization": bits, "dtype": "bfloat16", "name_or_path": str(bert)},
                       train={"mixed_precision": "bf16", "max_steps": 2, "global_batch_size": 4})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCALETUNE_NO_PROGRESS": "1"}
    res = forking.run(["train", str(path)], env, tmp_path / "train.log", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run", "train")] == [1, 2]
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert "classifier" in saved["modules_to_save"]
    # merge folds it into the full-precision base, and says that is not the model eval measured
    res = forking.run(["merge", str(path), "--out", str(tmp_path / "merged")], env, tmp_path / "merge.log", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "quantized base and is folded into the base's full-precision weights" in res.stderr
    assert (tmp_path / "merged" / "config.json").is_file()


def test_evals_and_saves_per_epoch_set_the_step_intervals(make_config, tmp_path, caplog):
    """axolotl's evals_per_epoch / saves_per_epoch had no equivalent (an unknown key): the user worked out
    the steps of an epoch. 80 examples in global batches of 8 are 10 steps an epoch: 4 evals an epoch are at
    its steps 3, 5, 8 and 10, 3 checkpoints at 4, 7 and 10; over 2 epochs. (One every 10 // 4 steps was 5 evals
    an epoch, and checkpoints every 3 steps missed the epochs' ends.)"""
    import yaml

    from scaletune.errors import ConfigError

    path = make_config("causal_lm", train={"global_batch_size": 8, "micro_batch_size": 4, "epochs": 2,
                                           "max_steps": None, "evals_per_epoch": 4, "saves_per_epoch": 3,
                                           "eval_every": None, "save_every": None, "save_total_limit": None},
                       n=80)
    raw = yaml.safe_load(path.read_text())
    for key in ("eval_every", "save_every"):  # (as a user writes it: only the per-epoch keys)
        raw["train"].pop(key)
    path.write_text(yaml.safe_dump(raw))
    with caplog.at_level("INFO", logger="scaletune"):
        assert main(["train", str(path)]) == 0
    assert "train.evals_per_epoch=4: evaluating at steps 3, 5, 8, 10 of each epoch of 10" in caplog.text
    out = tmp_path / "run"
    assert [r["step"] for r in read_metrics(out, "eval")] == [3, 5, 8, 10, 13, 15, 18, 20]
    assert sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")) == [4, 7, 10, 14, 17, 20]
    # run.json's config runs again as it is (it held the resolved eval_every beside evals_per_epoch: refused)
    saved = json.loads((out / "run.json").read_text())["config"]
    assert saved["train"]["evals_per_epoch"] == 4 and saved["train"]["eval_every"] == 200  # (the default: unset)
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump({**saved, "output_dir": str(tmp_path / "again")}))
    load_config(again, [], check_peft=True)
    # one or the other; and evals need eval data
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.eval_every=5", "data.eval=null"], check_peft=True)
    text = "\n".join(err.value.problems)
    assert "train.evals_per_epoch and train.eval_every: give one or the other" in text
    assert "train.evals_per_epoch: there is no eval data to evaluate" in text


def test_per_epoch_schedules_fall_due_the_asked_number_of_times_each_epoch():
    """N times an epoch is N steps of every epoch, the last at its end, for any epoch length; more than the
    epoch has steps is every step. Fixed intervals stay as they were."""
    from scaletune.train import Every

    for epoch in (1, 7, 10, 64, 999):
        for times in (1, 3, 4, 50):
            every = Every.per_epoch(times, epoch)
            due = [step for step in range(1, 3 * epoch + 1) if every.due(step)]
            assert len(due) == 3 * min(times, epoch) and due[-1] == 3 * epoch
            assert all(every.due(k * epoch) for k in (1, 2, 3))
            gaps = {b - a for a, b in zip(due, due[1:])}
            assert max(gaps) - min(gaps) <= 1  # evenly spread
    assert [s for s in range(1, 13) if Every(5).due(s)] == [5, 10] and not any(Every().due(s) for s in range(9))
    assert Every.per_epoch(50, 999).describe() == "at steps 20, 40, 60, ..., 999 of each epoch of 999"
    # up to six steps are all named; a single one reads "step"
    assert Every.per_epoch(6, 12).describe() == "at steps 2, 4, 6, 8, 10, 12 of each epoch of 12"
    assert Every.per_epoch(1, 7).describe() == "at step 7 of each epoch of 7"


def test_a_preemption_another_rank_heard_marks_the_checkpoint_with_its_signal(make_config, tmp_path, monkeypatch, capsys):
    """Ranks stop on the signal step_head agrees on, which another rank may have heard alone: the marker the
    Slurm templates read (requeue on SIGUSR1), the preempted event and the message name that signal, not
    this rank's own (none)."""
    import signal

    from scaletune import loop

    marker = tmp_path / "marker"
    monkeypatch.setenv("SCALETUNE_PREEMPT_MARKER", str(marker))
    path = make_config("causal_lm", train={"global_batch_size": 4, "micro_batch_size": 4, "max_steps": 4})
    run, _ = setup(load_config(path))
    monkeypatch.setattr(loop, "step_head", lambda acc, n, stop, w=None: (n, n if w is None else w,
                                                                   signal.SIGUSR1 if run.step >= 2 else None))
    assert fit(run, StopFlag()) == "preempted"
    assert marker.read_text().splitlines() == [str(tmp_path / "run/checkpoints/step-2"), "SIGUSR1"]
    assert read_metrics(tmp_path / "run", "preempted")[0]["signal"] == signal.SIGUSR1
    assert "stopped on SIGUSR1 (to another rank) at step 2" in capsys.readouterr().out
