"""Live throughput: tokens/s (all and target), padding ratio, peak memory and LoRA-aware MFU.

MFU counts the FLOPs a LoRA step really does, per token: 2N forward through the base (N = the
parameters that multiply: all of them but frozen embedding tables, which are looked up; an LM head
tied to the input embedding is a multiply and is counted), 2N backward for activation gradients only (frozen weights get no weight gradient),
6 N_trainable for the adapter (forward, activation and weight gradients), plus attention
12 * layers * hidden * L for a token in a sequence of L tokens (scores and weighted sum, forward and
backward), where L is the length of the example the token belongs to: a packed row's examples do not
attend to each other, so their attention is not work a row-long L would claim (a packed row's
trailing padding counts as one more, short, example). That is the whole L x L score matrix (the
PaLM/Megatron convention), about twice what a causal kernel computes. Divided by the device's dense
bf16 peak (table below, or SCALETUNE_PEAK_TFLOPS, which also reports it on a CPU or an unlisted GPU).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from .model import count_parameters
from .trainable_state import unwrap

# Dense (no 2:4 sparsity) bf16 tensor-core peaks, with the board's SM count. Looked up by the first key
# found in the device's name, so a variant goes before its family: the PCIe and NVL boards run lower
# clocks than SXM.
PEAK_BF16_TFLOPS = {"H100 PCIe": (756.0, 114), "H100 NVL": (835.0, 132), "H200 NVL": (835.0, 132),
                    "A100": (312.0, 108), "H100": (989.0, 132), "H200": (989.0, 132), "H800": (989.0, 132),
                    "L40S": (362.0, 142), "A10G": (125.0, 80), "RTX 4090": (165.0, 128)}


def device_peak_tflops() -> float | None:
    """The dense bf16 peak MFU is measured against: SCALETUNE_PEAK_TFLOPS, else the table's for this GPU
    (None where it is not listed). A MIG slice ("... MIG 3g.40gb") keeps the board's name but only some
    of its SMs, and gets that share of the board's peak."""
    if os.environ.get("SCALETUNE_PEAK_TFLOPS"):
        return float(os.environ["SCALETUNE_PEAK_TFLOPS"])
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    tflops, board_sms = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), (None, 0))
    if tflops is not None and "MIG" in name:
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        tflops *= min(1.0, sms / board_sms)
    return tflops


def step_flops(n_params: int, n_trainable: int, n_layers: int, hidden: int, tokens: float,
               sum_sq_lengths: float) -> float:
    """LoRA-aware FLOPs of training on `tokens` tokens whose examples' squared lengths sum to `sum_sq_lengths`."""
    return (4.0 * n_params + 6.0 * n_trainable) * tokens + 12.0 * n_layers * hidden * sum_sq_lengths


def lookup_parameters(model: Any) -> int:
    """Elements of the frozen embedding tables (token, position, token-type) that no matmul reads: a
    lookup costs no FLOPs. A table whose weight is also the LM head's (tied) is multiplied there and stays
    counted."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = getattr(head, "weight", None)
    return sum(getattr(m.weight, "ds_numel", None) or m.weight.numel() for m in model.modules()
               if isinstance(m, torch.nn.Embedding) and not m.weight.requires_grad and m.weight is not tied)


def reset_peak_memory() -> None:
    """From here on `peak_memory_mb` is the peak since now: the training loop's, not the first tokenisation's
    (Python records and Arrow pieces: a 200k-example run logged 1,274 MiB at every step while it trained in
    743). CUDA's allocator statistics; on Linux the process's RSS high-water mark (VmHWM, reset through
    /proc/self/clear_refs); elsewhere nothing can be reset and the peak stays the process's."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb() -> float:
    """Peak memory since `reset_peak_memory` (or the process's start), MiB: CUDA max allocated, else RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**10
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        import resource  # (POSIX only: none on Windows)
    except ImportError:
        return float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)  # (bytes on macOS, KiB on Linux)


class Throughput:
    """Accumulates token counts between log events; `flush` reduces them over ranks."""

    def __init__(self, accelerator: Any, model: Any):
        self.acc = accelerator
        base = unwrap(accelerator, model)
        conf = getattr(base, "config", None)
        self.n_trainable, n_params = count_parameters(base)
        self.n_params = n_params - lookup_parameters(base)
        self.layers = getattr(conf, "num_hidden_layers", 0) or 0
        self.hidden = getattr(conf, "hidden_size", 0) or 0
        self.peak = device_peak_tflops()
        reset_peak_memory()  # (the loop's peak from here: setup's, tokenising's, is not training's)
        self._reset()

    def _reset(self) -> None:
        self.tokens = self.positions = self.targets = self.sum_sq = 0
        self.start = time.perf_counter()

    def count(self, batch: dict) -> None:
        """Count a micro-batch (before it goes to the device: nothing here waits for the GPU)."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is not None:
            lengths = mask.sum(1)
        elif "cu_seq_lens" in batch:
            lengths = batch["cu_seq_lens"].diff()
        else:
            lengths = torch.full((ids.shape[0],), ids.shape[1])
        self.tokens += int(lengths.sum()) if mask is not None else int(batch.get("n_tokens", ids.numel()))
        self.sum_sq += int((lengths.long() ** 2).sum())
        self.positions += ids.numel()

    def add_step(self, n_targets_global: int) -> None:
        self.targets += n_targets_global

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave what runs inside (an eval, a checkpoint) out of the interval's time: tokens/s and MFU are
        the training's."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began

    def flush(self) -> dict:
        dt = max(time.perf_counter() - self.start, 1e-9)
        local = torch.tensor([self.tokens, self.positions, self.sum_sq], dtype=torch.float64, device=self.acc.device)
        tokens, positions, sum_sq = self.acc.reduce(local, "sum").tolist()
        out = {"tokens_per_s": tokens / dt, "target_tokens_per_s": self.targets / dt,
               "padding_ratio": 1.0 - tokens / max(positions, 1), "peak_mem_mb": peak_memory_mb()}
        if torch.cuda.is_available():
            # Times the caching allocator found no free block, emptied its cache (cudaFree: the GPU
            # drains) and tried again: memory pressure that costs speed before it costs an OOM.
            out["cuda_alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        if self.peak:
            flops = step_flops(self.n_params, self.n_trainable, self.layers, self.hidden, tokens, sum_sq)
            out["mfu"] = flops / dt / (self.peak * 1e12 * self.acc.num_processes)
        self._reset()
        return out
