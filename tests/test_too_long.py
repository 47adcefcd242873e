"""data.too_long: what becomes of a causal_lm example longer than data.max_length (truncate, drop, split)."""

from __future__ import annotations

import json

import pytest

from scaletune.config import load_config
from scaletune.data import build_datasets
from scaletune.errors import DataError
from scaletune.loop import fit
from scaletune.model import load_tokenizer
from scaletune.tasks import IGNORE, get_task
from scaletune.train import StopFlag, setup

from stutil import assert_clean_error, run_cli, write_jsonl
from stutil import data_config as _cfg

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


def _long_text(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] + str(i % 10) for i in range(n_words))


def test_drop_leaves_long_examples_out_of_both_splits_and_says_so(tmp_path, tiny_llama, caplog):
    """truncate trains on a cut answer; drop leaves those examples out (train and eval), counted and warned, and
    keeps every other example exactly as truncate encodes it."""
    records = [{"instruction": f"Say {w}", "input": "", "output": w} for w in WORDS[:4]]
    records += [{"instruction": "Recite", "input": "", "output": _long_text(80, s)} for s in range(2)]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    evaldata = write_jsonl(tmp_path / "e.jsonl", records[3:])
    built = {}
    for mode in ("truncate", "drop"):
        cfg = _cfg(tmp_path, tiny_llama, data=data, eval=str(evaldata), max_length=128, too_long=mode)
        caplog.clear()
        with caplog.at_level("WARNING", logger="scaletune"):
            built[mode] = build_datasets(cfg, get_task("causal_lm"), load_tokenizer(cfg))
        built[mode]["log"] = caplog.text
    assert built["truncate"]["stats"]["truncated"] == {"train": 2, "eval": 2}
    assert built["drop"]["stats"]["truncated"] == {"train": 0, "eval": 0}
    assert built["drop"]["stats"]["too_long"] == {"train": 2, "eval": 2}
    assert (len(built["drop"]["train"]), len(built["drop"]["eval"])) == (4, 1)
    assert built["drop"]["train"]["input_ids"] == built["truncate"]["train"]["input_ids"][:4]
    assert "data.train: 2 example(s) longer than data.max_length=128 tokens were left out (data.too_long: drop); " \
           "4 kept" in built["drop"]["log"]
    assert "were cut" not in built["drop"]["log"] and "were cut" in built["truncate"]["log"]
    only_long = _cfg(tmp_path, tiny_llama, data=write_jsonl(tmp_path / "l.jsonl", records[4:]), max_length=128,
                     too_long="drop")
    with pytest.raises(DataError, match=r"no usable examples in .*l.jsonl \(0 had no target tokens within "
                                        r"data.max_length=128; 2 longer one\(s\) left out by data.too_long: drop\)"):
        build_datasets(only_long, get_task("causal_lm"), load_tokenizer(only_long))


@pytest.mark.parametrize("bos", [False, True])
def test_split_makes_every_token_a_target_exactly_once(tmp_path, tiny_llama, bos):
    """A long text becomes pieces of at most max_length tokens that overlap by one token: read in order, the
    pieces' targets (every token after a row's first) are the whole text's, each once, with the token before
    each as context. Short texts are kept whole, as truncate keeps them."""
    records = [{"text": _long_text(70, 1)}, {"text": "a short one"}, {"text": _long_text(33, 2)}]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=20, too_long="split")
    tok = load_tokenizer(cfg)
    if not bos:
        tok.add_bos_token = False
    whole_cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=4096)
    whole = build_datasets(whole_cfg, get_task("causal_lm"), tok)["train"]
    built = build_datasets(cfg, get_task("causal_lm"), tok)
    pieces = built["train"]
    assert built["stats"]["too_long"] == {"train": 2, "eval": 0}
    assert all(len(ids) <= 20 for ids in pieces["input_ids"])
    at = 0
    for ids, labels in zip(whole["input_ids"], whole["labels"]):
        targets, context = [], []
        while True:
            p_ids, p_labels = pieces[at]["input_ids"], pieces[at]["labels"]
            at += 1
            targets += [(p_ids[i - 1], lab) for i, lab in enumerate(p_labels) if i and lab != IGNORE]
            context.append(p_ids)
            if sum(map(len, context)) - (len(context) - 1) >= len(ids):
                break
        assert targets == [(ids[i - 1], lab) for i, lab in enumerate(labels) if i and lab != IGNORE]
        assert [t for piece in context for t in piece[1:]] == ids[1:]  # (each piece starts with the last one's end)
    assert at == len(pieces) and len(pieces) > len(whole)
    assert (whole["labels"][0][0] == IGNORE) == bos  # (a leading BOS is no target; the first piece keeps it)


def test_split_trains_with_packing_and_is_kept_in_run_json(make_config, tmp_path):
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": _long_text(60 + 9 * i, i)} for i in range(8)])
    path = make_config("causal_lm", data={"train": str(texts), "eval": None, "max_length": 32, "packing": True,
                                          "too_long": "split"},
                       train={"global_batch_size": 2, "micro_batch_size": 1, "max_steps": 2})
    run, _ = setup(load_config(path))
    info = json.loads((run.output_dir / "run.json").read_text())
    assert info["too_long_examples"] == {"train": 8, "eval": 0}
    assert run.data["stats"]["packed_examples"] > 8  # the pieces, packed
    assert fit(run, StopFlag()) == "done"


