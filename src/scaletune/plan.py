"""`scaletune plan`: per-rank memory estimate for a run config on N nodes x G devices, before launching.

The model is built from its config on the meta device (no weights are read), the run's peft adapter
is applied, and parameters are counted exactly. The model-state part of the estimate follows what
scaletune + DeepSpeed actually allocate (tests/test_plan.py checks it byte for byte on CPU):

* frozen base: model.dtype bytes/param (DeepSpeed bf16/fp16 casts every param to 16 bit); 4bit/8bit
  applies to Linear weights only, and peft's prepare_model_for_kbit_training upcasts the remaining
  16-bit params to fp32. ZeRO-3 keeps a ceil(n/world) partition of every param between steps; whole
  params gathered for forward/backward (incl. "persistent" ones) are counted as buffers.
* trainables: fp32 (scaletune upcasts them); under DeepSpeed bf16/fp16 they are 16-bit in the module
  plus an fp32 master partition. ZeRO-1/2 flatten each param group into a buffer padded to 2 x world.
* gradients: fp32; under ZeRO the fp32 partition gradient (1/world of the padded group).
* optimizer: AdamW's exp_avg + exp_avg_sq fp32 (+ a 4-byte step per param tensor, or per DeepSpeed group);
  the others as optimizers.state_bytes counts them (Adafactor factors only whole matrices: not ZeRO's
  flat partitions).

Activations, logits and buffers are approximations (documented at each function).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .config import CAUSAL_TASKS, RunConfig
from .errors import ConfigError
from .rules import cross_field_problems

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# what `plan` checks against when --gpu-memory is not given (an H100/A100-80GB); the verdict says so
ASSUMED_GPU_MEMORY = "80GiB"
CUDA_CONTEXT = GiB // 2  # CUDA context + cuBLAS/NCCL workspaces per process, typical for recent drivers
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 1024, "mib": 1024**2, "gib": GiB, "tib": 1024**4}


def parse_bytes(text: str, key: str = "--gpu-memory") -> int:
    """'80GiB', '24GB', '512MiB', '1.5TiB' -> bytes (GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ConfigError(f"{key}: cannot read {text!r} as a memory size (e.g. 80GiB, 24GB, 512MiB)")
    if float(m.group(1)) <= 0:
        raise ConfigError(f"{key}: {text!r} is no memory at all; give the device's size (e.g. 80GiB)")
    if not unit and float(m.group(1)) < 2**20:  # "80" is 80 bytes: surely 80GiB was meant
        raise ConfigError(f"{key}: {text!r} has no unit and would be {text.strip()} bytes; "
                          f"write e.g. {text.strip()}GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------------------------
# What the model looks like (exact counts from a meta-device build)


@dataclass
class ModelShape:
    """Exact parameter facts of base + adapter. They depend on the model, adapter and task only, never
    on what the suggestions change (ZeRO stage, offload, micro batch, checkpointing, dtype, quantization),
    so one shape serves every candidate; what does depend on those is decided in `estimate`."""

    frozen: list[tuple[int, bool, int]]  # (numel, is a quantizable Linear weight, out_features) per param
    groups: list[list[int]]  # numel of each trainable param, per optimizer param group
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    kv_dim: int
    heads: int = 1
    attention: str = "sdpa"  # the kernel the model gets when model.attn_implementation is not set
    chunkable_head: bool = False  # the chunked loss could stand in for this model's (see chunked_loss_applies)
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # each trainable param's, in `groups` order

    @property
    def trainable(self) -> int:
        return sum(map(sum, self.groups))

    @property
    def total_frozen(self) -> int:
        return sum(n for n, _, _ in self.frozen)


def _labels(cfg: RunConfig, task: Any) -> list[str] | None:
    """The label set (classification heads are sized by it): data.labels, else read from data.train."""
    if cfg.task in CAUSAL_TASKS:
        return None
    if cfg.data.labels:
        return [str(x) for x in cfg.data.labels]
    from .data.sources import describe, read_train_records

    records, _ = read_train_records(cfg.data.train, conll=cfg.data.format == "conll",  # (as training reads them)
                                    conll_columns=cfg.data.conll_columns, max_samples=cfg.data.max_samples)
    return task.setup(records, cfg, describe(cfg.data.train))


def build_meta_model(cfg: RunConfig) -> Any:
    """Base model from its config on the meta device (no weights read) with the run's peft adapter."""
    import torch

    from .model import DTYPES, apply_adapter, cast_trainables, trainable_dtype
    from .new_tokens import plan_rows
    from .seqlen import read_model_config
    from .tasks import get_task

    task = get_task(cfg.task)
    config = read_model_config(cfg, **task.model_kwargs(_labels(cfg, task)))
    with torch.device("meta"):
        model = task.auto_model_class().from_config(config, dtype=DTYPES[cfg.model.dtype],
                                                    trust_remote_code=cfg.model.trust_remote_code)
        new_ids = plan_rows(model, cfg)  # (model.new_special_tokens: the extra rows and their trained copies)
        model = apply_adapter(model, cfg, task, total_steps=1000, new_ids=new_ids)  # total_steps only sizes adalora
    return cast_trainables(model, trainable_dtype(cfg))  # as load_model does


def _optimizer_groups(cfg: RunConfig, model: Any) -> list[list[tuple[int, ...]]]:
    """Trainable shapes per param group, grouped exactly as train.build_optimizer groups them."""
    import torch

    from .train import build_optimizer

    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer="adamw"))
    opt: torch.optim.Optimizer = build_optimizer(plain, model)  # meta params: nothing allocated
    return [[tuple(p.shape) for p in g["params"]] for g in opt.param_groups]


