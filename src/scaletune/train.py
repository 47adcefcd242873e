"""`scaletune train`: build everything from the run config, then run the one training loop (`fit`)."""

from __future__ import annotations

import json
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
from .data import tokenisation, tokenised_differently
from .distributed import main_rank_answer, raise_main_rank_failure
from .errors import (
    RESUME_AFTER_WRITE,
    ConfigError,
    UserError,
    failed_write,
    problems_count,
    write_error,
)
from .fileutil import replace_dir, restore_replaced
from .identity import config_changes, config_fingerprint, real_paths
from .optimizers import make_optimizer
from .outdir import (
    check_output_dir,
    discard_replaced,
    replaced_note,
    set_aside,
    set_aside_metrics,
    unrecorded_asides,
)
from .rules import cross_field_problems
from .stopflag import StopFlag
from .trainable_state import unwrap

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
    counters: dict = field(default_factory=lambda: {"nonfinite_skips": 0, "tokens_seen": 0})
    resumed_from: Path | None = None  # the checkpoint this run continues (its path's best adapter is beside it)
    class_weights: dict | None = None  # {label: weight} the loss uses (train.class_weights), as checkpoints keep it
    generation: list = field(default_factory=list)  # train.eval_generate's prompts (generation_metrics.prepare)


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


def _note_schedule_change(run: Run, saved: list[float] | None, lrs: list[float]) -> None:
    """Say so where the resumed step's learning rate is not the one the checkpoint's schedule would give:
    a longer run (max_steps, epochs) stretches the decay, so the rate jumps back up at the resume."""
    if not saved or math.isclose(saved[0], lrs[0], rel_tol=1e-6, abs_tol=1e-15) or not run.accelerator.is_main_process:
        return
    t = run.cfg.train
    log.warning("resuming after step %d: step %d trains at lr %.3g where the checkpoint's schedule had %.3g: the %s "
                "schedule (warmup included) is laid over this run's %d steps at learning_rate %g", run.step,
                run.step + 1, lrs[0], saved[0], t.lr_scheduler, run.total_steps, t.learning_rate)


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
                        "raise train.max_steps (or train.epochs) to continue it")
    _note_schedule_change(run, state["scheduler"].get("_last_lr"), lrs)
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


def save_checkpoint(run: Run, replace: bool = False) -> Path:
    from .trainable_state import gather_trainable_state, saved_adapter_state

    params, opt_state, scalars = gather_trainable_state(run.accelerator, run.model, run.optimizer)
    # Gathering the adapter is a collective under ZeRO-3: do it on every rank here, because
    # ckpt.save_checkpoint calls `save_adapter` on the main process only.
    adapter_state = saved_adapter_state(run.accelerator, run.model, params)
    method_tensors, method_facts = methods.method_state(run.model)
    state = {"step": run.step, "scheduler": run.scheduler.state_dict(), "optimizer_scalars": scalars,
             "method_state": method_facts,
             "counters": run.counters, "world_size": run.accelerator.num_processes,
             **nonfinite.loss_scale_state(run.accelerator, run.model),  # fp16: GradScaler's or DeepSpeed's
             "global_batch_size": run.cfg.train.global_batch_size,
             "config": run.given_config, "paths": real_paths(run.given_config),  # (see `config_changes`)
             "train_digest": run.data.get("train_digest"), "tokenisation": tokenisation(run.cfg.task),
             "class_weights": run.class_weights, "labels": run.data["labels"]}
    return ckpt.save_checkpoint(run.accelerator, run.output_dir, run.step, trainable=params,
                                optimizer_state=opt_state, state=state,
                                save_adapter=lambda d: save_adapter(run, d, adapter_state),
                                fingerprint=run.fingerprint, keep=run.cfg.train.save_total_limit,
                                method_tensors=method_tensors, replace=replace)


def save_adapter(run: Run, directory: Path, state: dict | None = None, extra_meta: dict | None = None) -> None:
    """Plain peft adapter directory + tokenizer (+ label maps): what `PeftModel.from_pretrained` loads.

    Without `state` this gathers it, a collective under ZeRO-3: then every rank must call it."""
    from .hub import recorded_base
    from .new_tokens import META_KEY, record
    from .trainable_state import prompt_encoders_holding, saved_adapter_state

    if state is None:
        state = saved_adapter_state(run.accelerator, run.model)
    if not run.accelerator.is_main_process:
        return
    model = unwrap(run.accelerator, run.model)
    new_tokens = record(run.tokenizer)
    base = recorded_base(run.cfg.model.name_or_path)
    for config in getattr(model, "peft_config", {}).values():  # (adapter_config.json's, see recorded_base)
        config.base_model_name_or_path = base
    with prompt_encoders_holding(model, state):
        # new tokens: peft would see the resized vocabulary and save both whole tables; their trained rows are
        # saved as trainable tokens, and eval resizes the base itself (new_tokens.fit_embeddings)
        model.save_pretrained(str(directory), state_dict=state, safe_serialization=True,
                              **({"save_embedding_layers": False} if new_tokens else {}))
    run.tokenizer.save_pretrained(str(directory))
    meta = {"task": run.cfg.task, "labels": run.data["labels"], "base_model": base,
            "max_length": run.cfg.data.max_length, "rope_scaling": run.cfg.model.rope_scaling,
            "held_out": held_out(run.cfg),
            "train_digest": run.data.get("train_digest"), "tokenisation": tokenisation(run.cfg.task),
            **run.task.cache_meta(), **({META_KEY: new_tokens} if new_tokens else {}),
            **(extra_meta or {})}
    (directory / "scaletune.json").write_text(json.dumps(meta, indent=1))


