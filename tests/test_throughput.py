"""Fast data path: packing isolates examples exactly, grouping cuts padding, logits only where needed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaletune.config import load_config
from scaletune.data.batching import epoch_order, step_micro_batches
from scaletune.data.packing import collate_packed, pack_dataset, pack_rows
from scaletune.loop import fit
from scaletune.tasks import IGNORE
from scaletune.tasks.base import pad_batch
from scaletune.train import StopFlag, setup

import stutil
from stutil import read_metrics


def test_pack_rows_places_every_example_once_within_max_length():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(300)]
    rows = pack_rows(lengths, 128)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert sum(lengths) / (len(rows) * 128) > 0.95  # best-fit decreasing wastes almost nothing
    assert pack_rows([64, 64, 128, 100, 28], 128) == [[2], [3, 4], [0, 1]]  # an exact fit fills a row



def test_pack_dataset_equals_member_by_member_packing_without_formatting_rows(monkeypatch):
    """The packed rows are built in Arrow and numpy: reading each member from the dataset formatted every example
    in Python (13 s for 50k examples before the first step). The rows equal concatenating each row's members
    (ids intact, first label masked, positions restarting), through a select's indices mapping too."""
    import random

    import datasets

    rng = random.Random(3)
    lengths = [rng.randint(1, 9) for _ in range(200)]
    ds = datasets.Dataset.from_dict({"input_ids": [[rng.randint(0, 999) for _ in range(n)] for n in lengths],
                                     "labels": [[rng.choice([IGNORE, rng.randint(0, 999)]) for _ in range(n)]
                                                for n in lengths], "length": lengths})
    picked = ds.select(range(199, 0, -2))
    want = []
    for members in pack_rows(list(picked["length"]), 16):
        ex = [picked[i] for i in members]
        want.append({"input_ids": [t for e in ex for t in e["input_ids"]],
                     "labels": [t for e in ex for t in [IGNORE] + e["labels"][1:]],
                     "position_ids": [t for e in ex for t in range(e["length"])],
                     "length": sum(e["length"] for e in ex), "n_examples": len(ex)})

    def refuse(*a, **kw):
        raise AssertionError("an example was formatted on its own")

    monkeypatch.setattr(datasets.arrow_dataset.Column, "__getitem__", refuse)
    monkeypatch.setattr(datasets.arrow_dataset.Column, "__iter__", refuse)
    packed = pack_dataset(picked, 16)
    monkeypatch.undo()
    assert packed.to_list() == want


def test_pack_dataset_restarts_positions_and_masks_each_examples_first_label():
    """Each packed example must be a segment of its own: positions restarting at 0 (the collator and the
    attention kernels find example boundaries by them; positions running on across a row would let examples
    attend to each other and give later ones positions they never had unpacked), its ids placed intact, and
    its first label masked so no example learns to predict its first token from the previous example. The
    labels here equal the ids (text formatted without a BOS token): their first label is a real target, which
    a BOS tokenizer's examples (label 0 already IGNORE) would hide."""
    import datasets

    examples = [[10 * k + j for j in range(n)] for k, n in enumerate([5, 3, 7, 2, 4, 6])]  # distinct ids
    ds = datasets.Dataset.from_dict({"input_ids": examples, "labels": [list(e) for e in examples],
                                     "length": [len(e) for e in examples]})
    packed = pack_dataset(ds, 10)
    assert len(packed) < len(examples)  # rows hold several examples: the boundaries are under test
    seen = []
    for row in packed:
        pos, ids, labels = row["position_ids"], row["input_ids"], row["labels"]
        assert len(pos) == len(ids) == len(labels) == row["length"] <= 10
        starts = [j for j, p in enumerate(pos) if p == 0] + [len(pos)]
        assert starts[0] == 0 and len(starts) - 1 == row["n_examples"]
        for a, b in zip(starts, starts[1:]):
            assert pos[a:b] == list(range(b - a))
            example = ids[a:b]
            assert example in examples
            assert labels[a:b] == [IGNORE] + example[1:]
            seen.append(example)
    assert sorted(seen) == sorted(examples)  # every example exactly once


