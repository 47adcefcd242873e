"""World-size-agnostic trainable state: the adapter parameters and their Adam moments as plain full
tensors keyed by the PEFT parameter name, whatever the world size and ZeRO stage.

* `gather_trainable_state` / `load_trainable_state` move them between runs of any world size and any
  ZeRO stage. This is what makes "train on 8 GPUs with ZeRO-3, resume on 1 GPU" possible without
  DeepSpeed's sharded checkpoint format.
* `saved_adapter_state` returns a gathered state dict for `PeftModel.save_pretrained(state_dict=...)`,
  which under ZeRO-3 would otherwise see empty (partitioned) parameters.
* `unwrap` finds the PEFT model under DDP / DeepSpeed / torch.compile wrappers.

Importing this module is cheap: torch/accelerate/deepspeed are imported inside the functions.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

#: Optimizer-state keys moved by gather/load under ZeRO (torch AdamW and DeepSpeed's Adam variants use these;
#: Adafactor on ZeRO's flat 1-D partitions keeps exp_avg_sq alone).
ADAM_STATE_KEYS: tuple[str, ...] = ("exp_avg", "exp_avg_sq")


def _strip_prefix(name: str) -> str:
    """PEFT parameter name without DDP/DeepSpeed/torch.compile wrapper prefixes."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def unwrap(accelerator: Accelerator | None, model: Any) -> Any:
    """The PEFT model under any DDP/DeepSpeed/compile wrappers."""
    if not hasattr(model, "module") and not hasattr(model, "_orig_mod"):
        # Not wrapped. (accelerate's unwrap_model imports deepspeed to check, ~1 s per process.)
        return model
    if accelerator is not None:
        try:
            return accelerator.unwrap_model(model)
        except Exception:  # pragma: no cover - unwrap_model is best effort on exotic wrappers
            pass
    while hasattr(model, "module"):
        model = model.module
    return model


def _trainable_named_parameters(accelerator: Accelerator | None, model: Any) -> Iterator[tuple[str, Any]]:
    """(name, param) for every trainable parameter, in module registration order.

    The order is the same on every rank, which matters: DeepSpeed's full-state getters are
    collectives that all ranks must call in the same order.
    """
    for name, param in unwrap(accelerator, model).named_parameters():
        if param.requires_grad:
            yield _strip_prefix(name), param


def deepspeed_engine(accelerator: Accelerator | None, model: Any) -> Any | None:
    """The DeepSpeedEngine driving `model`, or None when DeepSpeed is not in use."""
    if "deepspeed" not in sys.modules:  # never imported -> not in use (importing it costs ~1 s per process)
        return None
    try:
        from deepspeed import DeepSpeedEngine
    except Exception:  # deepspeed not installed -> cannot be in use
        return None
    if isinstance(model, DeepSpeedEngine):
        return model
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None) if accelerator is not None else None
    if wrapped is not None:
        return wrapped.engine
    return None


def _zero_stage(engine: Any) -> int:
    return int(engine.zero_optimization_stage()) if engine is not None else 0


def _base_torch_optimizer(optimizer: Any) -> Any:
    """The innermost torch optimizer (under accelerate's and DeepSpeed's wrappers).

    Its `state[...]["step"]` is the Adam step count. Under DeepSpeed ZeRO the params of this optimizer
    are DeepSpeed's flat fp32 partitions, one per param group.
    """
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


def _ds_zero_optimizer(engine: Any) -> Any:
    return engine.optimizer


def _state_params(base_opt: Any, extra: list | None = None) -> list:
    """Every tensor the optimizer keeps (or should keep) state for, without duplicates.

    ZeRO-3 empties `param_groups[i]["params"]` after its steps, so the state keys are walked too.
    """
    out: list = []
    seen: set[int] = set()
    candidates = list(extra or []) + [p for g in base_opt.param_groups for p in g["params"]] + list(base_opt.state)
    for p in candidates:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _read_step(base_opt: Any) -> int:
    """Largest Adam step count found in a torch optimizer's state (0 before the first step)."""
    steps: list[float] = []
    for st in base_opt.state.values():
        if "step" in st:
            v = st["step"]
            steps.append(float(v.item() if hasattr(v, "item") else v))
    for group in base_opt.param_groups:
        if "step" in group:  # some optimizers (and DeepSpeed's own Adam) keep it per group
            steps.append(float(group["step"]))
    return int(max(steps)) if steps else 0


