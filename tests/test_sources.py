"""data.train as a list of sources with weights (scaletune/data/sources.py): concatenated, each source's
examples repeated or subsampled by its weight after the eval split, every problem named by its item."""

from __future__ import annotations

import json

import pytest

from scaletune.cli import main
from scaletune.config import load_config
from scaletune.errors import DataError
from scaletune.train import setup

from stutil import alpaca_records, write_jsonl


def _records(tag: str, n: int) -> list[dict]:
    return [{**r, "instruction": f"SRC{tag.upper()} {i}: {r['instruction']}"} for i, r in enumerate(alpaca_records(n))]


def _tag(run, ex) -> str:
    """Which source an example came from (its instruction's first word, in the tokenised text)."""
    text = run.tokenizer.decode(ex["input_ids"]).replace(" ", "")
    return "alpha" if "SRCALPHA" in text else "bravo" if "SRCBRAVO" in text else "?"


def _tags(run) -> list[str]:
    return [_tag(run, ex) for ex in run.data["train"]]


def test_sources_are_concatenated_and_weighted_after_the_split(make_config, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", _records("alpha", 20))
    b = write_jsonl(tmp_path / "b.jsonl", _records("bravo", 20))
    path = make_config("causal_lm", data={"train": [str(a), {"path": str(b), "weight": 2.5}], "eval": None,
                                          "eval_fraction": 0.25, "max_length": 256, "packing": False})
    run, _ = setup(load_config(path))
    n_eval = {"alpha": 0, "bravo": 0}
    for ex in run.data["eval"]:
        n_eval[_tag(run, ex)] += 1
    assert sum(n_eval.values()) == 10
    tags = _tags(run)
    kept = {tag: 20 - n for tag, n in n_eval.items()}
    assert tags.count("alpha") == kept["alpha"]
    assert tags.count("bravo") == 2 * kept["bravo"] + int(kept["bravo"] * 0.5 + 0.5)
    # the same selection on every run (seeded), and a changed weight is a different dataset (cache)
    again, _ = setup(load_config(path), overwrite=True)
    assert sorted(_tags(again)) == sorted(tags)


def test_list_problems_are_named_by_item(make_config, tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", _records("alpha", 8))
    path = make_config("causal_lm", data={"train": [str(a), {"path": str(a), "weight": 0}, {"file": "x"}, 3]})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    for wanted in ("data.train[1].weight: must be a number > 0", "data.train[2]: unknown key(s) file",
                   "data.train[2].path: a data file (or hub:<id>[:split]) is required",
                   "data.train[3]: expected a file or {path: FILE, weight: W}, got int 3"):
        assert wanted in err, wanted
    path = make_config("causal_lm", data={"train": {"path": str(a)}})
    assert main(["train", str(path)]) == 2
    assert "data.train: expected str | list, got dict" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(alpaca_records(1)[0]) + "\n{oops\n")
    path = make_config("causal_lm", data={"train": [str(a), str(bad)]})
    assert main(["train", str(path)]) == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err
    path = make_config("causal_lm", data={"train": [str(a), str(tmp_path / "missing.jsonl")]})
    assert main(["train", str(path)]) == 2
    assert "data.train[1]: file not found" in capsys.readouterr().err


@pytest.mark.parametrize("weight", [1, 1.0])
def test_a_list_of_one_source_is_that_source(make_config, tmp_path, weight):
    a = write_jsonl(tmp_path / "a.jsonl", _records("alpha", 16))
    one, _ = setup(load_config(make_config("causal_lm", data={"train": str(a)})))
    listed, _ = setup(load_config(make_config("causal_lm", data={"train": [{"path": str(a), "weight": weight}]})),
                      overwrite=True)
    assert [ex["input_ids"] for ex in one.data["train"]] == [ex["input_ids"] for ex in listed.data["train"]]


def test_a_weight_that_keeps_nothing_of_a_source_says_so(make_config, tmp_path, caplog):
    a = write_jsonl(tmp_path / "a.jsonl", _records("alpha", 16))
    b = write_jsonl(tmp_path / "b.jsonl", _records("bravo", 8))
    path = make_config("causal_lm", data={"train": [str(a), {"path": str(b), "weight": 0.01}], "max_length": 256})
    with caplog.at_level("WARNING", logger="scaletune"):
        run, _ = setup(load_config(path))
    assert f"data.train[1]: weight 0.01 keeps none of the 8 training example(s) of {b}" in caplog.text
    assert set(_tags(run)) == {"alpha"}
    alone = make_config("causal_lm", data={"train": [{"path": str(b), "weight": 0.01}], "max_length": 256})
    with pytest.raises(DataError, match=r"data.train: the weights of .* keep no training example"):
        setup(load_config(alone), overwrite=True)


def test_eval_of_the_held_out_split_needs_the_sources_in_the_runs_order(make_config, tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", _records("alpha", 16))
    b = write_jsonl(tmp_path / "b.jsonl", _records("bravo", 16))
    path = make_config("causal_lm", data={"train": [str(a), str(b)], "eval": None, "eval_fraction": 0.25},
                       train={"max_steps": 1})
    assert main(["train", str(path)]) == 0
    assert main(["eval", str(path)]) == 0
    capsys.readouterr()
    assert main(["eval", str(path), f"data.train=[{b},{a}]"]) == 2
    assert "lists the sources the adapter at" in capsys.readouterr().err
    for some in (f"[{a}]", f"[{a},{b},{b}]"):  # a subset, a superset: split with other examples than the run's
        assert main(["eval", str(path), f"data.train={some}"]) == 2
        assert "shares sources with the data the adapter at" in capsys.readouterr().err
    c = write_jsonl(tmp_path / "c.jsonl", _records("charlie", 16))
    assert main(["eval", str(path), f"data.train=[{c}]"]) == 0  # other data altogether: its own split


def test_a_fractional_weights_subset_is_seeded():
    """weight 0.5 keeps a random half of a source: the same half for the same train.seed (every rank, every
    resume, the cache key's digest of the data), another for another seed. An unseeded pick trained each rank
    and each resumed run on different examples."""
    from scaletune.data.sources import weighted

    a, b = _records("alpha", 4), _records("bravo", 20)
    source_of = {**{id(r): 0 for r in a}, **{id(r): 1 for r in b}}
    train = ["a.jsonl", {"path": "b.jsonl", "weight": 0.5}]

    def kept(seed: int) -> list[str]:
        out = weighted(a + b, source_of, train, seed)
        assert out[:4] == a and len(out) == 14  # source 0 whole, then half of source 1
        return [r["instruction"] for r in out[4:]]

    first = kept(0)
    assert len(set(first)) == 10 and all(r.startswith("SRCBRAVO") for r in first)
    assert all(kept(0) == first for _ in range(5))
    assert set(kept(1)) != set(first)


def test_a_glob_pattern_is_the_files_it_matches_in_sorted_order(make_config, tmp_path, capsys):
    """data.train: shards/*.jsonl reads every matching file, sorted (the same order on every run and rank), each
    with the item's weight; a file added later is other data (the cache's version); no match is one error."""
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-2.jsonl", _records("bravo", 6))
    write_jsonl(shards / "part-1.jsonl", _records("alpha", 4))
    (shards / "notes").mkdir()  # (a directory the pattern matches is no data file)
    path = make_config("causal_lm", data={"train": [{"path": str(shards / "*"), "weight": 2}], "eval": None,
                                          "max_length": 256, "packing": False})
    run, _ = setup(load_config(path))
    assert sorted(_tags(run)) == ["alpha"] * 8 + ["bravo"] * 12
    from scaletune.data.sources import train_sources

    assert train_sources(str(shards / "part-?.jsonl")) == [(str(shards / "part-1.jsonl"), 1.0),
                                                          (str(shards / "part-2.jsonl"), 1.0)]
    write_jsonl(shards / "part-3.jsonl", _records("alpha", 2))
    again, _ = setup(load_config(path), overwrite=True)
    assert again.data["train_digest"] != run.data["train_digest"] and len(again.data["train"]) == 24
    path = make_config("causal_lm", data={"train": str(tmp_path / "none" / "*.jsonl")}, output_dir=str(tmp_path / "x"))
    assert main(["train", str(path)]) == 2
    assert f"data.train: no file matches {tmp_path / 'none' / '*.jsonl'}" in capsys.readouterr().err


def test_a_pattern_matching_the_eval_file_is_refused(make_config, tmp_path, capsys):
    """data/*.jsonl beside data/eval.jsonl would train on the examples the run is scored on, with nothing but
    a file name in the log to say so: one error naming the item and the file, exit 2, nothing written."""
    data = tmp_path / "data"
    path = make_config("causal_lm", data={"train": [str(data / "train.jsonl"), {"path": str(data / "*.jsonl")}]})
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"data.train[1]: the pattern {data / '*.jsonl'} matches {data / 'eval.jsonl'}, data.eval's file" in err
    assert not (tmp_path / "run").exists()
    narrower = make_config("causal_lm", data={"train": str(data / "tr*.jsonl")})
    load_config(narrower, check_peft=True)  # (a pattern that leaves the eval file out is fine)


def test_overwrite_checks_every_file_a_pattern_matches(make_config, tmp_path, capsys):
    """--overwrite refuses an output_dir holding any of the run's inputs: each file a pattern matches, not only
    the last in sorted order (a pattern's files share one config key)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    write_jsonl(out / "metrics.jsonl", _records("alpha", 4))  # (matched, but not the last match: zz/ sorts after)
    (tmp_path / "zz").mkdir()
    write_jsonl(tmp_path / "zz" / "more.jsonl", _records("bravo", 4))
    path = make_config("causal_lm", data={"train": str(tmp_path / "*" / "*.jsonl"), "eval": None,
                                          "eval_fraction": 0.1})
    capsys.readouterr()
    assert main(["train", str(path), "--overwrite"]) == 2
    assert f"data.train ({out / 'metrics.jsonl'}) is inside it" in capsys.readouterr().err


def test_an_eval_file_that_is_also_a_training_source_is_said(make_config, tmp_path, caplog):
    """Named twice (not by a pattern, which is refused): the evals would score trained examples; a fit check
    may mean it, so it is a warning naming the source."""
    a = write_jsonl(tmp_path / "a.jsonl", _records("alpha", 16))
    b = write_jsonl(tmp_path / "b.jsonl", _records("bravo", 16))
    path = make_config("causal_lm", data={"train": [str(a), str(b)], "eval": f"{tmp_path}/./b.jsonl"})
    with caplog.at_level("WARNING", logger="scaletune"):
        setup(load_config(path))
    assert f"data.eval ({tmp_path}/./b.jsonl) is also data.train[1]: the evals score" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="scaletune"):
        setup(load_config(make_config("causal_lm", data={"train": str(a), "eval": str(b)})), overwrite=True)
    assert "is also data.train" not in caplog.text
