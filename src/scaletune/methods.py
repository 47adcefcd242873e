"""The PEFT method matrix (single source of truth) and the few per-method training hooks.

scaletune passes any peft method through by name. `MATRIX` says which combinations are tested and
supported; `problems` refuses the others before training with the reason; the README table is
generated from `MATRIX` (a test keeps them in sync). The only method that needs help from the loop
is AdaLoRA: its rank budget is re-allocated after each optimizer step (`after_step`), and its
orthogonal regulariser is part of the loss (`extra_loss`) — peft adds it only when the model
computes the loss itself, which scaletune does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    peft_method: str  # value of `peft.method`
    extra: dict  # peft keys that define the variant (e.g. use_dora)
    tasks: tuple[str, ...]
    zero3: bool
    note: str = ""  # why some tasks are missing / what to know
    zero3_why: str = ""  # why ZeRO-3 is refused
    zero12_why: str = ""  # why ZeRO-1/2 are refused too (empty: they are supported)
    four_bit_why: str = ""  # why a 4-bit (QLoRA) base is refused (empty: it is supported)
    merges: bool = True  # `scaletune merge` folds it into the base (False: it adds tokens or layers; merge refuses)


_ALL = ("causal_lm", "dpo", "kto", "reward", "seq_cls", "seq_regression", "token_cls")
# peft's rank allocator reads each step's gradients after backward and masks the weights after the optimizer
# step; DeepSpeed's step runs inside accelerate's backward (the gradients are gone when the allocator looks:
# a ValueError at step 1) and keeps a master copy of the weights the mask would not reach
_ADALORA_DS = ("its rank re-allocation reads the gradients between backward and the optimizer step, and DeepSpeed "
               "steps inside backward; use distributed.zero_stage: 0 (DDP)")
# a 4-bit base weight is stored packed, (n, 1); peft's LoHa and LoKr take their factor shapes from it
_PACKED_4BIT = "peft sizes its factors from the base weight's shape, which a 4-bit base stores packed; use lora or 8bit"
_PROMPT_Z3 = "peft computes the embeddings to save with a forward on one rank, which deadlocks; use ZeRO-2"
# dpo's and kto's reference is the model with the adapter switched off, which drops the virtual tokens its positions
# assume
_NO_DPO = "dpo, kto: the reference (adapter off) has no virtual tokens"
# transformers reads a sequence classifier's output at each row's last non-pad token, found from the input ids; a
# virtual-token method hands the model embeddings instead, and a padded row's reward would be read at a pad
_NO_REWARD = "reward: peft passes embeddings, so a padded row's last token is not found"
# peft's LN tuning deep-copies each norm layer when it wraps it; under ZeRO-3 the layer is already partitioned, and
# DeepSpeed's stage-3 optimizer fails on the copies at accelerator.prepare (an assert that a partition's tensors
# share one dtype; 2-process CPU run)
_LN_Z3 = ("peft deep-copies each norm layer, which ZeRO-3 has already partitioned at load, and DeepSpeed fails "
          "setting up the copies; use ZeRO-2")
MATRIX: dict[str, Method] = {
    "lora": Method("lora", {}, _ALL, True),
    "dora": Method("lora", {"use_dora": True}, _ALL, True, "LoRA + weight-decomposed magnitude"),
    "rslora": Method("lora", {"use_rslora": True}, _ALL, True, "rank-stabilised scaling alpha/sqrt(r)"),
    "adalora": Method("adalora", {}, _ALL, False, zero3_why=_ADALORA_DS, zero12_why=_ADALORA_DS),
    "ia3": Method("ia3", {}, _ALL, True),
    "loha": Method("loha", {}, _ALL, False, zero3_why="peft's LoHa sizes itself from the base weight, which "
                                                     "ZeRO-3 has already partitioned (empty) at load; use ZeRO-2",
                   four_bit_why=_PACKED_4BIT),
    "lokr": Method("lokr", {}, _ALL, True, four_bit_why=_PACKED_4BIT),
    "vera": Method("vera", {}, _ALL, False, "needs equal-shaped target layers (e.g. q/v projections)",
                   "saving its shared projections deadlocks under ZeRO-3; use ZeRO-2"),
    "oft": Method("oft", {}, _ALL, True),
    "ln_tuning": Method("ln_tuning", {}, _ALL, False, "trains a copy of each norm layer (LayerNorm/RMSNorm), nothing "
                        "else; peft knows the norm layers of Llama, Mistral, Qwen, Gemma, GPT-2 and a few other "
                        "decoders: other models need target_modules (BERT: [LayerNorm])", _LN_Z3),
    "prefix_tuning": Method("prefix_tuning", {}, ("causal_lm", "seq_cls", "seq_regression"), False,
                            f"virtual key/values; {_NO_DPO}; reward: not tested; token_cls: peft gives no per-token alignment; seq_cls: "
                            "peft 0.21 cannot reach encoders under transformers>=5.24 (refused then)", _PROMPT_Z3,
                            merges=False),
    "prompt_tuning": Method("prompt_tuning", {}, ("causal_lm", "seq_cls", "seq_regression"), False,
                            f"virtual input tokens; {_NO_DPO}; {_NO_REWARD}; token_cls: outputs would include the virtual tokens",
                            _PROMPT_Z3, merges=False),
    "bottleneck_adapter": Method("bottleneck_adapter", {}, _ALL, True, "Houlsby/Pfeiffer adapter (scaletune's)",
                                 merges=False),
}


# How the messages name the variants that are a peft method plus an option (MATRIX rows), and QLoRA
VARIANT_NAMES = {"dora": "DoRA", "rslora": "rsLoRA", "qlora": "QLoRA"}


def how_to_select(name: str) -> str | None:
    """For a method name that is a variant scaletune knows but peft does not (dora, rslora, qlora): how to
    select it; None for any other name."""
    name = name.lower()
    row = MATRIX.get(name)
    if row is not None and row.peft_method != name:
        options = " and ".join(f"peft.{k}: true" for k in row.extra)
        return f"{VARIANT_NAMES.get(name, name)} is peft.method: {row.peft_method} with {options}"
    if name == "qlora":
        return "QLoRA is peft.method: lora with model.quantization: 4bit"
    return None


def supported_for(task: str) -> str:
    """The peft.method values that support `task`, each with the options that select its variants:
    'lora (use_dora: true for DoRA, use_rslora: true for rsLoRA), adalora, ...'. (Only method names peft
    knows: 'dora' is not one.)"""
    out = []
    for name, row in MATRIX.items():
        if task not in row.tasks or name != row.peft_method:
            continue
        variants = [f"{', '.join(f'{k}: true' for k in v.extra)} for {VARIANT_NAMES.get(n, n)}"
                    for n, v in MATRIX.items() if v.peft_method == name and n != name and task in v.tasks]
        out.append(f"{name} ({', '.join(variants)})" if variants else name)
    return ", ".join(out)


def variant_of(cfg: Any) -> str:
    """The matrix row a run config selects (lora + use_dora -> dora, ...)."""
    method = cfg.peft_method
    if method == "lora":
        if cfg.peft.get("use_dora"):
            return "dora"
        if cfg.peft.get("use_rslora"):
            return "rslora"
    return method


def problems(cfg: Any) -> list[str]:
    """Unsupported method x task x distributed combinations, each with the reason."""
    row = MATRIX.get(variant_of(cfg))
    if row is None or row.peft_method != cfg.peft_method:
        # other peft methods pass through untested, peft itself validates them; a variant's name given as the
        # method (dora) is not a peft method, and the peft check says how to select it (how_to_select)
        return []
    out = []
    if cfg.task not in row.tasks:
        out.append(f"peft.method={cfg.peft_method} with task {cfg.task} is not supported ({row.note}); "
                   f"use one of: {supported_for(cfg.task)}")
    stage = cfg.distributed.zero_stage
    if stage in (1, 2) and row.zero12_why:
        out.append(f"peft.method={cfg.peft_method} with distributed.zero_stage={stage}: {row.zero12_why}")
    if stage == 3 and not row.zero3:
        out.append(f"peft.method={cfg.peft_method} with distributed.zero_stage=3: {row.zero3_why}")
    if cfg.model.quantization == "4bit" and row.four_bit_why:
        out.append(f"peft.method={cfg.peft_method} with model.quantization=4bit: {row.four_bit_why}")
    return out


def matrix_markdown() -> str:
    head = (f"| method (`peft.method`) | {' | '.join(_ALL)} | ZeRO-1/2 | ZeRO-3 | merge | note |\n"
            + "| --- " * (len(_ALL) + 5) + "|")
    lines = [head]
    for name, row in MATRIX.items():
        key = f"`{row.peft_method}`" + "".join(f" + `{k}: true`" for k in row.extra)
        marks = " | ".join("yes" if t in row.tasks else "no" for t in _ALL)
        why = (f"ZeRO: {row.zero3_why}" if row.zero12_why and row.zero12_why == row.zero3_why
               else "; ".join(x for x in (row.zero12_why and f"ZeRO-1/2: {row.zero12_why}",
                                          row.zero3_why and f"ZeRO-3: {row.zero3_why}") if x))
        note = "; ".join(x for x in (row.note, why, row.four_bit_why and f"4-bit base: {row.four_bit_why}") if x)
        zero12 = "no" if row.zero12_why else "yes"
        lines.append(f"| {name} ({key}) | {marks} | {zero12} | {'yes' if row.zero3 else 'no'} | "
                     f"{'yes' if row.merges else 'no'} | {note} |")
    return "\n".join(lines)


# --- hooks used by the loop ----------------------------------------------------------------------

def _adalora(model: Any) -> Any | None:
    from .trainable_state import unwrap

    base = getattr(unwrap(None, model), "base_model", None)
    return base if base is not None and hasattr(base, "update_and_allocate") else None


def is_adalora(model: Any) -> bool:
    """Whether `model` carries AdaLoRA (its budget update after each step reads the gradients)."""
    return _adalora(model) is not None


def extra_loss(model: Any) -> Any:
    """AdaLoRA's orthogonal regulariser (weight * mean ||PP^T - I||_F), added once per step."""
    ada = _adalora(model)
    if ada is None:
        return None
    import torch

    name = ada.trainable_adapter_name
    weight = ada.peft_config[name].orth_reg_weight
    terms = []
    for n, p in ada.model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and name in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    return weight * torch.stack(terms).mean() if terms else None


