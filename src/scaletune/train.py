"""`scaletune train`: build everything from the run config, then run the one training loop (`fit`)."""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import class_weights, methods, nonfinite, runlock, schedules
from .config import RunConfig
from .data import tokenised_differently
from .distributed import raise_main_rank_failure
from .errors import (
    RESUME_AFTER_WRITE,
    ConfigError,
    UserError,
    problems_count,
)
from .identity import config_changes, config_fingerprint
from .optimizers import make_optimizer
from .outdir import (
    check_output_dir,
    replaced_note,
    set_aside,
    set_aside_metrics,
    unrecorded_asides,
)
from .rules import cross_field_problems
from .stopflag import StopFlag

log = logging.getLogger("scaletune")

@dataclass(frozen=True)
class Every:
    """When a periodic eval or checkpoint falls due: every `steps` steps (train.eval_every / save_every), or at
    the steps `at` into each epoch of `epoch` steps (evals_per_epoch / saves_per_epoch)."""

    steps: int | None = None
    epoch: int = 0
    at: frozenset[int] = frozenset()

    @classmethod
    def per_epoch(cls, times: int, epoch: int) -> Every:
        """`times` an epoch, evenly spread with the last at the epoch's end: 4 in 10 steps at 3, 5, 8 and 10.
        (One every epoch // times steps gave 5 in such an epoch, and drifted off the epochs' ends.)"""
        return cls(epoch=epoch, at=frozenset(math.ceil(k * epoch / times) for k in range(1, times + 1)))

    def due(self, step: int) -> bool:
        if self.at:
            return (step - 1) % self.epoch + 1 in self.at
        return bool(self.steps) and step % self.steps == 0

    def describe(self) -> str:
        at = sorted(self.at)
        shown = ", ".join(map(str, at)) if len(at) <= 6 else f"{at[0]}, {at[1]}, {at[2]}, ..., {at[-1]}"
        return f"at step{'s' if len(at) > 1 else ''} {shown} of each epoch of {self.epoch}"


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: RunConfig
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    task: Any
    data: dict
    tokenizer: Any
    output_dir: Path
    total_steps: int
    accum: int
    fingerprint: str
    # the config as validated, before load_tokenizer lowered data.max_length to what the model takes: what
    # the fingerprint hashes, so a resume's "changed:" list compares like with like
    given_config: dict = field(default_factory=dict)
    eval_every: Every = field(default_factory=Every)  # train.eval_every or train.evals_per_epoch
    save_every: Every = field(default_factory=Every)  # likewise for checkpoints
    step: int = 0
    batch_shape: tuple = ()
    evaluating: bool = False  # an eval's forwards run (train.eval_batch_size's batches): for an out-of-memory message
    counters: dict = field(default_factory=lambda: {"nonfinite_skips": 0, "tokens_seen": 0})
    resumed_from: Path | None = None  # the checkpoint this run continues (its path's best adapter is beside it)
    class_weights: dict | None = None  # {label: weight} the loss uses (train.class_weights), as checkpoints keep it
    generation: list = field(default_factory=list)  # train.eval_generate's prompts (generation_metrics.prepare)
    schedule_note: str | None = None  # a resume's changed lr for its next step (`restore`), warned if it trains


def build_optimizer(cfg: RunConfig, model: Any) -> Any:
    """train.optimizer over the trainable parameters, norms and biases undecayed (optimizers.py builds it)."""
    t = cfg.train
    decay, no_decay, lora_b = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bias" in name or "norm" in name.lower():
            no_decay.append(p)
        elif t.loraplus_lr_ratio and (".lora_B." in name or ".lora_embedding_B." in name):
            lora_b.append(p)  # LoRA+: B's own, higher learning rate (the schedule scales each group's)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": lora_b, "weight_decay": t.weight_decay, "lr": t.learning_rate * (t.loraplus_lr_ratio or 1)}]
    groups = [g for g in groups if g["params"]]
    return make_optimizer(t.optimizer, groups, t, cfg.distributed.zero_stage)


