"""From the `data:` section to tokenised train/eval sets, cached across runs and ranks.

Records are read and validated in Python (so errors name file:line), encoded by the task (in pieces,
over forked processes for a large file: encode.py), and the result is stored as an Arrow dataset under a
fingerprint of (data files, tokenizer, task, data config). The main process builds the cache first;
other ranks and later runs load it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..distributed import main_process_first
from ..errors import DataError
from ..fileutil import sha256_file
from .encode import COUNTS, RECORD, encode_all
from .readers import WHERE, read_records
from .sources import describe, eval_among_train, read_capped, read_train_records, train_sources, weighted

log = logging.getLogger("scaletune")

# 2: numeric string labels sort numerically; 3: token_cls stores the gold tags max_length cut;
# 4: CSV quoted fields keep U+2028, \x85, \r\n and the like as written (str.splitlines used to break them);
# 5: meta counts the examples max_length cut; token_cls stores the words with no sub-token (blank_at, blank_tags)
# 6: messages' "weight": 0 turns are context; 7: token_cls integer tags named by data.labels;
# 8: JSON true/false labels are named "true"/"false" (were "True"/"False" with data.labels, else refused),
# labels that differ only in spaces are refused; 9: seq_cls text pairs keep token_type_ids; 10: chat data's
# weight-0 answers stay untrained under train_on_prompt; 11: causal_lm's BOS only where the tokenizer puts it;
# 12: causal_lm text tokenised in one piece (SentencePiece); 13: the built-in template's header after a tool
# result, an answer or a system prompt; 14: token_cls words of a byte-level BPE tokenizer (GPT-2, RoBERTa, Llama 3)
# or of Gemma's are tokenised with the space before them, in their word-start ("Ġ", "▁") form; 15: a token_cls
# word whose first sub-token is a bare space ("▁" "2" "0" ...) is labelled on its next one with every tokenizer;
# 16: tool schemas rendered as text keep non-ASCII as written (were \u-escaped); 17: tool results under a merged
# model's saved built-in template stay `### Tool result:` turns (were user turns; TOKENISATION not bumped: only
# that case changed, and resumes of every other run would be warned for nothing); 19: an entry's meta holds its
# row counts, checked as it is read (the ids are 18's); 20: reward rows hold their pair's margin (0.0 without one;
# TOKENISATION not bumped: ids and targets are as before, and only pairs with a margin now train differently)
CACHE_VERSION = "20"
# The data version at which each task's token ids or targets last changed (a cache version changes for more:
# a count in the meta, a refusal): what checkpoints and adapters record as how their data was tokenised.
TOKENISATION = {"causal_lm": "18", "dpo": "18", "kto": "18", "reward": "16", "seq_cls": "9", "token_cls": "15",
                "seq_regression": "14"}


def tokenisation(task: str) -> str:
    """How this scaletune tokenises `task`'s data, as checkpoints and adapters record it."""
    return f"{task}-{TOKENISATION[task]}"


def tokenised_differently(recorded: Any, task: str, tokenizer: Any = None) -> str | None:
    """What to say of data a checkpoint or adapter records as tokenised `recorded` (`tokenisation`), or None if
    that is this scaletune's. The data file can be the same (the same train_digest) and still give other ids:
    v11 stopped adding a BOS the tokenizer does not add itself, v13 changed the built-in template's rendering, v14
    gave token_cls words of a byte-level BPE tokenizer (and Gemma's) their word-start form, v15 labels a word on
    the sub-token after a bare-space first one with every tokenizer (v14: byte-level BPE's and Gemma's), v18 stopped
    training the whitespace a chat template writes after an answer's end marker (ChatML's newline)."""
    now = tokenisation(task)
    if recorded == now:
        return None
    if recorded in ("token_cls-7", "token_cls-14") and now == "token_cls-15" and tokenizer is not None:
        if not _token_cls_changed(recorded, tokenizer):
            return None
    if recorded is None:
        return "was written before scaletune recorded how it tokenises (its data version), by a scaletune that " \
               "may have tokenised otherwise"
    return f"was trained on data tokenised by another scaletune (data version {recorded}, now {now})"


