"""train.chunked_loss: the same loss and LoRA gradients as the usual path, with a smaller memory peak."""

from __future__ import annotations

import pytest
import torch
import yaml

from scaletune.config import load_config
from scaletune.data.packing import collate_packed
from scaletune.tasks import IGNORE, chunked_ce
from scaletune.tasks.base import pad_batch
from scaletune.train import setup

from stutil import loss_and_grads, tensor_peak_bytes


def _run(make_config, peft: dict | None = None, **sections):
    train = {"global_batch_size": 8, "micro_batch_size": 8, "max_steps": 1, **sections.pop("train", {})}
    path = make_config("causal_lm", n=32, train=train, **sections)
    if peft is not None:  # replace the whole section (make_config merges)
        raw = yaml.safe_load(path.read_text())
        raw["peft"] = peft
        path.write_text(yaml.safe_dump(raw))
    run, _ = setup(load_config(path), overwrite=True)  # several runs per test share the output dir
    return run


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_same_loss_and_gradients_as_the_usual_path(make_config, monkeypatch, packed):
    run = _run(make_config)
    assert run.task._head is not None  # on by default for a frozen, plain head
    head = run.task._head
    monkeypatch.setattr(chunked_ce, "CHUNK_ELEMENTS", 7 * head.weight.shape[0])  # 7 rows: many chunks
    examples = [run.data["train"][i] for i in range(6)]
    pad = run.tokenizer.pad_token_id
    if packed:
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for ex in examples:
            row["input_ids"] += ex["input_ids"]
            row["labels"] += [IGNORE] + ex["labels"][1:]
            row["position_ids"] += list(range(len(ex["input_ids"])))
        batch = collate_packed([row, {k: v[:9] for k, v in row.items()}], pad)
    else:
        batch = pad_batch(examples, pad)
    chunked = loss_and_grads(run, batch)
    run.task._head = None
    usual = loss_and_grads(run, batch)
    assert chunked[0] == pytest.approx(usual[0], rel=1e-6)
    assert chunked[1].keys() == usual[1].keys() and chunked[1]
    for name, g in usual[1].items():
        torch.testing.assert_close(chunked[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture()
def bf16_run(make_config):
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps one mixed-precision setting per process; the other tests here run without one
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return _run(make_config, model={"dtype": "bfloat16"}, train={"mixed_precision": "bf16"})
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_bf16_mixed_precision_matches_the_usual_path(bf16_run):
    """bf16 weights under autocast: both paths run the head in bf16 on the same hidden states."""
    run = bf16_run
    assert run.task._head is not None and run.task._head_dtype == torch.bfloat16
    batch = pad_batch([run.data["train"][i] for i in range(6)], run.tokenizer.pad_token_id)
    chunked = loss_and_grads(run, batch)
    assert run.task._head is not None  # the first call's self-check kept the chunked path
    run.task._head = None
    usual = loss_and_grads(run, batch)
    assert chunked[0] == pytest.approx(usual[0], rel=1e-4)
    for name, g in usual[1].items():
        torch.testing.assert_close(chunked[1][name], g, rtol=2e-2, atol=1e-4, msg=name)


def test_bf16_adapters_take_their_input_uncast_with_identical_numbers(bf16_run):
    """Under autocast the LoRA layers skip peft's float32 copy of their input (methods.skip_adapter_input_casts):
    bit-identical loss and gradients to peft's default casting."""
    from peft.tuners.lora import LoraLayer

    run = bf16_run
    layers = [m for m in run.model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.cast_input_dtype_enabled is False for m in layers)
    assert all(p.dtype == torch.float32 for n, p in run.model.named_parameters() if p.requires_grad)
    batch = pad_batch([run.data["train"][i] for i in range(6)], run.tokenizer.pad_token_id)
    uncast = loss_and_grads(run, batch)
    for m in layers:
        m.cast_input_dtype_enabled = True
    cast = loss_and_grads(run, batch)
    assert uncast[0] == cast[0]
    for name, g in cast[1].items():
        assert torch.equal(uncast[1][name], g), name


def test_falls_back_when_the_logits_are_not_the_head_of_the_last_hidden_state(make_config, caplog):
    """The first call checks head(last hidden state) against the model's own last logits; a model that
    transforms its logits some other way gets the usual loss (on its real logits) from then on."""
    run = _run(make_config)
    base = run.model.get_base_model()
    base.lm_head.register_forward_hook(lambda mod, args, out: out * 0.5)
    batch = pad_batch([run.data["train"][i] for i in range(6)], run.tokenizer.pad_token_id)
    with caplog.at_level("WARNING", logger="scaletune"):
        fallback = loss_and_grads(run, batch)
    assert run.task._head is None and "not head(last hidden state)" in caplog.text
    assert fallback[0] == pytest.approx(loss_and_grads(run, batch)[0], rel=1e-6)
    # ...and that loss is the one on the halved logits, not the chunked loss on the head's own
    run2 = _run(make_config)
    assert abs(loss_and_grads(run2, batch)[0] - fallback[0]) > 1e-3 * fallback[0]


def test_eval_loss_is_the_same(make_config):
    from scaletune.evaluate import evaluate

    run = _run(make_config)
    args = (run.accelerator, run.model, run.task, run.data["eval"], None, 4, run.tokenizer.pad_token_id)
    chunked = evaluate(*args)
    run.task._head = None
    assert chunked["loss"] == pytest.approx(evaluate(*args)["loss"], rel=1e-6)


def test_peak_tensor_memory_is_lower(make_config, monkeypatch):
    """One micro-batch forward+backward, peak of live tensor bytes from the profiler's allocation events:
    the usual path holds several float32 (target tokens x vocab) buffers at once, the chunked one a chunk."""
    run = _run(make_config)
    batch = pad_batch([run.data["train"][i] for i in range(8)], run.tokenizer.pad_token_id)
    vocab = run.task._head.weight.shape[0]
    monkeypatch.setattr(chunked_ce, "CHUNK_ELEMENTS", 8 * vocab)
    targets = run.task.count_targets(batch)

    def peak() -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            loss_and_grads(run, batch)
        return tensor_peak_bytes(prof)

    chunked = peak()
    run.task._head = None
    usual = peak()
    # at least two float32 vocabulary-sized buffers over the batch's target tokens are gone
    assert usual - chunked >= 2 * 4 * targets * vocab * 0.9, (usual, chunked, targets, vocab)


def test_head_cross_entropy_matches_cross_entropy_and_skips_ignored_rows(monkeypatch):
    """Against F.cross_entropy(sum, ignore_index) on the whole logits: loss and the gradients of the
    hidden states (rows without a target get none) across several chunks, bias included."""
    monkeypatch.setattr(chunked_ce, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows per chunk, a short last one
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 16, generator=gen, requires_grad=True)
    weight, bias = torch.randn(50, 16, generator=gen), torch.randn(50, generator=gen)
    labels = torch.randint(0, 50, (11,), generator=gen)
    labels[[0, 4, 5, 10]] = IGNORE
    ours = chunked_ce.head_cross_entropy(hidden, weight, bias, labels)
    (grad,) = torch.autograd.grad(2.5 * ours, hidden)
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, labels, reduction="sum",
                                                  ignore_index=IGNORE)
    (expected,) = torch.autograd.grad(2.5 * reference, hidden)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    assert grad[[0, 4, 5, 10]].abs().max() == 0 and grad[[1, 2, 3]].abs().min() > 0


def test_a_bf16_head_scales_its_gradient_by_the_float32_loss_scale(monkeypatch):
    """Backward of a bf16 head times the loop's float32 scale (1 / the step's targets) is each element's
    gradient times that scale, rounded once. It was times the scale rounded to bf16 first: 1/912 is 0.2% off
    there, so the step's whole gradient came out 0.2% too large, where the usual path's float32 loss is exact."""
    monkeypatch.setattr(chunked_ce, "CHUNK_ELEMENTS", 3 * 16)  # 3 rows per chunk, a short last one
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 16, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(50, 16, generator=gen).bfloat16()
    labels = torch.randint(0, 50, (11,), generator=gen)
    scale = torch.tensor(1 / 912)
    assert abs(float(scale.bfloat16()) / float(scale) - 1) > 1e-3  # (the scale bf16 cannot hold)
    (unit,) = torch.autograd.grad(chunked_ce.head_cross_entropy(hidden, weight, None, labels), hidden)
    (grad,) = torch.autograd.grad(chunked_ce.head_cross_entropy(hidden, weight, None, labels) * scale, hidden)
    assert grad.dtype == torch.bfloat16
    assert torch.equal(grad, (unit.float() * scale).bfloat16())
    ratio = (grad.double() * unit.double()).sum() / (unit.double() ** 2).sum() / float(scale)
    assert abs(float(ratio) - 1) < 2e-4  # (was 1.002)


@pytest.mark.parametrize("vocab", [32000, 50257, 128256, 151936, 256000, 1 << 21])
def test_gpu_chunks_are_whole_tiles_in_the_budget(vocab):
    """On a GPU the chunk is the largest multiple of 128 rows whose logits fit the GPU budget (at least
    one tile); on CPU the smaller CPU budget, whatever the row count."""
    rows = chunked_ce.chunk_rows(vocab, cuda=True)
    assert rows % chunked_ce.GPU_ROW_MULTIPLE == 0 and rows >= chunked_ce.GPU_ROW_MULTIPLE
    assert rows * vocab <= chunked_ce.GPU_CHUNK_ELEMENTS or rows == chunked_ce.GPU_ROW_MULTIPLE
    assert (rows + chunked_ce.GPU_ROW_MULTIPLE) * vocab > chunked_ce.GPU_CHUNK_ELEMENTS
    cpu_rows = chunked_ce.chunk_rows(vocab)
    assert cpu_rows * vocab <= chunked_ce.CHUNK_ELEMENTS < (cpu_rows + 1) * vocab


def test_kept_off_where_it_cannot_stand_in(make_config):
    head_trained = _run(make_config, peft={"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"],
                                           "modules_to_save": ["lm_head"]})
    assert head_trained.task._head is None
    adapted = _run(make_config, peft={"method": "lora", "r": 4, "target_modules": ["q_proj", "lm_head"]})
    assert adapted.task._head is None
    prompt = _run(make_config, peft={"method": "prompt_tuning", "num_virtual_tokens": 4})
    assert prompt.task._head is None
    off = _run(make_config, train={"chunked_loss": False})
    assert off.task._head is None


