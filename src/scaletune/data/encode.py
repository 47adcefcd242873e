"""Encoding records into tokenised columns: in pieces of CHUNK records, over forked worker processes for
a large file, each piece narrowed to 32-bit Arrow columns and spilled beside the cache until the set is
joined (build_datasets stores the result)."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..progress import Progress

# Records per piece of work. Each piece's ids go from Python lists (about 36 bytes a token) into Arrow
# (4-8) before the next piece is encoded, so memory holds the records and the Arrow data, not the whole
# set's lists (which took 10x the file's size); with data.num_proc > 1 the pieces are the workers' tasks.
CHUNK = 2000

_WORK: tuple | None = None  # (records, task, tokenizer, cfg, label2id, sourced) while encode_all runs: forked workers read it
# what encoding counts per split: examples without a target within max_length (skipped), cut at max_length,
# whose answer ends in no special token, longer than max_length and dropped or split (data.too_long)
COUNTS = ("dropped", "truncated", "unstopped", "too_long")
RECORD = "record"  # column of `encode_all(sourced=True)`: the index in `records` each example was encoded from


def _encode_span(span: tuple[int, int]) -> dict:
    """Encode records[start:end] of `_WORK` into columns plus the counts of COUNTS."""
    from ..tasks.base import TOO_LONG, TRUNCATED, UNSTOPPED  # (tasks import data's readers)

    records, task, tokenizer, cfg, label2id, sourced = _WORK
    columns: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    counts = dict.fromkeys(COUNTS, 0)
    # (the task's examples of each record: kto makes two of a preference pair, both from record `at`)
    examples = ((at, one) for at, rec in enumerate(records[span[0]:span[1]], start=span[0])
                for one in task.examples_of(rec))
    for at, rec in examples:
        ex = task.encode(rec, tokenizer, cfg, label2id)
        if ex is None:
            counts["dropped"] += 1
            continue
        for piece in ex if isinstance(ex, list) else [ex]:  # (a list: a long text split in pieces)
            counts["too_long"] += bool(piece.pop(TOO_LONG, False))
            if not piece:  # (data.too_long: drop)
                continue
            if sourced:  # (a dropped record leaves a gap: the examples' positions no longer say which record)
                columns.setdefault(RECORD, []).append(at)
            counts["truncated"] += bool(piece.pop(TRUNCATED, False))
            counts["unstopped"] += bool(piece.pop(UNSTOPPED, False))
            columns["length"].append(len(piece["input_ids"]))
            for key, value in piece.items():  # input_ids, labels and what else the task keeps (token_cls: cut_tags)
                columns.setdefault(key, []).append(value)
    columns.update(counts)
    return columns


def tokenize_processes(cfg: Any) -> int:
    """data.num_proc, or the CPUs this process may use (a Slurm allocation's, not the node's), at most 8."""
    if cfg.data.num_proc:
        return cfg.data.num_proc
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _quiet_worker() -> None:
    # The main process decides on Ctrl-C and on the stop signals (a SIGTERM before the first step still
    # ends in a checkpoint); Slurm signals every process of the job, and a worker killed by one would
    # break the pool. The workers end when their work does, or with the pool.
    import signal

    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


_ABANDONED = False  # set once a pool's workers were killed (see workers_abandoned)


def workers_abandoned() -> bool:
    """Whether tokenising workers were killed mid-work in this process (an interrupt, an error). A worker
    killed while it wrote a finished piece leaves the pool's manager thread reading the rest of it for
    ever, and Python's exit joins that thread: Ctrl-C while tokenising hung about one time in five. The
    CLI then ends the process without that teardown (`distributed.hard_exit`)."""
    return _ABANDONED


@contextmanager
def _workers(n: int) -> Iterator[Any]:
    """A pool of `n` forked processes (None for n <= 1): they inherit the records, task and tokenizer, so
    only spans go out and columns come back. A worker that dies (out of memory, say) fails the pool's
    map rather than leaving it waiting; on an error here the pending pieces are dropped."""
    import multiprocessing

    # Only where fork is the platform's own default (Linux): Windows has no fork, and on macOS a fork of a process
    # that has loaded torch and the system's frameworks may crash (Python defaults to spawn there since 3.8)
    if n <= 1 or not sys.platform.startswith("linux"):
        yield None
        return
    from concurrent.futures import ProcessPoolExecutor

    # tokenizers prints a warning in each forked child once its own threads were used, unless told
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # The collector's passes write to every object they visit: in a worker, that copies each inherited page
    # of records. Frozen, the objects of now are never visited (in here until the pool ends, in the workers).
    gc.freeze()
    try:
        pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"), initializer=_quiet_worker)
        pool.submit(int).result()  # start the workers now, while the variable is set
    except BaseException:
        gc.unfreeze()
        raise
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    try:
        yield pool
    except BaseException:
        # The workers ignore SIGTERM, and one may sit writing a finished piece into a pipe nobody reads
        # any more: only SIGKILL ends them, and then the pool's manager thread, which exit joins.
        global _ABANDONED
        _ABANDONED = True
        workers = list(getattr(pool, "_processes", {}).values())  # (no public handle on them)
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.kill()
        for worker in workers:
            worker.join(timeout=10)
        raise
    finally:
        gc.unfreeze()
    pool.shutdown()


def encode_all(records: list[dict], task: Any, tokenizer: Any, cfg: Any, label2id: dict | None,
                shown: bool = True, sourced: bool = False) -> tuple[Any, dict]:
    """Encode every record, in order: (a Dataset of the examples kept, or None if none was, and the counts
    of COUNTS). A bad record's DataError is raised here, from a worker too.
    `shown`: progress on screen (300k Alpaca records took ~50 s on 2 cores with nothing shown). `sourced`:
    the Dataset has a RECORD column, each example's index in `records`."""
    global _WORK
    from concurrent.futures.process import BrokenProcessPool

    import datasets

    spans = [(i, min(i + CHUNK, len(records))) for i in range(0, len(records), CHUNK)]
    counts = dict.fromkeys(COUNTS, 0)
    parts = []
    procs = tokenize_processes(cfg)
    _WORK = (records, task, tokenizer, cfg, label2id, sourced)
    progress = Progress(len(records), "tokenising", "records", shown=shown and len(spans) > 1)
    try:
        with _spill_dir(len(spans) > 1) as spill, _workers(min(procs, len(spans))) as pool:
            for (start, end), columns in zip(spans, pool.map(_encode_span, spans) if pool else map(_encode_span, spans)):
                progress.update(end - start)
                for key in counts:
                    counts[key] += columns.pop(key)
                if columns["input_ids"]:
                    parts.append(_spilled(_narrowed(datasets.Dataset.from_dict(columns)), spill, len(parts)))
    except BrokenProcessPool as exc:
        raise UserError(f"a process tokenising the data died ({exc}); the machine may be out of memory: "
                        f"set data.num_proc lower (it was {procs}; 1 tokenises in the main "
                        "process)") from None
    finally:
        _WORK = None
        progress.close()
    if not parts:
        return None, counts
    return _joined(parts), counts


