"""Command line: `scaletune train | eval | predict | merge | demo | launch | launch-args | slurm | plan | report |
config-help`.

Bad input of any kind ends here as one screen of text and exit code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from . import generation_metrics
from .config_file import is_override
from .console_log import setup_logging
from .demo import DEFAULT_OUT as DEMO_OUT
from .errors import (
    EXIT_INTERRUPTED,
    EXIT_PEER,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    RESUME_AFTER_WRITE,
    ConfigError,
    UserError,
    failed_write,
    problems_count,
    write_error,
)
from .fileutil import merge_out_is_empty

_ADAPTER_HELP = "adapter dir, or a checkpoint dir (uses its adapter/) (default: OUTPUT_DIR/adapter)"


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.learning_rate=1e-4; ~peft.r removes a key")


def top_k_option(value: str) -> int | str:
    """`--top-k`'s value: a count of classes >= 1, or "all"; anything else is argparse's one-line usage error."""
    if value.strip().lower() == "all":
        return "all"
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 or 'all', got {value!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (or 'all'), got {k}")
    return k


def threshold_option(value: str) -> float:
    """`--threshold`'s value: a probability strictly between 0 and 1; else argparse's one-line usage error."""
    try:
        t = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {value!r}") from None
    if not 0 < t < 1:  # (0 or 1 would pick every class or none, whatever the model says; NaN fails too)
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return t


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaletune", description="Parameter-efficient fine-tuning, one config "
                                     "from laptop to cluster.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an adapter")
    _add_config(p)
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint), a checkpoint dir, or none")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a checkpoint written under a different run config")

    p = sub.add_parser("eval", help="evaluate a trained adapter")
    _add_config(p)
    p.add_argument("--adapter", help=_ADAPTER_HELP)
    p.add_argument("--data", help="data file to evaluate (default: data.eval)")
    p.add_argument("--predictions", metavar="FILE.jsonl", help="also write one JSON line per eval example (token_cls "
                   "with data.too_long: split, per sentence), in the file's order (its \"line\", gold and predicted labels or its loss); FILE must not exist")
    p.add_argument("--threshold", type=threshold_option, default=None, metavar="T",
                   help="seq_cls multi-label: score with a class predicted where its sigmoid exceeds T (default "
                        "0.5, as training's evals), e.g. the T to give predict --threshold")
    p.add_argument("--generate", action="store_true", help="causal_lm: also generate each example's answer as "
                   "predict does (greedy) and score it against the reference: exact_match, token_f1, rouge_l")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="with --generate: most tokens an answer may add (default 128; cut at the model's context)")
    p.add_argument("--json", action="store_true",
                   help="print the metrics as JSON on a terminal too (a table there otherwise; piped: always JSON)")

    p = sub.add_parser("predict", help="generate (causal_lm), label (seq_cls/token_cls) or score (seq_regression, "
                       "reward: a prompt + answer a line) inputs")
    _add_config(p)
    p.add_argument("--adapter", help=_ADAPTER_HELP)
    p.add_argument("--input", default="-", help="file of lines (text or JSON objects; a csv/tsv/parquet/CoNLL file or "
                   "JSON array is read as training reads it); '-' (the default) = stdin; each output line names its "
                   "input line (\"line\": N)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="causal_lm: most tokens a completion may add (default 64; cut at the model's context)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="causal_lm: sample completions at this temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="causal_lm, with --temperature: sample from the smallest set of tokens this probable")
    p.add_argument("--seed", type=int, default=0, help="causal_lm, with --temperature: the sampling seed (default 0)")
    p.add_argument("--top-k", type=top_k_option, default=None, metavar="K",
                   help="seq_cls: add \"scores\", the K most probable classes with their scores, best first "
                        "('all': every class; not sampling: causal_lm samples with --temperature/--top-p)")
    p.add_argument("--threshold", type=threshold_option, default=None, metavar="T",
                   help="seq_cls multi-label: a class is in a line's \"labels\" where its sigmoid exceeds T "
                        "(default 0.5, as eval scores)")

    p = sub.add_parser("merge", help="merge the adapter into the base model weights")
    _add_config(p)
    p.add_argument("--adapter", help=_ADAPTER_HELP)
    p.add_argument("--out", required=True, help="directory for the merged model")

    p = sub.add_parser("demo", help="train a tiny model on bundled data; nothing to download",
                       description="Build a tiny random Llama and a tokenizer, train LoRA on the bundled instructions "
                                   "on the CPU (well under three minutes on a laptop), and print held-out loss and answers before "
                                   "and after. Writes OUT/demo.yaml (a complete run config to start from) and the "
                                   "run in OUT/run (adapter, checkpoints, metrics.jsonl).")
    p.add_argument("--out", default=DEMO_OUT,
                   help="output directory (default runs/demo; replaced if it holds a previous demo, else refused "
                        "unless empty)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300)")

    p = sub.add_parser("launch", help="compose and run `accelerate launch` for this config")
    _add_config(p)
    p.add_argument("--nproc", type=int, default=None, help="processes per node (default: GPUs on this node)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes of the job (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0 .. nnodes-1 (default 0)")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (default 127.0.0.1)")
    p.add_argument("--master-port", type=int, default=29500, help="free TCP port on node 0 (default 29500)")
    p.add_argument("--resume", default=None, help="passed to `scaletune train` (auto | checkpoint dir)")
    p.add_argument("--overwrite", action="store_true", help="passed to `scaletune train`")
    p.add_argument("--allow-config-change", action="store_true", help="passed to `scaletune train`")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")

    p = sub.add_parser("launch-args", help="print the DeepSpeed flags `accelerate launch` needs for this config "
                                           "(none without ZeRO; `launch --dry-run` prints a whole command)")
    _add_config(p)

    p = sub.add_parser("slurm", help="submit this config with the Slurm templates")
    _add_config(p)
    p.add_argument("--nodes", type=int, default=1, help="nodes to request (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node (default 1; 0: CPU-only nodes)")
    p.add_argument("--time", default=None, help="Slurm time limit, e.g. 04:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--sbatch-arg", action="append", default=[], dest="sbatch_args", metavar="OPTION",
                   help="extra sbatch option (repeatable; write it with '='), e.g. --sbatch-arg=--qos=high")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command, do not submit")

    p = sub.add_parser("plan", help="estimate per-rank memory and check the combination before launching")
    _add_config(p)
    p.add_argument("--nodes", type=int, default=1, help="nodes the run would use (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node (default 1)")
    p.add_argument("--gpu-memory", default=None,
                   help="memory per device, e.g. 80GiB, 24GB (not given: 80GiB, an H100/A100-80GB, is assumed "
                        "and the verdict says so)")
    p.add_argument("--cpu-memory", default=None, help="host memory per node (for offload), e.g. 512GiB")

    p = sub.add_parser("report", help="plots and a summary of one or more finished runs")
    p.add_argument("run_dirs", nargs="+", help="run output directories (with metrics.jsonl and run.json)")
    p.add_argument("--out", default=None, help="where report.html and PNGs go (default: first run dir)")

    p = sub.add_parser("convert", help="rewrite another tool's config (LLaMA-Factory, axolotl, TrainingArguments) "
                                       "as a scaletune run config, with notes on what does not carry over")
    p.add_argument("config", help="the other tool's YAML config")
    p.add_argument("--out", default=None, help="write it to this new file (default: print it)")

    p = sub.add_parser("config-help", help="print every run-config key with its type, default and meaning")
    p.add_argument("keys", nargs="*", metavar="KEY", help="only keys containing one of these, e.g. lr warmup peft")
    p.add_argument("--markdown", action="store_true", help="as the README's table")
    p.add_argument("--method", default=None, metavar="M",
                   help="the peft.* options of method M (lora, ia3, prefix_tuning, ...) instead: peft's fields")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad command-line values before anything is loaded or written."""
    from pathlib import Path

    problems = []
    cmd = args.command
    if cmd == "demo":
        if args.steps is not None and args.steps < 1:
            problems.append(f"--steps: must be >= 1, got {args.steps}")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            problems.append(f"--out {args.out}: exists and is not a directory")
    if getattr(args, "resume", None) not in (None, "none") and getattr(args, "overwrite", False):  # (train, launch)
        problems.append("--resume and --overwrite contradict each other: --resume continues the run in output_dir, "
                        "--overwrite replaces it; pass one")
    if cmd == "predict":
        if args.max_new_tokens < 1:
            problems.append(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
        if not 0 <= args.temperature < float("inf"):  # (also NaN)
            problems.append(f"--temperature: must be a number >= 0 (0: greedy), got {args.temperature}")
        if not 0 < args.top_p <= 1:
            problems.append(f"--top-p: must be in (0, 1], got {args.top_p}")
        elif args.top_p < 1 and not args.temperature:
            problems.append("--top-p: sampling only; give a --temperature > 0 too")
        if not 0 <= args.seed < 2**63:  # (torch.manual_seed's range)
            problems.append(f"--seed: must be in [0, 2**63), got {args.seed}")
        elif args.seed and not args.temperature:
            problems.append("--seed: sampling only (greedy completions need no seed); give a --temperature > 0 too")
        if args.input not in (None, "-") and not Path(args.input).is_file():
            what = "is a directory" if Path(args.input).is_dir() else "file not found"
            problems.append(f"--input {args.input}: {what}")
    if cmd == "eval" and args.data and not args.data.startswith("hub:") and not Path(args.data).is_file():
        what = "is a directory" if Path(args.data).is_dir() else "file not found"
        problems.append(f"--data {args.data}: {what}")
    if cmd == "eval" and args.predictions is not None and (problem := new_file_problem(args.predictions)):
        problems.append(f"--predictions {args.predictions}: {problem}")
    if cmd == "eval":
        problems += generation_metrics.arg_problems(args)
    if cmd == "merge":
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            problems.append(f"--out {out}: exists and is not a directory")
        elif out.is_dir() and not merge_out_is_empty(out):
            problems.append(f"--out {out} is not empty; choose a new directory")
        elif out.is_symlink() and not out.exists():
            problems.append(f"--out {out}: a symbolic link to {os.readlink(out)}, which does not exist")
        elif not out.exists():  # it is created after loading and merging: say now if that cannot work
            parent = next(p for p in out.absolute().parents if p.exists())
            if not parent.is_dir():
                problems.append(f"--out {out}: {parent} is not a directory")
            elif not os.access(parent, os.W_OK | os.X_OK):
                problems.append(f"--out {out}: cannot create it in {parent} (permission denied)")
    if cmd == "launch":
        if (args.nproc is not None and args.nproc < 1) or args.nnodes < 1:
            problems.append(f"--nproc must be >= 1 (default: one per GPU) and --nnodes >= 1 (got {args.nproc}, "
                            f"{args.nnodes})")
        elif not 0 <= args.node_rank < args.nnodes:
            problems.append(f"--node-rank: must be in [0, {args.nnodes - 1}], got {args.node_rank}")
        if not 1 <= args.master_port <= 65535:
            problems.append(f"--master-port: must be in [1, 65535], got {args.master_port}")
    if cmd == "slurm" and (args.nodes < 1 or args.gpus_per_node < 0):
        problems.append(f"--nodes must be >= 1 and --gpus-per-node >= 0 (got {args.nodes}, {args.gpus_per_node})")
    if cmd == "slurm":
        # sbatch takes its first non-option word as the script: `--sbatch-arg=qos=high` would replace ours
        problems += [f"--sbatch-arg {value!r}: not an sbatch option (write e.g. --sbatch-arg=--qos=high)"
                     for value in args.sbatch_args if not value.startswith("-")]
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(problems, title=f"scaletune {cmd}: bad arguments")


def new_file_problem(path: str) -> str | None:
    """Why a new file cannot be written at `path` (it exists: nothing the user has is overwritten; its directory
    is missing or not writable), or None."""
    target = Path(path)
    if target.is_dir():
        return "is a directory; name the file to write (e.g. DIR/NAME)"
    if target.exists() or target.is_symlink():
        return "exists; choose a new file (nothing is overwritten)"
    if path.endswith(("/", os.sep)):  # (Path drops the slash: `--out new/` wrote a file named `new`)
        return "names a directory; name the file to write (e.g. DIR/NAME)"
    parent = target.absolute().parent
    if not parent.exists():
        return f"directory {parent} does not exist"
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create it in {parent} (permission denied)"
    return None


def sampling(args: argparse.Namespace) -> dict | None:
    """predict's sampling settings for run_predict (None: greedy, the default)."""
    return {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed} if args.temperature else None


def dispatch(args: argparse.Namespace) -> int:
    from .config import load_config
    from .config_help import config_help, config_reference, method_help

    check_args(args)
    if args.command == "config-help":
        if args.method:
            print(method_help(args.method, args.keys, markdown=args.markdown))
        else:
            print(config_reference(args.keys) if args.markdown else config_help(args.keys))
        return 0
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.out, args.steps)
    if args.command == "convert":
        from .convert import main_convert

        return main_convert(args.config, args.out)
    if args.command == "report":
        from .report import main_report

        return main_report(args)
    if args.command == "launch":  # validates the config itself, for the world size it will start
        from . import launch

        return launch.main_launch(args)
    # The commands about to train (launch-args composes a job's flags) check the peft options in the same
    # error as the rest (that imports peft, which they need anyway); eval/predict/merge read the trained
    # adapter's own config.
    cfg = load_config(args.config, args.overrides, check_peft=args.command in ("train", "plan", "slurm", "launch-args"))
    if args.command == "plan":
        from .plan import main_plan

        return main_plan(args, cfg)
    if args.command == "train":
        from .distributed import launched
        from .train import train

        result, _ = train(cfg, resume=args.resume, overwrite=args.overwrite,
                          allow_config_change=args.allow_config_change, stop=getattr(args, "stop", None))
        # what to run next (a launched rank's is the launcher's to say: its own command is the one to repeat)
        if result == "preempted":
            if not launched():  # (the stop named its checkpoint, not how to go on from it)
                print(f"continue with `{_continue_command(args)}`", file=sys.stderr)
            return EXIT_PREEMPTED
        if not launched():
            print(_next_commands(cfg), flush=True)
        return 0
    if args.command == "eval":
        from .infer import run_eval

        metrics = run_eval(cfg, args.adapter, args.data, args.predictions, args.threshold, args.generate,
                           args.max_new_tokens)
        import json

        # every rank of an `accelerate launch` has the gathered metrics: one document on stdout, not one per rank
        if os.environ.get("RANK", "0") != "0":
            return 0
        if sys.stdout.isatty() and not getattr(args, "json", False):
            # a person reads it: 16-digit floats and a confusion matrix one number a line were hard to read
            from .metrics_table import metrics_table

            print(metrics_table(metrics))
        else:
            print(json.dumps(metrics, indent=2, default=float))  # (full precision: compared with metrics.jsonl)
        return 0
    if args.command == "predict":
        from .infer import run_predict

        # the streams are passed at call time: run_predict's defaults were bound when infer was imported
        run_predict(cfg, args.adapter, args.input, args.max_new_tokens, out=sys.stdout, stdin=sys.stdin,
                    sampling=sampling(args), top_k=args.top_k, threshold=args.threshold)
        return 0
    if args.command == "merge":
        from .merge import run_merge

        print(f"merged model written to {run_merge(cfg, args.adapter, args.out)}")
        return 0
    if args.command == "launch-args":
        from . import launch

        flags = launch.deepspeed_flags(cfg)
        print(" ".join(flags))
        if not flags:  # (stdout stays empty for a script's $(...); a person is told why)
            print("scaletune launch-args: no DeepSpeed flags: distributed.zero_stage is 0 (DDP); "
                  "`scaletune launch CONFIG --nproc N --dry-run` prints a whole launch command", file=sys.stderr)
        return 0
    if args.command == "slurm":
        from .data.sources import missing_files
        from .launch import preflight
        from .rules import cross_field_problems
        from .slurm import main_slurm

        # The world the job will have (the template's: SCALETUNE_PROCS_PER_NODE, else a process per GPU, else
        # one per CPU-only node): refuse now, not after the queue wait
        ppn = os.environ.get("SCALETUNE_PROCS_PER_NODE", "")
        ppn = int(ppn) if ppn.isdigit() and int(ppn) > 0 else max(args.gpus_per_node, 1)
        # (GPUs asked for through --sbatch-arg=--gres/--gpus*: their count per node is the template's to find)
        gpus_elsewhere = not args.gpus_per_node and any(
            re.match(r"(--gres=\S*gpu|--gpus|-G)", a) for a in args.sbatch_args)
        problems = [] if gpus_elsewhere else cross_field_problems(cfg, world_size=args.nodes * ppn,
                                                                   has_cuda=args.gpus_per_node > 0)
        if problems:
            what = f"{args.gpus_per_node} GPU(s)" if args.gpus_per_node > 0 else f"{ppn} CPU process(es)"
            raise ConfigError(problems, title=f"{args.config} cannot run on {args.nodes} node(s) x {what} "
                                              f"({problems_count(len(problems))})")
        for line in missing_files(cfg.data):  # (a warning: the job may read a path only its node has)
            print(f"scaletune: warning: {line}; the job would stop at its start if its node lacks it too",
                  file=sys.stderr)
        if not args.dry_run:  # the job runs in this environment (SCALETUNE_VENV / this python)
            preflight(cfg)
            # A job meant to wait for the run there (chained with --dependency) may be queued beside it.
            if not any(re.match(r"(--dependency=|-d)\S*after\w*:\d", a) for a in args.sbatch_args):
                from . import runlock
                from .slurm import job_name, queued_job

                # (singleton waits for the user's queued jobs of the same name, not for a run outside Slurm)
                singleton = any(re.match(r"(--dependency=|-d)\S*singleton", a) for a in args.sbatch_args)
                if not singleton and (job := queued_job(Path(cfg.output_dir))):  # (a queued job holds no lock)
                    raise UserError(f"output_dir {cfg.output_dir}: job {job[0]} ({job[1]}) was submitted for it "
                                    "and has not ended; a second job would be refused when it started",
                                    hint=f"wait for it, scancel it, or queue this one after it: "
                                         f"--sbatch-arg=--dependency=afterany:{job[0]}")

                # A same-name job running for this output_dir holds its lock, and singleton starts this one after it
                if not (singleton and queued_job(Path(cfg.output_dir), name=job_name(args.sbatch_args))):
                    runlock.check_free(Path(cfg.output_dir))
        return main_slurm(args, cfg.output_dir)  # the config was validated above; the job re-reads it
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may also follow options (`train run.yaml --resume auto k=v`, as the Slurm templates do).
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.own_process = argv is None  # this process's own command line (not a caller's, as in the tests)
    stray = [x for x in extra if x.startswith("-") or not is_override(x) or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.command == "train":
        from .stopflag import StopFlag

        # Before anything slow is imported or loaded: a stop signal during start-up then ends in a
        # checkpoint at the first step boundary rather than killing the process (see StopFlag).
        args.stop = StopFlag()
        # a rank torchrun started (not a process a leftover WORLD_SIZE=1 marks, under nohup: its shell's exit
        # would stop it)
        if "TORCHELASTIC_RUN_ID" in os.environ or (os.environ.get("WORLD_SIZE") or "1").strip() not in ("0", "1"):
            args.stop.follow_launcher()
    setup_logging()
    code = _dispatch_reporting(args)
    if argv is None:  # this process's own command line (not a caller's)
        from .distributed import exit_rank, hard_exit

        if args.command in ("train", "eval"):  # (a launched eval's ranks hold the same process group)
            if args.command == "train":
                args.stop.settle()
            exit_rank(code)  # a rank of a multi-process run ends here, done or refused (see there why)
        data = sys.modules.get("scaletune.data.encode")
        if data is not None and data.workers_abandoned():  # (their pool's thread would hang the exit)
            hard_exit(code)
        if args.command == "launch" and code == EXIT_USAGE:
            # Python's teardown gives SIGTERM back its default action: srun's SIGTERM (another node failed the
            # same way) then ended this node's refusal with 143, the job with it, not with the config error's 2
            hard_exit(code)
    return code


def _dispatch_reporting(args: argparse.Namespace) -> int:
    """Run the command; a user's error, an interrupt or another rank's failure becomes its message and
    exit code (anything else is a bug: its traceback is kept)."""
    try:
        return dispatch(args)
    except UserError as exc:
        print(_render_error(exc), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\ninterrupted{_resume_hint(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `scaletune plan ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 141  # 128 + SIGPIPE, what a shell reports for a pipe closed early
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP) and exc.filename is not None:
            # a path given by the user (config key, option, data file): any file access may be the first to meet it
            from .fileutil import shortened

            print(UserError(f"{shortened(str(exc.filename))}: {exc.strerror}").render(), file=sys.stderr)
            return EXIT_USAGE
        if not failed_write(exc):
            raise
        # a write the machine refused (a full disk, a quota) where no step had its own message for it
        hint = RESUME_AFTER_WRITE if args.command == "train" else "free disk space (or fix permissions) and run it again"
        if args.command == "demo":  # run from a read-only directory, a newcomer meets `runs: Permission denied`
            hint = (f"the demo writes to --out, here {Path(args.out).absolute()}: run it from a directory you can "
                    "write to, or pass --out DIR")
        if exc.errno in (errno.EACCES, errno.EPERM):  # a read or a write: say only what the system said
            print(UserError(f"{exc.filename or 'a file'}: {exc.strerror}", hint=hint).render(), file=sys.stderr)
        else:
            print(write_error(exc, exc.filename or "a file", hint).render(), file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:
        from .distributed import PEER_TIMEOUT, peer_failure

        why = peer_failure(exc)
        if why is None:
            raise
        # the rank that failed first has printed its own error; this traceback would only bury it
        rank = os.environ.get("RANK", "?")
        if why in PEER_TIMEOUT:
            print(f"rank {rank}: stopped: another rank did not answer within distributed.timeout_s (it hung, or "
                  f"its node stopped){_resume_hint(args)}", file=sys.stderr)
        else:
            print(f"rank {rank}: stopped because another rank failed ({why}); its error is printed by that rank "
                  f"(in its node's log, unless that node was lost){_resume_hint(args)}", file=sys.stderr)
        return EXIT_PEER


def _render_error(exc: UserError) -> str:
    """The error as printed; rank 0's error re-raised on another rank (distributed.main_process_first) is
    printed in full only by the first process of each node (another node's log would not have it)."""
    source = getattr(exc, "relayed_from", None)
    if source is None or os.environ.get("LOCAL_RANK", "0") == "0":
        return exc.render()
    return f"rank {os.environ.get('RANK', '?')}: stopped by rank {source}'s error (rank {source} prints it)"


def _resume_hint(args: argparse.Namespace) -> str:
    """After Ctrl-C in `train`: which checkpoint a resume would start from, the command, and where the
    run --overwrite replaced is kept."""
    if args.command == "demo":  # stopped before its training loop (building the model, the first eval)
        from .demo import rerun_command

        return f"; run `{rerun_command(args.out, args.steps)}` to start it again"
    if args.command != "train":
        return ""
    try:
        from .checkpoint import checkpoint_dirs
        from .config import load_config
        from .outdir import replaced_note

        cfg = load_config(args.config, args.overrides)
        newest = next(iter(checkpoint_dirs(Path(cfg.output_dir))), None)
        kept = replaced_note(Path(cfg.output_dir))
    except Exception:  # noqa: BLE001 - a hint must never hide the interruption itself
        return ""
    kept = f"; {kept}" if kept else ""
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:
        # a rank of a launched run: the launcher's command (which this rank does not know) is the one to
        # repeat, and `scaletune train` alone would run one process (or be refused, under ZeRO)
        if os.environ.get("RANK", "0") != "0":
            return ""
        where = f"newest checkpoint {newest}" if newest is not None else "no checkpoint was written yet"
        return f"; {where}: continue with the same launch command plus --resume auto{kept}"
    if newest is None:
        return f" (no checkpoint was written yet){kept}"
    return f"; newest checkpoint {newest}: continue with `{_continue_command(args)}`{kept}"


def _next_commands(cfg: Any) -> str:
    """After a finished `train` of run config `cfg`: the commands that use what it wrote, given the run's
    output directory, whose run.json holds the config it trained with (overrides included: without them eval
    looked for the example config's placeholder model; a YAML edited since would mislead it)."""
    run = str(cfg.output_dir)
    # without eval data, eval refuses ("nothing to evaluate")
    data = [] if cfg.data.eval or cfg.data.eval_fraction else ["--data", "FILE"]
    return (f"next:\n  {shlex.join(['scaletune', 'eval', run, *data])}  # scores the adapter\n"
            f"  {shlex.join(['scaletune', 'predict', run, '--input', 'FILE'])}  # applies it\n"
            f"  {shlex.join(['scaletune', 'report', run])}  # plots the run")


def _continue_command(args: argparse.Namespace) -> str:
    """The command that resumes this `train` run: its overrides too, as one of them may be output_dir."""
    return shlex.join(["scaletune", "train", str(args.config), *(args.overrides or []), "--resume", "auto"])


if __name__ == "__main__":
    sys.exit(main())