def _step_tensor(group: dict | None, p: Any, value: float, like: Any = None) -> Any:
    """Adam's step count as torch keeps it: a float32 scalar on the parameter's device for a fused or
    capturable optimizer (its kernels read it there; a CPU one beside CUDA parameters fails the first
    step after a resume), else on the CPU. Without the parameter's group (DeepSpeed's flat partitions),
    where `like` is."""
    import torch

    if group is not None:
        device = p.device if group.get("fused") or group.get("capturable") else "cpu"
        return torch.tensor(float(value), dtype=torch.float32, device=device)
    if torch.is_tensor(like):
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)
    return torch.tensor(float(value), dtype=torch.float32)


def _groups_by_param(base_opt: Any) -> dict:
    return {id(p): group for group in base_opt.param_groups for p in group["params"]}


def _write_step(base_opt: Any, step: int) -> None:
    """Set the Adam step count everywhere a torch/DeepSpeed optimizer may keep it."""
    for group in base_opt.param_groups:
        if "step" in group:
            group["step"] = step
    groups = _groups_by_param(base_opt)
    for p, st in base_opt.state.items():
        st["step"] = _step_tensor(groups.get(id(p)), p, step, like=st.get("step"))


def _moment_keys(base_opt: Any) -> list[str]:
    """The ADAM_STATE_KEYS this optimizer's state holds (after its first step)."""
    return [k for k in ADAM_STATE_KEYS if any(k in st for st in base_opt.state.values())]


def _ensure_adam_state(base_opt: Any, flat_params: list | None = None, keys: tuple = ADAM_STATE_KEYS) -> None:
    """Create zero Adam state (the moments `keys`) for params that have none yet (fresh optimizer, before
    its first step).

    torch AdamW (and Adafactor) initialise state lazily in step() only when the state dict is empty, so
    pre-filled tensors are used as-is and the loaded moments survive into the next step. `flat_params`
    lists DeepSpeed's flat fp32 partitions, which ZeRO-3 does not leave in `param_groups`.
    """
    import torch

    amsgrad = any(g.get("amsgrad") for g in base_opt.param_groups)
    groups = _groups_by_param(base_opt)
    for p in _state_params(base_opt, flat_params):
        st = base_opt.state[p]
        if len(st) == 0:
            st["step"] = _step_tensor(groups.get(id(p)), p, 0.0)
            for key in keys:
                st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _ds_flat_fp32_partitions(zero_opt: Any) -> list:
    """DeepSpeed's flat fp32 master partitions (the params of its inner torch optimizer)."""
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flat = getattr(zero_opt, attr, None)
        if flat:
            return [t for t in flat if t is not None]
    return []


