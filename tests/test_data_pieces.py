"""A large set's encoded pieces wait on disk, memory-mapped, not in memory (data/__init__.py `_spilled`)."""

from __future__ import annotations

import gc
import pickle

import pyarrow as pa
import pytest

import scaletune.data.encode as data_mod
from scaletune.config import from_dict
from scaletune.data import build_datasets
from scaletune.errors import DataError
from scaletune.model import load_tokenizer
from scaletune.tasks import get_task

from stutil import alpaca_records, write_jsonl


def _build(tmp_path, model, data, monkeypatch, procs):
    monkeypatch.setenv("SCALETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_mod, "CHUNK", 7)
    cfg = from_dict({"task": "causal_lm", "model": {"name_or_path": str(model), "dtype": "float32"},
                     "data": {"train": str(data), "max_length": 256, "cache": False, "num_proc": procs},
                     "output_dir": str(tmp_path / "out")})
    return build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))


@pytest.mark.parametrize("procs", [1, 2])
def test_pieces_are_mapped_from_disk_not_held_by_arrow(tmp_path, tiny_llama, monkeypatch, procs):
    """The built set's data is not in Arrow's memory pool (the pieces used to be, until the end of the run),
    its scratch files are gone, a pickled copy (as a DataLoader worker may get) still holds the data, and
    the collector is not left frozen."""
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_records(60))
    before = pa.total_allocated_bytes()
    train = _build(tmp_path, tiny_llama, data, monkeypatch, procs)["train"]
    assert train.data.nbytes > 10_000
    assert pa.total_allocated_bytes() - before < train.data.nbytes / 4
    assert not list((tmp_path / "cache" / "tokenized").glob(".pieces-*"))
    assert pickle.loads(pickle.dumps(train)).to_dict() == train.to_dict()
    assert gc.get_freeze_count() == 0


def test_a_bad_record_leaves_no_pieces_behind(tmp_path, tiny_llama, monkeypatch):
    records = alpaca_records(40)
    records[30]["output"] = 7
    data = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=r"d.jsonl:31: field 'output' must be a string"):
        _build(tmp_path, tiny_llama, data, monkeypatch, 2)
    assert not list((tmp_path / "cache" / "tokenized").glob(".pieces-*"))
    assert gc.get_freeze_count() == 0
