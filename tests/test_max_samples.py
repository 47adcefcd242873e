"""data.max_samples (LLaMA-Factory's max_samples): each data.train item and data.eval keep their first N records,
in file order, before weights and the eval_fraction split; the cut is logged, and keys the tokenised-data cache."""

from __future__ import annotations

import pytest

from scaletune.cli import main
from scaletune.config import from_dict
from scaletune.data import build_datasets, fingerprint
from scaletune.data.sources import read_train_records
from scaletune.model import load_tokenizer
from scaletune.tasks import get_task

from stutil import BASE, problems_of, write_jsonl


def _cls(tag: str, n: int) -> list[dict]:
    """n seq_cls records whose text names their source and position (`tag` 3)."""
    return [{"text": f"{tag} {i}", "label": "pos" if i % 2 else "neg"} for i in range(n)]


def _texts(records: list[dict]) -> list[str]:
    return [r["text"] for r in records]


def _encoded(tmp_path, tiny_bert, monkeypatch, **data) -> dict[str, list[str]]:
    """The texts build_datasets hands to the encoder for train and eval, in order (the records it read)."""
    import scaletune.data as data_module

    monkeypatch.setenv("SCALETUNE_CACHE", str(tmp_path / "cache"))
    cfg = from_dict({"task": "seq_cls", "model": {"name_or_path": str(tiny_bert), "dtype": "float32"},
                     "data": {"max_length": 16, **data}, "train": {"mixed_precision": "no"}})
    seen: list[list[str]] = []
    encode_all = data_module.encode_all

    def spy(records, *args, **kw):
        seen.append(_texts(records))
        return encode_all(records, *args, **kw)

    monkeypatch.setattr(data_module, "encode_all", spy)
    build_datasets(cfg, get_task("seq_cls"), load_tokenizer(cfg))
    return {"train": seen[0], "eval": seen[1]}


def test_each_source_keeps_its_first_records_in_file_order(tmp_path, caplog):
    a = write_jsonl(tmp_path / "a.jsonl", _cls("alpha", 10))
    b = write_jsonl(tmp_path / "b.jsonl", _cls("bravo", 2))
    with caplog.at_level("INFO", logger="scaletune"):
        records, source_of = read_train_records([str(a), str(b)], conll=False, max_samples=3)
    assert _texts(records) == ["alpha 0", "alpha 1", "alpha 2", "bravo 0", "bravo 1"]  # (b: shorter, all of it)
    assert [source_of[id(r)] for r in records] == [0, 0, 0, 1, 1]
    assert f"data.train[0]: first 3 of 10 records of {a} (data.max_samples)" in caplog.text
    assert "data.train[1]" not in caplog.text  # nothing cut: nothing said


def test_a_larger_cap_or_none_keeps_every_record(tmp_path, caplog):
    a = write_jsonl(tmp_path / "a.jsonl", _cls("alpha", 4))
    with caplog.at_level("INFO", logger="scaletune"):
        for cap in (4, 1000, None):
            assert _texts(read_train_records(str(a), conll=False, max_samples=cap)[0]) == _texts(_cls("alpha", 4))
    assert "data.max_samples" not in caplog.text


def test_a_patterns_files_are_capped_together(tmp_path):
    """shards/*.jsonl is one item: "the first N" of what it names, its files in sorted order."""
    (tmp_path / "shards").mkdir()
    write_jsonl(tmp_path / "shards" / "p1.jsonl", _cls("one", 2))
    write_jsonl(tmp_path / "shards" / "p2.jsonl", _cls("two", 5))
    records, _ = read_train_records(str(tmp_path / "shards" / "*.jsonl"), conll=False, max_samples=4)
    assert _texts(records) == ["one 0", "one 1", "two 0", "two 1"]


def test_weights_apply_to_the_capped_records(tmp_path, tiny_bert, monkeypatch):
    a = write_jsonl(tmp_path / "a.jsonl", _cls("alpha", 10))
    b = write_jsonl(tmp_path / "b.jsonl", _cls("bravo", 10))
    seen = _encoded(tmp_path, tiny_bert, monkeypatch, train=[str(a), {"path": str(b), "weight": 2}], max_samples=3)
    assert seen["train"] == ["alpha 0", "alpha 1", "alpha 2"] + ["bravo 0", "bravo 1", "bravo 2"] * 2


def test_the_eval_fraction_split_is_made_of_the_capped_records(tmp_path, tiny_bert, monkeypatch):
    a = write_jsonl(tmp_path / "a.jsonl", _cls("alpha", 40))
    seen = _encoded(tmp_path, tiny_bert, monkeypatch, train=str(a), eval_fraction=0.25, max_samples=8)
    assert len(seen["eval"]) == 2 and len(seen["train"]) == 6  # (a quarter of 8, not of 40)
    assert sorted(seen["train"] + seen["eval"]) == sorted(_texts(_cls("alpha", 8)))