def test_each_epoch_has_its_own_order_and_the_same_epoch_repeats_it():
    """The order depends on (seed, epoch): a seed that ignored the epoch would replay the first epoch's order
    (and its steps' batches) every epoch; the same (seed, epoch) must give the same order, or a resume would
    train on other examples than the interrupted run."""
    import random

    rng = random.Random(2)
    lengths = [rng.randint(10, 500) for _ in range(256)]
    for group in (True, False):
        orders = [epoch_order(lengths, 7, epoch, 16, group) for epoch in range(3)]
        assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
        assert all(sorted(o) == sorted(orders[0]) for o in orders)  # the same examples, reordered
        assert epoch_order(lengths, 7, 1, 16, group) == orders[1]
        assert epoch_order(lengths, 8, 1, 16, group) != orders[1]

@pytest.fixture()
def llama_run(make_config):
    path = make_config("causal_lm", n=32, train={"global_batch_size": 8, "micro_batch_size": 8, "max_steps": 1})
    run, _ = setup(load_config(path))
    return run


def test_packed_loss_equals_token_weighted_unpacked_loss(llama_run):
    """Same examples, one packed row vs one per row: equal summed loss and per-example logits."""
    run = llama_run
    task = run.task
    model = run.accelerator.unwrap_model(run.model).eval()
    examples = [run.data["train"][i] for i in range(5)]
    pad = run.tokenizer.pad_token_id
    # unpacked: each example on its own (no padding at all), losses summed over target tokens
    total, n = 0.0, 0
    solo_logits = []
    with torch.no_grad():
        for ex in examples:
            batch = pad_batch([ex], pad)
            loss, _ = task.loss_sum(model, batch)
            total += float(loss)
            n += task.count_targets(batch)
            solo_logits.append(model(input_ids=batch["input_ids"]).logits[0])
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for ex in examples:
            row["input_ids"] += ex["input_ids"]
            row["labels"] += [IGNORE] + ex["labels"][1:]
            row["position_ids"] += list(range(len(ex["input_ids"])))
        packed = collate_packed([row, {k: v[:7] for k, v in row.items()}], pad)  # 2nd row forces end padding
        full = collate_packed([row], pad)
        p_loss, _ = task.loss_sum(model, full)
        assert task.count_targets(full) == n
        assert float(p_loss) / n == pytest.approx(total / n, rel=1e-5)
        # no token attends across examples: each example's logits inside the row equal its solo logits
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        single = model(input_ids=full["input_ids"], position_ids=full["position_ids"], use_cache=False).logits[0]
        torch.testing.assert_close(single[:len(examples[0]["input_ids"])], solo_logits[0], rtol=1e-4, atol=1e-5)
        start = 0
        for ex, solo in zip(examples, solo_logits):
            end = start + len(ex["input_ids"])
            torch.testing.assert_close(logits[start:end], solo, rtol=1e-4, atol=1e-5)
            start = end


