"""task: seq_regression: a real-valued score per text (pair), trained with MSE, scored by eval, predict and a
merged model alike."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import yaml

from scaletune.cli import main
from scaletune.config import load_config

from stutil import SCORES, read_metrics, reg_records, tiny_lora_run, write_jsonl


def _cli(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert):
    """A run trained in this process on reg_records: (config path, the Run with its in-memory model, eval records)."""
    from scaletune.loop import fit
    from scaletune.stopflag import StopFlag
    from scaletune.train import setup

    tmp = tmp_path_factory.mktemp("regression")
    train = write_jsonl(tmp / "train.jsonl", reg_records(96))
    evals = reg_records(24, seed=1)
    raw = tiny_lora_run(tiny_bert, train, task="seq_regression",
                        data={"eval": str(write_jsonl(tmp / "eval.jsonl", evals)), "max_length": 32},
                        train={"global_batch_size": 16, "micro_batch_size": 8, "max_steps": 100,
                               "learning_rate": 0.003, "eval_every": 50},
                        output_dir=str(tmp / "run"))
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    run, _ = setup(load_config(path))
    stop = StopFlag()
    try:
        assert fit(run, stop) == "done"
    finally:
        stop.release_interrupts()
    run.model.eval()
    return path, run, evals


def test_training_lowers_eval_mse_below_the_mean_predictor(trained):
    """Every eval logs the regression metrics; the last eval's MSE is below the first's and below what
    predicting the eval set's own mean would score (its variance), with a positive correlation (the tiny
    model learns slowly: a mean predictor is where an untrained head's bias gets to first)."""
    path, run, evals = trained
    logged = read_metrics(run.output_dir, "eval")
    assert [e["step"] for e in logged] == [50, 100]
    first, last = logged[0], logged[-1]
    assert set(last) >= {"loss", "mse", "rmse", "mae", "pearson", "spearman"}
    assert last["loss"] == pytest.approx(last["mse"], rel=1e-5)  # (the summed loss over its count is the MSE)
    assert last["rmse"] == pytest.approx(math.sqrt(last["mse"]))
    assert last["mse"] < first["mse"]
    assert last["mse"] < 0.95 * statistics.pvariance([r["label"] for r in evals])
    assert last["pearson"] > 0.3 and last["spearman"] > 0.3


def test_the_loss_is_torchs_mse_summed_over_the_examples(trained):
    """loss_sum of a micro-batch equals torch's MSE computed by hand on the logits times the examples, and
    transformers' own loss of the model (its config says problem_type regression) times them too."""
    _, run, _ = trained
    batch = run.task.collate([run.data["train"][i] for i in range(6)], run.tokenizer.pad_token_id)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (6,)
    with torch.no_grad():
        loss, logits = run.task.loss_sum(run.model, batch)
        by_hand = ((logits[:, 0] - batch["labels"]) ** 2).sum()
        own = run.model(**batch).loss * 6
    assert run.task.count_targets(batch) == 6
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(logits[:, 0], batch["labels"]) * 6)
    torch.testing.assert_close(loss, own, rtol=1e-5, atol=1e-6)


def _in_memory_scores(run, texts: list[str]) -> list[float]:
    enc = run.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return run.model(**enc).logits[:, 0].tolist()


def test_predict_gives_the_in_memory_models_scores(trained, capsys, tmp_path):
    path, run, evals = trained
    texts = [r["text"] for r in evals[:6]]
    given = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    code, out, err = _cli(["predict", path, "--input", given], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["text"] for line in lines] == texts
    assert all(set(line) == {"line", "text", "score"} and isinstance(line["score"], float) for line in lines)
    assert [line["score"] for line in lines] == pytest.approx(_in_memory_scores(run, texts), abs=1e-5)
    # the keyword decides the score: the predictions order the sentences as their gold scores do
    gold = [SCORES[next(w for w in t.split() if w in SCORES)] for t in texts]
    assert [line["score"] for line in lines] == pytest.approx(gold, abs=1.5)


