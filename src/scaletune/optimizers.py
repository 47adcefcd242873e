"""The optimizers `train.optimizer` names: how each is built from the run's parameter groups, and how many
bytes of state it keeps (what `scaletune plan` counts).

* adamw: torch's AdamW.
* adamw_8bit, paged_adamw_8bit, paged_adamw_32bit, lion, lion_8bit, paged_lion_8bit: bitsandbytes'.
  Lion takes adam_beta1/adam_beta2 as given (it has two betas too: one interpolates the update's sign,
  the other the momentum); the Lion paper suggests 0.9/0.99 and a 3-10x smaller learning rate.
* adafactor: transformers' Adafactor with an external learning rate (no relative step, no parameter
  scaling, no warmup of its own), so scaletune's schedule drives it as it drives AdamW; no first moment
  (beta1), as HF Trainer builds it: its factored second moment is what saves the memory.

Only torch-native states can be partitioned by DeepSpeed ZeRO and gathered back whole for a checkpoint:
bitsandbytes' quantized or paged states cannot, so those optimizers are refused under ZeRO (rules.py).
"""

from __future__ import annotations

import math
import typing
from typing import Any

from .config import TrainConfig

# train.optimizer's choices, as the config declares them (one list: a new choice is tested with the others)
OPTIMIZERS: tuple[str, ...] = typing.get_args(typing.get_type_hints(TrainConfig)["optimizer"])
# train.optimizer -> bitsandbytes.optim class
BNB_CLASSES = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw_32bit": "PagedAdamW32bit",
               "lion": "Lion", "lion_8bit": "Lion8bit", "paged_lion_8bit": "PagedLion8bit"}
# those DeepSpeed ZeRO can run (it partitions their states; a checkpoint gathers them back by name)
ZERO_OPTIMIZERS = ("adamw", "adafactor")
# bitsandbytes keeps the state of tensors under this many elements in 32 bit, even in its 8-bit optimizers
_BNB_MIN_8BIT_SIZE = 4096
_BNB_BLOCK = 256  # elements per absmax block of its blockwise 8-bit states


def make_optimizer(name: str, groups: list[dict], t: Any, zero_stage: int) -> Any:
    """Build optimizer `name` over `groups` (each with its weight_decay, LoRA+'s with its lr) from the train
    section `t`."""
    import torch

    betas = (t.adam_beta1, t.adam_beta2)
    if name == "adamw":
        # The fused kernel: a few launches per step instead of ~10 per tensor list on CUDA, ~1.7x faster
        # than foreach on CPU, and it can skip a non-finite update on the device (nonfinite.py). Under
        # DeepSpeed, which steps the optimizer itself, foreach (one kernel per group).
        fast = {"fused": True} if zero_stage == 0 else {"foreach": True}
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=betas, eps=t.adam_epsilon, **fast)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=t.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    from .errors import ConfigError

    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"train.optimizer={name} needs bitsandbytes: pip install bitsandbytes") from None
    kw = {"eps": t.adam_epsilon} if "adamw" in name else {}  # (Lion divides by nothing)
    return getattr(bnb.optim, BNB_CLASSES[name])(groups, lr=t.learning_rate, betas=betas, **kw)


def _bnb_state_bytes(numel: int, states: int, bits8: bool) -> int:
    """bitsandbytes: `states` fp32 tensors per parameter, or uint8 ones with an fp32 absmax per block and a
    256-entry fp32 quantile map each (8-bit, tensors of 4096+ elements)."""
    if not bits8 or numel < _BNB_MIN_8BIT_SIZE:
        return 4 * states * numel
    return states * (numel + 4 * math.ceil(numel / _BNB_BLOCK) + 4 * 256)


def _adafactor_bytes(shape: tuple[int, ...]) -> int:
    """Adafactor without beta1: a matrix keeps fp32 row and column means of the squared gradient, anything
    else its full fp32 second moment; plus its RMS, a 0-d fp32 tensor. (Its step is a Python int.)"""
    if len(shape) >= 2:
        rows, cols = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
        return 4 * (rows + cols) + 4
    return 4 * math.prod(shape) + 4


def state_bytes(name: str, shapes: list[tuple[int, ...]]) -> int:
    """Bytes of optimizer state `name` keeps for parameters of these shapes (under ZeRO: its flat 1-D
    partitions). AdamW adds a 4-byte step tensor per parameter; bitsandbytes' step is a Python int."""
    numels = [math.prod(s) for s in shapes]
    if name == "adamw":
        return sum(8 * n + 4 for n in numels)
    if name == "adafactor":
        return sum(_adafactor_bytes(s) for s in shapes)
    states = 1 if "lion" in name else 2
    return sum(_bnb_state_bytes(n, states, name.endswith("_8bit")) for n in numels)
