"""The tokenised-data cache: reused when nothing that changes the examples changed, keyed by every
data.* key and the files' contents, and rebuilt when broken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scaletune.config import from_dict
from scaletune.data import build_datasets
from scaletune.errors import DataError
from scaletune.model import load_tokenizer
from scaletune.tasks import get_task

from stutil import write_jsonl


def test_tokenised_cache_is_reused(tmp_path, tiny_bert, monkeypatch, caplog):
    monkeypatch.setenv("SCALETUNE_CACHE", str(tmp_path / "cache"))
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b", "label": "pos"}, {"text": "b", "label": "neg"}] * 4)
    raw = {"task": "seq_cls", "model": {"name_or_path": str(tiny_bert), "dtype": "float32"},
           "data": {"train": str(train)}, "train": {"mixed_precision": "no"}}
    cfg = from_dict(raw)
    tok = load_tokenizer(cfg)
    with caplog.at_level("INFO", logger="scaletune"):  # (minutes of silence on a large file: say which)
        first = build_datasets(cfg, get_task("seq_cls"), tok)
        assert f"data: tokenising 8 record(s) of {train} (cached for later runs in " in caplog.text
        calls = []
        task = get_task("seq_cls")
        monkeypatch.setattr(task, "encode", lambda *a: calls.append(a))
        second = build_datasets(cfg, task, tok)
        assert f"data: tokenised {train} read from the cache" in caplog.text
    assert calls == [] and second["train"]["input_ids"] == first["train"]["input_ids"]
    assert second["labels"] == ["neg", "pos"] and task.label == "label"
    train.write_text(json.dumps({"text": "new", "label": "pos"}) + "\n" + json.dumps({"text": "x", "label": "neg"}))
    third = build_datasets(cfg, get_task("seq_cls"), tok)  # content changed -> new fingerprint
    assert len(third["train"]) == 2
    caplog.clear()
    with caplog.at_level("INFO", logger="scaletune"), pytest.raises(DataError, match="file not found"):
        build_datasets(from_dict({**raw, "data": {"train": str(tmp_path / "gone.jsonl")}}), get_task("seq_cls"), tok)
    assert "tokenising" not in caplog.text  # (it used to announce the reading of a file that is not there)


TEXTS = ["a b c d e f g h a b c d e f g h", "h g f e d c b a h g f e d c b a"]


def _cls_cache_setup(tmp_path, tiny_bert, monkeypatch, **data):
    monkeypatch.setenv("SCALETUNE_CACHE", str(tmp_path / "cache"))
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": TEXTS[0], "label": "pos"}, {"text": TEXTS[1], "label": "neg"}] * 4)
    cfg = from_dict({"task": "seq_cls", "model": {"name_or_path": str(tiny_bert), "dtype": "float32"},
                     "data": {"train": str(train), "max_length": 8, **data}, "train": {"mixed_precision": "no"}})
    return cfg, load_tokenizer(cfg)


def test_cache_key_follows_truncation_side_and_the_seed_only_for_a_split(tmp_path, tiny_bert, monkeypatch):
    """A tokenizer saved with truncation_side "left" keeps the other end of a cls text: it got the entry of
    the same vocabulary cut on the right, so it trained on ids predict never feeds it. The seed picks only
    data.eval_fraction's split: changing it re-tokenised the whole set for nothing."""
    from scaletune.data import fingerprint

    cfg, tok = _cls_cache_setup(tmp_path, tiny_bert, monkeypatch)
    right = build_datasets(cfg, get_task("seq_cls"), tok)["train"]["input_ids"]
    tok.truncation_side = "left"
    left = build_datasets(cfg, get_task("seq_cls"), tok)["train"]["input_ids"]
    assert left != right and left == tok(TEXTS * 4, truncation=True, max_length=8)["input_ids"]
    reseeded = from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "seed": 7}})
    assert fingerprint(reseeded, tok) == fingerprint(cfg, tok)
    split = from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "eval_fraction": 0.25}})
    resplit = from_dict({**split.to_dict(), "train": {**split.to_dict()["train"], "seed": 7}})
    assert fingerprint(resplit, tok) != fingerprint(split, tok)