def gather_trainable_state(
    accelerator: Accelerator | None, model: Any, optimizer: Any
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Full fp32 trainable parameters and Adam state, identical on every rank.

    Args:
        accelerator: the run's Accelerator (None is fine for a plain single-process model).
        model: the prepared model (DDP/DeepSpeedEngine/PeftModel).
        optimizer: the prepared optimizer (AcceleratedOptimizer / DeepSpeed wrapper / torch AdamW).

    Returns:
        (params, opt_state, scalars): `params[name]` is the full fp32 CPU tensor of each trainable
        parameter (name = PEFT name without "module."); `opt_state[f"{name}::exp_avg"]` and
        `opt_state[f"{name}::exp_avg_sq"]` the full Adam moments (absent before the first step);
        `scalars = {"step": int}` the Adam step count.

    Under DeepSpeed every rank must call this (the getters are collectives, called here in the same
    parameter order everywhere). Works for no DeepSpeed (single process/DDP, replicated state) and
    ZeRO 1/2/3 including CPU offload.
    """
    import torch

    engine = deepspeed_engine(accelerator, model)
    stage = _zero_stage(engine)
    params: dict[str, torch.Tensor] = {}
    opt_state: dict[str, torch.Tensor] = {}

    if stage == 0:
        base = _base_torch_optimizer(engine.optimizer if engine is not None else optimizer)
        for name, p in _trainable_named_parameters(accelerator, model):
            # With DDP (or a single process) parameters and optimizer state are full and replicated.
            params[name] = p.detach().float().cpu().clone()
            st = base.state.get(p, {}) if base is not None else {}
            # Every tensor of the state, not only Adam's moments: bitsandbytes' 8-bit AdamW keeps its own
            # (state1/state2 as uint8 + absmax/qmap), kept in their dtype (replicated here: no re-sharding).
            for key, value in st.items():
                if key != "step" and torch.is_tensor(value):
                    value = value.detach().cpu().clone()
                    opt_state[f"{name}::{key}"] = value.float() if key in ADAM_STATE_KEYS else value
        scalars = {"step": _read_step(base) if base is not None else 0}
        return params, opt_state, scalars

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero_opt = _ds_zero_optimizer(engine)
    base = _base_torch_optimizer(zero_opt)
    step = _read_step(base)
    have_moments = any(len(st) for st in base.state.values())
    keys = _moment_keys(base)  # (all ranks step the same optimizer: the same keys everywhere)
    if have_moments and hasattr(zero_opt, "_hp_optimizer_states_linked"):
        # ZeRO-1/2 point each parameter at its optimizer state once, right after the first step of the
        # first parameter group, when the other groups (no-decay biases and norms, DoRA's magnitudes, a
        # classifier's bias) have no state yet: their getters below then raised "exp_avg not found".
        zero_opt._hp_optimizer_states_linked = False
        zero_opt._lazy_init_hp_params_optimizer_state()
    # All ranks agree on have_moments (same number of steps taken), so they call the same collectives.
    for name, p in _trainable_named_parameters(accelerator, model):
        full = safe_get_full_fp32_param(p)
        if full is None:
            raise RuntimeError(f"gather_trainable_state: DeepSpeed has no fp32 master for {name}")
        params[name] = full.detach().float().cpu().clone().reshape(_full_shape(p))
        if not have_moments:
            continue
        for key in keys:
            value = safe_get_full_optimizer_state(p, key)
            if value is not None:
                opt_state[f"{name}::{key}"] = value.detach().float().cpu().clone().reshape(_full_shape(p))
    return params, opt_state, {"step": step}


def _adam_only(opt_state: dict) -> bool:
    """Whether a saved optimizer state is torch Adam's (moments only) rather than another optimizer's."""
    return all(k.rpartition("::")[2] in (*ADAM_STATE_KEYS, "max_exp_avg_sq") for k in opt_state)


def _restore_as_saved(base: Any, named: list, opt_state: dict, step: int) -> None:
    """Another optimizer's state (bitsandbytes' 8-bit AdamW), put back tensor for tensor as it was saved:
    a non-empty state also stops the optimizer initialising it afresh at its next step. Its step count is
    the plain int such optimizers keep."""
    for name, p in named:
        prefix = f"{name}::"
        entries = {k[len(prefix):]: v for k, v in opt_state.items() if k.startswith(prefix)}
        if entries:
            st = base.state[p]
            st.update({k: v.to(p.device).clone() for k, v in entries.items()})
            st["step"] = step


def _full_shape(p: Any) -> Any:
    """The unpartitioned shape of a parameter (ZeRO-3 keeps it in `ds_shape`)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def load_trainable_state(
    accelerator: Accelerator | None,
    model: Any,
    optimizer: Any,
    params: dict[str, torch.Tensor],
    opt_state: dict[str, torch.Tensor],
    scalars: dict,
) -> None:
    """Restore what `gather_trainable_state` returned, at any world size and ZeRO stage.

    Call on every rank after `accelerator.prepare` and before the next optimizer step. Every
    trainable parameter must be present in `params` (a KeyError names the missing ones). Moments
    missing from `opt_state` are left at zero; `scalars["step"]` becomes Adam's step count so bias
    correction continues where it stopped.
    """
    import torch

    named = list(_trainable_named_parameters(accelerator, model))
    missing = [n for n, _ in named if n not in params]
    if missing:
        raise KeyError(
            f"load_trainable_state: no saved value for trainable parameters {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}"
        )
    extra = set(params) - {n for n, _ in named}
    if extra:
        logger.warning(
            "load_trainable_state: ignoring %d saved parameters the model does not train: %s",
            len(extra),
            sorted(extra)[:5],
        )
    step = int(scalars.get("step", 0)) if scalars else 0
    engine = deepspeed_engine(accelerator, model)
    stage = _zero_stage(engine)

    if stage == 0:
        base = _base_torch_optimizer(engine.optimizer if engine is not None else optimizer)
        with torch.no_grad():
            for name, p in named:
                p.data.copy_(params[name].to(device=p.device, dtype=p.dtype).reshape(p.shape))
        if base is None:
            return
        if opt_state and not _adam_only(opt_state):
            _restore_as_saved(base, named, opt_state, step)
        elif opt_state:
            _ensure_adam_state(base)
            for name, p in named:
                st = base.state[p]
                for key in ADAM_STATE_KEYS:
                    value = opt_state.get(f"{name}::{key}")
                    if value is not None:
                        st[key] = value.to(device=p.device, dtype=st[key].dtype).reshape(p.shape).clone()
            _write_step(base, step)
        return

    import deepspeed

    zero_opt = _ds_zero_optimizer(engine)
    base = _base_torch_optimizer(zero_opt)
    if opt_state:
        # A fresh DeepSpeed optimizer has no Adam state yet (torch creates it in the first step) and,
        # for ZeRO-1/2, has not linked the per-parameter views into it; create both so the setters
        # below have somewhere to write and the next step() uses the restored tensors.
        saved = tuple(k for k in ADAM_STATE_KEYS if any(n.endswith(f"::{k}") for n in opt_state))
        _ensure_adam_state(base, _ds_flat_fp32_partitions(zero_opt), saved)
        if hasattr(zero_opt, "_lazy_init_hp_params_optimizer_state"):
            zero_opt._lazy_init_hp_params_optimizer_state()
    for name, p in named:
        value = params[name].float()
        device = _ds_device(p)
        # fp32 master copy (the optimizer's view) ...
        _set_full_master(p, value.to(device), stage)
        # ... and the low-precision/model copy used by the next forward.
        if stage == 3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    p.data.copy_(value.to(device=p.device, dtype=p.dtype).reshape(p.shape))
        else:
            with torch.no_grad():
                p.data.copy_(value.to(device=p.device, dtype=p.dtype).reshape(p.shape))
        for key in ADAM_STATE_KEYS:
            moment = opt_state.get(f"{name}::{key}") if opt_state else None
            if moment is not None:
                _set_full_master(p, moment.float().to(device), stage, key)
    if opt_state:
        _write_step(base, step)


