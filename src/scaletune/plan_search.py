"""`scaletune plan`'s search for the cheapest change that fits, when the run as given does not.

Every candidate is a whole run config, checked with the rules `train` applies and estimated by
plan.estimate exactly as plan estimates a config given directly (one ModelShape serves all: it holds
nothing the changes touch).
"""

from __future__ import annotations

import dataclasses

from .config import RunConfig
from .optimizers import ZERO_OPTIMIZERS
from .plan import Budget, Estimate, ModelShape, estimate
from .rules import cross_field_problems

# Less offload, mildest first, from each setting: "optimizer" keeps only the optimizer states on the host
# (small for an adapter), "none" nothing.
_LESS_OFFLOAD = {"all": ("optimizer", "none"), "params": ("optimizer", "none"), "optimizer": ("none",), "none": ()}


def _with(cfg: RunConfig, **changes: dict) -> RunConfig:
    """A copy of `cfg` with section fields replaced, e.g. _with(cfg, train={"micro_batch_size": 1})."""
    out = cfg
    for section, values in changes.items():
        out = dataclasses.replace(out, **{section: dataclasses.replace(getattr(out, section), **values)})
    return out


def _offload(cfg: RunConfig, to: str) -> tuple[str, dict]:
    """The change to distributed.offload=`to`, with the optimizer it needs."""
    text, changes = f"distributed.offload={to}", {"distributed": {"offload": to}}
    if to in ("optimizer", "all") and cfg.train.optimizer not in ZERO_OPTIMIZERS:
        # ZeRO runs no bitsandbytes optimizer (config rule), so offload means adamw.
        text, changes["train"] = f"{text}, train.optimizer=adamw", {"optimizer": "adamw"}
    return text, changes


def _levels(cfg: RunConfig, world: int, offload: bool = True) -> list[list[tuple[str, dict]]]:
    """Changes in order of cost; alternatives inside a level replace each other, mildest first.
    `offload`: include moving the optimizer to the host (not after less offload was chosen for the host)."""
    t, dist = cfg.train, cfg.distributed
    levels: list[list[tuple[str, dict]]] = []
    if cfg.model.attn_implementation == "eager":  # (its L x L scores per layer: SDPA keeps none, for nothing)
        levels.append([("model.attn_implementation=sdpa", {"model": {"attn_implementation": "sdpa"}})])
    if not cfg.model.gradient_checkpointing and cfg.peft_method != "prefix_tuning":
        levels.append([("model.gradient_checkpointing=true", {"model": {"gradient_checkpointing": True}})])
    levels.append([(f"train.micro_batch_size={m} (grad accumulation {t.global_batch_size // (m * world)}, "
                    "same global batch)", {"train": {"micro_batch_size": m}})
                   for m in range(t.micro_batch_size - 1, 0, -1) if t.global_batch_size % (m * world) == 0])
    levels.append([(f"distributed.zero_stage={s}", {"distributed": {"zero_stage": s}})
                   for s in range(max(dist.zero_stage + 1, 2), 4)])
    if offload and dist.offload == "none":
        levels.append([_offload(cfg, "optimizer")])
    if cfg.model.quantization != "4bit":
        dtype = "bfloat16" if cfg.model.dtype == "float32" else cfg.model.dtype
        mp = "bf16" if dtype == "bfloat16" else "fp16"
        levels.append([("model.quantization=4bit", {"model": {"quantization": "4bit", "dtype": dtype},
                                                    "train": {"mixed_precision": mp}})])
    return [level for level in levels if level]


def _ladder(cfg: RunConfig, world: int, offload: bool = True, steps: tuple[str, ...] = ()) -> list[tuple[str, RunConfig]]:
    """Each level's alternatives on top of the strongest of the earlier ones; `steps` name what `cfg`
    already changed."""
    out: list[tuple[str, RunConfig]] = []
    base, done = cfg, list(steps)
    for level in _levels(cfg, world, offload):
        for text, changes in level:
            out.append(("; ".join([*done, text]), _with(base, **changes)))
        done.append(level[-1][0])
        base = _with(base, **level[-1][1])
    return out


def candidates(cfg: RunConfig, world: int, host_short: bool = False) -> list[tuple[str, RunConfig]]:
    """Every candidate, cheapest first. When the host cannot hold what is offloaded (`host_short`), less
    offload comes first, alone and then with the device-side changes it may need: it costs no speed, unlike
    the rest of the ladder (4-bit would also shrink the host part, and change the model)."""
    out: list[tuple[str, RunConfig]] = []
    for to in _LESS_OFFLOAD[cfg.distributed.offload] if host_short else ():
        text, changes = _offload(cfg, to)
        less = _with(cfg, **changes)
        out.append((text, less))
        out += _ladder(less, world, offload=False, steps=(text,))
    return out + _ladder(cfg, world)


def suggest(cfg: RunConfig, shape: ModelShape, world: int, budget: Budget,
            cuda: bool) -> tuple[str, Estimate] | None:
    """The first candidate that is a valid combination and fits `budget` (device and host memory)."""
    host_short = budget.host_short(estimate(cfg, shape, world, cuda))
    for text, cand in candidates(cfg, world, host_short):
        if cross_field_problems(cand, world_size=world, has_cuda=cuda):
            continue
        est = estimate(cand, shape, world, cuda)
        if not budget.shortfalls(est):
            return text, est
    return None