def _token_cls_changed(recorded: str, tokenizer: Any) -> bool:
    """Whether token_cls data tokenised at `recorded` (7 or 14) may have other ids or label positions now: v14
    changed the ids of tokenizers whose space marks a word's start, v15 the label positions of those with a
    bare-space token that v14 left on it (SentencePiece's "▁": Llama 2, T5, XLM-R; not WordPiece)."""
    from ..tasks.token_cls import bare_space_ids, space_marks_words

    if space_marks_words(tokenizer):  # (v14 gave them their word-start ids and already skipped a bare space)
        return recorded == "token_cls-7"
    return bool(bare_space_ids(tokenizer))


def cache_root() -> Path:
    return Path(os.environ.get("SCALETUNE_CACHE", Path.home() / ".cache" / "scaletune")) / "tokenized"


def _file_digest(spec: str | None, key: str = "data.train") -> str:
    if spec is None:
        return "none"
    path = Path(spec)
    if not path.is_file():
        return spec
    try:
        return sha256_file(path)
    except OSError as exc:  # (hashed before read_records, which would say the same)
        raise DataError(f"{key}: cannot read {path}: {exc.strerror}") from None


def _tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation/padding settings change as a side effect of encoding; they are not the vocabulary
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        body = json.dumps(spec, sort_keys=True)
    else:
        body = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    # truncation_side: which end a cls text loses at max_length (tokenizer_config.json may say "left")
    extra = json.dumps([getattr(tokenizer, "chat_template", None), tokenizer.bos_token, tokenizer.eos_token,
                        getattr(tokenizer, "truncation_side", None)])
    return hashlib.sha256((body + extra).encode()).hexdigest()


# data.* keys added after the cache key's layout was set, with the default that encodes as before they existed
_LATER_KEYS = {"too_long": "truncate", "train_on_last_turn": False}


def train_digest(cfg: Any) -> str:
    """The training sources' contents (a file's sha256; a hub source's name): what a checkpoint was trained on."""
    return ",".join(_file_digest(spec) for spec, _ in train_sources(cfg.data.train))


def fingerprint(cfg: Any, tokenizer: Any, train: str | None = None, evald: str | None = None) -> str:
    """The tokenised-data cache key: the data's contents (`train_digest`, data.eval's sha256), what reads
    and encodes them, and the tokenizer. Files by content and suffix (it picks the reader), not by name:
    the same file copied to scratch space or reached by another path is not tokenised again."""
    d = asdict(cfg.data)
    for key in ("num_workers", "num_proc", "cache", "group_by_length"):
        d.pop(key)
    for key, default in _LATER_KEYS.items():  # (at its default, a later key keeps the entries made before it valid)
        if d[key] == default:
            d.pop(key)
    d["train"] = [(Path(spec).suffix.lower(), weight) for spec, weight in train_sources(cfg.data.train)]
    if cfg.data.max_samples is not None:
        from .sources import train_keyed_sources

        # (the cap is per data.train item, a pattern's files together: the same files listed one by one keep
        # other records, so each file's item is in the key; without a cap both read the same)
        keys = [key for key, _ in train_keyed_sources(cfg.data.train)]
        d["train"] = [[keys.index(key), *source] for key, source in zip(keys, d["train"])]
    d["eval"] = Path(cfg.data.eval).suffix.lower() if cfg.data.eval else None
    d["chat_template"] = None  # (its text is in the tokenizer's digest)
    # the seed picks eval_fraction's split and the part a fractional weight (0.5: a seeded half) keeps; only those
    split_seed = str(cfg.train.seed) if (cfg.data.eval_fraction and not cfg.data.eval) or any(
        weight % 1 for _, weight in train_sources(cfg.data.train)) else "-"
    train = train_digest(cfg) if train is None else train
    evald = _file_digest(cfg.data.eval, "data.eval") if evald is None else evald
    parts = [CACHE_VERSION, cfg.task, json.dumps(d, sort_keys=True), train, evald, split_seed,
             _tokenizer_digest(tokenizer)]
    # (surrogateescape: a path of bytes that are not UTF-8 is a str with surrogates, which a missing file's digest
    # is, and a plain encode() refused with a traceback before the reader could say the file is not there)
    return hashlib.sha256("\x1f".join(parts).encode(errors="surrogateescape")).hexdigest()[:24]