def _set_full_master(p: Any, value: Any, stage: int, key: str | None = None) -> None:
    """Put a whole float32 tensor into DeepSpeed's master copy of `p` (key None) or its optimizer state `key`.

    Under ZeRO-3 each rank takes its slice itself: DeepSpeed's setter (0.19) slices the whole tensor at
    rank x partition size without the padding of the last partition, so a tensor whose size is no
    multiple of the world size (a 3-label classifier's bias on 2 ranks) failed to resume there."""
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    if stage != 3:
        (safe_set_full_fp32_param(p, value) if key is None else safe_set_full_optimizer_state(p, value, key))
        return
    import torch

    size = p.ds_tensor.numel()  # this rank's partition, padded
    start = p._z3_optimizer._get_param_partition_rank(p) * size
    flat = value.flatten()[start:start + size]
    local = torch.zeros(size, dtype=value.dtype, device=value.device)
    local[:flat.numel()] = flat
    (safe_set_local_fp32_param(p, local) if key is None else safe_set_local_optimizer_state(p, local, key))


def _ds_device(p: Any) -> Any:
    """Device of a DeepSpeed-managed parameter's data (the accelerator device; CPU when offloaded)."""
    tensor = getattr(p, "ds_tensor", None)
    return (tensor if tensor is not None else p).device