def resume_point(cfg: RunConfig, resume: str | None, overwrite: bool,
                 allow_config_change: bool) -> tuple[Path | None, bool]:
    """The checkpoint this run continues (None: a fresh start) and whether its output_dir is to be
    replaced (--overwrite), decided from the filesystem alone: no model, no data, no process group.

    Raises UserError / ConfigError for a run that may not start (a non-empty output_dir without --resume
    or --overwrite, a foreign checkpoint, a directory a fresh start would overwrite). `setup` calls it,
    and `scaletune launch` before it starts any process, so a refusal is one error, not one per rank.
    """
    out = Path(cfg.output_dir)
    fingerprint = config_fingerprint(cfg)
    resume = None if resume in (None, "none") else resume
    def changes(saved: dict, saved_paths: dict | None) -> list[str]:
        return config_changes(saved, cfg, saved_paths)

    resume_from = None
    if resume == "auto":
        resume_from = ckpt.find_resumable(out, fingerprint, allow_config_change, changes)
    elif resume is not None:
        resume_from = Path(resume)
        problem = ckpt.verify(resume_from) if resume_from.is_dir() else "not a directory"
        if problem and (resume_from / "checkpoints").is_dir():  # a run's output_dir, not one checkpoint
            newest = next(iter(ckpt.checkpoint_dirs(resume_from)), None)
            raise UserError(f"--resume {resume}: this is a run's output directory, not a checkpoint; pass one of "
                            f"its checkpoints{f' (newest: {newest})' if newest else ''}, or --resume auto to "
                            "continue the run in output_dir")
        if problem:
            raise UserError(f"--resume {resume}: not a usable checkpoint ({problem})")
        ckpt.check_same_config(resume_from, fingerprint, allow_config_change, changes)
    return resume_from, check_output_dir(cfg, resume, overwrite, resume_from)


