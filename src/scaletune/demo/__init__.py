"""`scaletune demo`: the whole product on a laptop CPU, with nothing to download.

Builds a tiny Llama from a config plus a tokenizer trained on the bundled instructions, writes a run
config next to it, measures held-out loss before training, trains LoRA with the ordinary `train`
path, and prints before/after loss, perplexity and answers.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
from pathlib import Path

import yaml

from ..errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, UserError

DATA = Path(__file__).with_name("instructions.jsonl")
DEFAULT_OUT = "runs/demo"  # `--out`'s default (cli.py)
MARKER = ".scaletune-demo"
DEMO_FILES = {MARKER, "base-model", "demo.yaml", "run"}  # what a demo writes in --out


def demo_config(out: Path, steps: int) -> dict:
    """The demo's run config (causal_lm LoRA on the tiny base in `out`), as `demo.yaml` records it."""
    # The random base's output head is frozen noise that LoRA on the inner layers must aim at; training the
    # head itself (51k weights) plus a gentler lr measured lower held-out loss and more right answers in the
    # same time, on 3 seeds (5e-3 without it: 2.9 mean loss, 0-1 of 4 right; 1e-2 collapses to '1').
    return {
        "task": "causal_lm",
        "model": {"name_or_path": str(out / "base-model"), "dtype": "float32"},
        "peft": {"method": "lora", "r": 32, "lora_alpha": 64, "lora_dropout": 0.0, "target_modules": "all-linear",
                 "modules_to_save": ["lm_head"]},
        "data": {"train": str(DATA), "eval_fraction": 0.1, "format": "alpaca", "max_length": 96, "cache": False},
        "train": {"global_batch_size": 16, "micro_batch_size": 8, "max_steps": steps, "learning_rate": 2e-3,
                  "lr_scheduler": "cosine", "warmup_ratio": 0.05, "mixed_precision": "no", "eval_every": steps,
                  "save_every": steps, "log_every": 10, "report_to": []},
        "output_dir": str(out / "run"),
    }


def rerun_command(out_dir: str, steps: int | None) -> str:
    """The command that runs this demo again: the user's own --out and --steps, since a bare `scaletune demo`
    would train another directory (runs/demo) for another number of steps."""
    args = [] if out_dir == DEFAULT_OUT else ["--out", shlex.quote(out_dir)]
    args += [] if steps is None else ["--steps", str(steps)]
    return " ".join(["scaletune demo", *args])


def run_demo(out_dir: str, steps: int | None = None) -> int:
    from ..config import from_dict
    from ..evaluate import evaluate
    from ..generation import generate, prompt_segments
    from ..loop import fit
    from ..stopflag import StopFlag
    from ..train import setup
    from .tiny import build_model_dir

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise UserError(f"--out {out} is not empty and is not a previous demo; pick another directory")
        # the marker says the directory was a demo's, not that all of it is: another run's output_dir or
        # notes put in it since would go with the replaced demo
        added = sorted(p.name for p in out.iterdir() if p.name not in DEMO_FILES)
        if added:
            raise UserError(f"--out {out} is a previous demo, but it now also holds {', '.join(added[:5])}"
                            f"{' and more' if len(added) > 5 else ''}, which replacing the demo would delete; "
                            "move them out or pick another directory")
        print(f"[demo] replacing the previous demo in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("created by scaletune demo; safe to delete\n")
    given_steps, steps = steps, steps or 300
    records = [json.loads(line) for line in DATA.read_text().splitlines()]
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in records]
    print(f"[demo] building a tiny Llama (128 hidden, 4 layers) and training its tokenizer -> {out / 'base-model'}")
    # A frozen random base drawn at transformers' usual std (0.02) has near-zero queries and keys at this
    # width: every token attends uniformly, and LoRA's gradients on q and k, each scaled by the other,
    # start near zero, so 300 steps learn only which answer tokens are common ('1', then '1' again).
    # At 1/sqrt(width) the projections keep unit scale and the adapter learns each skill's answer form.
    hidden = 128
    build_model_dir(out / "base-model", texts * 4, arch="llama", hidden=hidden, layers=4, heads=4, vocab_size=400,
                    init_std=hidden**-0.5)
    # absolute paths: the printed next step (`scaletune predict .../demo.yaml`) works from any directory
    raw = demo_config(out.absolute(), steps)
    (out / "demo.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = from_dict(raw, source=str(out / "demo.yaml"))
    run, _ = setup(cfg)
    pad = run.tokenizer.pad_token_id
    before = evaluate(run.accelerator, run.model, run.task, run.data["eval"], None, 8, pad)
    questions = ["Add 3 and 4.", "What is the opposite of hot?", "Is 7 even or odd?", "Repeat the word apple three times."]

    def answers() -> list[str]:
        return [generate(run.model, run.tokenizer, prompt_segments({"text": q}, run.tokenizer)[1], 8) for q in questions]

    before_answers = answers()
    print(f"[demo] training LoRA for {steps} steps on {len(run.data['train'])} examples "
          f"(CPU, {run.cfg.train.global_batch_size} per step); config: {out / 'demo.yaml'}")
    stop = StopFlag()
    try:
        stopped = fit(run, stop) == "preempted"
    finally:
        stop.release_interrupts()
    if stopped:  # (Ctrl-C or a stop signal: the half-trained adapter is a checkpoint, not the demo's result)
        print(f"[demo] stopped at step {run.step} of {steps}; run `{rerun_command(out_dir, given_steps)}` "
              "to start it again (it replaces this unfinished demo)")
        return EXIT_INTERRUPTED if stop.signal == signal.SIGINT else EXIT_PREEMPTED
    after = evaluate(run.accelerator, run.model, run.task, run.data["eval"], None, 8, pad)
    after_answers = answers()
    print("\n[demo] held-out set            before      after")
    print(f"       loss                  {before['loss']:8.3f}   {after['loss']:8.3f}")
    print(f"       perplexity            {before['perplexity']:8.2f}   {after['perplexity']:8.2f}")
    # (records it trained on: what they show is recall, not answering new questions; the README says so)
    print("       questions from its training data:")
    for q, a0, a1 in zip(questions, before_answers, after_answers):
        print(f"       {q:<36} before: {a0.strip()[:20]!r:<24} after: {a1.strip()[:24]!r}")
    print(f"\n[demo] adapter: {cfg.output_dir}/adapter   metrics: {cfg.output_dir}/metrics.jsonl")
    # a pipe, not bash's `<<<`: sh, dash and fish refuse a here-string, and the line must run as printed
    print(f"[demo] next: echo 'Add 2 and 5.' | scaletune predict {shlex.quote(str(out / 'demo.yaml'))} --input -")
    print(f"              scaletune eval {shlex.quote(str(out / 'demo.yaml'))} --generate"
          "   # its answers to the held-out questions")
    return 0 if after["loss"] < before["loss"] else 1
