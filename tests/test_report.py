"""`scaletune report`: plots, HTML and terminal summary from synthetic (and one real) run dirs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from scaletune.cli import main
from scaletune.errors import UserError
from scaletune.report import build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

EVAL = {
    "causal_lm": lambda s: {"loss": 2.0 / s, "perplexity": 2.718 ** (2.0 / s), "target_tokens": 500},
    "seq_cls": lambda s: {"loss": 1.0 / s, "accuracy": 0.5 + 0.1 * s, "macro_f1": 0.4 + 0.1 * s,
                          "per_class": {"neg": {"precision": 0.8, "recall": 0.7, "f1-score": 0.75, "support": 8},
                                        "pos": {"precision": 0.7, "recall": 0.8, "f1-score": 0.74, "support": 8}},
                          "confusion_matrix": {"labels": ["neg", "pos"], "counts": [[13, 3], [4, 17]]}},
    "kto": lambda s: {"loss": 0.5 - 0.05 * s, "desirable_reward": 0.1 * s, "undesirable_reward": -0.1 * s,
                      "reward_margin": 0.2 * s, "kl": 0.5 / s, "examples": 16},
    "token_cls": lambda s: {"loss": 1.0 / s, "precision": 0.6, "recall": 0.5 + 0.05 * s, "f1": 0.55 + 0.05 * s,
                            "token_accuracy": 0.9, "sentences_truncated": 2, "words_truncated": 7,
                            "entities_truncated": 3,
                            "per_type": {"PER": {"precision": 0.6, "recall": 0.5, "f1-score": 0.55, "support": 10}}},
}

CONFIG = {"task": "causal_lm", "model": {"name_or_path": "tiny", "dtype": "float32"},
          "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_length": 160},
          "peft": {"method": "lora", "r": 4, "lora_alpha": 8},
          "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "learning_rate": 0.01,
                    "lr_scheduler": "linear", "seed": 42},
          "distributed": {"zero_stage": 0}, "output_dir": "runs/x"}


def make_run(path: Path, task: str = "causal_lm", *, steps: int = 4, evals: bool = True, total: int | None = None,
             extra_lines: tuple[str, ...] = (), run_json: bool = True, **overrides: dict) -> Path:
    """Write a synthetic run dir: train events every step, eval at steps 2 and `steps`."""
    path.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        lines.append({"event": "train", "step": s, "time": 1000.0 + s, "loss": 3.0 / s, "tokens_per_s": 1000.0 + s,
                      "target_tokens_per_s": 500.0, "padding_ratio": 0.1, "peak_mem_mb": 100.0 + s,
                      "lr": 0.01 * (1 - s / (steps + 1)), "grad_norm": 1.0, "epoch": s / 8})
        if evals and s in (2, steps):
            lines.append({"event": "eval", "step": s, "time": 1000.5 + s, **EVAL[task](s)})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "".join(extra_lines))
    if run_json:
        cfg = copy.deepcopy(CONFIG)
        cfg["task"] = task
        for section, values in overrides.items():
            cfg[section].update(values)
        info = {"config": cfg, "versions": {"torch": "2.x"}, "world_size": 1, "grad_accum": 2,
                "total_steps": total or steps, "trainable_params": 1234}
        (path / "run.json").write_text(json.dumps(info))
    return path


def pngs(out: Path) -> list[Path]:
    files = sorted(out.glob("*.png"))
    assert files and all(f.read_bytes()[:8] == PNG_MAGIC for f in files)
    return files


@pytest.mark.parametrize("task,expected", [
    ("causal_lm", ["perplexity", "eval loss"]),
    ("seq_cls", ["accuracy", "macro_f1", "per_class", "neg"]),
    ("token_cls", ["precision", "recall", "token_accuracy", "per_type", "PER"]),
])
def test_single_run_renders_html_pngs_and_summary(tmp_path, capsys, task, expected):
    run = make_run(tmp_path / "run", task)
    report, _ = build_report([str(run)])
    assert report == run / "report.html"
    page = report.read_text()
    for word in [task, "final train loss", "0.75", "data:image/png;base64,", *expected]:
        assert word in page
    # counts of what max_length cut are not metrics to plot or rank
    assert not any(f"{k}_truncated" in page for k in ("sentences", "words", "entities"))
    names = {p.name for p in pngs(run)}
    assert {"loss.png", "eval_metrics.png", "learning_rate.png", "throughput.png", "memory.png"} <= names


def test_seq_cls_confusion_matrix_is_a_table_not_a_metric(tmp_path, capsys):
    """The nested counts of seq_cls' confusion matrix are shown as a gold x predicted table of the final
    eval, and are neither plotted nor summarised as a metric."""
    run = make_run(tmp_path / "run", "seq_cls")
    report, _ = build_report([str(run)])
    page = report.read_text()
    assert "confusion_matrix (step 4; rows: gold, columns: predicted)" in page
    assert ("<tr><th>gold \\ predicted</th><th>neg</th><th>pos</th></tr><tr><td>neg</td><td>13</td><td>3</td></tr>"
            "<tr><td>pos</td><td>4</td><td>17</td></tr>") in page
    assert main(["report", str(run)]) == 0
    assert "eval confusion" not in capsys.readouterr().out


def test_summary_values_best_and_final(tmp_path, capsys):
    run = make_run(tmp_path / "run", "seq_cls", steps=4)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "== run" in out and "seq_cls" in out and "4/4" in out
    assert "eval accuracy         0.9 (best 0.9 @ 4)" in out
    assert "eval loss             0.25 (best 0.25 @ 4)" in out  # lower is better for loss
    assert "peak memory (MB)      104" in out and "report:" in out


def test_kto_kl_and_example_count_get_no_best(tmp_path, capsys):
    """kto's kl is its reference point and examples a count, neither a score: the report gives their final value
    alone, where it calls a best for each score (its loss and rewards) that picks an adapter."""
    run = make_run(tmp_path / "run", "kto", steps=4)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "  eval kl               0.125\n" in out and "  eval examples         16\n" in out
    assert "  eval reward_margin    0.8 (best 0.8 @ 4)" in out
    assert "eval undesirable_reward -0.4 (best -0.4 @ 4)" in out  # lower is better
    page = (run / "report.html").read_text()
    assert "<td>0.125</td>" in page and "<td>16</td>" in page and "0.8 (best 0.8 @ 4)" in page


def test_multi_run_comparison_overlays_and_diffs_hyperparameters(tmp_path):
    a = make_run(tmp_path / "lr_small", train={"learning_rate": 1e-4})
    b = make_run(tmp_path / "lr_big", train={"learning_rate": 1e-3}, peft={"r": 16})
    out = tmp_path / "cmp"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "lr_small" in page and "lr_big" in page
    assert "<td>lr</td><td>0.0001</td><td>0.001</td>" in page
    assert "<td>r</td><td>4</td><td>16</td>" in page
    assert "<td>method</td><td>lora</td><td>lora</td>" in page  # key parameters shown even when equal
    assert "<td>global batch</td>" in page
    assert "train.lr_scheduler" not in page.split("Notes")[0]  # equal non-key parameters are left out
    assert "output_dir</td>" not in page
    assert not (a / "report.html").exists()
    pngs(out)


def test_partial_run_no_eval_and_corrupt_line_gets_notes(tmp_path, capsys):
    run = make_run(tmp_path / "killed", steps=3, total=10, evals=False,
                   # a step that is no finite number (hand-edited) was a traceback: int(NaN)
                   extra_lines=('{"event": "train", "step": NaN, "loss": 1}\n', '{"event": "train", "step": 1e400}\n',
                                '{"event": "train", "step": 4, "lo'))
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    page = (run / "report.html").read_text()
    for text in (out, page):
        assert "skipped 3 unreadable line" in text
        assert "no eval events" in text
        assert "incomplete: last logged step 3 of 10" in text
    assert "3/10" in out
    assert not (run / "eval_metrics.png").exists()
    pngs(run)


def test_missing_metrics_or_run_json_still_reports(tmp_path):
    only_json = make_run(tmp_path / "only_json")
    (only_json / "metrics.jsonl").unlink()
    report, _ = build_report([str(only_json)])
    assert "metrics.jsonl missing" in report.read_text()
    assert not list(only_json.glob("*.png"))

    only_metrics = make_run(tmp_path / "only_metrics", run_json=False)
    empty = make_run(tmp_path / "empty")
    (empty / "metrics.jsonl").write_text("")
    report, _ = build_report([str(only_metrics), str(empty)], out=str(tmp_path / "out"))
    page = report.read_text()
    assert "run.json missing" in page and "no readable records" in page


def test_resumed_run_keeps_latest_record_and_notes_preemption(tmp_path):
    run = make_run(tmp_path / "resumed", steps=2, extra_lines=(
        json.dumps({"event": "preempted", "step": 2, "time": 1, "signal": 15, "checkpoint": "ck/step-2"}) + "\n",
        json.dumps({"event": "train", "step": 2, "time": 2, "loss": 9.5}) + "\n"))
    _, (r,) = build_report([str(run)])
    assert r.series("train", "loss")[1] == [3.0, 9.5]
    assert any("stopped at step 2 (SIGTERM)" in n for n in r.notes), r.notes  # (a cancel as often as a preemption)
    assert any("replaced by the resumed run's" in n for n in r.notes)
    assert not any("resumed 1 time" in n for n in r.notes)  # (this log has no resume event)
    # rank 0 logs; when the signal reached another rank, its record has none: said so, not "signal –"
    other = make_run(tmp_path / "other", steps=2, extra_lines=(
        json.dumps({"event": "preempted", "step": 2, "time": 1, "signal": None, "checkpoint": "ck/step-2"}) + "\n",))
    _, (r,) = build_report([str(other)])
    assert any("preempted at step 2 (a signal to another rank)" in n for n in r.notes), r.notes
    # a Ctrl-C is named as the user's stop (it read "preempted at step 2 (signal 2)")
    ctrl_c = make_run(tmp_path / "ctrl_c", steps=2, extra_lines=(
        json.dumps({"event": "preempted", "step": 2, "time": 1, "signal": 2, "checkpoint": "ck/step-2"}) + "\n",))
    _, (r,) = build_report([str(ctrl_c)])
    assert any("stopped by Ctrl-C at step 2 (SIGINT)" in n for n in r.notes), r.notes
    # a run stopped on macOS (SIGUSR1 is 30 there, SIGPWR on Linux) is named as it was recorded
    mac = make_run(tmp_path / "mac", steps=2, extra_lines=(
        json.dumps({"event": "preempted", "step": 2, "time": 1, "signal": 30, "signal_name": "SIGUSR1",
                    "checkpoint": "ck/step-2"}) + "\n",))
    _, (r,) = build_report([str(mac)])
    assert any("preempted at step 2 (SIGUSR1)" in n for n in r.notes), r.notes


def test_resumes_are_listed_though_not_preemptions(tmp_path):
    """A run resumed after a kill or to go on longer showed only 'steps 60/60' (run.json has the resumes)."""
    run = make_run(tmp_path / "resumed", steps=2, extra_lines=(
        json.dumps({"event": "resume", "step": 1, "time": 1}) + "\n",
        json.dumps({"event": "train", "step": 2, "time": 2, "loss": 9.5}) + "\n",
        json.dumps({"event": "resume", "step": 2, "time": 3}) + "\n"))
    _, (r,) = build_report([str(run)])
    assert "resumed 2 time(s), from step(s) 1, 2" in r.notes


def test_strings_from_files_are_html_escaped(tmp_path):
    run = make_run(tmp_path / "run", model={"name_or_path": "<script>alert(1)</script>"})
    page = build_report([str(run)])[0].read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_bad_dirs_are_user_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="does not exist"):
        build_report([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl or run.json"):
        build_report([str(tmp_path / "empty")])
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_on_a_real_tiny_run(make_config, tmp_path, capsys):
    cfg = make_config("seq_cls", n=16, train={"max_steps": 2, "global_batch_size": 8})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "accuracy" in page and "macro_f1" in page and "2/2" in page
    assert {"loss.png", "eval_metrics.png"} <= {p.name for p in pngs(run)}


def test_metrics_are_strict_json_and_the_report_reads_nonfinite_values(make_config, tmp_path, monkeypatch):
    """A skipped NaN step was logged as bare NaN, which strict JSON readers (JavaScript, jq --strict) refuse."""
    import math

    from scaletune import faults
    from scaletune.config import load_config
    from scaletune.loop import fit
    from scaletune.report import load_run
    from scaletune.stopflag import StopFlag
    from scaletune.train import setup

    monkeypatch.setenv("SCALETUNE_FAULT", "nan@2")
    faults._plan.cache_clear()
    path = make_config("causal_lm", train={"max_steps": 3, "log_every": 1, "on_nonfinite": "skip"})
    run, _ = setup(load_config(path))
    try:
        fit(run, StopFlag())
    finally:
        faults._plan.cache_clear()
    lines = (run.output_dir / "metrics.jsonl").read_text().splitlines()

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in {text}"))

    records = [strict(line) for line in lines]
    assert any(r.get("loss") == "NaN" for r in records), records
    run2 = load_run(run.output_dir, "r")
    steps, losses = run2.series("train", "loss")
    assert math.isnan(losses[steps.index(2)])


def test_a_report_into_the_same_out_leaves_no_stale_plot_and_names_a_run_once(tmp_path):
    with_eval = make_run(tmp_path / "a")
    without = make_run(tmp_path / "b", evals=False)
    out = tmp_path / "rep"
    build_report([str(with_eval)], str(out))
    assert (out / "eval_metrics.png").exists()
    _, runs = build_report([str(without), str(without) + "/"], str(out))
    assert not (out / "eval_metrics.png").exists() and len(runs) == 1


def test_a_resume_after_a_stop_replaces_what_the_stopped_path_logged(make_config, tmp_path, monkeypatch, capsys):
    """Stopped by a non-finite loss at step 5 (checkpoint at step 3), then resumed with --resume auto: the
    stopped path's step 4-5 records (its non-finite event included) are not the run's. metrics.jsonl
    marks the resume, `report` shows the resumed path only, and TensorBoard drops the stopped path's
    points past step 3 (it drew both curves: steps 4, 5, 4, 5, 6)."""
    from tensorboard.backend.event_processing import event_accumulator

    from scaletune import faults

    path = make_config("causal_lm", train={"max_steps": 6, "save_every": 3, "report_to": ["tensorboard"]})
    monkeypatch.setenv("SCALETUNE_FAULT", "nan@5")
    faults._plan.cache_clear()
    assert main(["train", str(path)]) == 2
    monkeypatch.delenv("SCALETUNE_FAULT")
    faults._plan.cache_clear()
    assert main(["train", str(path), "--resume", "auto"]) == 0
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in records if r["event"] in ("nonfinite", "resume")] == [
        ("nonfinite", 5), ("resume", 3)]
    _, (r,) = build_report([str(out)])
    assert not any("non-finite" in n for n in r.notes), r.notes
    at = next(i for i, x in enumerate(records) if x["event"] == "resume")
    steps, losses = r.series("train", "loss")
    assert steps == [1, 2, 3, 4, 5, 6] and losses[3:] == [x["loss"] for x in records[at:] if x["event"] == "train"]
    acc = event_accumulator.EventAccumulator(str(out / "scaletune"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_a_run_name_the_font_cannot_draw_warns_nothing(tmp_path, recwarn):
    """matplotlib's "Glyph 12521 (KATAKANA LETTER RA) missing from font" went to the user's terminal."""
    run = make_run(tmp_path / "ラン 1", "causal_lm")
    report, _ = build_report([str(run)])
    assert "ラン 1" in report.read_text()
    assert not [w for w in recwarn if "Glyph" in str(w.message)]


def test_the_summary_gives_trainable_parameters_and_logged_time_without_the_gaps(tmp_path, capsys, monkeypatch):
    """What a user compares first: the adapter's size and how long training took. The time is each start's span
    of logged records, summed; the hours between a preemption and its resume (queued) are not the run's."""
    run = make_run(tmp_path / "run", steps=4, extra_lines=(  # 1001..1004.5 logged, then resumed an hour later
        json.dumps({"event": "resume", "step": 4, "time": 4600.0}) + "\n",  # (spans begin at a first step log,
        json.dumps({"event": "train", "step": 5, "time": 4700.0, "loss": 0.5}) + "\n",  # the first start's too)
        json.dumps({"event": "train", "step": 6, "time": 4760.0, "loss": 0.4}) + "\n"))
    _, (r,) = build_report([str(run)])
    assert r.seconds == pytest.approx(3.5 + 60.0)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "trainable params      1,234" in out and "time (logged)         1m04s" in out, out
    import scaletune.report as report_mod

    titles = []
    real = report_mod.plot_panels
    monkeypatch.setattr(report_mod, "plot_panels",
                        lambda runs, panels, path: titles.extend(t for t, _ in panels) or real(runs, panels, path))
    build_report([str(make_run(tmp_path / "cls", task="seq_cls"))])
    assert "examples/s" in titles and "target tokens/s" not in titles  # (one target per example)
    # dpo counts pairs: its targets/s are pairs/s, alone or beside other tasks' (the label named "target tokens/s")
    titles.clear()
    build_report([str(make_run(tmp_path / "dpo", task="dpo", evals=False))])
    assert "pairs/s" in titles and "target tokens/s" not in titles, titles
    titles.clear()
    build_report([str(tmp_path / "dpo"), str(tmp_path / "cls"), str(make_run(tmp_path / "lm"))], out=str(tmp_path / "r"))
    assert "target tokens/s (dpo: pairs/s, seq_cls: examples/s)" in titles, titles
    # a multi-label classifier counts example x class pairs (its loss's denominator), not examples
    ml = make_run(tmp_path / "ml", task="seq_cls")
    info = json.loads((ml / "run.json").read_text())
    (ml / "run.json").write_text(json.dumps({**info, "multi_label": True}))
    titles.clear()
    build_report([str(ml)], out=str(tmp_path / "r2"))
    assert "example-labels/s" in titles and "examples/s" not in titles, titles


