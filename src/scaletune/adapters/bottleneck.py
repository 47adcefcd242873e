"""Houlsby bottleneck adapters as a peft tuner (`peft.method: bottleneck_adapter`).

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", insert a small bottleneck MLP after a
transformer sub-layer's output projection, before the sub-layer's residual connection:

    h -> h + up(act(down(h)))        down: hidden -> m,  up: m -> hidden,  m = hidden / reduction_factor

Mapping onto Hugging Face modules: the "output projection" of a sub-layer is an ordinary Linear, so an adapter is
implemented by wrapping that Linear and adding the bottleneck residual to its output. Everything the paper's adapter
sees (the projected sub-layer output, before dropout/residual/LayerNorm) is exactly that Linear's output.

    BERT-style encoders (BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa-v2):
        attention sub-layer  -> `attention.output.dense`    feed-forward -> `output.dense` (not under `attention`)
    Llama-style decoders (Llama, Mistral, Qwen2/3, Gemma, Phi-3):
        attention sub-layer  -> `self_attn.o_proj`          feed-forward -> `mlp.down_proj`
    DistilBERT:  `attention.out_lin` / `ffn.lin2`

`placement="houlsby"` adapts both sub-layers of every block (2 adapters per layer), `placement="pfeiffer"` only the
feed-forward one (1 per layer, Pfeiffer et al. 2021). Unlike the paper we do not also train the LayerNorms; add them
to `modules_to_save` if wanted. An adapter adds layers, so it can never be merged into the base weights.

Registration: importing this module registers the method with peft, after which `get_peft_model`,
`save_pretrained` and `PeftModel.from_pretrained` work as for any built-in method (see `_register_with_peft`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

__all__ = ["PEFT_TYPE", "MERGE_REFUSED", "BottleneckConfig", "BottleneckModel", "BottleneckLayer", "Linear",
           "detect_target_modules"]

#: The peft_type string written to adapter_config.json; lowercases to the run-config name `bottleneck_adapter`.
PEFT_TYPE = "BOTTLENECK_ADAPTER"

MERGE_REFUSED = ("bottleneck adapters add layers; they cannot be merged into the base weights "
                 "— use the adapter directly")

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh,
}
_PLACEMENTS = ("houlsby", "pfeiffer")

# Per naming convention: (attention output projection, feed-forward output projection), as regexes matching the end
# of a module name. The look-behind keeps BERT's FFN `output.dense` from also matching `attention.output.dense`.
_SUBLAYER_OUTPUTS: dict[str, tuple[str, str]] = {
    "llama-style decoder": (r"self_attn\.o_proj", r"mlp\.down_proj"),
    "bert-style encoder": (r"attention\.output\.dense", r"(?<!attention\.)output\.dense"),
    "distilbert": (r"attention\.out_lin", r"ffn\.lin2"),
}


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a Houlsby bottleneck adapter (see the module docstring for where adapters go).

    Args:
        reduction_factor: bottleneck width = output width of the adapted module // reduction_factor.
        bottleneck_dim: explicit bottleneck width; overrides `reduction_factor` when set.
        non_linearity: "relu" | "gelu" | "swish" (= "silu") | "tanh".
        placement: "houlsby" (after attention and feed-forward) or "pfeiffer" (after feed-forward only). Only used
            when `target_modules` is auto-detected.
        init_scale: std of the normal init of the up-projection. 0 (default) makes it exactly zero, so the adapted
            model starts identical to the base; small values (Houlsby used 1e-2) give a near-identity start.
        target_modules: the Linear modules whose output gets an adapter (peft semantics: a regex matched against the
            full module name, or a list of names/name suffixes). None: detected from the architecture and `placement`.
        exclude_modules: modules never to adapt (same semantics as in peft's other methods).
        modules_to_save: extra modules trained in full and saved (peft adds the classification head for
            SEQ_CLS/TOKEN_CLS itself).
    """

    reduction_factor: int = field(default=16, metadata={"help": "bottleneck width = hidden // reduction_factor"})
    bottleneck_dim: int | None = field(default=None, metadata={"help": "bottleneck width; overrides "
                                                                          "reduction_factor"})
    non_linearity: str = field(default="relu", metadata={"help": "relu | gelu | swish | silu | tanh"})
    placement: str = field(default="houlsby", metadata={"help": "houlsby (attention + FFN) | pfeiffer (FFN only)"})
    init_scale: float = field(default=0.0, metadata={"help": "std of the up-projection init (0: exact identity)"})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "modules whose output is adapted; None: auto-detect from the architecture"})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules not to adapt"})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "modules trained in full and saved with the adapter (e.g. a new head)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        for name in ("reduction_factor", "bottleneck_dim"):
            value = getattr(self, name)
            # bool is an int subclass; `reduction_factor: true` in YAML is a mistake, not 1.
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.bottleneck_dim is None and self.reduction_factor is None:
            raise ValueError("set reduction_factor or bottleneck_dim")
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in _ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {', '.join(_ACTIVATIONS)}, got {self.non_linearity!r}")
        self.non_linearity = self.non_linearity.lower()
        if self.placement not in _PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(_PLACEMENTS)}, got {self.placement!r}")
        if isinstance(self.init_scale, bool) or not isinstance(self.init_scale, (int, float)) or self.init_scale < 0:
            raise ValueError(f"init_scale must be a number >= 0, got {self.init_scale!r}")

    def width(self, features: int) -> int:
        """Bottleneck width for an adapter on a module with `features` outputs."""
        return self.bottleneck_dim or max(1, features // self.reduction_factor)


def _out_features(module: nn.Module) -> int | None:
    """Output width of a Linear-like module (nn.Linear and its quantized subclasses, GPT-2's Conv1D), else None."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    if isinstance(getattr(module, "out_features", None), int):
        return module.out_features
    if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int):
        return module.nf
    return None


def detect_target_modules(model: nn.Module, placement: str = "houlsby") -> str:
    """Regex (peft `target_modules` semantics: full match) for the sub-layer output projections of `model`.

    Detection is by module naming convention rather than by `model_type`, so any model following the BERT or Llama
    layout works (e.g. RoBERTa, Mistral), and the task head (`classifier`, `score`, `lm_head`) is never matched.
    """
    names = [name for name, module in model.named_modules() if _out_features(module) is not None]
    for attn, ffn in _SUBLAYER_OUTPUTS.values():
        if any(re.fullmatch(rf".*\.{ffn}", n) for n in names) and any(re.fullmatch(rf".*\.{attn}", n) for n in names):
            return rf".*\.(?:{ffn})" if placement == "pfeiffer" else rf".*\.(?:{attn}|{ffn})"
    raise ValueError(f"bottleneck_adapter: cannot detect the sub-layer output projections of {type(model).__name__}; "
                     "set target_modules to the attention output and feed-forward output Linear modules")


class BottleneckLayer(BaseTunerLayer):
    """The adapter state of one wrapped module: per adapter name a down- and an up-projection."""

    # peft uses these names to find (and save/load/move/delete) the adapter weights of a layer.
    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_non_linearity",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict({})
        self.bottleneck_up = nn.ModuleDict({})
        self.bottleneck_non_linearity: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        features = _out_features(base_layer)
        if features is None:
            raise TypeError(f"bottleneck_adapter wraps Linear-like modules; {type(base_layer).__name__} is not one "
                            "(check target_modules)")
        self.out_features = features

    def update_layer(self, adapter_name: str, config: BottleneckConfig) -> None:
        """Create (or re-create) the adapter `adapter_name` on this layer."""
        width = config.width(self.out_features)
        down = nn.Linear(self.out_features, width)  # default (Kaiming-uniform) init: the up-projection gets signal
        up = nn.Linear(width, self.out_features)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.bias)
        if config.init_scale > 0:
            nn.init.normal_(up.weight, std=config.init_scale)
        else:
            # Zero up-projection: the adapter outputs exactly 0, so the model starts equal to the base model.
            nn.init.zeros_(up.weight)
        self.bottleneck_down[adapter_name] = down
        self.bottleneck_up[adapter_name] = up
        self.bottleneck_non_linearity[adapter_name] = config.non_linearity
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Always refused: a non-linear bottleneck is not a weight delta."""
        raise ValueError(MERGE_REFUSED)

    def unmerge(self) -> None:
        """Nothing is ever merged, so there is nothing to undo."""


class Linear(nn.Module, BottleneckLayer):
    """A Linear-like module whose output passes through the active bottleneck adapter(s)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig, **kwargs: Any) -> None:
        super().__init__()
        BottleneckLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.bottleneck_down:
                continue
            down, up = self.bottleneck_down[name], self.bottleneck_up[name]
            act = _ACTIVATIONS[self.bottleneck_non_linearity[name]]
            # Adapters stay float32 while the base may run in bf16: compute in the adapter dtype, add in the base's.
            h = self._cast_input_dtype(result, down.weight.dtype)
            result = result + up(act(down(h))).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


class BottleneckModel(BaseTuner):
    """peft tuner that wraps each target module in a bottleneck `Linear` (created by `get_peft_model`)."""

    prefix: str = "bottleneck_"
    tuner_layer_cls = BottleneckLayer
    # Targets are detected structurally (detect_target_modules), not looked up by model_type.
    target_module_mapping: dict[str, list[str]] = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        config = self.peft_config[adapter_name]
        if config.target_modules is None:
            # Resolved once and written into the config, so the saved adapter_config.json names the exact targets
            # and loading never depends on detection.
            config.target_modules = detect_target_modules(model, config.placement)
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        if peft_config.target_modules is None:  # only reachable if inject_adapter was bypassed
            raise ValueError("bottleneck_adapter: target_modules is not set")
        return peft_config

    def _create_and_replace(self, peft_config: PeftConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **kwargs: Any) -> None:
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config)  # a second adapter on an already wrapped module
            return
        new_module = Linear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self) -> None:
        # Called by peft before merge_adapter() and merge_and_unload(); unload() (no merge) still works.
        raise ValueError(MERGE_REFUSED)


def _register_with_peft() -> None:
    """Make `BOTTLENECK_ADAPTER` known to peft (config class, tuner class, state-dict prefix).

    Why not `peft.utils.register_peft_method`: it is the public registration function but only accepts names that are
    already members of peft's closed `PeftType` enum (it raises "please add an entry to PeftType" otherwise), and an
    enum cannot be extended without patching its internals. peft does accept a plain string as `peft_type` (issue
    huggingface/peft#2634), and its lookups index these mapping dicts with `config.peft_type`, so we fill exactly the
    three dicts `register_peft_method` fills (its documented effect), with the same uniqueness checks. This is the
    only place that touches peft's registries.
    """
    import peft.mapping as mapping

    registries = [(mapping.PEFT_TYPE_TO_CONFIG_MAPPING, BottleneckConfig),
                  (mapping.PEFT_TYPE_TO_TUNER_MAPPING, BottleneckModel),
                  (mapping.PEFT_TYPE_TO_PREFIX_MAPPING, BottleneckModel.prefix)]
    existing = mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(PEFT_TYPE)
    if existing is not None and existing.__qualname__ != BottleneckConfig.__qualname__:
        raise KeyError(f"a PEFT method called {PEFT_TYPE!r} is already registered ({existing.__module__})")
    if existing is None and BottleneckModel.prefix in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.values():
        raise KeyError(f"a PEFT method already uses the prefix {BottleneckModel.prefix!r}")
    for registry, value in registries:
        registry[PEFT_TYPE] = value  # re-registration (module reload) replaces our own earlier entry


_register_with_peft()