def split_eval(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic hold-out split (same on every rank and every run with the same seed)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(records) * fraction)))
    if n_eval >= len(records):
        raise DataError(f"data.eval_fraction={fraction} leaves no training examples out of {len(records)}")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def build_datasets(cfg: Any, task: Any, tokenizer: Any, accelerator: Any = None, *, for_eval: bool = False) -> dict:
    """Return {'train': Dataset, 'eval': Dataset | None, 'labels': [...] | None, 'stats': {...}}. `for_eval`:
    only the held-out split is wanted (`scaletune eval` with data.eval_fraction): no notes on the training
    split, which is not trained on here, and no packing."""
    conll, columns = cfg.data.format == "conll", cfg.data.conll_columns
    digest, eval_digest = train_digest(cfg), _file_digest(cfg.data.eval, "data.eval")
    key = fingerprint(cfg, tokenizer, digest, eval_digest)
    where = cache_root() / key
    # the others wait while rank 0 builds (and caches); an error there is raised on every rank
    main_first = main_process_first(accelerator) if accelerator is not None else nullcontext()
    if not for_eval and (accelerator is None or accelerator.is_main_process) \
            and (key_of := eval_among_train(cfg.data.train, cfg.data.eval)):
        log.warning("data.eval (%s) is also %s: the evals score examples the run trains on", cfg.data.eval, key_of)
    with main_first:
        cached = _load_cached(where, accelerator) if cfg.data.cache else None
        main = accelerator is None or accelerator.is_main_process
        if cached is not None:
            train, evalset, meta = cached
            labels = meta["labels"]
            task.setup_cached(meta)
            if main:
                log.info("data: tokenised %s%s read from the cache (%s)", describe(cfg.data.train),
                         f" and {cfg.data.eval}" if cfg.data.eval else "", where)
        else:
            train_records, source_of = read_train_records(cfg.data.train, conll=conll, conll_columns=columns,
                                                          max_samples=cfg.data.max_samples)
            labels = task.setup(train_records, cfg, describe(cfg.data.train))
            ignored = [task.ignored_fields(train_records, "data.train")]
            eval_records = None
            if cfg.data.eval:
                eval_records = read_capped(cfg.data.eval, key="data.eval", conll=conll, conll_columns=columns,
                                           max_samples=cfg.data.max_samples)
                task.check_eval(eval_records, cfg, cfg.data.eval)
                ignored.append(task.ignored_fields(eval_records, "data.eval"))
            elif cfg.data.eval_fraction:
                train_records, eval_records = split_eval(train_records, cfg.data.eval_fraction, cfg.train.seed)
            train_records = weighted(train_records, source_of, cfg.data.train, cfg.train.seed)
            if not train_records:  # every source's weight (after any eval_fraction split) kept none of it
                raise DataError(f"data.train: the weights of {describe(cfg.data.train)} keep no training example",
                                hint="raise the weights (a weight below 1 keeps that fraction of a source's "
                                     "examples, rounded)")
            if main:  # a large file takes minutes here: say what is happening (and that it happens once)
                log.info("data: tokenising %d record(s) of %s%s%s", len(train_records), describe(cfg.data.train),
                         f" and {len(eval_records or [])} for eval" if eval_records else "",
                         f" (cached for later runs in {where})" if cfg.data.cache else "")
            label2id = {name: i for i, name in enumerate(labels)} if labels else None
            train, counted = encode_all(train_records, task, tokenizer, cfg, label2id, shown=main)
            train_records = None  # (nothing reads them now: their memory is the eval set's and the save's)
            if train is None:
                raise DataError(f"data.train: no usable examples in {describe(cfg.data.train)} "
                                f"({_why_none(cfg, counted)})")
            evalset, counted_eval = encode_all(eval_records or [], task, tokenizer, cfg, label2id, shown=main)
            if cfg.data.eval and evalset is None:  # asked for, never run
                raise DataError(f"data.eval: no usable examples in {cfg.data.eval} ({_why_none(cfg, counted_eval)})")
            if eval_records and evalset is None:  # (a held-out part: the run trained with no eval, `eval` crashed)
                raise DataError(f"data.eval_fraction: no usable examples in the held-out part of "
                                f"{describe(cfg.data.train)} ({_why_none(cfg, counted_eval)})",
                                hint="hold out a larger fraction, or raise data.max_length")
            dropped, truncated, unstopped, too_long = ({"train": counted[key], "eval": counted_eval[key]}
                                                       for key in COUNTS)
            # scoring's bookkeeping would only slow every training batch
            train = train.remove_columns([c for c in task.eval_only_columns if c in train.column_names])
            meta = {"labels": labels, "has_eval": evalset is not None, "dropped": dropped, "truncated": truncated,
                    "unstopped": unstopped, "too_long": too_long,
                    "ignored_fields": [note for note in ignored if note], **task.cache_meta()}
            if cfg.data.cache and (accelerator is None or accelerator.is_main_process):
                _save_atomically(where, train, evalset, meta)
                # trained from the saved copy, memory-mapped as a later run's, rather than from the pieces
                # built in memory: a first run on 100k Alpaca records trained at ~1.0 GB RSS, a cached one
                # at ~0.75 GB, and now both do (2-core VM, 20M tokens)
                saved = _load_cached(where, accelerator, quiet=True)
                if saved is not None:
                    import pyarrow as pa

                    train, evalset = saved[0], saved[1]
                    # Arrow's allocator keeps what the pieces freed for itself: give it back to the system
                    pa.default_memory_pool().release_unused()
    for note in (meta.get("ignored_fields") or []) if main else []:  # (in the cache's meta: a cached build warns)
        if not (for_eval and note.startswith("data.train")):
            log.warning(note)
    for split, n in (meta.get("dropped") or {}).items():
        if n and main and not (for_eval and split == "train"):
            # silently training on fewer examples (and evaluating on a max_length-dependent subset)
            # would surprise anyone comparing runs
            log.warning("data.%s: %d example(s) skipped: no target tokens within data.max_length=%d%s",
                        split, n, cfg.data.max_length, _whole_prompts(cfg))
    # read from the dataset: a cached build warns too; it says what max_length cut from the eval set
    eval_note = task.eval_warning(evalset, labels, cfg) if evalset is not None and main else None
    sizes = {"train": len(train), "eval": len(evalset) if evalset is not None else 0}
    for split, n in (meta.get("truncated") or {}).items():
        if n and main and not (split == "eval" and eval_note) and not (for_eval and split == "train"):
            # the cut part is not trained on (causal_lm: the end of the answer; cls: the end of the text)
            log.warning("data.%s: %d of %d example(s) are longer than data.max_length=%d tokens and were cut; "
                        "raise it to train on (or score) their ends", split, n, sizes[split], cfg.data.max_length)
    if eval_note:
        log.warning(eval_note)
    for split, n in (meta.get("too_long") or {}).items():
        if n and main and not (for_eval and split == "train"):
            log.warning("data.%s: %s", split, _too_long_note(cfg, n, sizes[split]))
    n = (meta.get("unstopped") or {}).get("train")
    if n and main and not for_eval:
        log.warning("data.train: %d of %d example(s) hold an answer that ends in no end-of-sequence (or other special) "
                    "token: the tokenizer's chat template closes no assistant turn, or the tokenizer has no "
                    "eos_token; a model trained on them does not learn to stop (use a template that ends assistant "
                    "turns with the eos token)", n, sizes["train"])
    for key, rows in (("data.train", train), ("data.eval", evalset)) if main and not for_eval else ():
        ending = _rows_ending_in(rows, tokenizer.pad_token_id) if task.peft_task_type == "SEQ_CLS" else 0
        if ending:
            log.warning("%s: %d tokenised text(s) end in the tokenizer's pad token %r (id %d), also a token of "
                        "text: a decoder's sequence head reads each row at its last token that is not the pad id, "
                        "so they are scored at the token before (in training, eval and a merged model alike); give "
                        "the tokenizer a pad token of its own (or none: eos then pads)", key, ending,
                        tokenizer.pad_token, tokenizer.pad_token_id)
    if cfg.data.packing and not for_eval:
        from .packing import pack_dataset

        n_examples = len(train)
        train = pack_dataset(train, cfg.data.max_length)
        meta = {**meta, "packed_rows": len(train), "packed_examples": n_examples}
    # eval_digest: the contents the evals score (data.eval's, or data.train's for a held-out fraction of it), which
    # a best eval's record keeps: a resume on an eval file edited in place does not hold its evals to an old bar
    return {"train": train, "eval": evalset, "labels": labels, "stats": meta, "train_digest": digest,
            "eval_digest": hashlib.sha256((eval_digest if cfg.data.eval else digest).encode(errors="surrogateescape"))
            .hexdigest()[:16]}