def model_shape(cfg: RunConfig) -> ModelShape:
    """Count the meta model's parameters: frozen (with quantizable Linear weights marked) and trainable."""
    import torch

    model = build_meta_model(cfg)
    base = model.get_base_model()
    out_emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    # bitsandbytes leaves the output embedding (lm_head) unquantized.
    linear = {id(m.weight): m.out_features for m in base.modules()
              if isinstance(m, torch.nn.Linear) and m is not out_emb and not m.weight.requires_grad}
    frozen = [(p.numel(), id(p) in linear, linear.get(id(p), 0)) for p in model.parameters() if not p.requires_grad]
    c = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    hidden = int(getattr(c, "hidden_size", 0) or 0)
    heads = int(getattr(c, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(c, "num_key_value_heads", heads) or heads)
    layers = int(getattr(c, "num_hidden_layers", 1) or 1)
    chunkable = False
    if cfg.task == "causal_lm":
        from .tasks.chunked_ce import chunkable_head

        chunkable = chunkable_head(model)[0] is not None  # the rule training applies, on the meta model
    shapes = _optimizer_groups(cfg, model)
    return ModelShape(frozen=frozen, groups=[[math.prod(s) for s in g] for g in shapes], hidden=hidden, layers=layers,
                      intermediate=int(getattr(c, "intermediate_size", 4 * hidden) or 4 * hidden),
                      vocab=int(getattr(c, "vocab_size", 0) or 0),
                      kv_dim=hidden * kv_heads // heads, heads=heads, chunkable_head=chunkable,
                      attention=str(getattr(base.config, "_attn_implementation", None) or "sdpa"),
                      shapes=[s for g in shapes for s in g])


# ----------------------------------------------------------------------------------------------
# The estimate


@dataclass
class Estimate:
    """Per-rank bytes: `gpu` rows live on the device, `cpu` rows are offloaded to host memory."""

    gpu: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, int] = field(default_factory=dict)

    @property
    def model_states(self) -> dict[str, int]:
        keys = ("frozen", "trainable", "master", "grads", "optimizer")
        return {k: self.gpu.get(k, 0) + self.cpu.get(k, 0) for k in keys}

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def cpu_total(self) -> int:
        return sum(self.cpu.values())


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _param_dtype_bytes(cfg: RunConfig) -> int:
    """Bytes of an unquantized frozen param: DeepSpeed casts params to the 16-bit training dtype."""
    mp, stage = cfg.train.mixed_precision, cfg.distributed.zero_stage
    if stage > 0 and mp in ("bf16", "fp16"):
        return 2
    if cfg.model.quantization and cfg.model.dtype != "float32":
        return 4  # prepare_model_for_kbit_training upcasts the non-quantized 16-bit params to fp32
    return DTYPE_BYTES[cfg.model.dtype]


