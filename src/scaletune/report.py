"""`scaletune report`: PNG plots, a self-contained HTML page and a terminal summary of one or more runs.

Reads what training leaves in each run dir (metrics.jsonl, run.json, see tracking.py). Killed or
partial runs are normal input here: unreadable lines and missing files become notes, not errors.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import signal
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import has_direction, lower_is_better
from .errors import UserError, failed_write, write_error
from .tracking import NONFINITE, duration

# Eval metrics in display order (any other numeric key a task logs follows these).
_EVAL_ORDER = ("loss", "perplexity", "exact_match", "token_f1", "rouge_l", "accuracy", "macro_f1", "precision", "recall", "f1", "token_accuracy", "mse",
               "rmse", "mae", "pearson", "spearman")
# what a task's logged target_tokens_per_s counts (its Task.count_targets): a classifier's one target per example,
# dpo's and reward's pairs, kto's examples; any other task's are target tokens
_TARGET_UNIT = {"seq_cls": "examples/s", "seq_regression": "examples/s", "kto": "examples/s", "dpo": "pairs/s",
                "reward": "pairs/s"}
# counts/bookkeeping, not quality (token_cls: what data.max_length cut from the eval set)
_NOT_METRICS = {"event", "step", "time", "target_tokens", "sentences_truncated", "words_truncated",
                "entities_truncated", "generated_examples"}
# What people compare first across a sweep: label -> candidate dotted paths into run.json.
_KEY_PARAMS = {"method": ("config.peft.method",), "r": ("config.peft.r",), "lr": ("config.train.learning_rate",),
               "global batch": ("config.train.global_batch_size",), "steps": ("total_steps", "config.train.max_steps"),
               "trainable params": ("trainable_params",)}
# Differs between any two runs without being a hyper-parameter.
_NOT_PARAMS = {"output_dir"}
_RUN_LEVEL = ("world_size", "grad_accum", "total_steps", "max_length")  # derived at startup, worth diffing too
_MISSING = "–"


@dataclass
class Run:
    """Everything read from one run dir."""

    path: Path
    name: str
    info: dict  # run.json; {} when missing or unreadable
    events: dict[str, list[dict]]  # event type -> records, sorted by step
    notes: list[str] = field(default_factory=list)
    # seconds from each start's first logged record to its last (each leaves out its start-up and first log
    # interval), summed over the starts (a resume begins another: the time between them, queued or stopped, is
    # not the run's); None without timed records
    seconds: float | None = None

    @property
    def config(self) -> dict:
        cfg = self.info.get("config")
        return cfg if isinstance(cfg, dict) else {}

    @property
    def task(self) -> str:
        return str(self.config.get("task") or "unknown")

    def series(self, event: str, key: str) -> tuple[list[int], list[float]]:
        """Steps and numeric values of `key` over all `event` records (non-numbers skipped)."""
        pairs = [(r["step"], v) for r in self.events.get(event, []) if (v := _num(r.get(key))) is not None]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def steps_done(self) -> int | None:
        steps = [r["step"] for recs in self.events.values() for r in recs]
        return max(steps) if steps else None

    def eval_metrics(self) -> list[str]:
        keys = {k for r in self.events.get("eval", []) for k, v in r.items()
                if k not in _NOT_METRICS and _num(v) is not None}
        return _ordered(keys)


def _num(value: Any) -> float | None:
    """`value` as a float if it is a real number (bools and strings are not)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _ordered(keys: set[str]) -> list[str]:
    return [k for k in _EVAL_ORDER if k in keys] + sorted(keys - set(_EVAL_ORDER))


def _fmt(value: Any) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


# ----------------------------------------------------------------------------------------------
# Reading