def test_logits_only_at_target_positions_give_the_same_loss(llama_run):
    run = llama_run
    run.task._head = None  # the usual path (train.chunked_loss builds no logits at all)
    model = run.accelerator.unwrap_model(run.model)
    batch = pad_batch([run.data["train"][i] for i in range(4)], run.tokenizer.pad_token_id)
    with torch.no_grad():
        loss, logits = run.task.loss_sum(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        ref = torch.nn.functional.cross_entropy(full.reshape(-1, full.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                                ignore_index=IGNORE, reduction="sum")
    assert logits.shape[1] < full.shape[1]  # prompt positions were skipped
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)


def test_length_grouping_cuts_padding_and_is_world_size_independent():
    import random

    rng = random.Random(1)
    lengths = [rng.randint(10, 500) for _ in range(1024)]

    def padding(group: bool) -> float:
        order = epoch_order(lengths, 7, 0, 16, group)
        waste = total = 0
        for k in range(len(order) // 16):
            for mb in step_micro_batches(order, lengths, k, global_batch=16, micro=4, world=1, rank=0):
                width = max(lengths[i] for i in mb)
                waste += sum(width - lengths[i] for i in mb)
                total += width * len(mb)
        return waste / total

    assert padding(True) < 0.05 < padding(False)
    order = epoch_order(lengths, 7, 0, 16, True)
    one = step_micro_batches(order, lengths, 3, global_batch=16, micro=4, world=1, rank=0)
    two = [step_micro_batches(order, lengths, 3, global_batch=16, micro=2, world=2, rank=r) for r in (0, 1)]
    assert sorted(i for mb in one for i in mb) == sorted(i for r in two for mb in r for i in mb)
    assert sorted(order) == sorted(epoch_order(lengths, 7, 0, 16, False))


def test_training_with_packing_runs_and_reports_throughput(make_config):
    path = make_config("causal_lm", n=64, data={"packing": True, "max_length": 256},
                       train={"global_batch_size": 2, "micro_batch_size": 1, "max_steps": 3})
    run, _ = setup(load_config(path))
    assert run.data["stats"]["packed_examples"] == 64 and len(run.data["train"]) < 32
    info = json.loads((run.output_dir / "run.json").read_text())  # examples, not rows (run.json said rows)
    assert (info["train_examples"], info["packed_rows"]) == (64, len(run.data["train"]))
    assert fit(run, StopFlag()) == "done"
    rec = read_metrics(run.output_dir)[-1]
    assert rec["tokens_per_s"] > 0 and rec["target_tokens_per_s"] > 0 and rec["peak_mem_mb"] > 0
    assert rec["padding_ratio"] < 0.3


def test_torch_compile_gives_the_same_loss_and_gradient_norm(make_config, monkeypatch):
    """train.torch_compile compiles each decoder layer (adapters inside) in place: a packed step's loss and
    gradient norm match eager training, with the chunked loss's decoder hook in the path. Dynamo traces
    and AOT autograd differentiates the real graphs; the backend is aot_eager because inductor's C++
    code generation costs ~40 s of CI per run (inductor itself ran the GPU benchmarks)."""
    monkeypatch.setattr(torch.nn.Module, "compile", stutil.compiling_with("aot_eager"))
    logged = {}
    for compiled in (False, True):
        path = make_config("causal_lm", n=32, data={"packing": True, "max_length": 96, "eval": None},
                           train={"global_batch_size": 2, "micro_batch_size": 2, "max_steps": 1,
                                  "torch_compile": compiled})
        run, _ = setup(load_config(path), overwrite=True)
        layers = run.model.get_base_model().model.layers
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
        assert run.task._head is not None
        assert fit(run, StopFlag()) == "done"
        assert run.task._head is not None  # the decoder hook fired: no fallback to the usual loss
        (row,) = [r for r in read_metrics(run.output_dir) if r.get("event") == "train"]
        logged[compiled] = (row["loss"], row["grad_norm"])
    assert logged[True] == pytest.approx(logged[False], rel=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_mfu_counts_attention_per_example_not_per_row(monkeypatch, tied):
    """LoRA-aware FLOPs: (4N + 6 N_trainable) per token plus 12 * layers * hidden * L per token of an
    example of L tokens; a packed row's examples are counted separately (README formula). N leaves out
    the input embedding, a lookup, unless the LM head multiplies by the same (tied) weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import scaletune.metrics as metrics

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, tie_word_embeddings=tied))
    for name, p in model.named_parameters():
        p.requires_grad = "q_proj" in name
    n_all = sum(p.numel() for p in model.parameters())  # a tied weight is one parameter, counted once
    assert n_all == 64 * 16 * (1 if tied else 2) + sum(p.numel() for p in model.model.layers.parameters()) + 16
    n_all -= 0 if tied else 64 * 16
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    class Acc:  # one process, nothing to reduce
        device, num_processes = torch.device("cpu"), 1

        def reduce(self, tensor, op):
            return tensor

    from types import SimpleNamespace

    clock = iter([100.0, 102.0, 102.0])  # 2 s between start and flush (which restarts the clock)
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setenv("SCALETUNE_PEAK_TFLOPS", "1e-6")  # 1e6 FLOP/s
    speed = metrics.Throughput(Acc(), model)
    packed = collate_packed([{"input_ids": [1] * 5, "labels": [IGNORE] * 5, "position_ids": [0, 1, 2, 0, 1]},
                             {"input_ids": [1] * 4, "labels": [IGNORE] * 4, "position_ids": [0, 1, 2, 3]}], 0)
    padded = pad_batch([{"input_ids": [1] * 2, "labels": [1] * 2}, {"input_ids": [1] * 6, "labels": [1] * 6}], 0)
    speed.count(packed)  # examples 3, 2, 4 (+ 1 token of row padding, a segment of its own)
    speed.count(padded)  # examples 2 and 6; padding ignored
    out = speed.flush()
    tokens = 9 + 8
    sum_sq = (9 + 4 + 16 + 1) + (4 + 36)
    expected = ((4 * n_all + 6 * n_train) * tokens + 12 * 2 * 16 * sum_sq) / 2.0 / 1e6
    assert out["mfu"] == pytest.approx(expected, rel=1e-9)
    assert out["tokens_per_s"] == pytest.approx(tokens / 2.0)


@pytest.mark.parametrize(("name", "peak"), [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                            ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
                                            ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                            ("Tesla T4", None)])
def test_the_mfu_peak_is_the_boards_own(monkeypatch, name, peak):
    """PCIe and NVL boards of a family run lower clocks than its SXM part: each gets its own dense bf16
    peak, not the family's first match."""
    import scaletune.metrics as metrics

    monkeypatch.delenv("SCALETUNE_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert metrics.device_peak_tflops() == peak


def test_a_mig_slice_is_measured_against_its_share_of_the_board(monkeypatch):
    import types

    import scaletune.metrics as metrics

    monkeypatch.delenv("SCALETUNE_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3 MIG 3g.40gb")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: types.SimpleNamespace(multi_processor_count=60))
    assert metrics.device_peak_tflops() == pytest.approx(989.0 * 60 / 132)
    # the same SM count on the whole board's name: not a slice, the board's peak (no SM arithmetic)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert metrics.device_peak_tflops() == 989.0


def test_compile_blocks_finds_the_layers_under_a_ddp_style_wrapper(monkeypatch):
    """After accelerator.prepare under DDP the model is wrapped (`.module`): the blocks to compile are
    still found (the wrapper itself declares no `_no_split_modules`)."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from scaletune.model import compile_blocks

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **kw: compiled.append(type(self).__name__))
    model = peft.get_peft_model(
        LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                     num_attention_heads=2)),
        peft.LoraConfig(r=2, target_modules=["q_proj"]))
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DistributedDataParallel looks like from outside
    assert compile_blocks(wrapper) == 3
    assert compiled == ["LlamaDecoderLayer"] * 3


@pytest.mark.parametrize("mine,peers,agreed", [(None, "SIGUSR1", "SIGUSR1"), ("SIGUSR1", "SIGTERM", "SIGTERM"),
                                               ("SIGINT", "SIGUSR1", "SIGINT"), (None, None, None)])
def test_every_rank_stops_on_the_same_signal(mine, peers, agreed):
    """A rank the stop signal did not reach logged the preempted event without one and wrote an empty signal
    on the marker, where the Slurm templates look for SIGUSR1 to requeue: the ranks now agree on the signal in
    the step's all-reduce, a cancel (TERM) or Ctrl-C outranking a preemption notice (USR1)."""
    from types import SimpleNamespace

    from scaletune.loop import _STOP_ORDER, step_head

    def with_peer(t, op):  # the other rank's head: the same count, and the signal it heard
        return t + torch.tensor([37, 37, *[int(peers is not None and sig == getattr(signal, peers)) for sig in _STOP_ORDER]])

    stop = StopFlag.__new__(StopFlag)
    stop.signal = getattr(signal, mine) if mine else None
    two = SimpleNamespace(num_processes=2, device=torch.device("cpu"), reduce=with_peer)
    assert step_head(two, 37, stop) == (74, 74.0, getattr(signal, agreed) if agreed else None)


def test_step_head_and_norm_need_no_extra_device_round_trips():
    """One process: the step's target count and stop flag come from the host (no all-reduce, which on
    a GPU would wait for the previous step); loss and gradient norm are those of the usual formulas,
    returned as one device tensor (the host reads it only at logged/checkpointed steps)."""
    from types import SimpleNamespace

    from scaletune.loop import clip_and_norm, step_head

    def no_reduce(*_a, **_k):
        raise AssertionError("a single process must not reduce the step head")

    stop = StopFlag.__new__(StopFlag)
    stop.signal = None
    one = SimpleNamespace(num_processes=1, reduce=no_reduce)
    assert step_head(one, 37, stop) == (37, 37.0, None)
    stop.signal = signal.SIGTERM
    assert step_head(one, 37, stop) == (37, 37.0, signal.SIGTERM)
    two = SimpleNamespace(num_processes=2, device=torch.device("cpu"),
                          reduce=lambda t, op: t * 2)  # the peer has the same count and flag
    assert step_head(two, 37, stop) == (74, 74.0, signal.SIGTERM)
    assert step_head(two, 37, stop, 5.25) == (74, 10.5, signal.SIGTERM)  # class weights: the float denominator

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    expected = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
    acc = SimpleNamespace(distributed_type=SimpleNamespace(value="NO"), reduce=lambda t, op: t,
                          clip_grad_norm_=torch.nn.utils.clip_grad_norm_)
    norm_loss = clip_and_norm(acc, params, 1.0, torch.tensor(12.0), 4)
    assert isinstance(norm_loss, torch.Tensor) and norm_loss.shape == (2,)  # stays on the device
    norm, loss = norm_loss.tolist()
    assert norm == pytest.approx(expected, rel=1e-6) and loss == pytest.approx(3.0)
    assert torch.nn.utils.get_total_norm([p.grad for p in params]).item() == pytest.approx(1.0, rel=1e-5)  # clipped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc allocator setting")
def test_release_cpu_memory_returns_freed_tensors_to_the_os():
    """Without the setting, 240 MiB of freed 4 MiB tensors stay resident behind small live ones (glibc's
    adaptive threshold puts them on the heap); with it, each has its own mapping and goes back."""
    script = Path(__file__).parent / "helpers" / "heap_retention.py"
    env = stutil.child_env()
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    kept = {}
    for mode in ("off", "on"):
        res = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        kept[mode] = float(res.stdout.split()[-1])
    assert kept["off"] > 150 and kept["on"] < 30, kept


def test_release_cpu_memory_is_applied_on_cpu_runs_and_explains_a_refusal(make_config, monkeypatch, caplog):
    import scaletune.cpu_memory as cpu_memory

    calls = []
    monkeypatch.setattr(cpu_memory, "release_freed_memory", lambda: calls.append(1) or "a reason")
    for flag in (False, True):
        path = make_config("causal_lm", n=16, train={"global_batch_size": 8, "micro_batch_size": 8,
                                                     "max_steps": 1, "release_cpu_memory": flag})
        with caplog.at_level("WARNING", logger="scaletune"):
            setup(load_config(path), overwrite=True)
    assert calls == [1]
    assert "train.release_cpu_memory is not applied: a reason" in caplog.text
    monkeypatch.undo()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert "MALLOC_MMAP_THRESHOLD_" in cpu_memory.release_freed_memory()  # the user's own setting wins


def test_cuda_allocator_retries_are_logged(monkeypatch):
    """On CUDA each flush reports the caching allocator's retry count (memory pressure); not on CPU."""
    from types import SimpleNamespace

    import scaletune.metrics as metrics

    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, reduce=lambda t, op: t)
    speed = metrics.Throughput(acc, torch.nn.Linear(2, 2))
    speed.count({"input_ids": torch.ones(2, 3, dtype=torch.long)})
    assert "cuda_alloc_retries" not in speed.flush()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda: {"num_alloc_retries": 3})
    monkeypatch.setattr(metrics, "peak_memory_mb", lambda: 1.0)
    assert speed.flush()["cuda_alloc_retries"] == 3


def test_time_spent_in_eval_and_checkpoints_is_not_training_time(monkeypatch):
    """tokens/s covers training only: an eval or a checkpoint inside a log interval (`paused`) used to
    count, so an interval holding an eval logged a fraction of the real rate."""
    from types import SimpleNamespace

    from scaletune import metrics

    class Acc:
        device, num_processes = torch.device("cpu"), 1

        def reduce(self, tensor, op):
            return tensor

    clock = iter([100.0, 101.0, 104.0, 105.0, 105.0])  # start, pause 101-104 (3 s), flush at 105
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    speed = metrics.Throughput(Acc(), torch.nn.Linear(2, 2))
    speed.count({"input_ids": torch.ones(2, 5, dtype=torch.long)})
    speed.add_step(6)
    with speed.paused():
        pass
    out = speed.flush()
    assert out["tokens_per_s"] == pytest.approx(10 / 2.0) and out["target_tokens_per_s"] == pytest.approx(6 / 2.0)


def test_column_values_reads_lengths_through_arrow_without_per_row_formatting(monkeypatch):
    """StepBatches, eval and packing read the length column in one Arrow call: `list(dataset["length"])`
    formatted every row (datasets >= 4's lazy Column), 2.7 s of a 300k-example run's start before step 1."""
    import datasets

    from scaletune.data.batching import StepBatches, column_values

    ds = datasets.Dataset.from_dict({"input_ids": [[1] * (i % 7 + 1) for i in range(50)],
                                     "labels": [i % 2 for i in range(50)], "length": [i % 7 + 1 for i in range(50)]})
    picked = ds.select(range(49, -1, -3))  # an indices mapping: values in the selected order
    assert column_values(ds, "length") == [i % 7 + 1 for i in range(50)]
    assert column_values(picked, "length") == [i % 7 + 1 for i in range(49, -1, -3)]
    assert column_values({"length": (3, 1)}, "length") == [3, 1]

    def refuse(*a, **kw):
        raise AssertionError("a row was formatted one at a time")

    monkeypatch.setattr(datasets.arrow_dataset.Column, "__iter__", refuse)
    batches = StepBatches(picked, lambda b: b, global_batch=4, micro=2, world=1, rank=0, seed=0, group_by_length=True)
    assert batches.lengths == column_values(picked, "length") and batches.per_epoch == 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the RSS high-water mark resets through /proc")
def test_the_logged_peak_memory_is_the_training_loops_not_the_tokenisings():
    """peak_mem_mb was the process's peak since start: a run whose first tokenisation peaked at 1,274 MiB logged
    that at every step while it trained in 743. The loop's Throughput resets it when training begins."""
    from scaletune import metrics

    blob = bytearray(400 * 2**20)
    blob[:: 2**12] = b"x" * len(blob[:: 2**12])  # touched: resident
    before = metrics.peak_memory_mb()
    del blob
    metrics.reset_peak_memory()
    assert metrics.peak_memory_mb() < before - 300


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux: VmHWM, reset through clear_refs")
def test_the_peak_memory_is_a_high_water_mark_and_the_loop_starts_it_afresh(monkeypatch):
    """peak_mem_mb is the highest the loop reached, not what is resident when it is logged (memory freed
    between two logs still counted); and the loop's Throughput is where it starts, not the process's start."""
    import torch

    from scaletune import metrics

    metrics.reset_peak_memory()
    low = metrics.peak_memory_mb()
    blob = bytearray(400 * 2**20)
    blob[:: 2**12] = b"x" * len(blob[:: 2**12])  # touched: resident
    del blob
    assert metrics.peak_memory_mb() > low + 300
    resets = []
    monkeypatch.setattr(metrics, "reset_peak_memory", lambda: resets.append(1))

    class Acc:
        device, num_processes = torch.device("cpu"), 1

    metrics.Throughput(Acc(), torch.nn.Linear(2, 2))
    assert resets == [1]


def test_each_flush_reports_its_own_interval(monkeypatch):
    """A log's tokens/s, target tokens/s and padding ratio are those of the steps since the previous log: a flush
    that kept its counts and clock would log running totals since training began."""
    from types import SimpleNamespace

    from scaletune import metrics

    clock = iter([100.0, 102.0, 102.0, 103.0, 103.0])  # start; flush at 102 (restarting the clock); flush at 103
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, reduce=lambda t, op: t)
    speed = metrics.Throughput(acc, torch.nn.Linear(2, 2))
    speed.count(pad_batch([{"input_ids": [1] * 2, "labels": 0}, {"input_ids": [1] * 6, "labels": 1}], 0))
    speed.add_step(2)
    first = speed.flush()
    speed.count(pad_batch([{"input_ids": [1] * 3, "labels": 0}], 0))
    speed.add_step(1)
    second = speed.flush()
    assert first["tokens_per_s"] == pytest.approx(8 / 2) and first["padding_ratio"] == pytest.approx(4 / 12)
    assert second["tokens_per_s"] == pytest.approx(3 / 1) and second["target_tokens_per_s"] == pytest.approx(1 / 1)
    assert second["padding_ratio"] == 0.0


def test_the_step_holding_the_longest_example_comes_first():
    """With length grouping, each epoch's first step holds its longest example: an out-of-memory shows at step 1,
    not hours in (the grouped order without that move puts it anywhere)."""
    import random

    rng = random.Random(3)
    lengths = [rng.randint(10, 500) for _ in range(256)]
    for epoch in range(3):
        order = epoch_order(lengths, 7, epoch, 16, True)
        assert max(lengths[i] for i in order[:16]) == max(lengths[i] for i in order), epoch