def _quantized_bytes(numel: int, out_features: int, mode: str) -> int:
    """NF4 + double quant: 0.5 B/param + uint8 absmax per 64 + fp32 absmax per 256 blocks; int8: + fp32 row scale."""
    if mode == "4bit":
        blocks = math.ceil(numel / 64)
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * 256
    return numel + 4 * out_features


def frozen_bytes(cfg: RunConfig, shape: ModelShape, world: int, persist: int) -> tuple[int, int]:
    """(device, offloaded) bytes of the frozen base on one rank."""
    b, q, stage = _param_dtype_bytes(cfg), cfg.model.quantization, cfg.distributed.zero_stage
    on_cpu = stage == 3 and cfg.distributed.offload in ("params", "all")
    dev = host = 0
    for numel, is_linear, out_f in shape.frozen:
        if q and is_linear:
            qbytes = _quantized_bytes(numel, out_f, q)
            # quant_storage = compute dtype lets ZeRO-3 shard the packed 4-bit weights like any param.
            dev += qbytes if stage < 3 else math.ceil(qbytes / world)
            continue
        if stage < 3:
            dev += numel * b
            continue
        part = math.ceil(numel / world) * b
        # Only the partition is held between steps (measured); "persistent" params (numel <= 10 x hidden)
        # are whole during forward/backward and counted with the gathered params in buffer_bytes.
        if on_cpu and numel > persist:
            host += part
        else:
            dev += part
    return dev, host


def _trainable_dtype_bytes(cfg: RunConfig) -> int:
    if cfg.distributed.zero_stage > 0 and cfg.train.mixed_precision in ("bf16", "fp16"):
        return 2  # DeepSpeed casts the module to 16 bit; the fp32 copy is its master partition
    return 4