# ----------------------------------------------------------------------------------------------
# Saving the adapter


def saved_adapter_state(accelerator: Accelerator, model: Any, masters: dict | None = None) -> dict | None:
    """State dict to pass as `peft_model.save_pretrained(dir, state_dict=...)`.

    Under DeepSpeed the module's parameters are not the trained weights as kept: ZeRO-3's are empty
    partitions (`save_pretrained` alone writes an empty adapter), and under bf16/fp16 every stage's are
    16-bit copies of its float32 masters (the adapter was saved in bf16, where a single process saves
    the float32 weights it trains). So the trainable parameters' float32 masters are gathered (a
    collective: call on every rank, then save on the main process), plus the buffers (never
    partitioned), which some methods save with the adapter (VeRA's shared projections). Keys are the
    PEFT model's own names (no "module." prefix). Without DeepSpeed this returns None: the unwrapped
    model's own state dict is complete. `masters`: those float32 tensors by name, gathered already (a
    checkpoint's `gather_trainable_state`), so they are not gathered a second time.
    """
    engine = deepspeed_engine(accelerator, model)
    stage = _zero_stage(engine)
    if stage == 0:
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    # Only the trainable params (accelerator.get_state_dict would gather the whole base model onto
    # rank 0); each getter is a collective and returns the full tensor on every rank.
    state: dict[str, Any] = {}
    for n, p in _trainable_named_parameters(accelerator, model):
        state[n] = masters[n] if masters is not None else (
            safe_get_full_fp32_param(p).detach().float().cpu().clone().reshape(_full_shape(p)))
    if stage < 3:
        # ZeRO-1/2 leave the module whole: its own state dict (references, no copies) has everything else
        # under the names peft looks for (VeRA's shared projections at the model level, not at a layer's)
        return {**unwrap(accelerator, model).state_dict(), **state}
    for n, b in unwrap(accelerator, model).named_buffers():
        state.setdefault(_strip_prefix(n), b.detach().to("cpu", copy=True))
    return state


@contextmanager
def prompt_encoders_holding(model: Any, state: dict | None) -> Iterator[None]:
    """While saving `model` (a PeftModel) with `state` (`saved_adapter_state`'s): its prompt encoders hold
    the float32 weights of `state`.

    peft saves a prompt-learning adapter (prompt, prefix and p-tuning) not from the state dict passed to
    `save_pretrained` but by running its prompt encoder on the virtual tokens, i.e. from the module's own
    weights, which under DeepSpeed bf16/fp16 are 16-bit copies: such an adapter was saved rounded to
    bf16 (off its float32 masters by up to 7e-3). A float32 copy holding the masters stands in for each
    encoder meanwhile; the module itself is left as it was."""
    import copy

    encoders = getattr(model, "prompt_encoder", None)
    if state is None or not encoders:
        yield
        return
    originals = dict(encoders.items())
    try:
        for name, encoder in originals.items():
            prefix = f"prompt_encoder.{name}."
            own = encoder.state_dict()
            masters = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in own}
            if not masters or any(own[k].shape != v.shape for k, v in masters.items()):
                continue  # (a ZeRO-3 partition holds no whole weight to stand in for: saved as peft saves it)
            stand_in = copy.deepcopy(encoder).float()
            stand_in.load_state_dict({**stand_in.state_dict(), **masters})
            encoders[name] = stand_in
        yield
    finally:
        for name, encoder in originals.items():
            encoders[name] = encoder