def setup(cfg: RunConfig, *, resume: str | None = None, overwrite: bool = False,
          allow_config_change: bool = False) -> tuple[Run, Path | None]:
    """Accelerator -> data -> model -> optimizer -> (resume). Returns the run and the checkpoint used."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers.utils import logging as hf_logging

    from .best import scored_over
    from .data import build_datasets
    from .distributed import accelerator_kwargs, refuse_differing_configs, world_size_from_env
    from .generation_metrics import prepare_for_training
    from .model import (
        AUTOCAST_DTYPES,
        check_vocabulary,
        compile_blocks,
        count_parameters,
        load_model,
        load_tokenizer,
        quantization_config,
    )
    from .peft_options import peft_config
    from .tasks import get_task

    world = world_size_from_env()
    refuse_what_cannot_run_here(cfg, world)
    # refuse bad peft settings before loading anything (AdaLoRA's real step count comes later)
    peft_config(cfg, get_task(cfg.task).peft_task_type, total_steps=10**9)
    quantization_config(cfg)
    hf_logging.disable_progress_bar()
    t = cfg.train
    accum = t.global_batch_size // (t.micro_batch_size * world)
    out = Path(cfg.output_dir)
    fingerprint, given_config = config_fingerprint(cfg), cfg.to_dict()
    resume_from, replace_output = resume_point(cfg, resume, overwrite, allow_config_change)
    # (W&B is started by tracking.start_trackers under a project of its own)
    accelerator = Accelerator(project_dir=str(out), log_with=[r for r in t.report_to or [] if r != "wandb"] or None,
                              **accelerator_kwargs(cfg, accum))
    refuse_differing_configs(accelerator, given_config)
    set_seed(t.seed)
    if t.release_cpu_memory and accelerator.device.type == "cpu":
        from .cpu_memory import release_freed_memory

        why_not = release_freed_memory()
        if why_not:
            log.warning("train.release_cpu_memory is not applied: %s", why_not)
    tokenizer = load_tokenizer(cfg)
    task = get_task(cfg.task)
    task.configure(cfg)
    data = build_datasets(cfg, task, tokenizer, accelerator)
    n_train = len(data["train"])
    # (read and checked before the model loads: an eval record without a reference answer stops the run here)
    generation = prepare_for_training(cfg, task, tokenizer) if t.eval_generate else []
    weights = class_weights.resolve(cfg, data["labels"], data["train"], getattr(task, "multi_label", False))
    if t.label_smoothing and getattr(task, "multi_label", False):
        raise ConfigError("train.label_smoothing: this run is multi-label (a sigmoid and binary cross-entropy per "
                          "class); label smoothing is for single-label seq_cls and token_cls")
    task.set_label_smoothing(t.label_smoothing)
    per_epoch = n_train // t.global_batch_size
    if per_epoch == 0:
        packed = data["stats"].get("packed_examples")
        what = (f"{packed} usable examples packed into {n_train} row(s) of data.max_length={cfg.data.max_length} "
                "tokens; a batch counts rows") if packed else f"{n_train} usable examples"
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) is larger than the training set "
                          f"({what}); lower it")
    total = t.max_steps or max(1, math.ceil(t.epochs * per_epoch))
    # (kept on the Run, not written into the config: run.json's config must run again as it is)
    every = {"eval": Every(t.eval_every), "save": Every(t.save_every)}
    for what, per in (("eval", t.evals_per_epoch), ("save", t.saves_per_epoch)):
        if per:
            every[what] = Every.per_epoch(per, per_epoch)
            log.info("train.%ss_per_epoch=%d: %s %s", what, per, "evaluating" if what == "eval" else "checkpointing",
                     every[what].describe())
    watchers = [w for w, on in (("train.early_stopping_patience", t.early_stopping_patience),
                                ("lr_scheduler: reduce_lr_on_plateau", t.lr_scheduler == "reduce_lr_on_plateau")) if on]
    if watchers and data["eval"] is not None and accelerator.is_main_process and \
            not any(every["eval"].due(k) for k in range(1, total)):  # (the end's eval has no step after it)
        log.warning("%s: this run's %d step(s) have no eval before the last (train.eval_every %s), so %s never acts; "
                    "lower train.eval_every (or set evals_per_epoch)", " and ".join(watchers), total, t.eval_every,
                    "it" if len(watchers) == 1 else "they")
    left_out = n_train - per_epoch * t.global_batch_size
    if left_out and total >= per_epoch and accelerator.is_main_process:  # (a shorter run never reaches them)
        # Every step has the same shape (data/batching.py); the shuffle picks who sits each epoch out.
        rows = "packed rows" if data["stats"].get("packed_examples") else "examples"
        (log.warning if left_out > 0.1 * n_train else log.info)(
            "data.train: %d of %d %s do not fill a last global batch of %d and sit each epoch out (a different "
            "random set each epoch)", left_out, n_train, rows, t.global_batch_size)
    model = load_model(cfg, task, data["labels"], tokenizer, total_steps=total, resuming=resume_from is not None)
    check_vocabulary(model, tokenizer, data)
    trainable, all_params = count_parameters(model)
    optimizer = build_optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if getattr(accelerator, "native_amp", False):
        methods.skip_adapter_input_casts(model)
    if cfg.model.attn_implementation == "varlen":
        from .attention import prepare

        prepare(accelerator.device)
    if t.torch_compile and compile_blocks(model) == 0:
        raise ConfigError(f"train.torch_compile: {cfg.model.name_or_path} declares no repeated blocks "
                          "(_no_split_modules) to compile; set torch_compile: false")
    if t.chunked_loss and hasattr(task, "enable_chunked_loss"):
        why_not = task.enable_chunked_loss(model, AUTOCAST_DTYPES.get(t.mixed_precision))
        if why_not:
            log.info("train.chunked_loss: using the usual loss because %s", why_not)
    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * total)
    plateau_over = scored_over(cfg, schedules.plateau_metric(t)) if t.lr_scheduler == "reduce_lr_on_plateau" else ""
    scheduler = schedules.make_scheduler(t, optimizer, warmup, total, plateau_over,
                                         data.get("eval_digest") or "" if plateau_over else "")
    if t.lr_scheduler != "constant" and warmup >= total:  # e.g. max_steps 1: its one step at lr 0
        peak = max(scheduler.lr_lambdas[0](k) for k in range(total))
        log.warning("the warmup (%d step(s)) is not shorter than the run (%d step(s)): the learning rate reaches "
                    "at most %.0f%% of train.learning_rate%s; lower train.warmup_steps / warmup_ratio", warmup, total,
                    100 * peak, " and nothing is trained" if peak == 0 else "")
    run = Run(cfg, accelerator, model, optimizer, scheduler, task, data, tokenizer, out, total, accum, fingerprint,
              given_config, eval_every=every["eval"], save_every=every["save"], class_weights=weights,
              generation=generation)
    error = None
    if accelerator.is_main_process:
        try:
            if replace_output:
                set_aside(out)  # only now: a bad input or model never costs the previous run
            out.mkdir(parents=True, exist_ok=True)
            if replace_output:
                runlock.after_replace(out)
            if resume_from is None and (aside := set_aside_metrics(out)):
                log.info("an earlier attempt in %s stopped before its first checkpoint; its metrics are kept at %s",
                         out, aside)
        except UserError as exc:
            error = exc
        except OSError as exc:
            error = UserError(f"could not prepare {out}: {exc.strerror or exc}", hint=RESUME_AFTER_WRITE)
        if error is None and (note := replaced_note(out)):  # also when a later --resume carries on this run
            log.info("%s", note)
        for orphan in unrecorded_asides(out) if error is None else []:
            log.warning("%s holds the run an earlier --overwrite of %s set aside before it was stopped; nothing "
                        "deletes it: move it back or delete it yourself", orphan, out)
    # (also the barrier the other ranks wait at until the output directory is ready)
    raise_main_rank_failure(accelerator, error, str(out), hint=RESUME_AFTER_WRITE)
    if resume_from is not None:
        restore(run, resume_from)
    use_class_weights(run)
    if accelerator.is_main_process:
        from .tracking import run_summary, write_run_json

        facts = {"world_size": world, "grad_accum": accum, "total_steps": total,
                 "steps_per_epoch": per_epoch,
                 # with packing a batch counts rows: both are kept, and left_out counts rows
                 "train_examples": data["stats"].get("packed_examples", n_train),
                 "packed_rows": data["stats"].get("packed_rows"),
                 "left_out_per_epoch": left_out,
                 "skipped_examples": data["stats"].get("dropped"),
                 "truncated_examples": data["stats"].get("truncated"),
                 "too_long_examples": data["stats"].get("too_long"),
                 "eval_examples": len(data["eval"]) if data["eval"] is not None else 0,
                 "max_length": cfg.data.max_length,  # (as the model took it; the config keeps the given one)
                 "trainable_params": trainable, "total_params": all_params,
                 "labels": data["labels"], "multi_label": getattr(task, "multi_label", False),
                 "class_weights": run.class_weights,
                 "config_fingerprint": fingerprint,
                 "resumed_from": str(resume_from) if resume_from else None}
        write_run_json(out, cfg, facts, config=run.given_config)
        log.info("%s", run_summary(cfg, facts))
    if t.report_to:
        from .tracking import start_trackers

        start_trackers(accelerator, cfg, out, run.step)
    return run, resume_from


def _schedule_change(run: Run, saved: list[float] | None, lrs: list[float]) -> str | None:
    """What to say where the resumed step's learning rate is not the one the checkpoint's schedule would give:
    a longer run (max_steps, epochs) stretches the decay, so the rate jumps back up at the resume."""
    if not saved or math.isclose(saved[0], lrs[0], rel_tol=1e-6, abs_tol=1e-15) or not run.accelerator.is_main_process:
        return None
    t = run.cfg.train
    return (f"resuming after step {run.step}: step {run.step + 1} trains at lr {lrs[0]:.3g} where the checkpoint's "
            f"schedule had {saved[0]:.3g}: the {t.lr_scheduler} schedule (warmup included) is laid over this run's "
            f"{run.total_steps} steps at learning_rate {t.learning_rate:g}")


def restore(run: Run, resume_from: Path) -> None:
    """Continue `run` from the checkpoint at `resume_from`: trainable weights and optimizer state, the
    schedule's position, method state (AdaLoRA), counters and the fp16 loss scaler."""
    from .trainable_state import load_trainable_state

    accelerator, model, optimizer, scheduler = run.accelerator, run.model, run.optimizer, run.scheduler
    params, opt_state, state = ckpt.load_checkpoint(resume_from)
    if problem := ckpt.label_change(resume_from, state, run.data["labels"]):
        raise UserError(problem)
    try:
        load_trainable_state(accelerator, model, optimizer, params, opt_state, state["optimizer_scalars"])
    except (KeyError, RuntimeError, ValueError) as exc:  # --allow-config-change across shapes or tasks
        # (torch's words name tensor sizes, not the config: say which of the adapter's keys changed)
        saved = state.get("config")
        keys = [c for c in config_changes(saved, run.cfg, state.get("paths")) if c.startswith(("peft.", "model.",
                "task"))] if isinstance(saved, dict) else []
        changed = f" (changed: {'; '.join(keys[:8])})" if keys else ""
        raise UserError(f"checkpoint {resume_from} does not fit this run's model and adapter{changed}: "
                        f"{str(exc).splitlines()[0][:300]}",
                        hint="--allow-config-change cannot change the adapter's shape: resume with the checkpoint's "
                             "settings, or train the new adapter in a new output_dir") from None
    # The schedule's position comes from the checkpoint, its peak from this config: load_state_dict would
    # also bring back the saved base_lrs, and a learning_rate changed with --allow-config-change would
    # silently do nothing. (transformers' schedules are LambdaLR: lr = base * lambda(step).)
    peaks = list(scheduler.base_lrs)
    if (note := schedules.restored(scheduler, state["scheduler"])) and accelerator.is_main_process:
        log.warning("%s", note)
    scheduler.base_lrs = peaks
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(peaks, scheduler.lr_lambdas)]
    scheduler._last_lr = lrs  # what get_last_lr() reports until the next step
    for group, lr in zip(optimizer.param_groups, lrs):  # load_state_dict does not set the optimizer's
        group["lr"] = lr
    methods.load_method_state(model, state["method_tensors"], state.get("method_state") or {})
    run.step, run.counters, run.resumed_from = state["step"], state["counters"], resume_from
    run.class_weights = class_weights.recorded(state, run.cfg, run.data["labels"]) or run.class_weights
    nonfinite.load_loss_scale_state(accelerator, model, state)  # else fp16's scale starts over at 2**16
    if run.step > run.total_steps:
        raise UserError(f"checkpoint {resume_from} is at step {run.step}, past this run's {run.total_steps} steps; "
                        "raise train.max_steps (or train.epochs) to continue it, or resume an earlier checkpoint "
                        f"(--resume {resume_from.parent}/step-N) to end this run there")
    # (said by the loop, once it knows the step trains: not for a run that stays stopped early)
    run.schedule_note = _schedule_change(run, state["scheduler"].get("_last_lr"), lrs)
    error = None
    if accelerator.is_main_process:
        try:
            ckpt.set_aside_newer(run.output_dir, resume_from, run.step)
        except OSError as exc:  # (shutil.Error, a copy's list of failed files, has no strerror: its first)
            if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
                src, _, why = exc.args[0][0]  # (a copy's list of (source, destination, reason): the first)
                why = f"{src}: {why}"
            else:
                why = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
            error = UserError(f"could not set up {run.output_dir / 'checkpoints'} to resume {resume_from}: "
                              f"{why[:300]}", hint="fix what it names (a full disk, a broken link in the checkpoint), "
                                                   "then run the same command again: a checkpoint from elsewhere "
                                                   "is copied in before the later ones are moved aside")
        if state.get("train_digest") not in (None, run.data.get("train_digest")):
            # not refused: a fixed typo in the data is a fair reason; but the promise of an exact resume is off
            log.warning("data.train's contents changed since checkpoint %s was written: the resumed run trains "
                        "on other examples than the interrupted one did", resume_from)
        if differs := tokenised_differently(state.get("tokenisation"), run.cfg.task, run.tokenizer):  # (an upgrade between a run and its resume)
            log.warning("checkpoint %s %s: from here the run may train on other token ids than before (a BOS token, "
                        "the chat template's rendering); to continue exactly, resume with the scaletune that "
                        "started the run", resume_from, differs)
    raise_main_rank_failure(accelerator, error, str(run.output_dir / "checkpoints"),
                            hint="fix the cause, then run the same command again")
    accelerator.print(f"resumed from {resume_from} at step {run.step} "
                      f"(saved at world size {state['world_size']}, now {accelerator.num_processes})")


