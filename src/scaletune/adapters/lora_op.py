"""A LoRA Linear's forward and backward as two opaque operators, for `train.torch_compile`.

Eager AddmmLoraLinear accumulates the update into the base output in place. Under torch.compile,
AOTAutograd rewrites every in-place op as a functional one, so inductor emits
`addmm(base_output, h, Bᵀ)`, and cuBLAS' out-of-place addmm first copies its accumulator into the new
output: a full-width device-to-device copy per adapted layer (~22 ms of a 768 ms 8B step in the H100
profile, benchmarks/RESULTS.md session 8). Backward has the same shape: the input gradient from the
base weight plus the one from A becomes another addmm on a copy. Custom operators are opaque to that
rewrite, so inside them the accumulations stay in place:

    forward:  out = x Wᵀ (+ bias);  h = x Aᵀ;  out += s·h Bᵀ          (saves x, W, A, B, h)
    backward: g_h = s·g B;  g_B = s·gᵀ h;  g_A = g_hᵀ x;  g_x = g W;  g_x += g_h A

These are the products autograd computes for peft's layer (the scale on the rank-r side, as in
AddmmLoraLinear); only the order of a few float32 additions differs. The weight and bias of the base
layer get no gradient: callers use the operator only for a frozen base and an identity dropout.
Calling an operator eagerly costs ~0.3 ms of Python per layer, so eager runs keep the plain in-place
addmm, which has no copy to remove.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("scaletune::lora_linear", mutates_args=())
def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
                scale: float) -> tuple[Tensor, Tensor]:
    """(x Wᵀ + bias + scale·(x Aᵀ) Bᵀ, x Aᵀ) for a 2-D x; all tensors in one dtype."""
    out = torch.nn.functional.linear(x, weight, bias)
    h = torch.mm(x, a.t())
    out.addmm_(h, b.t(), alpha=scale)
    return out, h


@lora_linear.register_fake
def _lora_linear_shapes(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
                        scale: float) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], a.shape[0])


@torch.library.custom_op("scaletune::lora_linear_backward", mutates_args=())
def lora_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, a: Tensor, b: Tensor, h: Tensor,
                         scale: float, input_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `lora_linear`'s first output for x (empty unless `input_grad`), A and B."""
    grad_h = torch.mm(grad, b).mul_(scale)
    grad_b = torch.mm(grad.t(), h).mul_(scale)
    grad_a = torch.mm(grad_h.t(), x)
    grad_x = torch.mm(grad, weight).addmm_(grad_h, a) if input_grad else x.new_empty(0)
    return grad_x, grad_a, grad_b


@lora_linear_backward.register_fake
def _lora_linear_backward_shapes(grad: Tensor, x: Tensor, weight: Tensor, a: Tensor, b: Tensor, h: Tensor,
                                 scale: float, input_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_empty(x.shape if input_grad else (0,)), a.new_empty(a.shape), b.new_empty(b.shape)


def _save(ctx, inputs: tuple, output: tuple) -> None:
    x, weight, _bias, a, b, scale = inputs
    ctx.save_for_backward(x, weight, a, b, output[1])
    ctx.scale = scale


def _backward(ctx, grad: Tensor, _grad_h: Tensor) -> tuple:
    x, weight, a, b, h = ctx.saved_tensors
    need_x, _, _, need_a, need_b, _ = ctx.needs_input_grad
    grad_x, grad_a, grad_b = lora_linear_backward(grad.contiguous(), x, weight, a, b, h, ctx.scale, need_x)
    return (grad_x if need_x else None, None, None, grad_a if need_a else None, grad_b if need_b else None,
            None)


lora_linear.register_autograd(_backward, setup_context=_save)