def skip_adapter_input_casts(model: Any) -> int:
    """For training under autocast: stop peft's plain LoRA layers casting their (bf16/fp16) input to the
    adapter's float32 weight dtype. Autocast casts it straight back for the adapter's matmul, so the
    numbers are the same, but the two full-size copies per adapted layer, forward and backward, were
    ~40% of the GPU time of a bf16 1B LoRA step (H100 profile). peft documents this switch
    (`cast_input_dtype_enabled`, set by `peft.helpers.disable_input_dtype_casting`). Variants (DoRA)
    mix the input with float32 tensors outside a matmul and keep the cast. Returns the layers changed."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and not getattr(module, "lora_variant", None):
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed


def after_step(model: Any, step: int) -> None:
    """After optimizer.step, before zero_grad (it reads the gradients): AdaLoRA's budget update."""
    ada = _adalora(model)
    if ada is not None:
        ada.update_and_allocate(step)


_ADALORA_AVERAGES = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def method_state(model: Any) -> tuple[dict, dict]:
    """(tensors by name, JSON-able facts) a method keeps outside its parameters and the optimizer, for a
    checkpoint: AdaLoRA's importance averages (they decide which ranks are cut next) and, once final, its rank
    pattern (every later step masks with it; without it a resumed run fails). Empty for other methods."""
    ada = _adalora(model)
    if ada is None:
        return {}, {}
    alloc = ada.rankallocator
    tensors = {f"{kind}::{name}": t.detach().cpu().contiguous()
               for kind in _ADALORA_AVERAGES for name, t in getattr(alloc, kind).items()}
    return tensors, {"adalora_rank_pattern": ada.peft_config[ada.trainable_adapter_name].rank_pattern}