def _rows_ending_in(dataset: Any, token_id: int | None) -> int:
    """How many rows of `dataset` (None: none) end in `token_id` (in any *input_ids column), read from Arrow, not
    Python lists; a split (a held-out fraction: an indices mapping) counts its own rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if token_id is None or dataset is None:
        return 0
    picked = dataset._indices.column(0) if getattr(dataset, "_indices", None) is not None else None
    n = 0
    for name in dataset.column_names:
        if not name.endswith("input_ids"):
            continue
        flags = []
        for chunk in dataset.data.column(name).chunks:
            ends = pc.subtract(pc.cumulative_sum(pc.list_value_length(chunk)), 1)
            flags.append(pc.equal(pc.take(pc.list_flatten(chunk), ends), token_id))
        ending = pa.chunked_array(flags, type=pa.bool_())
        n += pc.sum(ending.take(picked) if picked is not None else ending).as_py() or 0
    return n


def build_eval_only(cfg: Any, task: Any, tokenizer: Any, key: str, sources: list | None = None) -> Any:
    """`scaletune eval`'s dataset: the file cfg.data.eval alone, read, set up and tokenised once, its problems
    named by `key` (--data, or data.eval when the path came from the config), never data.train. The labels
    are the adapter's (cfg.data.labels); not cached. `sources`, when given, is filled with the record each
    example was encoded from, in the dataset's order (a record with no target tokens has no example)."""
    # (a file given as --data is scored whole: data.max_samples cuts the config's data, not a file named to score)
    records = read_capped(cfg.data.eval, key=key, conll=cfg.data.format == "conll",
                          conll_columns=cfg.data.conll_columns,
                          max_samples=cfg.data.max_samples if key == "data.eval" else None)
    labels = task.setup(records, cfg, cfg.data.eval, key=key)
    ignored = task.ignored_fields(records, key)
    if ignored:
        log.warning(ignored)
    return _encoded_eval(cfg, task, tokenizer, key, cfg.data.eval, records, labels, sources)


