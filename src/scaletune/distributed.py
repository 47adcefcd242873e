"""Scale-out glue: Accelerator arguments and DeepSpeed configs (trainable state across world sizes
lives in trainable_state.py).

* `accelerator_kwargs` turns the run config's `distributed:` and `train:` sections into the keyword
  arguments of `accelerate.Accelerator`, including a fully resolved DeepSpeed config (no "auto" left
  that accelerate would fill with its own defaults, e.g. gradient clipping 1.0 regardless of the run).
* `deepspeed_config_name` / `deepspeed_config_path` pick the packaged ZeRO configs that `scaletune launch`
  and the Slurm templates use.
* `main_process_first` and `peer_failure` keep a failure on one rank a one-screen error on all of them.

Importing this module is cheap: torch/accelerate/deepspeed are imported inside the functions, so the
CLI can validate configs without paying for them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from . import errors
from .errors import ConfigError

#: Name of the packaged folder holding the canonical DeepSpeed JSON files.
_DS_RESOURCE_PACKAGE = "scaletune.resources.deepspeed"


# ----------------------------------------------------------------------------------------------
# Environment helpers


LAUNCHER_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")  # torchrun/accelerate, MPI


def launched() -> bool:
    """Whether a launcher started this process (and so set up what torch.distributed needs)."""
    return any(var in os.environ for var in LAUNCHER_WORLD_VARS)


def world_size_from_env() -> int:
    """World size as set by the launcher (torchrun/accelerate/deepspeed), 1 when not launched.

    Known before the Accelerator exists, which is what the DeepSpeed batch arithmetic needs.
    """
    for var in LAUNCHER_WORLD_VARS:
        value = os.environ.get(var)
        if value and value.isdigit():
            return max(1, int(value))
    return 1


def cuda_available() -> bool:
    """True when torch sees a CUDA device (imports torch lazily)."""
    import torch

    return torch.cuda.is_available()


def launched_with_deepspeed() -> bool:
    """True when `accelerate launch` was told to use DeepSpeed (flag or config file)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def launched_zero_stage() -> tuple[int | None, str]:
    """The ZeRO stage `accelerate launch` started DeepSpeed with (its DeepSpeed JSON's, or its --zero_stage)
    and where that came from; (None, "") without DeepSpeed or where the launch does not say."""
    if not launched_with_deepspeed():
        return None, ""
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and config_file != "none":
        stage, source = load_deepspeed_json(config_file).get("zero_optimization", {}).get("stage"), config_file
    else:
        stage, source = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"), "accelerate's --zero_stage"
    try:
        return int(stage), source
    except (TypeError, ValueError):
        return None, ""


# ----------------------------------------------------------------------------------------------
# Failures on one rank


@contextlib.contextmanager
def main_process_first(accelerator: Any) -> Iterator[None]:
    """`accelerator.main_process_first()`, except that an error of the main process reaches the others.

    The other ranks wait in a collective while the main process runs the block; with accelerate's
    version, a UserError there (e.g. no usable training example) kills the main process and each other
    rank dies in the barrier with a "Connection closed by peer" traceback (gloo) or hangs until
    torchrun stops it (NCCL). Here the main process broadcasts the outcome instead of only waiting:
    the others raise the same UserError (marked `relayed_from = 0`, see cli._render_error), or, for any other
    exception, one saying that rank 0 failed.
    """
    if accelerator is None or accelerator.num_processes == 1:
        yield
        return
    import torch.distributed as dist

    group = _patient_group()
    if accelerator.is_main_process:
        try:
            yield
        except Exception as exc:
            with contextlib.suppress(Exception):  # a peer gone as well must not replace this error
                _broadcast_outcome(_error_payload(exc), group)
            raise
        _broadcast_outcome(None, group)
    else:
        payload = _broadcast_outcome(None, group)  # receives the main process's outcome
        if payload is not None:
            raise _error_from_payload(payload)
        yield
    # the other ranks' turn may be long too (another node without the shared cache tokenises again):
    # the main process waits for it here, not in the next collective, which would time out
    dist.barrier(group=group)


_PATIENT: dict = {}  # the process group it was made in -> the patient group


def _patient_group() -> Any:
    """A gloo group of every rank whose collectives wait as long as the work on the other side takes (up
    to a week): the wait for rank 0 to tokenise a large file would otherwise end in the process group's
    timeout (distributed.timeout_s). A rank that dies still ends the wait: gloo sees its connection close,
    and the launcher stops the others."""
    import torch.distributed as dist

    world = dist.group.WORLD
    if world not in _PATIENT:
        _PATIENT.clear()
        _PATIENT[world] = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    return _PATIENT[world]