def load_method_state(model: Any, tensors: dict, facts: dict) -> None:
    """Put back what `method_state` saved (every rank: DDP ranks see the same reduced gradients)."""
    ada = _adalora(model)
    if ada is None:
        return
    alloc = ada.rankallocator
    device = next(p.device for p in ada.model.parameters())
    for kind in _ADALORA_AVERAGES:
        prefix = f"{kind}::"
        setattr(alloc, kind, {k[len(prefix):]: t.to(device) for k, t in tensors.items() if k.startswith(prefix)})
    ada.peft_config[ada.trainable_adapter_name].rank_pattern = facts.get("adalora_rank_pattern")


def name_ia3_feedforward_in_full(model: Any) -> None:
    """peft expands IA3's `target_modules: all-linear` into each module's full name but keeps feedforward_modules
    as the model type's short default (down_proj), so the adapter_config.json it saves fails peft's own check
    on load ("feedforward_modules should be a subset of target_modules"): name the feedforward modules in full
    too, as the target list does (which modules they are is unchanged)."""
    for config in getattr(model, "peft_config", {}).values():
        targets, ff = getattr(config, "target_modules", None), getattr(config, "feedforward_modules", None)
        if getattr(config, "peft_type", None) != "IA3" or not isinstance(targets, (set, list)) \
                or not isinstance(ff, (set, list)) or set(ff) <= set(targets):
            continue
        config.feedforward_modules = {t for t in targets if any(t == f or t.endswith(f".{f}") for f in ff)}