def use_class_weights(run: Run) -> None:
    """Give the task the run's class weights (a resume's: the checkpoint's) and log them once."""
    if run.class_weights is None:
        return
    run.task.set_class_weights(list(run.class_weights.values()))
    if run.accelerator.is_main_process:
        what = "multi-label positive weights" if getattr(run.task, "multi_label", False) else "class weights"
        log.info("train.class_weights (%s%s): %s", what, ", from the checkpoint" if run.resumed_from else "",
                 class_weights.describe(run.class_weights))


def refuse_what_cannot_run_here(cfg: RunConfig, world: int) -> None:
    """ConfigError listing every reason this config cannot run in this process: the cross-field rules
    (rules.py) for this world size and device, and a launch that does not fit `distributed.zero_stage`."""
    from .distributed import cuda_available, launched, launched_zero_stage

    problems = cross_field_problems(cfg, world_size=world, has_cuda=cuda_available())
    if cfg.distributed.zero_stage and not launched():
        # DeepSpeed needs the process group a launcher sets up; without one it fails deep in accelerate
        problems.append(f"distributed.zero_stage={cfg.distributed.zero_stage} needs a launcher: "
                        "`scaletune launch run.yaml --nproc N` (or accelerate launch), or set zero_stage: 0")
    stage, source = launched_zero_stage()
    if stage is not None and stage != cfg.distributed.zero_stage:
        # what is supported, what is gathered and which kernels apply are decided from the run config's stage
        problems.append(f"distributed.zero_stage={cfg.distributed.zero_stage}, but this process was launched "
                        f"with DeepSpeed ZeRO stage {stage} ({source}): add distributed.zero_stage={stage} to the "
                        "command (or use `scaletune launch`, which picks the launch for the config's stage)")
    if problems:
        err = ConfigError(problems, title=f"{cfg.source_file or 'run config'} cannot run here "
                                           f"({problems_count(len(problems))})")
        if world > 1:  # every rank finds the same problems: each node's first process prints them, once
            err.relayed_from = 0  # type: ignore[attr-defined]
        raise err


