"""Cross-entropy through a frozen LM head, a chunk of tokens at a time (`train.chunked_loss`).

The usual path materialises `tokens x vocab` logits, keeps their float32 log-softmax for backward and
allocates a gradient of the same size: three or four vocabulary-sized buffers at the peak, which for a
small model are the largest tensors of the step. Here the head is applied to a chunk of target
positions at a time; each chunk's logits are turned into its loss and, in the same pass, into the
gradient with respect to the hidden states (softmax - one_hot) @ W, so nothing vocabulary-sized
outlives its chunk. The work is the same as forward + backward of the head (its weight is frozen:
no weight gradient), so nothing is recomputed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..trainable_state import unwrap
from .base import IGNORE

CHUNK_ELEMENTS = 1 << 24  # logits per chunk on CPU (64 MiB in float32), whatever the vocabulary size
# On a GPU each chunk's two products read the whole head weight (1 GB for an 8B model's 128k x 4096
# in bf16) for as many FLOPs per byte as the chunk has rows. The CPU's 130 rows for that vocabulary
# would leave the products bound by that read (an H100 needs ~300 FLOPs per byte to be compute-bound)
# and spill 2 rows into a second 128-row tile. GPU chunks are 8x larger, a multiple of 128 rows:
# 1024 rows (~1.3 GB of logits and their temporaries) for a 128k vocabulary.
GPU_CHUNK_ELEMENTS = 1 << 27
GPU_ROW_MULTIPLE = 128


class _HeadCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ W.T + b, label), rows with label IGNORE contributing nothing."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor) -> torch.Tensor:
        rows = chunk_rows(weight.shape[0], cuda=hidden.is_cuda)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], rows):
            h, lab = hidden[start:start + rows], labels[start:start + rows]
            valid = lab != IGNORE
            safe = lab.clamp(min=0)
            # The usual path's numbers: head in the model's dtype, float32 log-softmax (one fused
            # kernel; logsumexp would write a full-size temporary and need a subtraction pass).
            logp = torch.log_softmax(F.linear(h, weight, bias).float(), dim=-1)
            total -= (logp.gather(1, safe[:, None]).squeeze(1) * valid).sum()
            if grad is not None:
                probs = logp.exp_()  # softmax, in place: no second buffer
                probs[torch.arange(len(lab), device=lab.device), safe] -= 1.0
                # rows without a target are zeroed after the product: hidden-width, not vocabulary-width
                grad[start:start + rows] = (probs.to(weight.dtype) @ weight).to(hidden.dtype) * valid[:, None]
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        if grad.dtype == grad_out.dtype:
            return grad * grad_out, None, None, None
        # grad_out is the loop's float32 1 / (the step's targets). Rounded to bf16 first, it scaled the whole
        # step's gradient by up to 2**-8 off (+0.2% at 912 targets), every element the same way, where the usual
        # path's float32 loss rounds each element once. In float32, a bounded number of rows at a time.
        out = torch.empty_like(grad)
        rows = max(1, CHUNK_ELEMENTS // max(1, grad[0].numel())) if len(grad) else 1
        for start in range(0, len(grad), rows):
            out[start:start + rows] = grad[start:start + rows].float() * grad_out.float()
        return out, None, None, None


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       labels: torch.Tensor) -> torch.Tensor:
    """Summed float32 cross-entropy of `hidden @ weight.T + bias` against `labels` (IGNORE skipped);
    hidden (N, h), labels (N,), all in the dtype the head computes in."""
    return _HeadCrossEntropy.apply(hidden, weight, bias, labels)


def chunk_rows(vocab: int, cuda: bool = False) -> int:
    """Target tokens per chunk for a vocabulary of this size, on a CUDA device or not (also used by
    `plan`)."""
    if not cuda:
        return max(1, CHUNK_ELEMENTS // vocab)
    return max(1, GPU_CHUNK_ELEMENTS // vocab // GPU_ROW_MULTIPLE) * GPU_ROW_MULTIPLE


def chunkable_head(model: Any) -> tuple[torch.nn.Linear | None, str | None]:
    """(the head, None) if the chunked loss can stand in for `model`'s own, else (None, why not).
    Shared by training (tasks/causal_lm.py) and `scaletune plan` (on the meta model)."""
    inner = unwrap(None, model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    active = getattr(inner, "active_peft_config", None)
    if active is not None and getattr(active, "is_prompt_learning", False):
        return None, "prompt-learning methods add virtual tokens in front of the hidden states"
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(getattr(base, "config", None), key, None) not in (None, 1, 1.0):
            return None, f"the model transforms its logits ({key})"
    head = plain_head(inner)
    if head is None:
        return None, "the LM head is trained, adapted or partitioned (ZeRO-3)"
    if not isinstance(decoder_of(inner), torch.nn.Module):
        return None, "the model has no decoder module to read the last hidden state from"
    return head, None


def decoder_of(model: Any) -> torch.nn.Module | None:
    """The module whose output is the head's input (training catches it with a forward hook)."""
    inner = unwrap(None, model)
    return inner.get_decoder() if hasattr(inner, "get_decoder") else None


def plain_head(model: Any) -> torch.nn.Linear | None:
    """The model's output head if the chunked path can stand in for it: a plain, frozen Linear (not
    adapted, not a trained `modules_to_save` copy, not partitioned by ZeRO-3); else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:  # peft wraps adapted / trained heads in its own modules
        return None
    if head.weight.requires_grad or head.weight.numel() == 0 or hasattr(head.weight, "ds_id"):
        return None
    return head
