"""`model.attn_implementation: varlen` — padding-free attention with PyTorch's own variable-length kernel.

The collators describe every micro-batch as segments of the flattened (rows x width) token grid: each
packed example, each padded row's real tokens, and each stretch of padding, as cumulative offsets
(`cu_seq_lens`, the convention of flash attention's varlen API). On CUDA the attention then runs
`torch.nn.attention.varlen.varlen_attn` (flash attention inside PyTorch, nothing to install): causal
within each segment, no mask tensor, and no work across examples or on padding, where SDPA with
packing computes a full (width x width) score matrix per row and masks most of it away.

It is registered with transformers' public extension point (`AttentionInterface`) under NAME, with
SDPA's mask function, so every call that cannot use the kernel (no segment bounds, e.g. generation
with a KV cache; attention dropout; a device without a kernel) is answered by SDPA with the right mask.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

NAME = "scaletune_varlen"


def register() -> str:
    """Register the implementation with transformers (idempotent); returns the name to load models with."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def segment_bounds(segments: list[list[int]], width: int) -> torch.Tensor:
    """`cu_seq_lens` for a batch of rows `width` tokens wide: `segments[r]` are the lengths of row r's
    examples in order; whatever is left of the row (padding) is one more segment."""
    bounds = [0]
    for lengths in segments:
        row_start = bounds[-1]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        if bounds[-1] < row_start + width:
            bounds.append(row_start + width)
    return torch.tensor(bounds, dtype=torch.int32)


def _torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                  scale: float | None) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMS:
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0),
                               enable_gqa=True)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # older PyTorch: no grouped-query support
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0))


def _varlen_params() -> frozenset[str]:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


_VARLEN_PARAMS = _varlen_params()
# Device type -> kernel(q, k, v, cu_seq_lens, max_len, scale) on (tokens, heads, head_dim) tensors,
# causal within each segment. Tests add a reference implementation for "cpu".
KERNELS: dict[str, Callable[..., torch.Tensor]] = {"cuda": _torch_varlen} if "window_size" in _VARLEN_PARAMS else {}


def available(device_type: str) -> bool:
    """Whether `device_type` has a variable-length kernel (else SDPA answers every call)."""
    return device_type in KERNELS


def varlen_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (batch, heads, seq, dim), key/value (batch, kv_heads, seq,
    dim); returns (batch, seq, heads, dim) like the built-in implementations."""
    kernel = KERNELS.get(query.device.type)
    batch, heads, seq, dim = query.shape
    if kernel is None or cu_seq_lens_q is None or key.shape[2] != seq or (dropout > 0.0 and module.training):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    q = query.transpose(1, 2).reshape(batch * seq, heads, dim)
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], dim)
    out = kernel(q, k, v, cu_seq_lens_q, max_length_q or seq, scaling)
    return out.view(batch, seq, heads, dim), None