def train(cfg: RunConfig, *, resume: str | None = None, overwrite: bool = False,
          allow_config_change: bool = False, stop: StopFlag | None = None) -> tuple[str, int]:
    """Entry point of `scaletune train` (and scaletune.api.train): set up and train; returns fit's "done" or
    "preempted" and the step the run reached. `stop`: the process's StopFlag when the CLI installed it already
    (at start-up), else one is installed here. Nothing of the run (model, optimizer, data) is returned: it is
    freed when this returns (scaletune.api calls it again and again in one process)."""
    stop = stop if stop is not None else StopFlag()
    runlock.lock_run(Path(cfg.output_dir))  # before anything reads output_dir to decide what to do
    try:
        run, _ = setup(cfg, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change)
        from .loop import fit

        try:
            result = fit(run, stop)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise out_of_memory(run, exc) from None
    finally:
        stop.release_interrupts()  # (fit's loop caught Ctrl-C; an error out of it leaves it so otherwise)
        runlock.release_run()
    return result, run.step


def out_of_memory(run: Run, exc: BaseException) -> UserError:
    """The numbers behind an OOM and the cheapest changes that fix it, instead of a traceback."""
    from .metrics import peak_memory_mb

    t = run.cfg.train
    rows, seq = (run.batch_shape + (0, 0))[:2]
    where = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "host RAM"
    fixes = oom_fixes(run.cfg, run.accelerator.num_processes, evaluating=run.evaluating)
    what = (f"in an eval after step {run.step} (eval_batch_size={t.eval_batch_size or t.micro_batch_size}, "
            if run.evaluating else f"at step {run.step + 1} in a micro-batch of {rows} x {seq} tokens (")
    return UserError(
        f"out of memory {what}"
        f"micro_batch_size={t.micro_batch_size}, max_length={run.cfg.data.max_length}, peak "
        f"{peak_memory_mb():.0f} MiB of {where}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
        hint=("cheapest first: " + "; ".join(fixes) + ". " if fixes else "a smaller model or a larger device. ")
        + "Resume with --resume auto to keep finished steps.")