@pytest.mark.parametrize("flag", [["--top-k", "2"], ["--threshold", "0.3"]], ids=["top-k", "threshold"])
def test_class_options_are_refused_for_regression(trained, capsys, tmp_path, flag):
    path, _, _ = trained
    given = write_jsonl(tmp_path / "in.jsonl", [{"text": "alpha echo"}])
    code, out, err = _cli(["predict", path, "--input", given, *flag], capsys)
    assert code == 2 and not out
    assert f"{flag[0]}: seq_regression has no classes" in err and "Traceback" not in err


def test_the_merged_model_scores_so_in_plain_transformers(trained, capsys, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path, run, evals = trained
    code, _, err = _cli(["merge", path, "--out", tmp_path / "merged"], capsys)
    assert code == 0, err
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    texts = [r["text"] for r in evals[:6]]
    with torch.no_grad():
        scores = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits[:, 0].tolist()
    assert scores == pytest.approx(_in_memory_scores(run, texts), abs=1e-4)


@pytest.mark.parametrize("value,why", [("high", "not a number"), ("nan", "not a finite number"),
                                       ([1.0, 2.0], "not a number"), (True, "not a number"),
                                       pytest.param(10 ** 400, "not a finite number", id="huge-int")])
def test_a_bad_score_is_refused_naming_file_line_and_column(make_config, capsys, tmp_path, value, why):
    records = reg_records(8)
    records[4]["label"] = value
    train = write_jsonl(tmp_path / "bad.jsonl", records)
    path = make_config("seq_regression", data={"train": str(train), "eval": None}, train={"eval_every": None})
    code, _, err = _cli(["train", path], capsys)
    assert code == 2, err
    assert f"bad.jsonl:5: column 'label' holds {value!r}, {why}" in err and "Traceback" not in err


def test_an_undefined_best_metric_is_said_not_silently_skipped(make_config, capsys, tmp_path):
    """An eval set whose answers are all the same score has no Pearson correlation (NaN): with best_metric:
    pearson no eval is a best, and each eval says so rather than the run ending without best_adapter/ unsaid."""
    records = reg_records(8, seed=1)
    for rec in records:
        rec["label"] = 2.0
    evals = write_jsonl(tmp_path / "constant.jsonl", records)
    path = make_config("seq_regression", data={"eval": str(evals)},
                       train={"best_metric": "pearson", "eval_every": 2, "max_steps": 4})
    code, out, err = _cli(["train", path], capsys)
    assert code == 0, err
    assert "warning: step 2: eval pearson is nan (undefined over this eval set), not a best" in out + err
    assert not (tmp_path / "run" / "best_adapter").exists()


def test_a_csv_score_is_read_as_a_number(make_config, capsys, tmp_path):
    """A CSV cell is text: "3.8" is the score 3.8, a word in it the error naming its line."""
    from scaletune.tasks.seq_regression import score_of

    assert score_of(" 3.8", "f.csv:2", "score") == 3.8
    train = tmp_path / "bad.csv"
    train.write_text("text,score\nalpha echo,0.5\nbravo golf,2.5\ncharlie kilo,four\n")
    path = make_config("seq_regression", data={"train": str(train), "eval": None}, train={"eval_every": None})
    code, _, err = _cli(["train", path], capsys)
    assert code == 2 and "bad.csv:4: column 'score' holds 'four', not a number" in err, err


def test_data_labels_and_a_list_of_label_columns_are_refused(make_config, capsys):
    path = make_config("seq_regression", data={"labels": ["low", "high"]})
    code, _, err = _cli(["train", path], capsys)
    assert code == 2 and "data.labels: seq_regression predicts a real-valued score" in err, err
    path = make_config("seq_regression", data={"label_column": ["a", "b"]})
    code, _, err = _cli(["train", path], capsys)
    assert code == 2 and "data.label_column: seq_regression reads one score column" in err, err


def test_best_metric_direction(make_config, capsys):
    """pearson and spearman pick the higher eval, the errors the lower; report's best agrees."""
    from scaletune.config import lower_is_better
    from scaletune.report import Run, eval_summary

    assert not lower_is_better("pearson") and not lower_is_better("spearman")
    assert all(lower_is_better(m) for m in ("loss", "mse", "rmse", "mae", "perplexity"))
    events = {"eval": [{"step": 1, "pearson": 0.2, "mae": 2.0}, {"step": 2, "pearson": 0.9, "mae": 1.0},
                       {"step": 3, "pearson": 0.5, "mae": 1.5}]}
    run = Run(path=None, name="r", info={"config": {"task": "seq_regression"}}, events=events)
    assert eval_summary(run, "pearson") == (0.5, 0.9, 2)
    assert eval_summary(run, "mae") == (1.5, 1.0, 2)
    path = make_config("seq_regression", train={"best_metric": "pearson", "eval_every": 50})
    cfg = load_config(path)
    assert cfg.train.best_metric == "pearson"
    path = make_config("seq_regression", train={"best_metric": "accuracy", "eval_every": 50})
    code, _, err = _cli(["train", path], capsys)
    assert code == 2 and "'accuracy' is not a seq_regression eval metric" in err and "pearson" in err, err


def test_eval_predictions_give_each_examples_score(trained, capsys, tmp_path):
    """`eval --predictions`: each line has the example's gold score, the model's and their difference, and the
    file's squared errors average to the printed MSE."""
    path, _, evals = trained
    target = tmp_path / "pred.jsonl"
    code, out, err = _cli(["eval", path, "--predictions", target], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [line["text"] for line in lines] == [r["text"] for r in evals]
    assert [line["label"] for line in lines] == pytest.approx([float(r["label"]) for r in evals])
    assert all(line["error"] == pytest.approx(line["predicted"] - line["label"]) for line in lines)
    assert statistics.fmean(line["error"] ** 2 for line in lines) == pytest.approx(json.loads(out)["mse"], rel=1e-6)


def test_class_weights_are_refused_for_regression(make_config, capsys):
    path = make_config("seq_regression")
    code, _, err = _cli(["train", path, "train.class_weights=balanced"], capsys)
    assert code == 2 and "train.class_weights" in err and "seq_regression" in err


def test_an_eval_predictions_line_gives_the_records_score_not_its_float32_copy():
    """The gold score is written as the eval file has it (3.8, not float32's 3.799999952...), and the error is
    taken from it."""
    from scaletune.tasks import get_task

    task = get_task("seq_regression")
    task.text, task.pair, task.label = "text", None, "score"
    gold32 = torch.tensor([3.8], dtype=torch.float32).tolist()[0]
    line = task.example_line((4.0, gold32), None, {"text": "fine", "score": "3.8"}, None)
    assert line["label"] == 3.8 and line["error"] == 4.0 - 3.8


def test_regression_metrics_are_numpys_and_scipys():
    """mae is the mean absolute error (signed errors would cancel), spearman the rank correlation (not
    pearson's), both defined from 2 examples on and NaN where a side is constant."""
    from scipy.stats import pearsonr, spearmanr

    from scaletune.tasks.seq_regression import regression_metrics

    pairs = [(1.0, 0.5), (2.0, 2.5), (3.0, 3.0), (4.0, 100.0)]
    pred, gold = [p for p, _ in pairs], [g for _, g in pairs]
    got = regression_metrics(pairs, 0.7)
    assert got["loss"] == 0.7
    assert got["mae"] == pytest.approx((0.5 + 0.5 + 0 + 96) / 4)
    assert got["mse"] == pytest.approx((0.25 + 0.25 + 0 + 96**2) / 4)
    assert got["rmse"] == pytest.approx(math.sqrt(got["mse"]))
    assert got["pearson"] == pytest.approx(pearsonr(pred, gold).statistic)
    assert got["spearman"] == pytest.approx(spearmanr(pred, gold).statistic)
    assert got["spearman"] == pytest.approx(1.0) and got["pearson"] < 0.9  # (the test can tell them apart)
    two = regression_metrics([(1.0, 0.0), (2.0, 3.0)], 0.0)
    assert two["pearson"] == pytest.approx(1.0) and two["spearman"] == pytest.approx(1.0)
    flat = regression_metrics([(1.0, 0.0), (1.0, 3.0), (1.0, 2.0)], 0.0)
    assert math.isnan(flat["pearson"]) and math.isnan(flat["spearman"])