def _broadcast_outcome(payload: tuple | None, group: Any) -> tuple | None:
    """Send (rank 0) or receive (the others) rank 0's outcome; a collective, so it also synchronises."""
    import torch.distributed as dist

    box = [payload]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _error_payload(exc: Exception) -> tuple:
    """Plain data for an exception: always picklable, whatever else the exception object holds."""
    if isinstance(exc, errors.UserError):
        return type(exc).__name__, exc.problems, exc.title, exc.hint
    first_line = next(iter(str(exc).splitlines()), "")[:200]
    return "", [f"rank 0 failed: {type(exc).__name__}: {first_line}"], None, "rank 0's traceback says where"


def _error_from_payload(payload: tuple) -> errors.UserError:
    name, problems, title, hint = payload
    cls = getattr(errors, name, None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, errors.UserError)):
        cls = errors.UserError
    exc = cls(problems, title=title, hint=hint)
    exc.relayed_from = 0  # type: ignore[attr-defined] - cli._render_error prints it once, on rank 0
    return exc


# What only concerns one process or node, left out when the ranks' configs are compared: its data workers and
# cache, its memory, its trackers, and the paths (each node reads them through its own mounts, where the same
# file may be written otherwise)
_PER_NODE = ("output_dir", "data.num_workers", "data.num_proc", "data.cache", "train.release_cpu_memory",
             "train.report_to")


def refuse_differing_configs(accelerator: Any, given: dict) -> None:
    """Every rank trains with one run config. Each node's launcher reads its own file and overrides: a node
    given another learning rate trained with it silently (run.json records rank 0's), another max_steps
    ended in a collective mismatch. All ranks raise the same ConfigError, naming the keys that differ."""
    if accelerator.num_processes < 2:
        return
    import torch.distributed as dist

    from .identity import PATH_KEYS

    skip = {*_PER_NODE, *(f"{section}.{key}" for section, key in PATH_KEYS)}

    def flat(d: dict, prefix: str = "") -> dict:
        out: dict = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    mine = {k: v for k, v in flat(json.loads(json.dumps(given, default=str))).items() if k not in skip}
    every: list = [None] * accelerator.num_processes
    dist.all_gather_object(every, mine)
    for rank, theirs in enumerate(every):
        keys = sorted(k for k in set(theirs) | set(every[0]) if theirs.get(k) != every[0].get(k))
        if keys:
            exc = errors.ConfigError(
                [f"{k}: {json.dumps(every[0].get(k))} on rank 0, {json.dumps(theirs.get(k))} on rank {rank}"
                 for k in keys],
                title=f"the ranks were given different run configs (rank {rank} differs from rank 0)",
                hint="give every node the same config file and the same key=value overrides")
            if accelerator.process_index:  # (the same error on every rank: printed in full once per node)
                exc.relayed_from = 0  # type: ignore[attr-defined]
            raise exc


#: What a collective raises on a rank whose peer exited (gloo, NCCL).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited",
             "NCCL communicator was aborted")


#: What a collective raises when another rank did not answer within distributed.timeout_s (gloo, NCCL).
PEER_TIMEOUT = ("Timed out waiting", "collective operation timeout")


def peer_failure(exc: BaseException) -> str | None:
    """The reason, when `exc` is a launched rank's collective failing because another rank exited; else None.

    A rank that fails with its own error cannot tell the others; they learn it from the broken
    connection, and their traceback would bury the real error printed above it.
    """
    if not launched() or world_size_from_env() < 2 or not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    return next((sign for sign in (*PEER_GONE, *PEER_TIMEOUT) if sign in text), None)


def process_group_backend(cfg: Any) -> str:
    """The torch.distributed backend for this run: the configured one, else nccl on CUDA, else gloo."""
    backend = getattr(cfg.distributed, "backend", None)
    if backend:
        return str(backend)
    return "nccl" if cuda_available() else "gloo"


# ----------------------------------------------------------------------------------------------
# DeepSpeed config files


def deepspeed_config_name(zero_stage: int, offload: str = "none") -> str | None:
    """File name of the shipped DeepSpeed JSON that best matches (stage, offload); None for stage 0.

    The offload details are re-applied exactly by `build_deepspeed_config`, so e.g. stage 3 with
    `offload: optimizer` starts from zero3.json and only adds optimizer offload.
    """
    if zero_stage == 0:
        return None
    if zero_stage == 1:
        return "zero1.json"
    if zero_stage == 2:
        return "zero2.json" if offload == "none" else "zero2_offload.json"
    if zero_stage == 3:
        return "zero3_offload.json" if offload == "all" else "zero3.json"
    raise ValueError(f"distributed.zero_stage must be 0-3, got {zero_stage!r}")


