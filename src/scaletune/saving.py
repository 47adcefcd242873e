"""What a run writes as it goes: checkpoints (`checkpoint.py` does the atomic, verified part), the adapter
directory peft loads, and the run's final outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import checkpoint as ckpt
from . import methods, nonfinite
from .config import RunConfig
from .data import tokenisation
from .distributed import main_rank_answer, raise_main_rank_failure
from .errors import RESUME_AFTER_WRITE, failed_write, write_error
from .fileutil import replace_dir, restore_replaced
from .identity import real_paths
from .outdir import discard_replaced
from .trainable_state import unwrap

if TYPE_CHECKING:  # (annotations only)
    from .train import Run


def save_checkpoint(run: Run, replace: bool = False) -> Path:
    """OUTPUT_DIR/checkpoints/step-N for the run's current step: trainable weights, optimizer state, scheduler,
    counters and the adapter. Every rank calls it (gathering is a collective); the main one writes."""
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
        # the hub version trained on: AutoPeftModel* loads the base at adapter_config.json's revision (else main's)
        config.revision = run.cfg.model.revision
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

