"""model.attn_implementation: varlen — segment bounds, and the same loss and gradients as SDPA's masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device

from scaletune import attention
from scaletune.config import load_config
from scaletune.data.packing import collate_packed
from scaletune.tasks import IGNORE
from scaletune.train import setup

from stutil import loss_and_grads


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


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_varlen_matches_sdpa_with_masks(make_config, monkeypatch, packing):
    """The varlen path (here with an exact reference kernel on CPU: the CUDA kernel is checked in
    test_cuda_kernel_matches_sdpa) gives the loss and LoRA gradients of SDPA with its block-diagonal
    (packed) or padding (padded) mask, on the same batch."""
    calls: list = []
    # The device the runs land on (CPU here, CUDA on a GPU machine) gets the reference kernel.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setitem(attention.KERNELS, device, reference_kernel(calls))
    runs = {}
    for impl in ("sdpa", "varlen"):
        path = make_config("causal_lm", n=32, model={"attn_implementation": impl},
                           data={"packing": packing, "max_length": 96},
                           train={"global_batch_size": 4, "micro_batch_size": 4, "max_steps": 1})
        runs[impl], _ = setup(load_config(path), overwrite=True)
    run = runs["varlen"]
    assert run.model.config._attn_implementation == attention.NAME and run.task._varlen
    examples = [run.data["train"][i] for i in range(4)]
    batch = run.task.collate(examples, run.tokenizer.pad_token_id)
    assert batch["cu_seq_lens"][-1] == batch["input_ids"].numel()
    sdpa = loss_and_grads(runs["sdpa"], batch)
    varlen = loss_and_grads(run, batch)
    layers = run.model.config.num_hidden_layers
    assert len(calls) == layers and calls[0] == len(batch["cu_seq_lens"]) - 1  # every layer, every segment
    assert varlen[0] == pytest.approx(sdpa[0], rel=1e-5)
    for name, g in sdpa[1].items():
        torch.testing.assert_close(varlen[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_without_a_kernel_sdpa_answers(make_config, monkeypatch):
    """On a device with no varlen kernel (this CPU) the same config trains through SDPA and its masks."""
    assert "cpu" not in attention.KERNELS
    monkeypatch.delitem(attention.KERNELS, "cuda", raising=False)  # on a GPU machine: as if it had none
    path = make_config("causal_lm", n=32, model={"attn_implementation": "varlen"}, data={"packing": True})
    run, _ = setup(load_config(path), overwrite=True)
    batch = run.task.collate([run.data["train"][i] for i in range(2)], run.tokenizer.pad_token_id)
    loss, _ = run.task.loss_sum(run.model, send_to_device(batch, run.accelerator.device))
    assert torch.isfinite(loss)


@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in attention.KERNELS,
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


def _fake_varlen(heads_rule: str):
    """A stand-in for torch's varlen_attn without `enable_gqa` (PyTorch 2.11) on CPU: `grouped` shares
    each key/value head among its query heads like the flash kernel, `refuse` raises on fewer key/value
    heads, `wrong` silently pairs every query head with key/value head 0."""
    exact = reference_kernel([])

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1)):
        if q.shape[1] != k.shape[1]:
            if heads_rule == "refuse":
                raise RuntimeError("Expect query and key/value to have the same number of heads")
            if heads_rule == "wrong":
                k, v = k[:, :1].expand(-1, q.shape[1], -1), v[:, :1].expand(-1, q.shape[1], -1)
        return exact(q, k, v, cu_q, max_q, scale)

    return varlen_attn


@pytest.mark.parametrize("heads_rule, grouped", [("grouped", True), ("refuse", False), ("wrong", False)])
def test_grouped_heads_used_only_where_the_kernel_is_checked_to_take_them(monkeypatch, heads_rule, grouped):
    """Without `enable_gqa`, K/V go to the kernel with their own (fewer) heads only if a one-off check
    against repeated heads passes; either way the attention equals the reference."""
    from torch.nn.attention import varlen

    monkeypatch.setattr(attention, "_VARLEN_PARAMS", frozenset({"window_size"}))
    monkeypatch.setattr(attention, "_GROUPED", {})
    seen: list = []
    fake = _fake_varlen(heads_rule)

    def spy(q, k, *a, **kw):
        seen.append(k.shape[1])
        return fake(q, k, *a, **kw)

    monkeypatch.setattr(varlen, "varlen_attn", spy)
    assert attention.takes_grouped_heads(torch.device("cpu")) is grouped
    seen.clear()
    torch.manual_seed(1)
    q, k, v = (torch.randn(30, h, 16) for h in (8, 2, 2))
    cu = attention.segment_bounds([[12, 18]], 30)
    out = attention._torch_varlen(q, k, v, cu, 18, None)
    assert seen == [2 if grouped else 8]
    torch.testing.assert_close(out, reference_kernel([])(q, k, v, cu, 18, None))


def test_setup_makes_the_kernels_check_before_any_block_is_compiled(make_config, monkeypatch):
    """torch.compile cannot trace the check's random generator: setup answers it first (on the device the
    run uses), so compiled blocks only read the cached answer."""
    from torch.nn.attention import varlen

    monkeypatch.setattr(attention, "_VARLEN_PARAMS", frozenset({"window_size"}))
    monkeypatch.setattr(attention, "_GROUPED", {})
    monkeypatch.setitem(attention.KERNELS, "cpu", reference_kernel([]))
    monkeypatch.setattr(varlen, "varlen_attn", _fake_varlen("grouped"))
    path = make_config("causal_lm", n=16, model={"attn_implementation": "varlen"}, train={"max_steps": 1})
    run, _ = setup(load_config(path), overwrite=True)
    assert attention._GROUPED == {run.accelerator.device.type: True}


def _half_only_kernel(seen: list):
    """Stands for flash attention's kernel, which takes 16-bit inputs only: records their dtypes."""
    exact = reference_kernel([])

    def kernel(q, k, v, cu, max_len, scale):
        seen.append((q.dtype, k.dtype, v.dtype))
        assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16)
        return exact(q, k, v, cu, max_len, scale)

    kernel.half_only = True
    return kernel