def read_metrics(path: Path, notes: list[str]) -> tuple[dict[str, list[dict]], float | None]:
    """Parse metrics.jsonl by event type, skipping unreadable lines (a killed run truncates the last); and the
    seconds its starts logged over (`Run.seconds`)."""
    latest: dict[tuple[str, int], dict] = {}
    spans: list[list[float]] = []  # [first, last] logged time of each start
    starting = True
    bad: list[int] = []
    resumed: list[int] = []
    repeated = 0
    text = path.read_text(encoding="utf-8", errors="replace")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad.append(lineno)
            continue
        step = _num(rec.get("step")) if isinstance(rec, dict) else None
        if not (step is not None and math.isfinite(step) and isinstance(rec.get("event"), str)):
            bad.append(lineno)
            continue
        rec["step"] = int(rec["step"])
        rec.update({k: float(v) for k, v in rec.items() if v in NONFINITE.values()})  # tracking.json_safe's
        if rec["event"] == "resume":
            starting = True  # a new start: its span begins at its first record after this, as the first start's
        elif (when := _num(rec.get("time"))) is not None:
            if starting:
                spans.append([when, when])
                starting = False
            spans[-1][1] = max(spans[-1][1], when)
        if rec["event"] == "resume":  # what was logged past the checkpoint before it is not this run's path
            resumed.append(rec["step"])
            dropped = [k for k in latest if k[1] > rec["step"]]
            repeated += len(dropped)
            for k in dropped:
                del latest[k]
            continue
        key = (rec["event"], rec["step"])
        repeated += key in latest
        latest[key] = rec  # a resumed run re-logs the steps after its checkpoint: the newest record wins
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        notes.append(f"metrics.jsonl: skipped {len(bad)} unreadable line(s) (line {shown}; truncated or corrupt)")
    if resumed:  # (a preemption's, or one after a kill, a config change or a longer schedule)
        notes.append(f"resumed {len(resumed)} time(s), from step(s) {', '.join(map(str, resumed))}")
    if repeated:
        notes.append(f"metrics.jsonl: {repeated} record(s) past a resumed checkpoint replaced by the resumed run's")
    events: dict[str, list[dict]] = {}
    for (event, _), rec in sorted(latest.items(), key=lambda kv: kv[0][1]):
        events.setdefault(event, []).append(rec)
    return events, (sum(last - first for first, last in spans) if spans else None)


def read_run_json(path: Path, notes: list[str]) -> dict:
    """run.json as a dict; {} (and a note) when it is missing or unreadable."""
    if not path.is_file():
        notes.append("run.json missing: config and hyper-parameters unknown")
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"run.json unreadable ({exc}): config and hyper-parameters unknown")
        return {}
    if not isinstance(info, dict):
        notes.append("run.json is not a JSON object: config and hyper-parameters unknown")
        return {}
    return info


def load_run(path: Path, name: str) -> Run:
    """Read one run dir; the caller has checked it holds metrics.jsonl or run.json."""
    notes: list[str] = []
    info = read_run_json(path / "run.json", notes)
    config = info.get("config")
    if "max_length" not in info and isinstance(config, dict) and isinstance(config.get("data"), dict):
        # an older run.json: its config held data.max_length as loading lowered it, a newer one's the given
        # value (the lowered one beside it), so old and new runs of one setup showed as differing there
        from .config_file import checkpoints_max_length

        info["max_length"] = config["data"].get("max_length")
        config["data"]["max_length"] = checkpoints_max_length(path) or info["max_length"]
        if config["data"]["max_length"] != info["max_length"]:
            notes.append(f"run.json of an older scaletune: data.max_length {config['data']['max_length']} as "
                         f"given is its checkpoints'; its config held {info['max_length']}, what the model took")
    events: dict[str, list[dict]] = {}
    seconds = None
    if (path / "metrics.jsonl").is_file():
        events, seconds = read_metrics(path / "metrics.jsonl", notes)
        if not events:
            notes.append("metrics.jsonl has no readable records: no curves")
    else:
        notes.append("metrics.jsonl missing: no curves")
    run = Run(path=path, name=name, info=info, events=events, notes=notes, seconds=seconds)
    run.notes.extend(_event_notes(run))
    return run