@pytest.mark.parametrize("case, fragments", [
    ({"task": "seq_cls", "data": {"too_long": "drop"}}, ["data.too_long: drop is for task causal_lm"]),
    ({"data": {"too_long": "split", "format": "alpaca"}}, ["data.too_long: split cuts plain text", "alpaca"]),
    ({"data": {"too_long": "split"}}, ["data.too_long: split cuts plain text", "holds alpaca records"]),
    ({"data": {"too_long": "cut"}}, ["data.too_long", "truncate"]),
])
def test_too_long_refusals(make_config, capsys, case, fragments):
    """Where a setting cannot do what it says: a one-screen error naming the key, exit 2 (the auto-detected
    Alpaca data is refused once read, before the model loads)."""
    path = make_config(case.get("task", "causal_lm"), data=case["data"])
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, *fragments)


def test_a_held_out_part_that_drop_empties_is_refused_by_train_and_eval(make_config, tmp_path, capsys):
    """data.eval_fraction's held-out examples all longer than max_length under drop: training said "no eval set"
    and trained on without the evals asked for, and `scaletune eval` of the run crashed on the empty set (a
    TypeError traceback); both now end in data.eval's one-screen error."""
    from scaletune.data import split_eval

    records = [{"instruction": f"Say {i}", "input": "", "output": "word " * (3 if i % 2 else 200)} for i in range(10)]
    seed = next(s for s in range(100) if all(len(r["output"]) > 100 for r in split_eval(records, 0.2, s)[1]))
    data = write_jsonl(tmp_path / "d.jsonl", records)
    path = make_config(data={"train": str(data), "eval": None, "eval_fraction": 0.2, "max_length": 64},
                       train={"seed": seed, "global_batch_size": 2, "micro_batch_size": 1, "max_steps": 1})
    code, _, err = run_cli(["train", path, "data.too_long=drop"], capsys)
    assert_clean_error(code, err, "data.eval_fraction: no usable examples in the held-out part of",
                       "2 longer one(s) left out by data.too_long: drop")
    code, _, err = run_cli(["train", path], capsys)  # (truncate: the held-out answers are cut, and scored)
    assert code == 0, err
    code, _, err = run_cli(["eval", path, "data.too_long=drop"], capsys)
    assert_clean_error(code, err, "data.eval_fraction: no usable examples", "left out by data.too_long: drop")


@pytest.mark.parametrize("kind", ["completion", "pretrain"])
def test_axolotl_completion_datasets_convert_to_split(tmp_path, capsys, kind):
    """axolotl cuts a `type: completion` text into sequence_len pieces, as pretraining_dataset's: a converted
    config splits them too, rather than dropping every long one (axolotl's excess_length_strategy default,
    which those pieces never meet), whichever key comes first."""
    import yaml

    text = write_jsonl(tmp_path / "corpus.jsonl", [{"text": _long_text(40, 1)}])
    for order in ("first", "last"):
        excess = "excess_length_strategy: drop\n"
        body = f"datasets:\n  - path: {text}\n    type: {kind}\nsequence_len: 64\n"
        src = tmp_path / f"{order}.yaml"
        src.write_text("base_model: m\nadapter: lora\n" + (excess + body if order == "first" else body + excess))
        code, _, err = run_cli(["convert", src, "--out", tmp_path / f"{order}.out.yaml"], capsys)
        assert code == 0, err
        raw = yaml.safe_load((tmp_path / f"{order}.out.yaml").read_text())
        assert (raw["data"]["format"], raw["data"]["too_long"]) == ("text", "split"), order


def test_training_generates_for_the_eval_examples_drop_keeps(make_config, capsys, tmp_path):
    """train.eval_generate's first N are the examples the eval loss scores (and `eval --generate` answers): an
    example data.too_long: drop leaves out is not among them (it was generated for and scored)."""
    short = {"instruction": "Say hi.", "input": "", "output": "hi"}
    evalf = write_jsonl(tmp_path / "e.jsonl", [{**short, "output": "word " * 400}, short, short, short])
    path = make_config(data={"eval": str(evalf), "too_long": "drop"},
                       train={"max_steps": 1, "eval_generate": 2, "eval_max_new_tokens": 2})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    lines = [json.loads(x) for x in (tmp_path / "run" / "generations" / "step-1.jsonl").read_text().splitlines()]
    assert [ln["line"] for ln in lines] == [f"{evalf}:2", f"{evalf}:3"]


@pytest.mark.parametrize("mode", ["truncate", "split"])
def test_a_text_past_the_tokenizers_model_max_length_is_no_indexing_error(tmp_path, tiny_llama, mode, caplog):
    """A long document is tokenised whole, then cut or split at data.max_length (never above the tokenizer's
    model_max_length): transformers' warning that it "will result in indexing errors" was wrong and alarming."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": _long_text(80, s)} for s in range(3)])
    cfg = _cfg(tmp_path, tiny_llama, data=data, max_length=64, too_long=mode)
    tok = load_tokenizer(cfg)
    tok.model_max_length = 64
    with caplog.at_level("WARNING"):
        built = build_datasets(cfg, get_task("causal_lm"), tok)
    assert len(built["train"]) == (3 if mode == "truncate" else sum(1 for _ in built["train"])) > 0
    assert "indexing errors" not in caplog.text
