"""`model.init_adapter`: a new run that starts from an existing adapter's weights (an earlier run's adapter/ or
best_adapter/, or any peft adapter of the same method and shapes) instead of a new initialisation: training on
new data, a second stage, or more steps under another schedule. The run's peft section builds the adapter as
always; the saved weights then replace its initial ones, so the config stays what describes the run."""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger("scaletune")

KEY = "model.init_adapter"
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# adapter_config.json fields that may differ from the run's: how that adapter was trained or loaded (dropout,
# AdaLoRA's schedule), or where it sits, which the weights' names and shapes check exactly
_MAY_DIFFER = {"base_model_name_or_path", "revision", "inference_mode", "peft_version",
               "auto_mapping", "total_step", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
               "target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern"}
# LoRA initialisations that only set the adapter's first weights, which the saved ones replace. The others must be
# the adapter's own: pissa, olora (and corda, lora_ga, loftq) subtract their start from the base weights, and the
# saved adapter is an update of that residual base; mica freezes its B
_WEIGHTS_ONLY_INITS = (True, False, "gaussian", "orthogonal")


def adapter_dir(given: str) -> Path:
    """The adapter directory model.init_adapter names: a checkpoint (RUN/checkpoints/step-N) or a run's output
    directory stands for the adapter it holds (its `adapter/`), as eval's --adapter reads them."""
    path = Path(given)
    if not (path / "adapter_config.json").is_file() and (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    return path


def problems(cfg: Any) -> list[str]:
    """What the config check can tell without the model: the directory holds a peft adapter of peft.method whose
    settings are the peft section's."""
    path = cfg.model.init_adapter
    if path is None:
        return []
    if cfg.peft_method == "adalora":
        return [f"{KEY}: not with peft.method adalora: its saved adapter keeps only the ranks its schedule left, "
                "and a new run's schedule starts again from init_r"]
    if encoded := _encoder_not_saved(cfg):
        return [encoded]
    if not Path(path).exists() and _resumable(cfg):
        return []  # a resume reads its checkpoint, not this; a fresh start's load_initial still says it is gone
    path = adapter_dir(path)
    saved, problem = _saved_config(path)
    if problem:
        return [problem]
    from .adapter_record import adapter_meta
    from .new_tokens import init_problem

    meta = adapter_meta(path)  # (read once: the task and the new tokens it records)
    if task_problem := _task_problem(cfg, path, meta.get("task")):
        return [task_problem]
    if tokens_problem := init_problem(cfg, path, meta):  # (its trained embedding rows are its tokens')
        return [tokens_problem]
    method = str(saved.get("peft_type", "")).lower()
    if method != cfg.peft_method:
        return [f"{KEY}: {path} holds a {saved.get('peft_type')} adapter but peft.method is {cfg.peft_method}: "
                f"set peft.method: {method} with that adapter's options (its adapter_config.json)"]
    return _config_setting_problems(cfg, saved, Path(path))


def _encoder_not_saved(cfg: Any) -> str | None:
    """p_tuning, and prefix_tuning with prefix_projection, train a prompt encoder (an MLP or LSTM) whose output
    is the virtual tokens; peft saves only that output, not the encoder. Loaded into a new run's encoder input
    (same shape for p_tuning) it is silently fed through a freshly initialised encoder, so the run would not
    start from the adapter at all; prefix_projection's gives a bare size mismatch."""
    if cfg.peft_method == "p_tuning":
        what = "p_tuning"
    elif cfg.peft_method == "prefix_tuning" and cfg.peft.get("prefix_projection"):
        what = "prefix_tuning with prefix_projection: true"
    else:
        return None
    return (f"{KEY}: not with peft.method {what}: peft saves only its prompt encoder's output, not the encoder a "
            "new run trains, so the run cannot start from it (use it as it is with eval/predict, or train "
            "prefix_tuning/prompt_tuning without an encoder)")


def _config_setting_problems(cfg: Any, saved: dict, path: Path) -> list[str]:
    """The peft options that differ from the saved adapter's, from the run config alone, so `launch --dry-run`
    and `slurm` refuse them before submitting (load_initial checks again once the model has its modules)."""
    from .peft_options import peft_config
    from .tasks import TASKS, get_task

    if cfg.task not in TASKS:
        return []
    try:
        run = peft_config(cfg, get_task(cfg.task).peft_task_type).to_dict()
    except ConfigError:
        return []  # (the peft section's own problems: peft_problems reports them)
    # (None: filled in from the model when peft builds the adapter, as prompt learning's token_dim)
    return _setting_problems({k: v for k, v in run.items() if v is not None}, saved, path)


def _task_problem(cfg: Any, path: Path, task: str | None) -> str | None:
    """The adapter's recorded task when it is not the run's, told by the config check (before any tokenising);
    SFT then DPO gets the way that works: dpo and kto score against the adapter switched off, so an SFT adapter
    continued would be pulled back to the base it left, not kept near the SFT model (TRL's and LLaMA-Factory's
    reference). `task`: the one the adapter's scaletune.json records."""
    merge = (f"merge it first (`scaletune merge SFT.yaml --out sft-merged`) and train {cfg.task} with "
             "model.name_or_path: sft-merged, whose reference is then the SFT model (as in TRL and LLaMA-Factory)")
    if cfg.task in ("dpo", "kto") and task is None:
        # (no scaletune.json: another tool's adapter, most often an SFT one (TRL's, LLaMA-Factory's), which would
        # be continued against the base it left, as the causal_lm case below; nothing tells it from a DPO one)
        return (f"{KEY}: {path} records no task (it has no scaletune.json), so it may be an SFT adapter, and task "
                f"{cfg.task}'s reference is the model with the adapter switched off: continuing an SFT adapter would "
                f"score against the base without the SFT; {merge}")
    if task in (None, cfg.task):
        return None
    if cfg.task in ("dpo", "kto") and task == "causal_lm":
        return (f"{KEY}: {path} is a causal_lm (SFT) adapter, and task {cfg.task}'s reference is the model with the "
                f"adapter switched off: continuing it would score against the base without the SFT; {merge}")
    return f"{KEY}: task: {cfg.task}, but the adapter was trained for {task} ({path})"


def _resumable(cfg: Any) -> bool:
    """Whether output_dir holds checkpoints that --resume (the Slurm templates' --resume auto too) continues from:
    the adapter the run started from may be gone by then (deleted, or set aside by --overwrite)."""
    from .checkpoint import checkpoint_dirs

    return bool(checkpoint_dirs(Path(cfg.output_dir)))


def _saved_config(path: Path) -> tuple[dict, str | None]:
    """The adapter's adapter_config.json, or why there is none to read."""
    conf = path / "adapter_config.json"
    if not path.is_dir():
        return {}, f"{KEY}: {path} is not a directory (an adapter directory: an earlier run's OUTPUT_DIR/adapter)"
    if not conf.is_file() or not any((path / name).is_file() for name in _WEIGHTS):
        return {}, (f"{KEY}: {path} is not a peft adapter directory (adapter_config.json and "
                    "adapter_model.safetensors): give an earlier run's OUTPUT_DIR/adapter or best_adapter")
    try:
        saved = json.loads(conf.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {}, f"{KEY}: {conf} cannot be read ({exc})"
    if not isinstance(saved, dict):
        return {}, f"{KEY}: {conf} is not a peft adapter config (a JSON object)"
    return saved, None


_SAME_MODULES = "the peft section (target_modules, modules_to_save) must build the adapter's modules"


def load_initial(model: Any, cfg: Any, labels: list[str] | None) -> None:
    """Replace the new adapter's initial weights (and a classifier head's) on `model`, a PeftModel built from the
    run's peft section, with those saved in model.init_adapter; every difference that would change what they
    mean (settings, labels, names, shapes) is one ConfigError before anything is written."""
    import peft

    path = adapter_dir(cfg.model.init_adapter)
    saved, problem = _saved_config(path)
    if problem:
        raise ConfigError(problem)
    found = _setting_problems(model.peft_config["default"].to_dict(), saved, path)
    found += _label_problems(cfg, labels, path)
    if found:
        raise ConfigError(found, title=f"{KEY}: {path} is not the adapter the run config describes",
                          hint="give the peft options (and data.labels) the adapter was trained with")
    try:
        state = peft.utils.load_peft_weights(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001  (safetensors' and torch's errors of a damaged file vary)
        raise ConfigError(f"{KEY}: the weights in {path} cannot be read "
                          f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]})") from None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    try:
        with _gathered(model), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Found missing adapter keys")  # (said below, by name)
            result = peft.set_peft_model_state_dict(model, state)
    except KeyError as exc:  # a module the run trains in full (modules_to_save) that the adapter did not
        raise ConfigError(f"the run trains {exc.args[0]} in full, which it has no weights for",
                          title=_not_fitting(path), hint=_SAME_MODULES) from None
    except RuntimeError as exc:  # size mismatch: another rank, base model or label count
        shapes = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise ConfigError(shapes[:5] or [str(exc).splitlines()[0]], title=_not_fitting(path),
                          hint=_base_hint(saved, cfg)) from None
    prompt = model.peft_config["default"].is_prompt_learning  # (peft loads its encoder outside load_state_dict)
    missing = sorted(n for n in trainable & set(result.missing_keys)
                     if not (prompt and n.startswith("prompt_encoder.")))
    unexpected = [k for k in result.unexpected_keys if not (prompt and k.startswith("prompt_embeddings"))]
    found = []
    if missing:
        found.append(f"{len(missing)} of the run's trainable weights are not in it: {_some(missing)}")
    if unexpected:
        found.append(f"{len(unexpected)} of its weights have no place in the run's adapter: {_some(unexpected)}")
    if found:
        raise ConfigError(found, title=_not_fitting(path), hint=_SAME_MODULES)
    log.info("%s: starting from the %d weight tensors of %s", KEY, len(state), path)


def _setting_problems(run: dict, saved: dict, path: Path) -> list[str]:
    """The peft options whose value differs between the run's adapter and the saved one's adapter_config.json."""
    out = []
    for key in sorted(set(run) & set(saved) - _MAY_DIFFER):
        if key.endswith("dropout") or _plain(run[key]) == _plain(saved[key]):
            continue
        if key == "task_type":  # (scaletune sets it from `task`: peft.task_type is no key a user can give)
            if saved[key] is not None:  # (None: a LoraConfig without one, whose weights are named alike)
                out.append(f"task: {path} is a peft {saved[key]} adapter (its adapter_config.json's task_type), "
                           f"this run's task trains a {run[key]} one")
            continue
        if key == "init_lora_weights" and run[key] in _WEIGHTS_ONLY_INITS and saved[key] in _WEIGHTS_ONLY_INITS:
            continue  # (the saved weights replace the initial ones)
        out.append(f"peft.{key}: {_plain(run[key])!r} in the run config, {_plain(saved[key])!r} in the "
                   f"{KEY}'s {path / 'adapter_config.json'}")
    return out


def _label_problems(cfg: Any, labels: list[str] | None, path: Path) -> list[str]:
    """A classifier head's rows are its labels, in order: another label list would score other classes."""
    from .adapter_record import adapter_meta

    meta = adapter_meta(path)
    if meta.get("task") not in (None, cfg.task):
        return [f"task: {cfg.task}, but the adapter was trained for {meta['task']}"]
    if not meta and labels is not None and not cfg.data.labels:
        # (plain peft, TRL: no scaletune.json names its head's rows; the data's sorted labels may be another order)
        return [f"data.labels: {path} has no scaletune.json, so the order of its classifier's labels is unknown: "
                "set data.labels to them, in the order of the head's outputs (the id2label it was trained with)"]
    if labels is None or meta.get("labels") is None or list(meta["labels"]) == list(labels):
        return []
    if extra := [label for label in labels if label not in meta["labels"]]:  # (its head has no row for them)
        unscored = _some([repr(x) for x in extra])
        return [f"data.labels: the data has labels the adapter's head does not score ({unscored}; it has "
                f"{meta['labels']}): more classes need a new head, a run without {KEY}"]
    return [f"data.labels: the data's labels {labels} are not the adapter's {meta['labels']} (in that order: set "
            "data.labels to the adapter's list)"]


def _plain(value: Any) -> Any:
    """A config value as JSON keeps it, sets and lists alike as a sorted list (target sets are saved as lists)."""
    if isinstance(value, (set, frozenset, list, tuple)):
        return sorted((_plain(v) for v in value), key=repr)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return getattr(value, "value", value)  # (an enum: its saved string)


def _base_hint(saved: dict, cfg: Any) -> str | None:
    """Name the base model the adapter was made for when it is not this run's: the likeliest cause of shapes
    that differ with the same peft options."""
    from .hub import recorded_base

    base = saved.get("base_model_name_or_path")
    if not base or recorded_base(str(base)) == recorded_base(cfg.model.name_or_path):
        return None
    return f"its adapter_config.json names base model {base}; this run's model.name_or_path is {cfg.model.name_or_path}"


def _not_fitting(path: Path) -> str:
    return f"{KEY}: the weights in {path} do not fit this run's adapter"


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


@contextmanager
def _gathered(model: Any):
    """Under ZeRO-3 the weights loaded at start-up are partitioned already: writes go to gathered copies, which
    DeepSpeed partitions again on leaving (every rank loads the same file)."""
    partitioned = [p for p in model.parameters() if p.requires_grad and hasattr(p, "ds_id")]  # (not the base)
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield
