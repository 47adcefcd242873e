"""model.rope_scaling: stretch a rotary model's positions to fine-tune on sequences longer than it was pretrained on.

`config_problems` checks the key from the config alone (nothing heavy imported: `from_dict` runs it before
torch loads). `scaled_rope_parameters` turns it into the base config's `rope_parameters` (transformers 5's form:
rope_type, factor, rope_theta, ...), standardized and validated by transformers itself; seqlen.read_model_config
applies it, and model.load_model hands it to from_pretrained, so training, eval, predict, merge (whose config.json
then carries it) and plan all see the same scaled model.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

from .errors import ConfigError

log = logging.getLogger("scaletune")

KEY = "model.rope_scaling"
# Each type's keys besides `type` (transformers' RopeParameters): (required, optional). transformers requires
# original_max_position_embeddings for yarn/llama3/longrope but fills it from max_position_embeddings, so it is
# optional here. 'proportional' (Gemma's partial rotary variant) is a model's own scheme, not a stretch.
TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (("factor",), ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                           "mscale", "mscale_all_dim", "truncate")),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor"), ("original_max_position_embeddings",)),
    "longrope": (("short_factor", "long_factor"), ("factor", "original_max_position_embeddings",
                                                    "attention_factor")),
}
_COMMON = ("rope_theta",)  # any type may also move the base frequency
# type's spellings: axolotl and transformers 4 wrote `type`, transformers 5 writes `rope_type`
_TYPE_KEYS = ("type", "rope_type")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# what each key must be: (test, what to say)
_VALUES: dict[str, tuple[Any, str]] = {
    "factor": (lambda v: _number(v) and v > 1, "a number > 1"),
    "rope_theta": (lambda v: _number(v) and v > 0, "a number > 0"),
    "attention_factor": (lambda v: _number(v) and v > 0, "a number > 0"),
    "original_max_position_embeddings": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                                         "a whole number > 0"),
    "truncate": (lambda v: isinstance(v, bool), "true or false"),
    "short_factor": (lambda v: isinstance(v, list) and v and all(map(_number, v)), "a list of numbers"),
    "long_factor": (lambda v: isinstance(v, list) and v and all(map(_number, v)), "a list of numbers"),
}


def rope_type(spec: dict) -> Any:
    """The type `spec` names, under either spelling (None without)."""
    return next((spec[k] for k in _TYPE_KEYS if k in spec), None)


def factor(cfg: Any) -> float:
    """How many times the base's pretrained length model.rope_scaling stretches positions to (1 without)."""
    spec = cfg.model.rope_scaling
    f = spec.get("factor") if isinstance(spec, dict) else None
    return float(f) if _number(f) and f > 1 else 1.0


def stretched_length(config: Any, positions: int) -> int:
    """The positions a loaded model's RoPE scaling covers, where `positions` is its max_position_embeddings: factor
    x original_max_position_embeddings (model.rope_scaling's default: max_position_embeddings), never fewer than
    `positions` (Llama 3.1's config states its stretched length already)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = getattr(text, "rope_parameters", None)
    if not isinstance(params, dict) or params.get("rope_type", "default") == "default":
        return positions
    f, original = params.get("factor"), params.get("original_max_position_embeddings", positions)
    if not (_number(f) and f > 1 and _number(original)):
        return positions
    return max(positions, int(original * f))


def config_problems(cfg: Any) -> list[str]:
    """What is wrong with model.rope_scaling given the config alone: the type, missing and unknown keys, values."""
    spec = cfg.model.rope_scaling
    if spec is None:
        return []
    kind = rope_type(spec)
    example = "e.g. {type: linear, factor: 2.0}"
    if kind is None:
        return [f"{KEY}: needs a type, one of {' | '.join(TYPES)} ({example})"]
    if all(k in spec for k in _TYPE_KEYS) and spec["type"] != spec["rope_type"]:
        return [f"{KEY}: type {spec['type']!r} and rope_type {spec['rope_type']!r} disagree; give one"]
    if kind not in TYPES:
        return [f"{KEY}: type {kind!r} is not one of {' | '.join(TYPES)}"]
    required, optional = TYPES[kind]
    p = []
    if missing := [k for k in required if k not in spec]:
        p.append(f"{KEY}: type {kind} needs {', '.join(missing)} ({example})")
    if unknown := [str(k) for k in spec if k not in (*_TYPE_KEYS, *required, *optional, *_COMMON)]:
        p.append(f"{KEY}: {', '.join(unknown)} not taken by type {kind} (it takes "
                 f"{', '.join((*required, *optional, *_COMMON))})")
    for key, value in spec.items():
        test, what = _VALUES.get(key, (_number, "a number"))
        if key not in _TYPE_KEYS and not test(value):
            p.append(f"{KEY}: {key} must be {what}, got {value!r}")
    low, high = spec.get("low_freq_factor"), spec.get("high_freq_factor")
    if _number(low) and _number(high) and high <= low:
        p.append(f"{KEY}: high_freq_factor ({high}) must be above low_freq_factor ({low})")
    return p


def _unscalable(config: Any) -> str | None:
    """Why `config` cannot take a RoPE scaling (None when it can)."""
    from .seqlen import position_limit

    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not params or position_limit(config)[1] or getattr(config, "alibi", False):
        return "has no rotary position embeddings to scale (its positions are a learned table or none)"
    if config.nested_rope_parameter_keys(params):
        return "has a RoPE of its own per layer type, which model.rope_scaling does not set"
    return None


def scaled_rope_parameters(config: Any, spec: dict, name: str) -> dict:
    """`config`'s rope_parameters with `spec` applied (the model's own rope_theta kept unless `spec` sets one),
    completed and checked by transformers; ConfigError naming model.rope_scaling where `config` (the model
    `name`'s) cannot take it."""
    why = _unscalable(config)
    if why:
        raise ConfigError(f"{KEY}: {name} ({config.model_type}) {why}; remove {KEY}")
    own = config.rope_parameters
    if own.get("rope_type", "default") not in ("default", rope_type(spec)):
        # (Llama 3.1's own llama3 x8, say: the two do not compose, the model then runs with the new one only)
        log.warning("%s: replaces %s's own RoPE scaling %s", KEY, name, own)
    kept = ("rope_theta", "partial_rotary_factor")
    if own.get("rope_type") == rope_type(spec):
        # a new factor of the model's own scheme (Llama 3.1's llama3: 8192 stretched to its 131072 positions)
        # stretches the length it was pretrained on, not the already stretched max_position_embeddings
        kept += ("original_max_position_embeddings",)
    params = {k: own[k] for k in kept if k in own}
    params.update({k: v for k, v in spec.items() if k not in _TYPE_KEYS}, rope_type=rope_type(spec))
    scaled = copy.deepcopy(config)  # (standardize fills original_max_position_embeddings from the model's)
    scaled.rope_parameters = params
    try:
        scaled.standardize_rope_params()
        scaled.validate_rope()
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"{KEY}: {name} cannot take {spec} ({str(exc).splitlines()[0]})") from None
    if rope_type(spec) == "longrope":
        _check_factor_lengths(scaled, name)
    return scaled.rope_parameters


def _check_factor_lengths(config: Any, name: str) -> None:
    """longrope's short_factor and long_factor scale one rotary frequency each: transformers only logs a wrong
    length, and torch then broadcasts a single number over every frequency or fails at the first forward."""
    params = config.rope_parameters
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    want = int(head_dim * params.get("partial_rotary_factor", 1.0)) // 2
    wrong = [f"{k} has {len(params[k])}" for k in ("short_factor", "long_factor") if len(params[k]) != want]
    if wrong:
        raise ConfigError(f"{KEY}: {name}'s rotary embeddings have {want} frequencies (head_dim {head_dim} / 2), "
                          f"one factor each in short_factor and long_factor; {' and '.join(wrong)}")