def _event_notes(run: Run) -> list[str]:
    """What the events say about how the run went (stopped early, no eval, skipped steps)."""
    notes = []
    if run.events and not run.events.get("train"):
        notes.append("no train events")
    if run.events and not run.events.get("eval"):
        notes.append("no eval events (data.eval not set, or the run stopped before its first evaluation)")
    for rec in run.events.get("preempted", []):
        # (no signal: a run from before the ranks agreed on it; the signal had reached another rank only)
        signum = rec.get("signal")
        if signum is None:
            how = "a signal to another rank"
        elif isinstance(rec.get("signal_name"), str):  # (as the machine that stopped named it)
            how = rec["signal_name"]
        else:
            try:
                how = signal.Signals(int(signum)).name
            except (ValueError, TypeError):  # (a signal this platform does not know: its number)
                how = f"signal {_fmt(signum)}"
        # a Ctrl-C is the user's own stop and SIGTERM a cancel (scancel, kill) as often as a preemption; SIGUSR1 is
        # the preemption notice Slurm sends ahead (--signal), and a signal another rank heard is said as it is
        what = {"SIGINT": "stopped by Ctrl-C", "SIGTERM": "stopped"}.get(how, "preempted")
        notes.append(f"{what} at step {rec['step']} ({how}); checkpoint {_fmt(rec.get('checkpoint'))}")
    skips = run.events.get("nonfinite", [])
    if skips:
        notes.append(f"{len(skips)} non-finite step(s), first at step {skips[0]['step']}")
    overflows = run.events.get("overflow", [])
    if overflows:
        notes.append(f"{len(overflows)} fp16 loss-scale overflow(s) (update skipped, scale halved), last at step "
                     f"{overflows[-1]['step']}")
    drops = run.events.get("lr_drop", [])
    if drops:
        at = ", ".join(str(r["step"]) for r in drops[:6]) + (", ..." if len(drops) > 6 else "")
        notes.append(f"learning rate lowered {len(drops)} time(s) by reduce_lr_on_plateau, after the evals of step(s) "
                     f"{at}; last to {_fmt(drops[-1].get('lr'))}")
    total, done = _num(run.info.get("total_steps")), run.steps_done()
    stopped = [r for r in run.events.get("early_stop", []) if r["step"] == done]  # (not one a resume went past)
    if stopped:  # complete at that step (README: early stopping)
        rec = stopped[-1]
        notes.append(f"stopped early at step {rec['step']}: {_fmt(rec.get('evals_without_better'))} evals without a "
                     f"better value (best at step {_fmt(rec.get('best_step'))})")
    elif total is not None and done is not None and done < total:
        notes.append(f"incomplete: last logged step {done} of {int(total)}")
    return notes


def _check_dirs(run_dirs: list[str]) -> list[Path]:
    problems = []
    for d in run_dirs:
        p = Path(d)
        if not p.is_dir():
            problems.append(f"run dir {d}: {'not a directory' if p.exists() else 'does not exist'}")
        elif not ((p / "metrics.jsonl").is_file() or (p / "run.json").is_file()):
            problems.append(f"run dir {d}: no metrics.jsonl or run.json (is this a scaletune output_dir?)")
    if problems:
        raise UserError(problems, title="cannot report" if len(problems) > 1 else None)
    return [Path(d) for d in run_dirs]


def _names(paths: list[Path]) -> list[str]:
    """Legend names: the dir name, or the full path where two runs share a dir name."""
    base = [p.resolve().name or str(p) for p in paths]
    return [b if base.count(b) == 1 else str(p) for b, p in zip(base, paths, strict=True)]


# ----------------------------------------------------------------------------------------------
# Summaries