def _attend(**kwargs):
    """varlen_attention on two rows of 6 tokens (segments 4+2 and 6), q/k in float32 as rotary embeddings
    leave them under autocast, v in the given dtype."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(2))
    v = torch.randn(2, 2, 6, 8, generator=g).to(kwargs.pop("v_dtype", torch.float32))
    module = SimpleNamespace(is_causal=True, training=False, num_key_value_groups=1)
    cu = attention.segment_bounds([[4, 2], [6]], width=6)
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.bool)  # SDPA's: each segment causal on its own
    for a, b in ((0, 4), (4, 6)):
        mask[0, 0, a:b, a:b] = torch.ones(b - a, b - a).tril().bool()
    mask[1, 0] = torch.ones(6, 6).tril().bool()
    out, _ = attention.varlen_attention(module, q, k, v, mask, cu_seq_lens_q=cu,
                                        max_length_q=kwargs.pop("max_length_q", 6), **kwargs)
    return out


def test_a_16_bit_kernel_gets_16_bit_inputs_or_is_not_used(monkeypatch):
    """Flash attention takes fp16/bf16 only, but float32 reaches attention under autocast (rotary
    embeddings upcast q and k; a float32 base): there the kernel gets the autocast dtype, as SDPA would
    compute in. Without autocast float32 is what the run asked for, and SDPA answers."""
    seen: list = []
    monkeypatch.setitem(attention.KERNELS, "cpu", _half_only_kernel(seen))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _attend(v_dtype=torch.bfloat16)
    assert seen == [(torch.bfloat16,) * 3] and out.dtype == torch.bfloat16
    reference = _attend()
    assert len(seen) == 1 and reference.dtype == torch.float32  # float32, no autocast: SDPA
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("kwargs", "kernel_used"), [
    ({}, True),
    ({"max_length_q": 4}, False),  # the bounds describe a narrower batch: prompt tuning's virtual tokens in front
    ({"sliding_window": 6}, True),  # a window as long as the row changes nothing
    ({"sliding_window": 3}, False),
    ({"softcap": 50.0}, False),  # (which transformers' SDPA then refuses, as it does for attn_implementation sdpa)
    ({"s_aux": torch.zeros(2)}, False),
])
def test_what_the_kernel_cannot_do_as_the_model_means_it_goes_to_sdpa(monkeypatch, kwargs, kernel_used):
    calls: list = []
    monkeypatch.setitem(attention.KERNELS, "cpu", reference_kernel(calls))
    with pytest.MonkeyPatch.context() as m:
        # SDPA answering: the call lands here (transformers' SDPA ignores sliding_window / softcap kwargs; its
        # masks carry the window)
        answered = []
        from transformers.integrations import sdpa_attention

        real = sdpa_attention.sdpa_attention_forward
        m.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **kw: answered.append(1) or real(*a, **kw))
        try:
            _attend(**kwargs)
        except ValueError as exc:
            assert "does not support `softcap`" in str(exc)
    assert (len(calls), len(answered)) == ((1, 0) if kernel_used else (0, 1))


def test_a_gpu_without_flash_attention_gets_sdpa(monkeypatch, caplog):
    """PyTorch's varlen kernel is flash attention (compute capability 8.0+): chosen by device type alone,
    a V100 or T4 would have failed at the first forward. Such a GPU gets SDPA, with one warning."""
    if "cuda" not in attention.KERNELS:
        pytest.skip("this torch has no torch.nn.attention.varlen kernel")
    attention._flash_capable.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5) if index == 1 else (9, 0))
    try:
        with caplog.at_level("WARNING", logger="scaletune"):
            assert attention.kernel_for(torch.device("cuda", 0)) is attention.KERNELS["cuda"]
            assert attention.kernel_for(torch.device("cuda", 1)) is None
            assert attention.kernel_for(torch.device("cuda", 1)) is None
    finally:
        attention._flash_capable.cache_clear()
    assert caplog.text.count("compute capability 7.5) has no flash attention kernel") == 1