def oom_fixes(cfg: RunConfig, world_size: int, *, evaluating: bool = False) -> list[str]:
    """The changes an out-of-memory message suggests, cheapest first, each one the config allows."""
    t = cfg.train
    fixes = []
    if evaluating:  # (its batch is train.eval_batch_size where given, not micro_batch_size; no backward)
        size = t.eval_batch_size or t.micro_batch_size
        smaller = max(2 if cfg.task == "kto" else 1, size // 2)  # (kto's KL term pairs rows within a batch)
        if smaller < size:
            fixes.append(f"train.eval_batch_size={smaller} (the evals' batch; training's stays)")
    elif t.micro_batch_size > 1:
        # a smaller micro batch that still divides the global batch: micro / its smallest prime factor
        # (micro 1 has none to give; an odd micro halved may not divide the global batch: 9 // 2 and 18)
        factor = next(f for f in range(2, t.micro_batch_size + 1) if t.micro_batch_size % f == 0)
        more = "doubles" if factor == 2 else f"x{factor}"
        fixes.append(f"train.micro_batch_size={t.micro_batch_size // factor} (global batch stays "
                     f"{t.global_batch_size}: accumulation {more})")
    if not cfg.model.gradient_checkpointing and not evaluating:
        fixes.append("model.gradient_checkpointing=true (activations recomputed in backward)")
    if cfg.data.max_length > 512:
        fixes.append(f"data.max_length={cfg.data.max_length // 2}")
    if cfg.distributed.zero_stage < 3 and world_size > 1:
        fixes.append("distributed.zero_stage=3 (shard the frozen base across ranks)")
    if cfg.model.quantization is None:
        fixes.append("model.quantization=4bit (QLoRA)")
    return fixes
