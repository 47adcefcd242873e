"""Console logging for the command line and for Python callers: one format, and the libraries' noise that
means nothing to someone running a config filtered out."""

from __future__ import annotations

import logging
import os


def setup_logging() -> None:
    """The command line's logging: INFO on rank 0, WARNING elsewhere, the libraries quietened."""
    rank = os.environ.get("RANK", "0")
    # Before transformers/datasets are imported: their download and weight-loading bars say nothing
    # about a local run (training has its own progress line).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=LOG_FORMAT, datefmt=LOG_DATEFMT)
    quiet_libraries(rank)


LOG_FORMAT, LOG_DATEFMT = "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"


def quiet_libraries(rank: str = "0", *, keep_levels: bool = False) -> None:
    """Silence what the libraries say that means nothing to someone running a config. Safe to call again (the
    filters are added once). `keep_levels` (a Python caller's process): a library logger the caller gave a level
    keeps it."""
    import warnings

    # Deprecations inside the libraries (peft calling a renamed transformers method, ...) are for their
    # developers, not for someone running a config; the test suite still sees them.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate|torch|datasets)\.")
    # ("torch": its INFO loggers print only when a Ctrl-C cut its import short, before torch set their levels:
    # FakeTensor cache statistics at exit, after "interrupted")
    for noisy in ("transformers", "datasets", "accelerate", "DeepSpeed", "torch", "torch.distributed", "huggingface_hub"):
        if not (keep_levels and logging.getLogger(noisy).level != logging.NOTSET):
            logging.getLogger(noisy).setLevel(logging.WARNING if rank == "0" else logging.ERROR)
    # huggingface_hub prints through a handler of its own and also passes each record on to the root
    # handler above: every retry warning of an offline hub call appeared twice
    logging.getLogger("huggingface_hub").propagate = False
    # DeepSpeed warns on import that it found no GPU: on a CPU run that is the plan, not news.
    logging.getLogger("DeepSpeed").addFilter(_not_cpu_accelerator_news)
    # bitsandbytes (imported by peft, quantized run or not) on a CPU with AVX512-BF16 asks the `kernels`
    # package for an optional 4-bit matmul from the Hugging Face hub; offline, or where the hub cannot vouch
    # for that repository, both warn (every process, every run) and bitsandbytes uses its own kernel.
    if not (keep_levels and logging.getLogger("kernels").level != logging.NOTSET):
        logging.getLogger("kernels").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_kernels_hub_news)


# (functions, not lambdas: addFilter skips a filter it holds already, so a second call adds none)
def _not_cpu_accelerator_news(record: logging.LogRecord) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def _not_kernels_hub_news(record: logging.LogRecord) -> bool:
    return "kernels-community" not in record.getMessage()