@contextmanager
def _spill_dir(large: bool) -> Iterator[Path | None]:
    """A scratch directory for the encoded pieces of a large set (None for one piece, or where none can be
    made): beside the cache, which is meant to hold tokenised data, not in a /tmp that may be RAM."""
    import shutil
    import tempfile

    from . import cache_root  # (data/__init__ imports this module)

    if not large or os.name != "posix":  # (a mapped file cannot be deleted on Windows)
        yield None
        return
    try:
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=".pieces-", dir=root))
    except OSError:
        yield None
        return
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _spilled(piece: Any, spill: Path | None, i: int) -> Any:
    """`piece` written to an Arrow file in `spill` and memory-mapped back: a large set's pieces wait for
    the save (and training) on disk, not in memory (200k Alpaca-sized records: the main process peaked at
    1.0 GB, not 1.46). The file is deleted at once (the mapping keeps its data); the Dataset wraps the
    mapped table as an in-memory one, so a pickled copy carries the data, not the path of a file that is gone."""
    import datasets
    import pyarrow as pa

    if spill is None:
        return piece
    path = spill / f"{i}.arrow"
    try:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, piece.data.schema) as writer:
            writer.write_table(piece.data.table)
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except OSError:  # (a full disk: this piece stays in memory)
        return piece
    finally:
        path.unlink(missing_ok=True)
    # the piece's own fingerprint (of the same data): without one, Dataset hashes the table, reading all of it
    return datasets.Dataset(table, fingerprint=getattr(piece, "_fingerprint", None))


def _narrowed(piece: Any) -> Any:
    """`piece` with its 64-bit integer columns (Arrow's inference for Python ints: labels, lengths, ids) in
    32 bits, which hold every token id, label and length: a third less cache on disk and data in memory."""
    import datasets
    import pyarrow as pa

    def narrow(tp: Any) -> Any:
        if pa.types.is_int64(tp):
            return pa.int32()
        if pa.types.is_list(tp) or pa.types.is_large_list(tp):
            return pa.list_(narrow(tp.value_type))
        return tp

    schema = pa.schema([field.with_type(narrow(field.type)) for field in piece.data.schema])
    return piece if schema == piece.data.schema else datasets.Dataset(piece.data.table.cast(schema))


def _joined(parts: list) -> Any:
    """One Dataset of the pieces, in order. A column whose lists were all empty in a piece (token_cls'
    blank_at, often) is untyped (list<null>) there: it gets the type another piece found. (concatenate_datasets
    joins without copying; a Dataset over pyarrow's concat_tables briefly took 4x the data's size.)"""
    import datasets
    import pyarrow as pa

    schemas = [p.data.schema for p in parts]

    def typed(name: str) -> Any:
        return next((s.field(name) for s in schemas if "null" not in str(s.field(name).type)), schemas[0].field(name))

    features = datasets.Features.from_arrow_schema(pa.schema([typed(name) for name in schemas[0].names]))
    return datasets.concatenate_datasets(
        [p if p.features == features else datasets.Dataset(p.data.cast(features.arrow_schema)) for p in parts])
