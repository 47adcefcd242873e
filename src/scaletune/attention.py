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

import functools
import inspect
import logging
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
    from torch.nn.attention import varlen

    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMS:
            return varlen.varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0),
                                      enable_gqa=True)
        if not takes_grouped_heads(q.device):
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return varlen.varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0))


_GROUPED: dict[str, bool] = {}


def takes_grouped_heads(device: torch.device) -> bool:
    """Whether this PyTorch's varlen_attn, which has no `enable_gqa` argument (2.11), takes keys/values
    with fewer heads as they are. Its flash kernel shares each key/value head among its query heads by
    itself, which saves repeating K and V (4x for Llama's 32/8 heads) in every layer's forward and summing
    their gradients back in backward (~14% of the attention time on an H100). Nothing documents it for
    that version, so it is checked once per device type against the repeated heads, forward and backward,
    on a small input."""
    if device.type not in _GROUPED:
        from torch.nn.attention import varlen

        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(24, heads, 64, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
                   for heads in (4, 2, 2))
        cu = torch.tensor([0, 9, 24], dtype=torch.int32, device=device)
        try:
            ours = varlen.varlen_attn(q, k, v, cu, cu, 15, 15, window_size=(-1, 0))
            ref = varlen.varlen_attn(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), cu, cu, 15, 15,
                                     window_size=(-1, 0))
            grads = [torch.autograd.grad(out.float().square().sum(), (q, k, v)) for out in (ours, ref)]
            # bf16 tolerance: a kernel that mapped query heads to the wrong key/value heads is off by O(1)
            same = all(torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)
                       for a, b in zip((ours, *grads[0]), (ref, *grads[1])))
        except (RuntimeError, ValueError):
            same = False
        _GROUPED[device.type] = same
    return _GROUPED[device.type]


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
# Kernels that take only 16-bit inputs (flash attention's); a kernel function may be marked so in tests
_torch_varlen.half_only = True  # type: ignore[attr-defined]
_HALF = (torch.float16, torch.bfloat16)


def _half_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """q, k, v in the 16-bit dtype a flash kernel needs, or None where the kernel would change the numbers.

    Under autocast float32 reaches attention anyway (rotary embeddings computed in float32 upcast q and
    k; a float32 base or QLoRA's float32 norms give float32 activations): the autocast dtype is what SDPA
    would compute in there too. Without autocast float32 is what the run asked for: SDPA keeps it."""
    if all(t.dtype in _HALF for t in (q, k, v)) and q.dtype == k.dtype == v.dtype:
        return q, k, v
    if not torch.is_autocast_enabled(q.device.type):
        return None
    dtype = torch.get_autocast_dtype(q.device.type)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def kernel_for(device: torch.device) -> Callable[..., torch.Tensor] | None:
    """The variable-length kernel for `device`, or None (SDPA answers). PyTorch's is flash attention,
    which needs compute capability 8.0 (Ampere) or newer: on a V100 or T4 it would fail at the first
    forward."""
    kernel = KERNELS.get(device.type)
    if kernel is _torch_varlen and not _flash_capable(device.index):
        return None
    return kernel


@functools.cache
def _flash_capable(index: int | None) -> bool:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < (8, 0):
        logging.getLogger("scaletune").warning(
            "model.attn_implementation=varlen: this GPU (compute capability %d.%d) has no flash attention kernel "
            "(8.0, Ampere, or newer); SDPA computes the attention instead", major, minor)
    return (major, minor) >= (8, 0)


def prepare(device: torch.device) -> None:
    """Make the kernel's one-time check on `device` now, before `train.torch_compile` traces the blocks that
    call it: dynamo cannot trace the check's random generator, so the first compiled block broke its graph
    there (a warning on the H200, and a recompilation once the answer was cached)."""
    if kernel_for(device) is not None and "enable_gqa" not in _VARLEN_PARAMS:
        takes_grouped_heads(device)


def varlen_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (batch, heads, seq, dim), key/value (batch, kv_heads, seq,
    dim); returns (batch, seq, heads, dim) like the built-in implementations."""
    kernel = kernel_for(query.device)
    batch, heads, seq, dim = query.shape
    window = kwargs.get("sliding_window")
    inputs = (query, key, value)
    if kernel is not None and getattr(kernel, "half_only", False):
        inputs = _half_inputs(query, key, value)
    # SDPA (with transformers' mask) answers what the kernel cannot do as the model means it: no segment
    # bounds (generation); key/values longer than the queries (prefix tuning's cache); a row wider than the
    # batch the bounds describe (prompt tuning's virtual tokens in front); attention dropout; a sliding
    # window shorter than the row, a logit soft-cap or attention sinks (Mistral, Gemma 2, gpt-oss); float32
    # without autocast for a 16-bit-only kernel.
    if (kernel is None or inputs is None or cu_seq_lens_q is None or key.shape[2] != seq
            or (max_length_q is not None and max_length_q != seq) or (dropout > 0.0 and module.training)
            or (window is not None and window < seq) or kwargs.get("softcap") is not None
            or kwargs.get("s_aux") is not None):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    query, key, value = inputs
    q = query.transpose(1, 2).reshape(batch * seq, heads, dim)
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], dim)
    out = kernel(q, k, v, cu_seq_lens_q, max_length_q or seq, scaling)
    return out.view(batch, seq, heads, dim), None