def deepspeed_config_path(name: str) -> Path:
    """Filesystem path of a packaged DeepSpeed JSON (src/scaletune/resources/deepspeed/<name>).

    Uses importlib.resources so it works from an installed wheel, not only from the repo checkout.
    `accelerate launch --deepspeed_config_file` needs a real path, and for a regular (non-zip)
    install `files()` is one.
    """
    path = resources.files(_DS_RESOURCE_PACKAGE).joinpath(name)
    return Path(str(path))


def load_deepspeed_json(name_or_path: str | os.PathLike) -> dict:
    """Read a DeepSpeed JSON: a packaged name ("zero3.json") or any filesystem path. A missing or
    malformed file is a ConfigError naming it (and the line, for bad JSON)."""
    text = str(name_or_path)
    if os.sep not in text and "/" not in text and not Path(text).is_file():
        return json.loads(resources.files(_DS_RESOURCE_PACKAGE).joinpath(text).read_text(encoding="utf-8"))
    path = Path(text)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        where = "" if path.is_absolute() else f" (relative to the current directory {Path.cwd()})"
        raise ConfigError(f"DeepSpeed config {text}{where}: {exc.strerror or exc}",
                          hint="the launch/*.yaml files name paths relative to the repository root: run "
                               "`accelerate launch` from there, or use `scaletune launch`") from None
    except ValueError as exc:
        line = f", line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ConfigError(f"DeepSpeed config {text}{line}: not valid JSON ({exc})") from None


def _is_packaged_config(path: str | os.PathLike) -> bool:
    """True when `path` is one of the shipped JSONs (packaged copy or the repo's configs/deepspeed/)."""
    p = Path(path)
    if p.name not in {f"zero{n}.json" for n in ("1", "2", "3", "2_offload", "3_offload")}:
        return False
    try:
        packaged = load_deepspeed_json(p.name)
        return json.loads(p.read_text(encoding="utf-8")) == packaged
    except (OSError, ValueError):
        return False


def _apply_offload(ds: dict, offload: str) -> None:
    """Make the ZeRO offload sections say exactly what `distributed.offload` says."""
    zero = ds.setdefault("zero_optimization", {})
    want_opt = offload in ("optimizer", "all")
    want_param = offload in ("params", "all")
    if want_opt:
        zero["offload_optimizer"] = {**zero.get("offload_optimizer", {}), "device": "cpu"}
        zero["offload_optimizer"].setdefault("pin_memory", True)
        # The trainer hands DeepSpeed a torch AdamW; without this DeepSpeed refuses anything but its
        # compiled DeepSpeedCPUAdam when the optimizer is offloaded.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    else:
        zero.pop("offload_optimizer", None)
    if want_param:
        zero["offload_param"] = {**zero.get("offload_param", {}), "device": "cpu"}
        zero["offload_param"].setdefault("pin_memory", True)
    else:
        zero.pop("offload_param", None)


def _fill_auto(node: dict, key: str, value: Any) -> None:
    """Replace node[key] only when it is "auto" (or absent)."""
    if node.get(key, "auto") == "auto":
        node[key] = value