def _partition_numels(cfg: RunConfig, shape: ModelShape, world: int) -> list[int]:
    """Per optimizer group: numel of this rank's flat partition (what the fp32 master / Adam hold)."""
    if cfg.distributed.zero_stage == 3:
        return [sum(math.ceil(n / world) for n in g) for g in shape.groups]
    return [_ceil_to(sum(g), 2 * world) // world for g in shape.groups]


def _optimizer_bytes(cfg: RunConfig, shapes: list[tuple[int, ...]]) -> int:
    """State bytes of train.optimizer for tensors of these shapes (see optimizers.state_bytes)."""
    from .optimizers import state_bytes

    return state_bytes(cfg.train.optimizer, shapes)


def model_state_bytes(cfg: RunConfig, shape: ModelShape, world: int) -> Estimate:
    """Exact per-rank bytes of params, fp32 master, gradients and optimizer states."""
    est = Estimate()
    stage, off = cfg.distributed.zero_stage, cfg.distributed.offload
    persist = 10 * shape.hidden  # accelerate's "auto" stage3_param_persistence_threshold
    est.gpu["frozen"], est.cpu["frozen"] = frozen_bytes(cfg, shape, world, persist)
    tb = _trainable_dtype_bytes(cfg)
    if stage == 0:
        params = [n for g in shape.groups for n in g]
        est.gpu["trainable"] = 4 * sum(params)
        est.gpu["grads"] = 4 * sum(params)
        est.gpu["optimizer"] = _optimizer_bytes(cfg, shape.shapes or [(n,) for n in params])
        return est
    parts = _partition_numels(cfg, shape, world)
    if stage == 3:
        module = sum(tb * math.ceil(n / world) for g in shape.groups for n in g)
    else:
        module = tb * sum(_ceil_to(sum(g), 2 * world) for g in shape.groups)
    # DeepSpeed keeps a separate fp32 master even for fp32 params (measured on CPU; on GPU it may reuse
    # an fp32 partition, so this can over-count by one partition there).
    states = {"master": 4 * sum(parts), "grads": 4 * sum(parts), "optimizer": _optimizer_bytes(cfg, [(n,) for n in parts])}
    where = est.cpu if off in ("optimizer", "all") else est.gpu
    where.update(states)
    (est.cpu if stage == 3 and off in ("params", "all") else est.gpu)["trainable"] = module
    return est


def chunked_loss_applies(cfg: RunConfig, shape: ModelShape) -> bool:
    """Whether training computes this run's loss a chunk at a time (train.chunked_loss): not under ZeRO-3,
    which partitions the LM head the chunks multiply by."""
    return (cfg.task == "causal_lm" and cfg.train.chunked_loss and cfg.distributed.zero_stage != 3
            and shape.chunkable_head)


def activation_bytes(cfg: RunConfig, shape: ModelShape, micro: int, cuda: bool = True) -> dict[str, int]:
    """Approximate peak activation memory of one micro-batch of `micro` examples at data.max_length tokens per
    row: the forward with gradient (`_grad_pass_bytes`) of one row an example, dpo's and reward's two (its chosen and its
    rejected answer; the reference's forward, under no_grad over the same rows, saves nothing and needs less).
    kto's forward with gradient is one row an example, but its reference's, under no_grad, runs on twice the
    rows (each example and its mismatched row): the larger of the two is the peak (`_kto_bytes`)."""
    if cfg.task == "kto":
        return _kto_bytes(cfg, shape, micro, cuda)
    return _grad_pass_bytes(cfg, shape, micro * (2 if cfg.task in ("dpo", "reward") else 1), cuda)


def _kto_bytes(cfg: RunConfig, shape: ModelShape, micro: int, cuda: bool) -> dict[str, int]:
    """kto's three forwards a micro-batch, one at a time: the reference (adapter off) over its 2 x `micro` rows,
    the policy's KL estimate over the `micro` mismatched ones, both under no_grad, then the policy's with
    gradient over the `micro` examples. The no_grad forwards keep nothing but a log-probability a row, so the
    peak is the larger of the reference's working set and the gradient pass (`micro` rows, as causal_lm's)."""
    grad = _grad_pass_bytes(cfg, shape, micro, cuda)
    reference = _no_grad_pass_bytes(cfg, shape, 2 * micro)
    return grad if sum(grad.values()) >= sum(reference.values()) else reference


def _activation_bytes_per_elem(cfg: RunConfig) -> int:
    """Bytes of an activation: 2 under 16-bit autocast or a quantized base, else the base dtype's."""
    autocast16 = cfg.train.mixed_precision in ("bf16", "fp16")
    return 2 if autocast16 or cfg.model.quantization else DTYPE_BYTES[cfg.model.dtype]


def _layer_bytes(cfg: RunConfig, shape: ModelShape, tokens: int) -> int:
    """What one layer saves for backward over `tokens` tokens (see `_grad_pass_bytes`)."""
    a = _activation_bytes_per_elem(cfg)
    h, i = shape.hidden, shape.intermediate
    compiled = cfg.train.torch_compile
    # + RMSNorm computes in float32: in 16-bit runs each norm keeps a float32 copy of its input (eager)
    return tokens * (a * (6 * h + 2 * shape.kv_dim + (3 if compiled else 4) * i)
                     + (0 if compiled else 2 * (4 - a) * h)) + _attention_scores_bytes(cfg, shape, tokens)


def _attention_scores_bytes(cfg: RunConfig, shape: ModelShape, tokens: int) -> int:
    """What eager attention saves per layer: its (heads x max_length x max_length) probabilities a row, in float32
    (softmax's output) plus their cast to the activation dtype (the matmul with v) in 16-bit runs. SDPA and the
    flash / varlen kernels keep no score matrix. Measured on CPU (28M Llama, 8 heads, 4 layers): float32 at
    2048 tokens, the peak rose by 529 MiB with eager (512 MiB counted); bf16, 4 x 512, by 200 MiB (192)."""
    if (cfg.model.attn_implementation or shape.attention) != "eager":
        return 0
    a = _activation_bytes_per_elem(cfg)
    return tokens * cfg.data.max_length * shape.heads * (4 + (0 if a == 4 else a))


def _no_grad_pass_bytes(cfg: RunConfig, shape: ModelShape, rows: int) -> dict[str, int]:
    """Peak of a forward under no_grad over `rows` rows that ends in their answers' log-probabilities: one layer's
    tensors at a time (at most what a layer saves for backward) beside the hidden states, then the logits, their
    float32 copy and cross-entropy's float32 log-softmax (no gradient: nothing more): counted together, a bound."""
    tokens = rows * cfg.data.max_length
    a = _activation_bytes_per_elem(cfg)
    return {"activations": _layer_bytes(cfg, shape, tokens) + tokens * a * shape.hidden,
            "logits": tokens * shape.vocab * (4 + 4 + (0 if a == 4 else a))}


def _grad_pass_bytes(cfg: RunConfig, shape: ModelShape, rows: int, cuda: bool = True) -> dict[str, int]:
    """Approximate peak activation memory of a forward with gradient over `rows` rows of data.max_length tokens.

    Per token and layer a Llama-style block with SDPA saves ~ (6 x hidden + 2 x kv + 4 x intermediate)
    values for backward: both norms' inputs and outputs, q (after rotary), k and v, the attention
    output, and SwiGLU's gate, up, activation and product (measured with saved_tensors_hooks; the
    inputs of LoRA-adapted modules are those same tensors, and LoRA's rank-r intermediates are
    negligible). With gradient checkpointing only each layer's input is kept, plus one layer recomputed
    at a time. Logits at the peak (start of backward): the float32 log-softmax the loss saves and its
    gradient, plus the logits (half-precision ones and their float32 copy when the model is not float32).
    Eager attention adds its score matrices (`_attention_scores_bytes`); SDPA / flash / varlen keep none.
    In 16-bit runs each RMSNorm also keeps the float32 copy of its input it computes in; float32
    weights under 16-bit autocast add the 16-bit copies of the frozen Linear weights (and head) that
    the backward pass needs (measured with saved_tensors_hooks, CPU bf16 autocast).
    With train.chunked_loss only one chunk's logits exist (head output, its float32 copy and the
    float32 log-softmax), plus the gathered hidden states and their gradient.
    Under train.torch_compile the compiled blocks' partitioner recomputes cheap elementwise work in
    backward instead of saving it: SwiGLU's activation output and the norms' float32 copies are not
    kept (measured: 110M Llama, bf16, CPU: 7.0 KB less per token and layer, 7.2 KB predicted; H100,
    bf16, varlen, 8 x 2048 tokens on 1B / 6 x 2048 on 8B: the estimate is 5% / 2% below the measured
    max_memory_allocated, where the eager formula was 22% above it).
    """
    tokens = rows * cfg.data.max_length
    autocast16 = cfg.train.mixed_precision in ("bf16", "fp16")
    a = _activation_bytes_per_elem(cfg)
    h = shape.hidden
    per_layer = _layer_bytes(cfg, shape, tokens)
    if cfg.model.gradient_checkpointing:
        layers = tokens * a * h * shape.layers + per_layer
        # eager attention's backward of the recomputed layer: the scores' gradients beside its saved scores
        # (measured: float32, 2048 tokens, checkpointed: 216 MiB above SDPA's peak for 128 MiB of saved scores)
        layers += _attention_scores_bytes(cfg, shape, tokens)
    else:
        layers = per_layer * shape.layers
    out = {"activations": layers}
    if chunked_loss_applies(cfg, shape):
        from .tasks.chunked_ce import chunk_rows

        chunk = min(tokens, chunk_rows(shape.vocab, cuda))
        out["logits"] = chunk * shape.vocab * (4 + 4 + (0 if a == 4 else a)) + 2 * tokens * h * a
    elif cfg.task in CAUSAL_TASKS:
        # float32 logits are their own float32 copy, but still alive beside the log-softmax and its gradient
        # (loss_sum hands them back): 12 bytes (measured on CPU, 28M Llama, 2048 tokens: 11.8; 8 were counted)
        out["logits"] = tokens * shape.vocab * (4 + 4 + (4 if a == 4 else a + 4))
    if autocast16 and _param_dtype_bytes(cfg) == 4 and not cfg.model.quantization:
        # float32 weights under 16-bit autocast: every frozen Linear's 16-bit cast is saved for the
        # backward pass (autocast caches casts of trainable leaves only), as is the LM head's
        # (one layer's at a time under gradient checkpointing, which saves only each layer's input)
        head = shape.vocab * h if cfg.task in CAUSAL_TASKS else 0
        linear = sum(n for n, is_linear, _ in shape.frozen if is_linear)
        out["autocast_weight_copies"] = 2 * ((linear // shape.layers if cfg.model.gradient_checkpointing
                                              else linear) + head)
    return out


def buffer_bytes(cfg: RunConfig, shape: ModelShape, world: int, cuda: bool) -> int:
    """Communication / temporary buffers (approximate), from the shipped DeepSpeed config defaults."""
    stage, trainable, b = cfg.distributed.zero_stage, shape.trainable, _trainable_dtype_bytes(cfg)
    bucket = shape.hidden**2  # accelerate fills "auto" reduce_bucket_size with hidden^2
    out = CUDA_CONTEXT if cuda else 0
    if stage == 0 and world > 1:
        out += 4 * trainable  # DDP gradient buckets: a second copy of the trainable grads
    elif stage in (1, 2):
        out += b * min(bucket, trainable) + b * min(200_000_000, trainable)  # reduce + all-gather buckets
    elif stage == 3:
        sizes = [n for n, _, _ in shape.frozen] + [n for g in shape.groups for n in g]
        persistent = sum(n for n in sizes if n <= 10 * shape.hidden)
        # prefetch bucket (0.9 hidden^2) + the largest gathered param + whole persistent params + reduce bucket
        out += _param_dtype_bytes(cfg) * (int(0.9 * bucket) + max(sizes, default=0) + persistent)
        out += b * min(bucket, trainable)
    return out


def estimate(cfg: RunConfig, shape: ModelShape, world: int, cuda: bool = True) -> Estimate:
    """Everything one rank holds: model states + activations + buffers."""
    est = model_state_bytes(cfg, shape, world)
    est.gpu.update(activation_bytes(cfg, shape, cfg.train.micro_batch_size, cuda))
    est.gpu["buffers"] = buffer_bytes(cfg, shape, world, cuda)
    return est


@dataclass
class Budget:
    """What a rank may use: `device` bytes, and its node's `host` bytes (None: not checked), which the
    node's `ranks_per_node` ranks all offload into."""

    device: int
    host: int | None = None
    ranks_per_node: int = 1

    def host_need(self, est: Estimate) -> int:
        return est.cpu_total * self.ranks_per_node

    def host_short(self, est: Estimate) -> bool:
        return self.host is not None and self.host_need(est) > self.host

    def shortfalls(self, est: Estimate) -> list[str]:
        """What does not fit, in words for the verdict; empty if everything does."""
        out = []
        if est.gpu_total > self.device:
            out.append(f"needs {fmt_bytes(est.gpu_total)} per device, has {fmt_bytes(self.device)}")
        if self.host_short(est):
            out.append(f"host memory for offload: needs {fmt_bytes(self.host_need(est))} per node, "
                       f"has {fmt_bytes(self.host)}")
        return out


# ----------------------------------------------------------------------------------------------
# Report


ROW_NAMES = {"frozen": "frozen base weights", "trainable": "trainable params (module copy)",
             "master": "fp32 master params", "grads": "gradients", "optimizer": "optimizer states",
             "activations": "activations (approx.)", "logits": "logits + fp32 loss (approx.)",
             "autocast_weight_copies": "16-bit weight casts kept for backward",
             "buffers": "comm/temp buffers + CUDA ctx (approx.)"}


def render(est: Estimate, limit: int, title: str) -> str:
    """Plain-text table of the per-rank breakdown (device and offloaded columns)."""
    lines = [title, f"  {'component':<40}{'device':>14}{'host (offload)':>16}"]
    for key, name in ROW_NAMES.items():
        dev, host = est.gpu.get(key, 0), est.cpu.get(key, 0)
        if dev or host:
            lines.append(f"  {name:<40}{fmt_bytes(dev):>14}{fmt_bytes(host) if host else '-':>16}")
    lines.append(f"  {'total per rank':<40}{fmt_bytes(est.gpu_total):>14}"
                 f"{fmt_bytes(est.cpu_total) if est.cpu_total else '-':>16}")
    lines.append(f"  {'device memory':<40}{fmt_bytes(limit):>14}")
    return "\n".join(lines)


def gpu_memory(given: str | None) -> tuple[int, str]:
    """(bytes per device, note for the verdict line): --gpu-memory as given, else ASSUMED_GPU_MEMORY with a
    note saying it was assumed, so "FITS" is not read as applying to a smaller card."""
    if given is not None:
        return parse_bytes(given), ""
    return parse_bytes(ASSUMED_GPU_MEMORY), f" (assumed: --gpu-memory {ASSUMED_GPU_MEMORY}; pass your device's)"


def training_max_length(cfg: RunConfig) -> RunConfig:
    """`cfg` with data.max_length lowered as training lowers it (seqlen.effective_max_length), saying so."""
    from .model import read_tokenizer
    from .seqlen import effective_max_length, read_model_config

    try:
        tokenizer = read_tokenizer(cfg, cfg.model.name_or_path)
    except ConfigError:
        tokenizer = None  # a config.json-only directory: only the model's position table is known
    length, notes = effective_max_length(cfg, tokenizer, read_model_config(cfg))
    for note in notes:
        print(f"note: {note}")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=length))