# A changed value for every data.* key the cache key must follow (the base config: _cls_cache_setup's, with
# eval_fraction 0.1): each one changes what is read, split or encoded.
_DATA_CHANGES = {
    "train": lambda cfg, tmp: [{"path": cfg.data.train, "weight": 2.0}],  # the same file, another weight
    "eval": lambda cfg, tmp: str(write_jsonl(tmp / "e.jsonl", [{"text": TEXTS[0], "label": "pos"}])),
    "eval_fraction": lambda cfg, tmp: 0.2,
    "max_samples": lambda cfg, tmp: 3,  # (the base file holds 8 records: 3 keeps fewer)
    "format": lambda cfg, tmp: "text",
    "max_length": lambda cfg, tmp: 16,
    "max_prompt_length": lambda cfg, tmp: 8,
    "train_on_prompt": lambda cfg, tmp: True,
    "packing": lambda cfg, tmp: True,
    "too_long": lambda cfg, tmp: "drop",
    "train_on_last_turn": lambda cfg, tmp: True,
    "columns": lambda cfg, tmp: {"instruction": "question"},
    "text_column": lambda cfg, tmp: "sentence",
    "text_pair_column": lambda cfg, tmp: "hypothesis",
    "label_column": lambda cfg, tmp: "y",
    "label_separator": lambda cfg, tmp: ";",
    "tokens_column": lambda cfg, tmp: "words",
    "tags_column": lambda cfg, tmp: "ner",
    "conll_columns": lambda cfg, tmp: [2, 3],
    "labels": lambda cfg, tmp: ["pos", "neg"],
}


# not in the key: how the data is loaded, not what it is; chat_template's text is in the tokenizer digest
_NOT_IN_CACHE_KEY = {"num_workers", "num_proc", "cache", "group_by_length", "chat_template"}


def test_every_data_key_is_covered_by_the_cache_key_test():
    """A new data.* key must be added to _DATA_CHANGES (or to the keys deliberately out of the cache key),
    so the test below checks that the tokenised-data cache follows it."""
    from dataclasses import fields

    from scaletune.config import DataConfig

    assert {f.name for f in fields(DataConfig)} == set(_DATA_CHANGES) | _NOT_IN_CACHE_KEY


@pytest.mark.parametrize("key", sorted(_DATA_CHANGES))
def test_cache_key_follows_every_data_key(tmp_path, tiny_bert, monkeypatch, key):
    """A data.* key left out of the cache key (max_length, the sources' weights, eval_fraction, ...) makes a
    run with the changed setting train on the tokenised data of the old one, without a word."""
    import copy

    from scaletune.data import fingerprint

    cfg, tok = _cls_cache_setup(tmp_path, tiny_bert, monkeypatch, eval_fraction=0.1)
    changed = copy.deepcopy(cfg)
    value = _DATA_CHANGES[key](cfg, tmp_path)
    assert value != getattr(cfg.data, key)
    setattr(changed.data, key, value)
    assert fingerprint(changed, tok) != fingerprint(cfg, tok)
    assert fingerprint(copy.deepcopy(cfg), tok) == fingerprint(cfg, tok)  # (a copy keeps the key)


def test_cache_key_follows_the_data_files_contents_edited_in_place(tmp_path, tiny_bert, monkeypatch):
    """data.eval (and data.train) edited in place, same path and suffix: the cache keyed by the path would
    evaluate (train) on the old examples' tokens."""
    from scaletune.data import fingerprint

    cfg, tok = _cls_cache_setup(tmp_path, tiny_bert, monkeypatch)
    cfg.data.eval = str(write_jsonl(tmp_path / "e.jsonl", [{"text": TEXTS[0], "label": "pos"}]))
    before = fingerprint(cfg, tok)
    write_jsonl(Path(cfg.data.eval), [{"text": TEXTS[1], "label": "pos"}])
    after_eval = fingerprint(cfg, tok)
    assert after_eval != before
    write_jsonl(Path(cfg.data.train), [{"text": TEXTS[1], "label": "neg"}] * 8)
    assert fingerprint(cfg, tok) != after_eval