def build_held_out(cfg: Any, task: Any, tokenizer: Any, sources: list) -> Any:
    """The examples data.eval_fraction holds out of data.train, split as training split them (same records, same
    seed), with `sources` filled as build_eval_only fills it: for `eval --predictions/--generate`, whose lines
    need the records (the cached held-out set keeps none). Not cached."""
    records, _ = read_train_records(cfg.data.train, conll=cfg.data.format == "conll",
                                    conll_columns=cfg.data.conll_columns, max_samples=cfg.data.max_samples)
    labels = task.setup(records, cfg, describe(cfg.data.train))
    _, held = split_eval(records, cfg.data.eval_fraction, cfg.train.seed)
    return _encoded_eval(cfg, task, tokenizer, "data.eval_fraction", f"the held-out part of {describe(cfg.data.train)}",
                         held, labels, sources)


def _encoded_eval(cfg: Any, task: Any, tokenizer: Any, key: str, what: str, records: list[dict],
                  labels: list[str] | None, sources: list | None) -> Any:
    """`records` tokenised as an eval set, what was skipped or cut said once (`key`, `what`: how to name them)."""
    evalset, counted = encode_all(records, task, tokenizer, cfg,
                                   {name: i for i, name in enumerate(labels)} if labels else None,
                                   sourced=sources is not None)
    # (unstopped: a training-time concern)
    dropped, truncated, too_long = counted["dropped"], counted["truncated"], counted["too_long"]
    if evalset is None:
        raise DataError(f"{key}: no usable examples in {what} ({_why_none(cfg, counted)})")
    if dropped:  # scored on fewer examples than the file holds: say so, as training does
        log.warning("%s: %d example(s) skipped: no target tokens within data.max_length=%d%s", key, dropped,
                    cfg.data.max_length, _whole_prompts(cfg))
    if too_long:
        log.warning("%s: %s", key, _too_long_note(cfg, too_long, len(evalset)))
    if sources is not None:
        from .batching import column_values  # (batching imports torch: config validation reads this package)

        sources[:] = [records[i] for i in column_values(evalset, RECORD)]
        evalset = evalset.remove_columns(RECORD)
    note = task.eval_warning(evalset, labels, cfg)
    if note:
        log.warning(note)
    elif truncated:
        log.warning("%s: %d of %d example(s) are longer than data.max_length=%d tokens and were cut; raise it to "
                    "score their ends", key, truncated, len(evalset), cfg.data.max_length)
    return evalset


