"""The `peft` section of a run config checked against the method's peft config: option names, the types
peft annotates them with, and values that would train nothing (`peft_problems` for config validation,
`peft_config` to build the config training uses)."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from typing import Any

from .config import TASKS, RunConfig, unknown_key_hint
from .config_values import _short
from .errors import ConfigError, problems_count


def _number(value: Any, *, integral: bool = False) -> Any:
    """A number written as a string (YAML 1.1 reads 1e-1 so; an override of a peft option stays the text
    typed) as a float, or an int where `integral` and it is one ("1e1" -> 10); any other value as it is."""
    if not isinstance(value, str):
        return value
    try:
        out = float(value)
    except ValueError:
        return value
    if not math.isfinite(out):
        return value  # ("nan" is no number an option means)
    return int(out) if integral and out.is_integer() else out


# Values that peft accepts and that train nothing: a zero alpha scales the adapter's output to zero (its
# up-projection then gets no gradient), dropout 1 zeroes its input, a rank 0 adapter has no weights.
_POSITIVE = ("lora_alpha", "alpha")  # LoRA/AdaLoRA; LoHa/LoKr
_DROPOUTS = ("lora_dropout", "rank_dropout", "module_dropout", "vera_dropout")
_FLOAT32_MAX = 3.4028234663852886e38
_RANKED = ("lora", "loha", "lokr", "vera")  # methods whose `r` is the adapter's rank (OFT's r may be 0)
# LoRA initialisations computed from data, by a peft function to be called around building the adapter: without
# it eva and lora_ga silently start as plain LoRA (peft falls back), corda fails
_DATA_DRIVEN = {"eva": "initialize_lora_eva_weights", "lora_ga": "preprocess_loraga", "corda": "preprocess_corda"}


def _peft_range_problems(method: str, kwargs: dict) -> list[str]:
    """Problems of the peft options whose value makes the adapter a no-op (see _POSITIVE, _DROPOUTS); options
    of the wrong type are left to _peft_value_problems."""
    problems = []
    for key, value in kwargs.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key in _POSITIVE and value <= 0:
            why = " (it scales the adapter's update: the model would never change)" if value == 0 else ""
            problems.append(f"peft.{key}: must be > 0, got {value}{why}")
        elif key in _POSITIVE and value > _FLOAT32_MAX:  # the scale is a float32 factor of the LoRA product
            problems.append(f"peft.{key}: must be at most {_FLOAT32_MAX:.3g} (the largest float32), got {value:.3g}")
        elif key in _DROPOUTS and not 0 <= value < 1:
            problems.append(f"peft.{key}: must be in [0, 1), got {value}"
                            f"{' (1 drops every input: nothing would be trained)' if value == 1 else ''}")
        elif key == "r" and method in _RANKED and value < 1:
            problems.append(f"peft.r: must be >= 1 (the adapter's rank), got {value}")
    init = kwargs.get("init_lora_weights")
    if isinstance(init, str) and init in _DATA_DRIVEN:
        problems.append(f"peft.init_lora_weights: {init} is initialised from the training data by peft's "
                        f"{_DATA_DRIVEN[init]}, a pass scaletune does not run (without it peft "
                        f"{'fails' if init == 'corda' else 'silently starts from plain LoRA weights'}); use true, "
                        "gaussian, pissa or olora")
    elif isinstance(init, str) and init.startswith("pissa_niter"):
        problems.append(f"peft.init_lora_weights: {init} takes a randomized SVD of each base weight and subtracts it "
                        "from the base, and peft draws it again, otherwise, at every load of the adapter (eval, "
                        "predict, merge, PeftModel.from_pretrained): the loaded model would not be the trained one; "
                        "use pissa (the exact SVD, the same at every load)")
    if method == "adalora" and "r" in kwargs:  # (peft takes it, warns, and ignores it)
        problems.append("peft.r: AdaLoRA does not read it: its ranks start at peft.init_r and are pruned down to "
                        "peft.target_r; remove peft.r (or give ~peft.r)")
    return problems


def _peft_value_problems(config_cls: type, kwargs: dict) -> list[str]:
    """peft's config dataclasses take any value: `use_dora: "yes"` is truthy and turns DoRA on, `r: true` is rank 1,
    `modules_to_save: lm_head` is matched letter by letter. Check the options annotated as a plain bool, int,
    float or list[str] (or Optional of one); anything else is left to peft. Numbers written as strings (YAML 1.1
    reads "1e-1" so, and an override of a peft option keeps the text) become numbers in `kwargs`."""
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # noqa: BLE001 - an annotation this Python cannot resolve: leave the values to peft
        return []
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    problems = []
    for key, value in list(kwargs.items()):
        tp = hints.get(key)
        args = typing.get_args(tp)
        optional = type(None) in args and len(args) == 2
        if optional and typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = args[0] if args[1] is type(None) else args[1]
        if value is None and (optional or defaults.get(key) is None):
            continue  # peft's own default for several int options (token_dim, num_virtual_tokens) is None
        choices = _enum_values(tp)
        if choices and isinstance(value, str):  # Union[SomeInit, str]: peft compares with the enum's values
            ok, want = value in choices, " | ".join(choices)
        elif tp is bool:
            ok, want = isinstance(value, bool), "bool (true or false)"
        elif tp is int:  # a float too: peft computes with it (lora_alpha: 0.5); a bool here is the silent mistake
            value = kwargs[key] = _number(value, integral=True)
            ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "int"
        elif tp is float:
            value = kwargs[key] = _number(value)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            want = "a finite number"
        elif typing.get_origin(tp) is list and typing.get_args(tp) == (str,):  # list[str] or typing.List[str]
            ok, want = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of names"
        elif _names_or_pattern(tp):  # target_modules: a list of names, or one regular expression
            ok = isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)
            want = "a list of names or a regular expression"
        elif dataclasses.is_dataclass(tp) and isinstance(value, dict):
            # (runtime_config: {ephemeral_gpu_offload: true}) peft keeps a mapping as given where it wants its
            # dataclass, and fails reading an attribute of it when the model is built: build it here, its own
            # options checked as these are
            value = dict(value)
            inner = [p.replace("peft.", f"peft.{key}.", 1) for p in _peft_value_problems(tp, value)]
            if inner:
                problems += inner
                continue
            try:
                kwargs[key], ok = tp(**value), True
            except (TypeError, ValueError) as exc:
                problems.append(f"peft.{key}: not a {tp.__name__} ({exc})")
                continue
            want = tp.__name__
        else:
            continue
        if not ok:
            got = f"{type(value).__name__} {_short(value)}"
            problems.append(f"peft.{key}: expected {want}{' or null' if optional else ''}, got {got}")
    return problems


def _names_or_pattern(tp: Any) -> bool:
    """Whether an option is annotated list[str] | str (and None): peft's target_modules and the like."""
    args = {a for a in typing.get_args(tp) if a is not type(None)}
    lists = {a for a in args if typing.get_origin(a) is list and typing.get_args(a) == (str,)}
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and len(lists) == 1 and args - lists == {str}


def _enum_values(tp: Any) -> list[str]:
    """The values of the enum an option is annotated with (alone or beside str), else []."""
    import enum

    for arg in (tp, *typing.get_args(tp)):
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return [str(m.value) for m in arg]
    return []


# Where scaletune sets an option peft leaves at its default (in `peft_config`), for `config-help --method`.
SCALETUNE_DEFAULTS = {"exclude_modules": "['classifier', 'score'] for seq_cls/token_cls (the new head trains in full)",
                      "total_step": "the run's optimizer steps (AdaLoRA's rank schedule)"}


def peft_config(cfg: RunConfig, task_type: str, total_steps: int | None = None) -> Any:
    """Build the peft config for `peft.method`, checking every key against that method's fields and the types
    peft annotates them with; all problems are raised together."""
    import peft

    from . import adapters  # registers scaletune's own peft methods  # noqa: F401

    method = cfg.peft_method
    mapping = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    by_name = {str(k.value if hasattr(k, "value") else k).lower(): v for k, v in mapping.items()}
    if method not in by_name:
        raise ConfigError(f"peft.method: unknown method {_short(str(cfg.peft.get('method')))}{_unknown_method_hint(method, by_name)}")
    config_cls = by_name[method]
    fields = {f.name for f in dataclasses.fields(config_cls)} - {"peft_type", "task_type"}
    # A deep copy: peft extends modules_to_save in place (the classifier head), which would change the run config.
    kwargs = copy.deepcopy(cfg.peft_kwargs)
    problems = []
    for key in kwargs:
        if key not in fields:
            # (a key the YAML keeps from another method's settings: say how to drop it from the command line)
            hint = unknown_key_hint(str(key), "peft", sorted(fields)) or f" (remove it, or give ~peft.{key})"
            article = "an" if config_cls.__name__[0] in "AEIOU" else "a"
            problems.append(f"peft.{key}: not {article} {config_cls.__name__} option{hint}")
    problems += _peft_value_problems(config_cls, kwargs)
    problems += _peft_range_problems(method, {k: v for k, v in kwargs.items() if k in fields})
    if problems:
        raise ConfigError(problems, title=f"peft section has {problems_count(len(problems))}")
    # (SCALETUNE_DEFAULTS says so in `config-help --method`)
    if task_type in ("SEQ_CLS", "TOKEN_CLS") and "exclude_modules" in fields and "exclude_modules" not in kwargs:
        # The new head is trained in full (peft's modules_to_save); an adapter on it as well would clash.
        kwargs["exclude_modules"] = ["classifier", "score"]
    if method == "adalora" and total_steps is not None and "total_step" not in kwargs:
        kwargs["total_step"] = total_steps
        tinit, tfinal = kwargs.get("tinit", 0), kwargs.get("tfinal", 0)
        if isinstance(tinit, int) and isinstance(tfinal, int) and tinit >= total_steps - tfinal:
            # (peft's own message asks for a larger total_step, a key the user never gave: scaletune fills it in)
            raise ConfigError(f"peft.tinit ({tinit}) and peft.tfinal ({tfinal}) leave AdaLoRA no steps to "
                              f"re-allocate ranks in: its total_step is the run's {total_steps} optimizer steps "
                              "(train.max_steps or epochs); lower them, or train longer")
    try:
        return config_cls(task_type=task_type, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"peft: {config_cls.__name__} rejected the settings: {exc}") from None


def _unknown_method_hint(method: str, known: dict) -> str:
    """What follows "unknown method 'x'": how to select a variant given by its name (dora: lora + use_dora),
    else a close name and the list of known ones."""
    from .methods import how_to_select

    how = how_to_select(method)
    if how:
        return f" ({how})"
    close = difflib.get_close_matches(method, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; known: {', '.join(sorted(known))}"


def peft_problems(cfg: RunConfig) -> list[str]:
    """Every problem `peft_config` would raise for this run config's peft section (method, option names, types
    and values), as a list for `from_dict` to report with the rest. Imports peft: seconds, so config validation
    asks only for commands about to train (config.py's check_peft)."""
    from .tasks import get_task

    if not isinstance(cfg.peft, dict) or not isinstance(cfg.peft.get("method", "lora"), str):
        return []  # the config check reports these
    task_type = get_task(cfg.task).peft_task_type if cfg.task in TASKS else None
    try:
        peft_config(cfg, task_type, total_steps=10**9)  # (AdaLoRA's real step count is known later)
    except ConfigError as exc:
        return exc.problems
    return []