def resolve_deepspeed_config(ds: dict, cfg: Any, grad_accum_steps: int, world_size: int | None = None,
                             source: str = "the DeepSpeed config") -> dict:
    """Fill every batch/precision/clipping "auto" of a DeepSpeed config from the run config.

    Accelerate would otherwise fill them itself: micro batch from a prepared dataloader (fails when
    the model is prepared alone), clipping always 1.0, and train_batch_size from its own view of the
    world size. Doing it here keeps DeepSpeed's arithmetic identical to scaletune's
    (global = micro x grad_accum x world). A value a user's JSON gives that differs from the run
    config's is refused (ConfigError naming both): DeepSpeed would step at other boundaries, clip or
    compute otherwise than the run config says, with nothing to tell.
    """
    ds = copy.deepcopy(ds)
    t = cfg.train
    world = world_size if world_size is not None else world_size_from_env()
    micro = int(t.micro_batch_size)
    mp = getattr(t, "mixed_precision", "no")
    wanted = [  # (JSON section, the key's dotted name, its value by the run config, the run config's key)
        (ds, "train_micro_batch_size_per_gpu", micro, "train.micro_batch_size"),
        (ds, "gradient_accumulation_steps", int(grad_accum_steps),
         "train.global_batch_size / (micro_batch_size x world size)"),
        (ds, "train_batch_size", micro * int(grad_accum_steps) * world, "train.global_batch_size"),
        # DeepSpeed treats 0.0 as "no clipping"; max_grad_norm: null means the same in scaletune.
        (ds, "gradient_clipping", float(t.max_grad_norm) if t.max_grad_norm is not None else 0.0,
         "train.max_grad_norm"),
        *((ds.setdefault(dtype, {}), f"{dtype}.enabled", mp == dtype, f"train.mixed_precision {mp}")
          for dtype in ("bf16", "fp16")),
    ]
    problems = []
    for node, name, value, ours in wanted:
        key = name.rpartition(".")[2]
        given = node.get(key, "auto")
        if isinstance(value, bool) and isinstance(given, str) and given.lower() in ("true", "false"):
            given = given.lower() == "true"  # (accelerate reads "true"/"false" strings as booleans)
        if given != "auto" and given != value:
            problems.append(f"{source}: {name} is {given!r}, the run config makes it {value!r} ({ours}); set it "
                            '"auto" to follow the run config, or change the run config')
        _fill_auto(node, key, value)
    if problems:
        raise ConfigError(problems, title=f"{source} disagrees with the run config")
    return ds


def build_deepspeed_config(cfg: Any, grad_accum_steps: int, world_size: int | None = None) -> dict:
    """The resolved DeepSpeed config dict for `cfg` (shipped JSON for the stage + offload + cfg values)."""
    dist = cfg.distributed
    name = deepspeed_config_name(int(dist.zero_stage), str(dist.offload))
    if name is None:
        raise ValueError("build_deepspeed_config: distributed.zero_stage is 0 (no DeepSpeed)")
    ds = load_deepspeed_json(name)
    ds["zero_optimization"]["stage"] = int(dist.zero_stage)
    _apply_offload(ds, str(dist.offload))
    return resolve_deepspeed_config(ds, cfg, grad_accum_steps, world_size)


# ----------------------------------------------------------------------------------------------
# Accelerator arguments


def accelerator_kwargs(cfg: Any, grad_accum_steps: int) -> dict:
    """Keyword arguments for `accelerate.Accelerator(**kwargs)` derived from `cfg`.

    Args:
        cfg: the RunConfig (reads `cfg.train` and `cfg.distributed`).
        grad_accum_steps: micro-steps per optimizer step on this world size, i.e.
            global_batch_size // (micro_batch_size * world_size); the caller computes it because it
            depends on the world size.

    Returns a dict with `mixed_precision`, `gradient_accumulation_steps`, and where needed
    `kwargs_handlers` (an `InitProcessGroupKwargs` carrying the backend), `cpu=True` (no CUDA and no
    DeepSpeed) and, for ZeRO stages, a `deepspeed_plugin` whose config has no "auto" batch, clipping
    or precision values left.

    The process-group backend is passed explicitly because without CUDA accelerate leaves it as None
    for a DeepSpeed launch: DeepSpeed then initialises a 1-process world while WORLD_SIZE says 2 and
    rejects the batch arithmetic. gloo is the backend that works on CPU.
    """
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    dist = cfg.distributed
    t = cfg.train
    stage = int(dist.zero_stage)
    world = world_size_from_env()
    kwargs: dict[str, Any] = {
        "mixed_precision": t.mixed_precision,
        "gradient_accumulation_steps": int(grad_accum_steps),
    }

    handlers: list[Any] = []
    multi_process = world > 1 or os.environ.get("LOCAL_RANK") is not None
    on_cuda = cuda_available()
    if multi_process:
        # The backend is passed because without CUDA accelerate/DeepSpeed guess wrong (see above; on CUDA
        # this is accelerate's own pick, nccl); the timeout because NCCL's default (10 minutes) is short
        # for a slow checkpoint write on shared storage.
        handlers.append(InitProcessGroupKwargs(backend=process_group_backend(cfg),
                                               timeout=timedelta(seconds=dist.timeout_s)))
    if handlers:
        kwargs["kwargs_handlers"] = handlers

    use_deepspeed = stage > 0 or launched_with_deepspeed()
    if not on_cuda and not use_deepspeed:
        # Without CUDA, accelerate only builds a data-parallel (MULTI_CPU/gloo) world when told it runs
        # on CPU; under torchrun it would otherwise report num_processes=N but never wrap the model in
        # DDP. (Not for DeepSpeed: accelerate drops DeepSpeed entirely when cpu=True.)
        kwargs["cpu"] = True

    if launched_with_deepspeed():
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if config_file and config_file != "none" and _is_packaged_config(config_file) and stage > 0:
            # `scaletune launch` (or a launch/*.yaml) picked one of our JSONs for this stage: rebuild
            # it from the run config so offload details (e.g. stage 3 + optimizer-only offload) match.
            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(
                hf_ds_config=build_deepspeed_config(cfg, grad_accum_steps, world)
            )
        elif config_file and config_file != "none":
            # A user-supplied DeepSpeed JSON: honour it, but fill its "auto" values from the run
            # config (and refuse values that disagree) so batch size, clipping and precision agree
            # with what scaletune does.
            # (its stage is the run config's: train.setup refuses a launch of another stage)
            ds = resolve_deepspeed_config(load_deepspeed_json(config_file), cfg, grad_accum_steps, world,
                                          source=config_file)
            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds)
        else:
            # Launched with plugin flags (--zero_stage ...) and no JSON: accelerate builds the plugin
            # from its environment; only the values it cannot know are supplied.
            plugin = DeepSpeedPlugin(
                gradient_accumulation_steps=int(grad_accum_steps),
                gradient_clipping=float(t.max_grad_norm) if t.max_grad_norm is not None else 0.0,
            )
            _fill_auto(plugin.deepspeed_config, "train_micro_batch_size_per_gpu", int(t.micro_batch_size))
            _fill_auto(
                plugin.deepspeed_config, "train_batch_size", int(t.micro_batch_size) * int(grad_accum_steps) * world
            )
            kwargs["deepspeed_plugin"] = plugin
    elif stage > 0:
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=build_deepspeed_config(cfg, grad_accum_steps, world))
    return kwargs