def held_out(cfg: RunConfig) -> dict | None:
    """What `scaletune eval` with data.eval_fraction must split the same way to score on examples the
    adapter never trained on (None: this run held nothing out of its training file)."""
    if not cfg.data.eval_fraction or cfg.data.eval:
        return None
    split = {"train": data_source(cfg.data.train), "eval_fraction": cfg.data.eval_fraction, "seed": cfg.train.seed}
    # data.max_samples picks the records split: another cap holds out others. (Only when set: an adapter
    # recorded before the key, or without a cap, compares equal to a run without one.)
    return split if cfg.data.max_samples is None else {**split, "max_samples": cfg.data.max_samples}


def data_source(train: Any) -> Any:
    """data.train as comparable names: a local file's absolute path (runs start from other directories)."""
    from .data.sources import train_sources

    if not isinstance(train, list):
        return train if train.startswith("hub:") else str(Path(train).resolve())
    names = [data_source(spec) for spec, _ in train_sources(train)]  # (weights do not move the split)
    return names[0] if len(names) == 1 else names  # [a] splits as a does


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
    fixes = [f"train.micro_batch_size={max(1, t.micro_batch_size // 2)} (global batch stays "
             f"{t.global_batch_size}: accumulation doubles)"]
    if not run.cfg.model.gradient_checkpointing:
        fixes.append("model.gradient_checkpointing=true (activations recomputed in backward)")
    if run.cfg.data.max_length > 512:
        fixes.append(f"data.max_length={run.cfg.data.max_length // 2}")
    if run.cfg.distributed.zero_stage < 3 and run.accelerator.num_processes > 1:
        fixes.append("distributed.zero_stage=3 (shard the frozen base across ranks)")
    if run.cfg.model.quantization is None:
        fixes.append("model.quantization=4bit (QLoRA)")
    return UserError(
        f"out of memory at step {run.step + 1} in a micro-batch of {rows} x {seq} tokens "
        f"(micro_batch_size={t.micro_batch_size}, max_length={run.cfg.data.max_length}, peak "
        f"{peak_memory_mb():.0f} MiB of {where}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
        hint="cheapest first: " + "; ".join(fixes) + ". Resume with --resume auto to keep finished steps.")


def write_adapter(run: Run, name: str, extra_meta: dict | None = None) -> Path:
    """OUTPUT_DIR/<name>/ replaced whole by the current adapter (written aside, then renamed: a kill leaves
    the old one or the new one). Every rank calls it (a collective under ZeRO-3); the main one writes."""
    tmp, final = run.output_dir / f".{name}.tmp", run.output_dir / name
    if run.accelerator.is_main_process:
        restore_replaced(final)
        if tmp.exists():
            shutil.rmtree(tmp)
    error = None
    try:
        save_adapter(run, tmp, extra_meta=extra_meta)
        if run.accelerator.is_main_process:
            replace_dir(tmp, final)
    except Exception as exc:
        if not failed_write(exc):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        error = write_error(exc, final, RESUME_AFTER_WRITE + f" (it writes {name}/ again)")
    raise_main_rank_failure(run.accelerator, error, str(final), hint=RESUME_AFTER_WRITE)
    return final


def final_outputs(run: Run, metrics_log: Any) -> None:
    """After the last step: checkpoint (so `--resume auto` knows it is done), the adapter, and only then
    the deletion of the run --overwrite replaced."""
    # (rank 0's answer: a rank looking itself could find the checkpoint rank 0 is writing, a DDP save having no
    # collective before its write, skip the save, and pair its next collectives with the save's: a hang)
    if not main_rank_answer(run.accelerator, (run.output_dir / "checkpoints" / f"step-{run.step}").is_dir()):
        save_checkpoint(run)
    final = write_adapter(run, "adapter")
    metrics_log.end_progress()
    if run.accelerator.is_main_process:
        out = run.output_dir
        where = [f"checkpoints in {out / 'checkpoints'}", f"metrics in {out / 'metrics.jsonl'}"]
        if (out / "best_adapter").is_dir():
            where.insert(0, f"best adapter in {out / 'best_adapter'}")
        if "tensorboard" in run.cfg.train.report_to:
            where.append(f"TensorBoard logs in {out / 'scaletune'}")
        metrics_log.write(f"adapter (step {run.step}) saved to {final}; " + ", ".join(where))
        # The run is complete (here, or in a later --resume of it): the run it replaced can go.
        for aside in discard_replaced(run.output_dir):
            metrics_log.write(f"deleted the run --overwrite replaced ({aside})")
    run.accelerator.wait_for_everyone()