def test_broken_cache_entries_are_rebuilt_and_replaced(tmp_path, tiny_bert, monkeypatch, caplog):
    """An entry with a truncated Arrow file or an empty meta.json crashed the run with pyarrow's or json's
    traceback; one without meta.json (a crash while it was written) was never replaced, and every run left
    a full copy of the data beside it (the rename onto the non-empty directory failed, silently)."""
    from scaletune.data import cache_root, fingerprint

    cfg, tok = _cls_cache_setup(tmp_path, tiny_bert, monkeypatch)
    fresh = list(build_datasets(cfg, get_task("seq_cls"), tok)["train"]["input_ids"])  # (read now: the entry is damaged below)
    entry = cache_root() / fingerprint(cfg, tok)
    arrow = next((entry / "train").glob("*.arrow"))
    calls: list = []
    for damage in ("truncate", "meta", "no-meta"):
        if damage == "truncate":
            arrow.write_bytes(arrow.read_bytes()[:100])
        elif damage == "meta":
            (entry / "meta.json").write_text("")
        else:
            (entry / "meta.json").unlink()
        caplog.clear()
        with caplog.at_level("WARNING", logger="scaletune"):
            again = list(build_datasets(cfg, get_task("seq_cls"), tok)["train"]["input_ids"])
        assert again == fresh, damage
        if damage != "no-meta":
            assert f"the tokenised-data cache entry {entry} cannot be read" in caplog.text, damage
        assert (entry / "meta.json").is_file() and sorted(p.name for p in entry.parent.iterdir()) == [entry.name]
        calls.clear()
        task = get_task("seq_cls")
        monkeypatch.setattr(task, "encode", lambda *a: calls.append(a))
        assert list(build_datasets(cfg, task, tok)["train"]["input_ids"]) == fresh and calls == []  # the repaired entry
        monkeypatch.undo()
        monkeypatch.setenv("SCALETUNE_CACHE", str(tmp_path / "cache"))


def test_the_cache_is_found_by_the_files_contents_and_read_mapped(tmp_path, tiny_bert, monkeypatch, capsys):
    """The cache key held data.train's path: the same file copied to scratch space was tokenised again. The
    first run trained on the pieces built in memory (~1.1 GB more at 300k Alpaca records) where later runs
    map the saved copy; 64-bit integer columns took a third more space than the ids need; and a long
    tokenisation showed nothing."""
    import shutil

    import scaletune.data as data
    from scaletune import progress

    monkeypatch.setattr(data.encode, "CHUNK", 3)  # several pieces: progress lines
    monkeypatch.setattr(progress, "LINE_EVERY_S", -1.0)  # (a line per piece: stderr is no terminal here)
    monkeypatch.setenv("SCALETUNE_NO_PROGRESS", "0")
    cfg, tok = _cls_cache_setup(tmp_path, tiny_bert, monkeypatch)
    built = build_datasets(cfg, get_task("seq_cls"), tok)["train"]
    assert built.cache_files and "tokenising: 3/8 records" in capsys.readouterr().err
    assert {f.name: str(f.type) for f in built.data.schema} == {
        "input_ids": "list<item: int32>", "labels": "int32", "length": "int32"}
    copy = tmp_path / "scratch" / "copy.jsonl"
    copy.parent.mkdir()
    shutil.copy(cfg.data.train, copy)
    calls: list = []
    task = get_task("seq_cls")
    monkeypatch.setattr(task, "encode", lambda *a: calls.append(a))
    cfg.data.train = str(copy)
    assert list(build_datasets(cfg, task, tok)["train"]["input_ids"]) == list(built["input_ids"]) and calls == []
    # a second run that tokenised the same data meanwhile keeps the entry the first one trains from (deleting
    # its mapped files would pull them from under it on a network file system)
    entry = data.cache_root() / data.fingerprint(cfg, tok)
    arrow = next((entry / "train").glob("*.arrow"))
    inode = arrow.stat().st_ino
    data._save_atomically(entry, built, None, {"labels": ["neg", "pos"], "has_eval": False})
    assert arrow.stat().st_ino == inode and sorted(p.name for p in entry.parent.iterdir()) == [entry.name]
    as_csv = tmp_path / "scratch" / "copy.csv"  # the same bytes another reader reads: another entry
    shutil.copy(copy, as_csv)
    assert data.fingerprint(cfg, tok) != data.fingerprint(from_dict({**cfg.to_dict(), "data": {
        **cfg.to_dict()["data"], "train": str(as_csv)}}), tok)


def test_a_cache_that_cannot_be_written_is_named(tmp_path, tiny_bert, monkeypatch, caplog):
    cfg, tok = _cls_cache_setup(tmp_path, tiny_bert, monkeypatch)
    (tmp_path / "cache").write_text("a file, not a directory")
    with caplog.at_level("WARNING", logger="scaletune"):
        built = build_datasets(cfg, get_task("seq_cls"), tok)
    assert len(built["train"]) == 8
    assert "could not write the tokenised-data cache to " in caplog.text and "SCALETUNE_CACHE" in caplog.text