def test_logged_time_is_missing_without_timed_records_and_reads_in_hours_from_one(tmp_path):
    """A metrics.jsonl whose records carry no time (an older scaletune's, or written by hand) has no logged
    time: the summary says it is missing, not 0s. An hour or more reads in hours."""
    from scaletune.report import _MISSING, _duration, load_run, run_stats

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {"task": "causal_lm"}, "started": 1}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"event": "train", "step": s, "loss": 1.0}) + "\n"
                                               for s in (1, 2)))
    loaded = load_run(run, "run")
    assert loaded.seconds is None and run_stats(loaded)["time (logged)"] == _MISSING
    assert _duration(3599.6) == "1h00m00s" and _duration(3600) == "1h00m00s" and _duration(3599) == "59m59s"
    assert _duration(42.4) == "42s" and _duration(61) == "1m01s"  # (as the step lines' ETA writes it)


def test_the_plateaus_drops_are_noted(tmp_path):
    run = make_run(tmp_path / "plateau", steps=2, extra_lines=tuple(
        json.dumps({"event": "lr_drop", "step": s, "time": 1, "lr": lr, "metric": "loss"}) + "\n"
        for s, lr in ((1, 1e-4), (2, 1e-5))))
    _, (r,) = build_report([str(run)])
    assert any(n.startswith("learning rate lowered 2 time(s) by reduce_lr_on_plateau, after the evals of step(s) 1, "
                            "2; last to 1") for n in r.notes), r.notes