def test_collated_target_positions_match_the_labels(make_config):
    """The collator finds the target positions on the CPU (no GPU wait mid-step); the loss on them equals
    the loss computed from the labels on the device, padded and packed."""
    run = _run(make_config)
    examples = [run.data["train"][i] for i in range(6)]
    pad = run.tokenizer.pad_token_id
    row = {"input_ids": sum((e["input_ids"] for e in examples), []),
           "labels": sum(([IGNORE] + e["labels"][1:] for e in examples), []),
           "position_ids": sum((list(range(len(e["input_ids"]))) for e in examples), [])}
    for batch in (run.task.collate(examples, pad), run.task.collate([row], pad)):
        index = batch["target_index"]
        assert len(index) == run.task.count_targets(batch)
        assert (batch["labels"].reshape(-1)[index + 1] != IGNORE).all()
        collated = loss_and_grads(run, batch)
        on_device = loss_and_grads(run, {k: v for k, v in batch.items() if k != "target_index"})
        assert collated[0] == on_device[0]
        for name, g in on_device[1].items():
            assert torch.equal(collated[1][name], g), name


def test_the_usual_loss_takes_its_logit_columns_from_the_collator(make_config, monkeypatch):
    """Without the chunked loss, the positions that need logits come from the collator (CPU) too: the
    same loss and gradients as finding them from the labels in the step, where on a GPU nonzero() makes
    the CPU wait for the GPU."""
    import scaletune.tasks.causal_lm as causal_lm

    run = _run(make_config, train={"chunked_loss": False})
    assert run.task._head is None
    batch = run.task.collate([run.data["train"][i] for i in range(6)], run.tokenizer.pad_token_id)
    labels = batch["labels"][:, 1:]
    want = torch.tensor([t for t in range(labels.shape[1]) if (labels[:, t] != IGNORE).any()])
    assert torch.equal(batch["target_columns"], want)
    from_labels = loss_and_grads(run, {k: v for k, v in batch.items() if k != "target_columns"})

    def not_in_the_step(labels):
        raise AssertionError("target columns computed in the step")

    monkeypatch.setattr(causal_lm, "target_columns", not_in_the_step)
    collated = loss_and_grads(run, batch)
    assert collated[0] == from_labels[0]
    for name, g in from_labels[1].items():
        assert torch.equal(collated[1][name], g), name


def test_the_head_check_reads_no_value_out_of_the_graph():
    """`float()` of a tensor that requires grad warns (seen twice per run under ZeRO-2 bf16)."""
    import warnings

    from scaletune.tasks.causal_lm import _same_logits

    logits = torch.randn(2, 1, 8, dtype=torch.bfloat16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _same_logits(logits * 1, logits * 1)