def eval_summary(run: Run, metric: str) -> tuple[float, float | None, int | None] | None:
    """(final, best, step of best) of an eval metric, or None when never logged; best and its step are None
    for a metric with no better direction (a count, kto's kl), which no best can be called for."""
    steps, values = run.series("eval", metric)
    finite = [(v, s) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    if not values:
        return None
    if not has_direction(metric):
        return values[-1], None, None
    if not finite:
        return values[-1], values[-1], steps[-1]
    lower = lower_is_better(metric)
    best, at = (min if lower else max)(finite, key=lambda vs: vs[0])
    return values[-1], best, at


def _eval_text(summary: tuple[float, float | None, int | None] | None) -> str:
    if summary is None:
        return _MISSING
    final, best, at = summary
    return _fmt(final) if at is None else f"{_fmt(final)} (best {_fmt(best)} @ {at})"


def run_stats(run: Run) -> dict[str, str]:
    """Headline numbers of one run, formatted, in display order."""
    total = run.info.get("total_steps")
    _, losses = run.series("train", "loss")
    _, tps = run.series("train", "tokens_per_s")
    _, mem = run.series("train", "peak_mem_mb")
    return {"task": run.task, "steps": f"{_fmt(run.steps_done())}/{_fmt(total)}",
            "trainable params": _count(run.info.get("trainable_params")),
            "time (logged)": _duration(run.seconds),
            "final train loss": _fmt(losses[-1] if losses else None),
            # the median shrugs off the slow first steps (compilation, allocator warm-up)
            "tokens/s (median)": _fmt(statistics.median(tps) if tps else None),
            "peak memory (MB)": _fmt(max(mem) if mem else None)}


def _count(value: Any) -> str:
    """A parameter count with thousands separators (74,498), as the training log writes it."""
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _fmt(value)


def _duration(seconds: float | None) -> str:
    """The step lines' form (42s, 3m07s, 2h05m09s), or that the run logged no time."""
    return _MISSING if seconds is None else duration(seconds)


def _dig(data: Any, dotted: str) -> Any:
    """`data["a"]["b"]` for "a.b", or None where a level is missing."""
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"train.learning_rate": value}; lists stay whole values."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def param_table(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """Rows (name, value per run): the key hyper-parameters, then every other resolved one that
    differs between runs. Runs without run.json show '–' and do not count as differing."""
    rows = [(label, [_fmt(next((v for p in paths if (v := _dig(r.info, p)) is not None), None)) for r in runs])
            for label, paths in _KEY_PARAMS.items()]
    if len(runs) < 2:
        return rows
    flat = [{**_flatten(r.config), **{k: r.info.get(k) for k in _RUN_LEVEL}} if r.config else None for r in runs]
    known = [f for f in flat if f is not None]
    shown = {p.split(".", 1)[-1] for paths in _KEY_PARAMS.values() for p in paths}
    for key in sorted({k for f in known for k in f} - _NOT_PARAMS - shown):
        values = [_fmt(f.get(key)) if f is not None else _MISSING for f in flat]
        if len({_fmt(f.get(key)) for f in known}) > 1:
            rows.append((key, values))
    return rows


def text_summary(runs: list[Run]) -> str:
    """Plain-text block per run for the terminal."""
    blocks = []
    for run in runs:
        lines = [f"== {run.name} ({run.path})"]
        lines += [f"  {k:<21} {v}" for k, v in run_stats(run).items()]
        for metric in run.eval_metrics():
            lines.append(f"  {'eval ' + metric:<21} {_eval_text(eval_summary(run, metric))}")
        lines += [f"  note: {n}" for n in run.notes]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


# ----------------------------------------------------------------------------------------------
# Plots


def plot_panels(runs: list[Run], panels: list[tuple[str, list[tuple[str, str]]]], path: Path) -> bool:
    """Draw panels of (title, [(event, key), ...]) over steps, one colour per run; False (nothing
    written) when no run has any of the data."""
    if not any(r.series(e, k)[0] for _, series in panels for e, k in series for r in runs):
        return False
    # The object API needs no pyplot: no global backend switch, nothing left open, safe headless.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (title, series) in zip(axes, panels, strict=False):  # spare grid cells are hidden below
        for i, run in enumerate(runs):
            for event, key in series:
                x, y = run.series(event, key)
                if not x:
                    continue
                dashed = event != "train"
                ax.plot(x, y, color=f"C{i % 10}", linestyle="--" if dashed else "-",
                        marker="o" if dashed or len(x) == 1 else None, markersize=3,
                        label=run.name if len(series) == 1 else f"{run.name} ({event})")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    with warnings.catch_warnings():  # a run name in a script the font lacks (ラン) draws as boxes; the page names it
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(path, dpi=100)
    return True


def make_plots(runs: list[Run], out: Path) -> dict[str, Path]:
    """Write every plot with data; return {title: png path}."""
    metrics = _ordered({m for r in runs for m in r.eval_metrics()} - {"loss"})
    # a classifier has one target per example, a dpo run one a pair: their target tokens/s are examples/s, pairs/s
    # (a multi-label classifier's targets are example x class pairs, its loss's denominator)
    units = {r.task + (" multi-label" if r.info.get("multi_label") else ""):
             "example-labels/s" if r.info.get("multi_label") else _TARGET_UNIT.get(r.task, "target tokens/s")
             for r in runs}
    if len(set(units.values())) == 1:
        targets = next(iter(units.values()))
    else:
        other = sorted(f"{task}: {unit}" for task, unit in units.items() if unit != "target tokens/s")
        base = "target tokens/s" if "target tokens/s" in units.values() else "targets/s"
        targets = f"{base} ({', '.join(other)})"
    figures = {
        "Loss": [("loss (train solid, eval dashed)", [("train", "loss"), ("eval", "loss")])],
        "Eval metrics": [(f"eval {m}", [("eval", m)]) for m in metrics],
        "Learning rate": [("learning rate", [("train", "lr")])],
        "Throughput": [("tokens/s", [("train", "tokens_per_s")]), (targets, [("train", "target_tokens_per_s")])],
        "Memory": [("peak memory (MB)", [("train", "peak_mem_mb")])],
    }
    written = {}
    for title, panels in figures.items():
        path = out / (title.lower().replace(" ", "_") + ".png")
        path.unlink(missing_ok=True)  # an earlier report's plot that this one has no data for must not stay
        if panels and plot_panels(runs, panels, path):
            written[title] = path
    return written


# ----------------------------------------------------------------------------------------------
# HTML

_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
        "margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
        "img{max-width:100%}.note{color:#a15c00}pre{background:#f7f7f7;padding:.5em;overflow:auto}")


def _table(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _per_label_html(run: Run) -> str:
    """Per-class (seq_cls) / per-type (token_cls) scores of the final evaluation, if logged."""
    last = (run.events.get("eval") or [{}])[-1]
    parts = []
    for key in ("per_class", "per_type"):
        table = last.get(key)
        if isinstance(table, dict) and table:
            cols = _ordered({c for v in table.values() if isinstance(v, dict) for c in v})
            rows = [[str(name)] + [_fmt(v.get(c)) if isinstance(v, dict) else _MISSING for c in cols]
                    for name, v in table.items()]
            parts.append(f"<h3>{html.escape(run.name)}: {key} (step {last['step']})</h3>"
                         + _table(["label", *cols], rows))
    return "".join(parts) + _confusion_html(run.name, last)


def _confusion_html(name: str, last: dict) -> str:
    """seq_cls' confusion matrix of the final evaluation (rows: the gold class, columns: the predicted), if
    logged in the shape `SeqCls.metrics` writes."""
    matrix = last.get("confusion_matrix")
    if not isinstance(matrix, dict) or not isinstance(matrix.get("labels"), list) \
            or not isinstance(matrix.get("counts"), list):
        return ""
    labels = [str(x) for x in matrix["labels"]]
    rows = [[label, *(_fmt(c) for c in counts)] for label, counts in zip(labels, matrix["counts"])
            if isinstance(counts, list)]
    return (f"<h3>{html.escape(name)}: confusion_matrix (step {last['step']}; rows: gold, columns: predicted)</h3>"
            + _table(["gold \\ predicted", *labels], rows))


def render_html(runs: list[Run], plots: dict[str, Path]) -> str:
    """The whole report as one HTML page, plots embedded so it can be mailed or uploaded alone."""
    e = html.escape
    metrics = _ordered({m for r in runs for m in r.eval_metrics()})
    stats = [run_stats(r) for r in runs]
    summary = _table(["run", *stats[0], *(f"eval {m} final (best @ step)" for m in metrics)],
                     [[r.name, *s.values(), *(_eval_text(eval_summary(r, m)) for m in metrics)]
                      for r, s in zip(runs, stats, strict=True)])
    params = param_table(runs)
    param_note = "Key hyper-parameters" + (", then every resolved one that differs between runs" if len(runs) > 1 else "")
    notes = "".join(f"<h3>{e(r.name)}</h3><ul>" + "".join(f'<li class="note">{e(n)}</li>' for n in r.notes) + "</ul>"
                    for r in runs if r.notes)
    images = "".join(f"<h3>{e(t)}</h3><img alt='{e(t)}' src='data:image/png;base64,"
                     f"{base64.b64encode(p.read_bytes()).decode()}'>" for t, p in plots.items())
    configs = "".join(f"<details><summary>{e(r.name)}: run.json</summary><pre>"
                      f"{e(json.dumps(r.info, indent=1, default=str))}</pre></details>" for r in runs if r.info)
    per_label = "".join(_per_label_html(r) for r in runs)
    title = "scaletune report: " + ", ".join(r.name for r in runs)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
            f"</head><body><h1>{e(title)}</h1><p>generated {e(time.strftime('%Y-%m-%d %H:%M:%S'))} from "
            f"{e(', '.join(str(r.path) for r in runs))}</p><h2>Summary</h2>{summary}"
            f"<h2>Hyper-parameters</h2><p>{e(param_note)}.</p>"
            f"{_table(['parameter', *(r.name for r in runs)], [[k, *v] for k, v in params])}"
            f"<h2>Notes</h2>{notes or '<p>none</p>'}<h2>Plots</h2>{images or '<p>no metrics to plot</p>'}"
            f"{'<h2>Per-label scores</h2>' + per_label if per_label else ''}<h2>Run records</h2>{configs}</body></html>")


# ----------------------------------------------------------------------------------------------
# Entry point


def build_report(run_dirs: list[str], out: str | None = None) -> tuple[Path, list[Run]]:
    """Read the runs, write PNGs and report.html into `out` (default: the first run dir)."""
    paths = []
    for p in _check_dirs(list(run_dirs)):  # a run named twice (`run` and `run/`) is reported once
        if all(p.resolve() != q.resolve() for q in paths):
            paths.append(p)
    out_dir = Path(out) if out else paths[0]
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out_dir.is_dir() and (theirs := _files_not_a_reports(out_dir)):
        raise UserError(f"--out {out_dir}: holds {', '.join(theirs)}, which this report would overwrite (or delete) "
                        "and no earlier scaletune report wrote", hint="give another --out (a new directory)")
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [load_run(p, n) for p, n in zip(paths, _names(paths), strict=True)]
    report = out_dir / "report.html"
    before = set(out_dir.iterdir())
    try:
        plots = make_plots(runs, out_dir)
        if report.is_symlink():  # (written through, it would overwrite the file the link names)
            report.unlink()
        report.write_text(render_html(runs, plots), encoding="utf-8")
    except OSError as exc:
        if not failed_write(exc):
            raise
        for written in set(out_dir.iterdir()) - before:  # this report's partial files, never what was there
            if written.is_file() and (written.suffix == ".png" or written.name == "report.html"):
                written.unlink(missing_ok=True)  # (not a live run's new files, when --out is its folder)
        raise write_error(exc, getattr(exc, "filename", None) or out_dir,
                          "free disk space (or fix permissions), or give another --out; the runs are untouched") from None
    return report, runs


# what a report writes: report.html and make_plots' PNGs (each figure's title, lowercased)
REPORT_FILES = ("report.html", "loss.png", "eval_metrics.png", "learning_rate.png", "throughput.png", "memory.png")


def _files_not_a_reports(out_dir: Path) -> list[str]:
    """The files of REPORT_FILES' names in `out_dir` that a report may not replace: all of them, unless `out_dir`
    is a run's directory (its plots and report are a report's) or holds an earlier report's report.html. `--out
    ~/notes` (or `.`) replaced the user's own loss.png and report.html, and deleted a memory.png (no memory data
    on a CPU run: an earlier report's plot that must not stay)."""
    if any((out_dir / name).is_file() for name in ("run.json", "metrics.jsonl")):
        return []
    try:
        with open(out_dir / "report.html", encoding="utf-8", errors="replace") as f:
            if "<title>scaletune report" in f.read(200):
                return []
    except OSError:
        pass
    return [name for name in REPORT_FILES if os.path.lexists(out_dir / name)]


def main_report(args: Any) -> int:
    """CLI: `scaletune report RUN_DIR [RUN_DIR ...] [--out DIR]`."""
    report, runs = build_report(args.run_dirs, args.out)
    print(text_summary(runs))
    print(f"report: {report}")
    return 0