def main_rank_answer(accelerator: Any, answer: bool) -> bool:
    """The main rank's `answer` on every rank (one small collective; every rank calls it), for a question about
    files that decides which collectives follow: another rank asking the file system itself may look while rank
    0 writes them, or see a node-local output_dir of its own."""
    return _any_rank(accelerator, answer and accelerator.is_main_process)


def _any_rank(accelerator: Any, flag: bool) -> bool:
    """Whether `flag` is true on any rank (one small collective where there are several; every rank calls it)."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    total = accelerator.reduce(torch.tensor([1.0 if flag else 0.0], device=accelerator.device), "sum")
    return bool(total.item() > 0)


def raise_main_rank_failure(accelerator: Any, error: Exception | None, what: str, hint: str) -> None:
    """After a write only the main rank does: raise its `error` there, and on every other rank an error
    saying rank 0 could not write `what`; the others would otherwise wait forever in the next collective
    while rank 0 exits. A collective on several ranks (the barrier the write needs, too)."""
    failed = _any_rank(accelerator, error is not None)
    if error is not None:
        raise error
    if failed:
        raise errors.UserError(f"rank 0 could not write {what} (its message says why)", hint=hint)


def exit_rank(code: int) -> None:
    """End this rank of a multi-process `scaletune train` (or launched `eval`) with `code` (its run done, stopped
    or refused: past its last collective), skipping Python's interpreter teardown; a single process returns.

    The teardown could abort a run that had succeeded ("terminate called without an active exception",
    exit 1 from the launch though every output was written; seen about once in 30 ZeRO-3 launches on
    CPU), or turn a refusal's exit 2 into 134. A gloo worker thread drops a finished collective's work
    after the rank waiting on it moved on; freeing its tensor takes the GIL, and once the interpreter is
    finalizing CPython ends that thread with pthread_exit, which unwinds through gloo's noexcept
    destructor into std::terminate (a core dump showed it). destroy_process_group() does not join those
    threads: under ZeRO-3 every partitioned parameter keeps the process group. The world size comes from
    the launcher's environment, as accelerate's end_training() destroys rank 0's group when it ends the
    trackers. Nothing of the run is lost: the trackers were ended and every file written and closed."""
    if world_size_from_env() > 1:
        hard_exit(code)


def hard_exit(code: int) -> None:
    """End the process with `code` after flushing the log and the standard streams, without Python's
    interpreter teardown (no atexit handlers, no joining of threads): for an end whose every file is
    written and closed, where the teardown could hang or abort (see exit_rank, data.encode.workers_abandoned)."""
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