def test_data_eval_keeps_its_first_records(tmp_path, tiny_bert, monkeypatch, caplog):
    a = write_jsonl(tmp_path / "a.jsonl", _cls("alpha", 6))
    e = write_jsonl(tmp_path / "e.jsonl", _cls("echo", 9))
    with caplog.at_level("INFO", logger="scaletune"):
        seen = _encoded(tmp_path, tiny_bert, monkeypatch, train=str(a), eval=str(e), max_samples=5)
    assert seen["train"] == _texts(_cls("alpha", 5)) and seen["eval"] == _texts(_cls("echo", 5))
    assert f"data.eval: first 5 of 9 records of {e} (data.max_samples)" in caplog.text
    assert "data: tokenising 5 record(s)" in caplog.text


def test_the_cache_key_follows_the_cap(tmp_path, tiny_bert):
    a = write_jsonl(tmp_path / "a.jsonl", _cls("alpha", 6))
    raw = {"task": "seq_cls", "model": {"name_or_path": str(tiny_bert), "dtype": "float32"},
           "data": {"train": str(a)}, "train": {"mixed_precision": "no"}}
    cfgs = [from_dict({**raw, "data": {**raw["data"], "max_samples": n}}) for n in (None, 2, 3)]
    tok = load_tokenizer(cfgs[0])
    assert len({fingerprint(cfg, tok) for cfg in cfgs}) == 3


def test_the_key_is_accepted_and_the_old_hint_gone():
    assert from_dict({**BASE, "data": {**BASE["data"], "max_samples": 1000}}).data.max_samples == 1000
    assert from_dict(BASE).data.max_samples is None
    text = "\n".join(problems_of({**BASE, "max_samples": 1000}))  # (LLaMA-Factory's flat config)
    assert "max_samples: unknown key (did you mean 'data.max_samples'?)" in text
    assert "no cap on examples" not in text


@pytest.mark.parametrize("bad", [0, -5])
def test_a_cap_below_one_is_refused_with_the_other_problems(make_config, capsys, bad):
    path = make_config("causal_lm", data={"max_samples": bad, "eval_fraction": 2.0, "eval": None})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"data.max_samples: must be >= 1 (or null: every record), got {bad}" in err
    assert "data.eval_fraction: must be in (0, 1), got 2.0" in err  # (all problems reported together)
    assert len(err.splitlines()) < 25 and "Traceback" not in err


def test_eval_of_the_held_out_split_needs_the_runs_cap(make_config, capsys):
    """The cap picks the records data.eval_fraction splits: another cap (or none) holds out other examples, some
    of them trained on, so `scaletune eval` refuses it as it refuses another seed."""
    path = make_config("causal_lm", n=32, data={"eval": None, "eval_fraction": 0.25, "max_samples": 16},
                       train={"max_steps": 1})
    assert main(["train", str(path)]) == 0
    assert main(["eval", str(path)]) == 0
    capsys.readouterr()
    for other in ("24", "null"):
        assert main(["eval", str(path), f"data.max_samples={other}"]) == 2
        assert "max_samples 16 (given: " in capsys.readouterr().err


def test_a_patterns_files_listed_one_by_one_are_another_cache_entry_under_a_cap(tmp_path, tiny_bert, monkeypatch):
    """The cap is per data.train item: shards/*.jsonl keeps the first N of its files together, the same files
    listed one by one the first N of each. Both read alike without a cap (one cache entry, as before), but under
    one they are other examples: the second run read the first's cached 3 examples instead of its 6."""
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", _cls("alpha", 5))
    write_jsonl(shards / "b.jsonl", _cls("bravo", 5))
    listed = [str(shards / "a.jsonl"), str(shards / "b.jsonl")]
    pattern = _encoded(tmp_path, tiny_bert, monkeypatch, train=str(shards / "*.jsonl"), eval_fraction=0.25,
                       max_samples=3)
    one_by_one = _encoded(tmp_path, tiny_bert, monkeypatch, train=listed, eval_fraction=0.25, max_samples=3)
    assert len(pattern["train"]) + len(pattern["eval"]) == 3
    assert len(one_by_one["train"]) + len(one_by_one["eval"]) == 6
    raw = {"task": "seq_cls", "model": {"name_or_path": str(tiny_bert), "dtype": "float32"},
           "train": {"mixed_precision": "no"}}
    tok = load_tokenizer(from_dict({**raw, "data": {"train": listed}}))
    uncapped = [from_dict({**raw, "data": {"train": train}}) for train in (str(shards / "*.jsonl"), listed)]
    assert fingerprint(uncapped[0], tok) == fingerprint(uncapped[1], tok)  # (without a cap: the same data)


def test_eval_scores_its_data_eval_capped_and_a_data_file_whole(make_config, tmp_path, capsys):
    """`scaletune eval` reads the config's data.eval as training did, its first N records; a file named with
    --data is what the user asked to score, all of it."""
    import json

    path = make_config("seq_cls", data={"max_samples": 12}, train={"max_steps": 1})
    assert main(["train", str(path)]) == 0
    evalf = tmp_path / "data" / "eval.jsonl"  # (make_config's: 16 records)
    counted = {}
    for name, extra in (("config", []), ("data", ["--data", str(evalf)])):
        out = tmp_path / f"{name}.pred.jsonl"
        assert main(["eval", str(path), "--predictions", str(out), *extra]) == 0
        counted[name] = len(out.read_text().splitlines())
    capsys.readouterr()
    assert counted == {"config": 12, "data": 16}
    assert json.loads((tmp_path / "data.pred.jsonl").read_text().splitlines()[-1])["line"] == f"{evalf}:16"
