"""model.attn_implementation: varlen — segment bounds, and the same loss and gradients as SDPA's masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scaletune import attention
from scaletune.config import load_config
from scaletune.data.packing import collate_packed
from scaletune.tasks import IGNORE
from scaletune.train import setup


def test_segment_bounds_mark_examples_and_padding():
    # row 0: examples of 3 and 2 tokens, 1 padding; row 1: one example of 6 (no padding); row 2: all padding
    cu = attention.segment_bounds([[3, 2], [6], []], width=6)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 6, 12, 18]


def test_packed_collate_gives_one_segment_per_example():
    rows = [{"input_ids": [5] * 7, "labels": [IGNORE] + [5] * 6, "position_ids": [0, 1, 2, 0, 1, 0, 1]},
            {"input_ids": [5] * 4, "labels": [IGNORE] + [5] * 3, "position_ids": [0, 1, 2, 3]}]
    batch = collate_packed(rows, pad_id=0)
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 7, 11, 14]


def reference_kernel(calls: list):
    """Exact varlen attention on CPU: causal SDPA on each segment alone."""

    def kernel(q, k, v, cu, max_len, scale):
        calls.append(len(cu) - 1)
        out = torch.empty_like(q)
        bounds = cu.tolist()
        assert max(b - a for a, b in zip(bounds, bounds[1:])) <= max_len
        for a, b in zip(bounds, bounds[1:]):
            qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
            out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                      enable_gqa=True).transpose(0, 1)
        return out

    return kernel


def _loss_and_grads(run, batch):
    run.model.zero_grad(set_to_none=True)
    loss, _ = run.task.loss_sum(run.model, batch)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in run.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_varlen_matches_sdpa_with_masks(make_config, monkeypatch, packing):
    """The varlen path (here with an exact reference kernel on CPU: the CUDA kernel is checked in
    test_cuda_kernel_matches_sdpa) gives the loss and LoRA gradients of SDPA with its block-diagonal
    (packed) or padding (padded) mask, on the same batch."""
    calls: list = []
    monkeypatch.setitem(attention.KERNELS, "cpu", reference_kernel(calls))
    runs = {}
    for impl in ("sdpa", "varlen"):
        path = make_config("causal_lm", n=32, model={"attn_implementation": impl},
                           data={"packing": packing, "max_length": 96},
                           train={"global_batch_size": 4, "micro_batch_size": 4, "max_steps": 1})
        runs[impl], _ = setup(load_config(path), overwrite=True)
    run = runs["varlen"]
    assert run.model.config._attn_implementation == attention.NAME and run.task.varlen
    examples = [run.data["train"][i] for i in range(4)]
    batch = run.task.collate(examples, run.tokenizer.pad_token_id)
    assert batch["cu_seq_lens"][-1] == batch["input_ids"].numel()
    sdpa = _loss_and_grads(runs["sdpa"], batch)
    varlen = _loss_and_grads(run, batch)
    layers = run.model.config.num_hidden_layers
    assert len(calls) == layers and calls[0] == len(batch["cu_seq_lens"]) - 1  # every layer, every segment
    assert varlen[0] == pytest.approx(sdpa[0], rel=1e-5)
    for name, g in sdpa[1].items():
        torch.testing.assert_close(varlen[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_without_a_kernel_sdpa_answers(make_config):
    """On a device with no varlen kernel (this CPU) the same config trains through SDPA and its masks."""
    assert not attention.available("cpu")
    path = make_config("causal_lm", n=32, model={"attn_implementation": "varlen"}, data={"packing": True})
    run, _ = setup(load_config(path), overwrite=True)
    batch = run.task.collate([run.data["train"][i] for i in range(2)], run.tokenizer.pad_token_id)
    loss, _ = run.task.loss_sum(run.model, batch)
    assert torch.isfinite(loss)


@pytest.mark.skipif(not torch.cuda.is_available() or not attention.available("cuda"),
                    reason="needs CUDA and torch.nn.attention.varlen")
def test_cuda_kernel_matches_sdpa():
    """GPU-only (run on the device machine): PyTorch's varlen kernel vs SDPA with a block-diagonal causal
    mask, bf16, grouped-query heads, on three packed segments."""
    torch.manual_seed(0)
    lengths, heads, kv_heads, dim = [5, 40, 19], 8, 2, 64
    n = sum(lengths)
    q = torch.randn(n, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(n, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(n, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = attention.segment_bounds([lengths], n).cuda()
    out = attention.KERNELS["cuda"](q, k, v, cu, n, None)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).cuda()
    mask = (seg[:, None] == seg[None, :]) & torch.ones(n, n, dtype=torch.bool, device="cuda").tril()
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-2)