def test_cache_key_follows_the_seed_for_a_fractional_weight(tmp_path, tiny_bert, monkeypatch):
    """A weight of 0.5 keeps a half of its source the seed picks: a run with another train.seed got the entry of
    the first one's half (without eval_fraction the seed was not in the key), so which examples it trained on
    depended on what the cache held. A whole weight (2: each twice) picks nothing: the key stays."""
    import copy

    from scaletune.data import fingerprint

    cfg, tok = _cls_cache_setup(tmp_path, tiny_bert, monkeypatch)
    other = write_jsonl(tmp_path / "o.jsonl", [{"text": f"{w} {w}", "label": "neg"} for w in "abcdefghijkl"])
    cfg.data.train = [cfg.data.train, {"path": str(other), "weight": 0.5}]
    first = build_datasets(cfg, get_task("seq_cls"), tok)["train"]["input_ids"]
    reseeded = copy.deepcopy(cfg)
    reseeded.train.seed = 7
    uncached = copy.deepcopy(reseeded)
    uncached.data.cache = False
    fresh = build_datasets(uncached, get_task("seq_cls"), tok)["train"]["input_ids"]
    assert fresh != first  # (another half)
    assert build_datasets(reseeded, get_task("seq_cls"), tok)["train"]["input_ids"] == fresh
    cfg.data.train[1]["weight"] = reseeded.data.train[1]["weight"] = 2.0
    assert fingerprint(reseeded, tok) == fingerprint(cfg, tok)


def test_an_entry_cut_at_a_record_batch_is_rebuilt(tmp_path, tiny_bert, monkeypatch, caplog):
    """An Arrow stream cut where a record batch ends reads without an error, as the batches before the cut: a
    cache entry cut there trained on part of the data (or none of it) without a word."""
    import pyarrow as pa

    from scaletune.data import cache_root, fingerprint

    cfg, tok = _cls_cache_setup(tmp_path, tiny_bert, monkeypatch, eval_fraction=0.25)
    fresh = build_datasets(cfg, get_task("seq_cls"), tok)
    fresh = [list(fresh[split]["input_ids"]) for split in ("train", "eval")]
    entry = cache_root() / fingerprint(cfg, tok)
    for split in ("train", "eval"):
        arrow = next((entry / split).glob("*.arrow"))
        data = arrow.read_bytes()
        source = pa.BufferReader(data)
        pa.ipc.MessageReader.open_stream(source).read_next_message()  # the schema: the cut is where it ends
        arrow.write_bytes(data[:source.tell()])
        caplog.clear()
        with caplog.at_level("WARNING", logger="scaletune"):
            again = build_datasets(cfg, get_task("seq_cls"), tok)
        assert [list(again[s]["input_ids"]) for s in ("train", "eval")] == fresh, split
        assert f"the tokenised-data cache entry {entry} cannot be read" in caplog.text and "examples of the" in caplog.text


def test_an_entry_another_run_wrote_meanwhile_is_kept(tmp_path, tiny_bert, monkeypatch):
    """Two runs started together both tokenise; the second to finish writing moved the first one's entry away and
    deleted it while that run trained from its mapped files (gone on a network file system). Its check for an
    entry came before its own write (minutes for a large set), not after."""
    import datasets

    import scaletune.data as data

    cfg, tok = _cls_cache_setup(tmp_path, tiny_bert, monkeypatch)
    built = build_datasets(cfg, get_task("seq_cls"), tok)["train"]
    entry = data.cache_root() / data.fingerprint(cfg, tok)
    aside = entry.with_name("aside")
    entry.rename(aside)
    save = datasets.Dataset.save_to_disk

    def save_while_the_other_run_finishes(self, path, *args, **kwargs):
        if aside.exists():
            aside.rename(entry)  # the other run's entry lands while this one writes
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_while_the_other_run_finishes)
    inode = next((entry.parent / "aside" / "train").glob("*.arrow")).stat().st_ino
    data._save_atomically(entry, built, None, {"labels": ["neg", "pos"], "has_eval": False})
    assert next((entry / "train").glob("*.arrow")).stat().st_ino == inode
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]


def test_varlen_is_the_runs_setting_not_the_cached_entrys(tmp_path, tiny_llama, monkeypatch):
    """causal_lm kept model.attn_implementation == "varlen" as task state in the cache's meta, whose key holds no
    model.* setting: a varlen run that found a sdpa run's entry passed no segment bounds (silently SDPA)."""
    monkeypatch.setenv("SCALETUNE_CACHE", str(tmp_path / "cache"))
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}, {"text": "d e f"}])
    for impl in ("sdpa", "varlen"):
        cfg = from_dict({"task": "causal_lm", "model": {"name_or_path": str(tiny_llama), "attn_implementation": impl},
                         "data": {"train": str(train), "format": "text"}})
        task = get_task("causal_lm")
        task.configure(cfg)
        build_datasets(cfg, task, load_tokenizer(cfg))
        assert task._varlen == (impl == "varlen")