def test_an_older_run_json_with_the_lowered_max_length_does_not_differ_from_a_newer_one(tmp_path):
    """run.json's config held data.max_length as loading lowered it (512 for a BERT given 1024) before it kept
    the given value with the lowered one beside it: the same setup, run by either version, showed as differing
    in data.max_length. The older run's given value is its checkpoints' (they always kept it)."""
    old = make_run(tmp_path / "old", data={"max_length": 512})
    ckpt = old / "checkpoints" / "step-4"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text("{}")
    (ckpt / "state.json").write_text(json.dumps({"config": {**CONFIG, "data": {**CONFIG["data"], "max_length": 1024}}}))
    new = make_run(tmp_path / "new", data={"max_length": 1024})
    info = json.loads((new / "run.json").read_text())
    (new / "run.json").write_text(json.dumps({**info, "max_length": 512}))
    out = tmp_path / "cmp"
    assert main(["report", str(old), str(new), "--out", str(out)]) == 0
    page = (out / "report.html").read_text().split("Notes")[0]
    assert "data.max_length</td>" not in page and "<td>max_length</td>" not in page
    assert "its config held 512" in (out / "report.html").read_text()  # (the report says what it read)
    newer = make_run(tmp_path / "newer", data={"max_length": 1024})
    info = json.loads((newer / "run.json").read_text())
    (newer / "run.json").write_text(json.dumps({**info, "max_length": 256}))
    assert main(["report", str(old), str(newer), "--out", str(tmp_path / "cmp2")]) == 0
    assert "<td>max_length</td><td>512</td><td>256</td>" in (tmp_path / "cmp2" / "report.html").read_text()


def test_report_out_never_replaces_the_users_own_files(tmp_path, capsys):
    """`report --out DIR` wrote report.html and the PNGs over DIR's files of those names, and deleted a
    memory.png it had no data for (a CPU run); only an earlier report's files (a run's directory, or a directory
    whose report.html a report wrote) are replaced."""
    run = make_run(tmp_path / "run")
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "report.html").write_text("my own report")
    (mine / "memory.png").write_bytes(b"my plot")
    assert main(["report", str(run), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "holds report.html, memory.png" in err and "Traceback" not in err
    assert (mine / "report.html").read_text() == "my own report" and (mine / "memory.png").read_bytes() == b"my plot"
    assert sorted(p.name for p in mine.iterdir()) == ["memory.png", "report.html"]
    out = tmp_path / "reports"
    for _ in range(2):  # an earlier report's files: replaced
        assert main(["report", str(run), "--out", str(out)]) == 0
    for _ in range(2):  # the run's own directory
        assert main(["report", str(run)]) == 0