def _why_none(cfg: Any, counted: dict) -> str:
    """Why encoding kept no example, from its counts."""
    why = [f"{counted['dropped']} had no target tokens within data.max_length={cfg.data.max_length}"]
    if counted["too_long"]:
        why.append(f"{counted['too_long']} longer one(s) left out by data.too_long: drop")
    return "; ".join(why)


def _too_long_note(cfg: Any, n: int, kept: int) -> str:
    """What data.too_long did to `n` examples longer than data.max_length (`kept`: the examples encoded)."""
    if cfg.data.too_long == "drop":
        return (f"{n} example(s) longer than data.max_length={cfg.data.max_length} tokens were left out "
                f"(data.too_long: drop); {kept} kept")
    return (f"{n} example(s) longer than data.max_length={cfg.data.max_length} tokens were split into pieces "
            f"(data.too_long: split); {kept} examples in all")


def _load_cached(where: Path, accelerator: Any, quiet: bool = False) -> tuple[Any, Any, dict] | None:
    """(train, eval, meta) from a complete cache entry; None when there is none, or when it cannot be read
    (a truncated Arrow file, a broken meta.json): the data is then tokenised again and the entry replaced."""
    import datasets

    if not (where / "meta.json").is_file():
        return None
    try:
        meta = json.loads((where / "meta.json").read_text())
        train = datasets.load_from_disk(str(where / "train"))
        evalset = datasets.load_from_disk(str(where / "eval")) if meta["has_eval"] else None
        meta["labels"]  # noqa: B018  (an entry without it is not one this version wrote)
        # An Arrow stream cut at a record batch's end reads without an error, as the batches before the cut
        # (1000 of 2800 examples): the entry says how many rows it holds
        rows = [len(train), len(evalset) if evalset is not None else 0]
        if (written := meta.pop("rows")) != rows:
            raise ValueError(f"its files hold {rows} (train, eval) examples of the {written} written")
    except (OSError, ValueError, KeyError, TypeError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        if not quiet and (accelerator is None or accelerator.is_main_process):
            log.warning("the tokenised-data cache entry %s cannot be read (%s: %s); tokenising the data again",
                        where, type(exc).__name__, str(exc)[:200])
        return None
    return train, evalset, meta


def _save_atomically(where: Path, train: Any, evalset: Any, meta: dict) -> None:
    """Write the entry beside `where`, then rename it into place; an unreadable or incomplete entry there
    (no meta.json) is replaced. Failing to write only costs the next run a tokenisation: warn, go on.
    A complete entry another run wrote meanwhile (the same data: its key says so) is kept, not replaced:
    that run trains from its mapped files, which a network file system does not keep for it once deleted."""
    import shutil

    if _load_cached(where, None, quiet=True) is not None:
        return
    tmp = where.with_name(where.name + f".tmp{os.getpid()}")
    try:
        train.save_to_disk(str(tmp / "train"))
        if evalset is not None:
            evalset.save_to_disk(str(tmp / "eval"))
        rows = [len(train), len(evalset) if evalset is not None else 0]  # (checked as it is read: _load_cached)
        (tmp / "meta.json").write_text(json.dumps({**meta, "rows": rows}))
        if _load_cached(where, None, quiet=True) is not None:
            return  # another run's entry came while this one was written (minutes for a large set): keep it
        if where.exists():
            old = where.with_name(where.name + f".old{os.getpid()}")
            os.replace(where, old)  # out of the way first: a rename onto a non-empty directory fails
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, where)
    except OSError as exc:
        if not (where / "meta.json").is_file():  # (else another run wrote the same entry meanwhile)
            log.warning("could not write the tokenised-data cache to %s (%s); the next run tokenises again "
                        "(set SCALETUNE_CACHE to a writable directory, or data.cache: false)", where, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["WHERE", "build_datasets", "build_eval_only", "read_records", "split_eval", "fingerprint"]


def _whole_prompts(cfg: Any) -> str:
    """What a skip means under dpo, kto and reward, which cut a prompt only to data.max_prompt_length: the prompt alone
    filled max_length."""
    if cfg.task not in ("dpo", "kto", "reward"):
        return ""
    if cfg.data.max_prompt_length is None:
        return (f" (task {cfg.task} keeps each prompt whole and cuts only the answers: these prompts fill it; set "
                "data.max_prompt_length to keep only a prompt's end, as TRL's max_prompt_length, or raise "
                "data.max_length)")
    return f" (their answers start past it, after data.max_prompt_length={cfg.data.max_prompt_length})"