def main_plan(args: Any, cfg: RunConfig) -> int:
    """`scaletune plan`: 0 = fits, 1 = does not fit (a suggestion is printed); invalid -> ConfigError."""
    from .data.sources import missing_files
    from .plan_search import suggest

    nodes, gpus = int(args.nodes), int(args.gpus_per_node)
    if nodes < 1 or gpus < 0:
        raise ConfigError(f"--nodes must be >= 1 and --gpus-per-node >= 0 (got {nodes}, {gpus})")
    cuda = gpus > 0
    world = nodes * gpus if cuda else nodes
    limit, assumed = gpu_memory(args.gpu_memory)
    host_limit = parse_bytes(args.cpu_memory, "--cpu-memory") if getattr(args, "cpu_memory", None) else None
    budget = Budget(limit, host_limit, max(1, gpus))
    problems = cross_field_problems(cfg, world_size=world, has_cuda=cuda)
    if problems:
        raise ConfigError(problems, title=f"this run cannot run on {nodes} node(s) x {gpus} GPU(s)")
    for line in missing_files(cfg.data):  # (said first: a fitting verdict is no go-ahead without the data)
        print(f"warning: {line}")
    cfg = training_max_length(cfg)
    shape = model_shape(cfg)
    est = estimate(cfg, shape, world, cuda)
    print(f"{cfg.model.name_or_path}: {shape.total_frozen:,} frozen + {shape.trainable:,} trainable params "
          f"({100 * shape.trainable / max(1, shape.total_frozen + shape.trainable):.3f}%)")
    print(render(est, limit, f"per-rank memory, world size {world}, ZeRO-{cfg.distributed.zero_stage}, "
                             f"micro batch {cfg.train.micro_batch_size} x {cfg.data.max_length} tokens"))
    if host_limit is not None and est.cpu_total:
        print(f"  host memory for offload: {fmt_bytes(budget.host_need(est))} of {fmt_bytes(host_limit)} per node")
    short = budget.shortfalls(est)
    if not short:
        print(f"verdict: FITS ({fmt_bytes(limit - est.gpu_total)} headroom per device){assumed}")
        return 0
    if est.gpu_total <= limit:  # only the host falls short: the device is not what to change
        short.append(f"the device part fits, {fmt_bytes(est.gpu_total)} of {fmt_bytes(limit)}")
    print(f"verdict: DOES NOT FIT ({'; '.join(short)}){assumed}")
    found = suggest(cfg, shape, world, budget, cuda)
    if found is None:
        more = " or more host memory" if budget.host_short(est) else ""
        print("suggestion: nothing in the search (checkpointing, micro batch, ZeRO, offload more or less, 4-bit) "
              f"fits; use more or larger devices{more}")
        return 1
    text, fit = found
    host = (f", {fmt_bytes(budget.host_need(fit))} host memory per node"
            if host_limit is not None and fit.cpu_total else "")
    print(f"suggestion: {text} -> {fmt_bytes(fit.gpu_total)} per device{host}")
    return 1
