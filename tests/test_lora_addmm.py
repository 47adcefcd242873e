"""train.fused_lora: peft's LoRA Linear with the update added inside one addmm gives peft's numbers, and
everything other than one plain adapter takes peft's own forward."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear

from scaletune.adapters.lora_addmm import AddmmLoraLinear, use_addmm_lora
from scaletune.config import from_dict, load_config
from scaletune.model import fused_lora_applies
from scaletune.tasks.base import pad_batch
from scaletune.train import setup

from stutil import loss_and_grads, tiny_lora_run


def _randomize_b(model: torch.nn.Module, seed: int = 0) -> None:
    """peft starts B at zero, where a wrong scale or a missing update would not show."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            p.data = 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_step_gives_peft_loss_and_gradients(make_config, dropout):
    runs = {}
    for fused in (True, False):
        path = make_config("causal_lm", n=32, train={"fused_lora": fused, "max_steps": 1},
                           peft={"lora_dropout": dropout})
        runs[fused], _ = setup(load_config(path), overwrite=True)
        _randomize_b(runs[fused].model)
    layers = {f: [m for m in r.model.modules() if isinstance(m, PeftLoraLinear)] for f, r in runs.items()}
    assert layers[True] and all(type(m) is AddmmLoraLinear for m in layers[True])
    assert all(type(m) is PeftLoraLinear for m in layers[False])
    assert {m.scaling["default"] for m in layers[True]} == {2.0}  # alpha 8 / r 4: a scale that shows
    batch = pad_batch([runs[True].data["train"][i] for i in range(6)], runs[True].tokenizer.pad_token_id)
    # seed: the same dropout masks for both forwards
    fused, plain = loss_and_grads(runs[True], batch, seed=0), loss_and_grads(runs[False], batch, seed=0)
    assert fused[0] == pytest.approx(plain[0], rel=1e-6)
    assert fused[1].keys() == plain[1].keys() and fused[1]
    for name, g in plain[1].items():
        torch.testing.assert_close(fused[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


class _Two(torch.nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32, bias: bool = True):
        super().__init__()
        self.a = torch.nn.Linear(24, 40, bias=bias, dtype=dtype)
        self.b = torch.nn.Linear(40, 16, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _pair(dtype: torch.dtype = torch.float32, bias: bool = True, **lora) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same LoRA model twice: peft's layers, and AddmmLoraLinear. `bias=False`: no bias anywhere (a
    bias makes the CPU's addmm copy it into the output: a copy that has nothing to do with LoRA)."""
    torch.manual_seed(0)
    base = _Two(dtype, bias)
    models = []
    for fused in (False, True):
        conf = LoraConfig(r=4, lora_alpha=12, target_modules=["a", "b"], **lora)
        if fused:
            use_addmm_lora(conf)
        torch.manual_seed(1)
        models.append(get_peft_model(copy.deepcopy(base), conf))
        _randomize_b(models[-1])
    assert type(models[1].base_model.model.a) is AddmmLoraLinear
    return models[0], models[1]


def _out_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.float().square().sum().backward()
    grads = [x.grad] + [p.grad for _, p in sorted(model.named_parameters()) if p.grad is not None]
    return out.detach(), grads


def _assert_same(plain: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor, exact: bool = False) -> None:
    (out_p, g_p), (out_f, g_f) = _out_and_grads(plain, x), _out_and_grads(fused, x)
    assert out_f.dtype == out_p.dtype and len(g_f) == len(g_p)
    for a, b in zip([out_f, *g_f], [out_p, *g_p], strict=True):
        if exact:
            assert torch.equal(a, b)
        else:
            # the scale applied to the rank-r side instead of the full product: last-bit differences
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("variant", ["plain", "dora", "lora_bias", "rslora"])
def test_layers_match_peft(variant):
    """Plain LoRA goes through addmm; DoRA and a LoRA bias take peft's forward (bit-identical)."""
    extra = {"dora": {"use_dora": True}, "lora_bias": {"lora_bias": True}, "rslora": {"use_rslora": True}}
    plain, fused = _pair(**extra.get(variant, {}))
    _assert_same(plain, fused, torch.randn(3, 5, 24), exact=variant in ("dora", "lora_bias"))


def test_update_goes_into_the_base_output_in_place_only_when_it_is_contiguous():
    plain, fused = _pair()
    x = torch.randn(3, 5, 24)
    layer = fused.base_model.model.a
    seen = []
    hook = layer.base_layer.register_forward_hook(lambda m, i, out: seen.append(out))
    assert layer(x) is seen[0]  # the GEMM accumulated into the base output: no full-width copy
    hook.remove()

    def column_major(module, inputs, out):  # same values, a layout a reshape would have to copy
        return out.transpose(0, 1).contiguous().transpose(0, 1)

    for model in (plain, fused):
        model.base_model.model.a.base_layer.register_forward_hook(column_major)
    _assert_same(plain, fused, x)


def test_compiled_layers_accumulate_in_place_without_copies():
    """Under torch.compile (inductor) the update and the input gradient are accumulated inside the GEMMs'
    outputs: no full-width copy in forward or backward (an in-place addmm alone is rewritten into an
    addmm on a copy: one per layer and direction), and peft's eager numbers."""
    from torch.profiler import profile

    plain, fused = _pair(bias=False)
    for layer in (fused.base_model.model.a, fused.base_model.model.b):
        layer.compile(fullgraph=True)
    x = torch.randn(15, 24)
    _assert_same(plain, fused, x)  # compiles
    x.requires_grad_(True)
    grad = torch.randn(15, 16)
    with profile(record_shapes=True) as prof:
        fused(x).backward(grad)
    events = [(e.name, e.input_shapes) for e in prof.events()]
    assert sum(name == "scaletune::lora_linear" for name, _ in events) == 2
    assert sum(name == "scaletune::lora_linear_backward" for name, _ in events) == 2
    assert [shapes for name, shapes in events if name in ("aten::copy_", "aten::clone") and shapes[0]] == []


def test_compiled_bf16_autocast_is_as_accurate_as_eager():
    """bf16 base, float32 adapters, autocast (scaletune's mixed precision): compiled, eager and peft's
    layers all differ from the same weights in float32 by bf16 roundings; the compiled ones by no more
    than eager (relative norm of the error, output and every gradient)."""
    plain, fused = _pair(bias=False)
    for model in (plain, fused):
        model.to(torch.bfloat16)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    eager = copy.deepcopy(fused)
    for layer in (fused.base_model.model.a, fused.base_model.model.b):
        layer.compile(fullgraph=True)
    torch.manual_seed(0)
    x = torch.randn(64, 9, 24).bfloat16()
    reference = _out_and_grads(copy.deepcopy(plain).float(), x.float())  # the same bf16 weights, exact
    errors = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name, model in (("peft", plain), ("eager", eager), ("compiled", fused)):
            out, grads = _out_and_grads(model, x)
            assert [t.dtype for t in (out, *grads)] == [torch.bfloat16] * 2 + [torch.float32] * 4
            errors[name] = [float((a.float() - b).norm() / b.norm())
                            for a, b in zip([out, *grads], [reference[0], *reference[1]], strict=True)]
    assert 0 < max(errors["compiled"]) < 0.02 and max(errors["peft"]) < 0.02
    for compiled, eager_ in zip(errors["compiled"], errors["eager"], strict=True):
        assert compiled <= 1.1 * eager_ + 1e-4


def test_operator_registration():
    """Fake (shape) functions, schema and autograd of the two operators agree with their kernels."""
    from scaletune.adapters.lora_op import lora_linear

    x = torch.randn(6, 24, requires_grad=True)
    a, b = torch.randn(4, 24, requires_grad=True), torch.randn(40, 4, requires_grad=True)
    for bias in (None, torch.randn(40)):
        torch.library.opcheck(lora_linear, (x, torch.randn(40, 24), bias, a, b, 0.5))


@pytest.mark.parametrize(("change", "expected"), [
    ("none", True), ("dropout", False), ("dropout_eval", True), ("trainable_base", False), ("hook", False),
    ("mixed_dtypes", False), ("mixed_dtypes_autocast", True),
])
def test_compiled_forward_takes_the_operator_only_where_it_is_exact(change, expected):
    """The operator feeds one x to both products, reads the base weight directly and gives the base no
    gradient: dropout in training, a trainable base, hooks and mixed dtypes without autocast keep the
    module forward."""
    _, fused = _pair(lora_dropout=0.1 if change.startswith("dropout") else 0.0)
    layer = fused.base_model.model.a
    x = torch.randn(2, 24)
    if change == "dropout_eval":
        fused.eval()
    if change == "trainable_base":
        layer.base_layer.weight.requires_grad_(True)
    if change == "hook":
        layer.base_layer.register_forward_hook(lambda *args: None)
    if change.startswith("mixed_dtypes"):
        layer.lora_B["default"].float()
        layer.base_layer.to(torch.bfloat16)
        x = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=change == "mixed_dtypes_autocast"):
        assert layer._opaque_op_applies("default", x, (), {}) is expected


def test_merged_disabled_and_multi_adapter_states_match_peft():
    plain, fused = _pair()
    x = torch.randn(2, 7, 24)
    for model in (plain, fused):
        torch.manual_seed(2)  # the same A
        model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["a", "b"]))
    _randomize_b(plain, seed=3)
    _randomize_b(fused, seed=3)
    _assert_same(plain, fused, x)
    for model in (plain, fused):
        model.base_model.set_adapter(["default", "second"])  # two active adapters: peft's loop over them
    _assert_same(plain, fused, x, exact=True)
    for model in (plain, fused):
        model.base_model.set_adapter("default")
    with plain.disable_adapter(), fused.disable_adapter():
        _assert_same(plain, fused, x, exact=True)
    for model in (plain, fused):
        model.eval()
    with torch.no_grad():  # mixed-adapter batch (inference): peft's per-row routing
        names = ["default", "second"]
        assert torch.equal(plain(x, adapter_names=names), fused(x, adapter_names=names))
        before = fused(x)
        fused.merge_adapter()
        torch.testing.assert_close(fused(x), before, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_and_mixed_dtypes_without_autocast():
    # bf16 base under autocast with float32 adapters (scaletune's mixed precision): addmm rounds once,
    # peft three times, so the two agree to bf16 precision, not bit for bit.
    plain, fused = _pair(torch.bfloat16)
    for model in (plain, fused):
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    x = torch.randn(4, 9, 24, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out_p, g_p), (out_f, g_f) = _out_and_grads(plain, x), _out_and_grads(fused, x)
    assert out_f.dtype == out_p.dtype == torch.bfloat16
    for a, b in zip([out_f, *g_f], [out_p, *g_p], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * float(b.abs().max()))
    # Without autocast the bf16 output meets a float32 adapter: peft's arithmetic, bit for bit.
    _assert_same(plain, fused, x, exact=True)


def test_saved_adapter_loads_into_plain_peft(tmp_path):
    plain, fused = _pair()
    fused.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert not any("custom" in k for k in saved)  # nothing of the registration is written
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(_Two(), tmp_path / "adapter")
    assert type(loaded.base_model.model.a) is PeftLoraLinear
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fused(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("sections", "expected"), [
    ({}, True),
    ({"peft": {"use_rslora": True}}, True),
    ({"train": {"fused_lora": False}}, False),
    ({"model": {"quantization": "4bit", "dtype": "bfloat16"}, "train": {"mixed_precision": "bf16"}}, False),
    ({"distributed": {"zero_stage": 3}}, False),
    ({"peft": {"method": "ia3"}}, False),
], ids=["lora", "rslora", "off", "4bit", "zero3", "ia3"])
def test_applies_only_to_plain_lora_on_unquantized_unpartitioned_bases(tmp_path, sections, expected):
    raw = tiny_lora_run(tmp_path / "model", tmp_path / "train.jsonl", output_dir=str(tmp_path / "run"))
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    if raw["peft"]["method"] == "ia3":
        raw["peft"] = {"method": "ia3"}
    assert fused_lora_applies(from_dict(raw)) is expected
