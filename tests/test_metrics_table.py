"""`scaletune eval` on a terminal prints a table a person reads; piped, the JSON a script reads."""

from __future__ import annotations

import io
import json

import pytest

METRICS = {"loss": 0.6788341463158983, "accuracy": 0.5103211009174312,
           "per_class": {"negative": {"precision": 1.0, "recall": 0.002336448598130841, "f1-score": 0.00466,
                                      "support": 428.0},
                         "positive": {"precision": 0.5097588978185993, "recall": 1.0, "f1-score": 0.6752851711026616,
                                      "support": 444.0}},
           "confusion_matrix": {"labels": ["negative", "positive"], "counts": [[1, 427], [0, 444]]},
           "thresholds": [0.5, 0.5]}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream", [Terminal, io.StringIO])
def test_eval_prints_a_table_on_a_terminal_and_json_otherwise(stream, make_config, monkeypatch):
    import scaletune.infer
    from scaletune.cli import main

    path = make_config("seq_cls")
    monkeypatch.setattr(scaletune.infer, "run_eval", lambda *args: METRICS)
    out = stream()
    monkeypatch.setattr("sys.stdout", out)
    assert main(["eval", str(path)]) == 0
    if stream is io.StringIO:  # (a script's: every digit, as metrics.jsonl has them)
        assert json.loads(out.getvalue()) == METRICS
        return
    assert out.getvalue().splitlines() == [
        "loss      0.6788",
        "accuracy  0.5103",
        "",
        "per_class  precision     recall   f1-score    support",
        "negative      1.0000     0.0023     0.0047        428",
        "positive      0.5098     1.0000     0.6753        444",
        "",
        "confusion matrix (rows: gold, columns: predicted)",
        "gold \\ predicted  negative  positive",
        "negative                 1       427",
        "positive                 0       444",
        "",
        "thresholds: [0.5, 0.5]",  # (what the table does not know stays shown)
    ]
    out.seek(0), out.truncate()
    assert main(["eval", str(path), "--json"]) == 0  # a terminal that wants the JSON
    assert json.loads(out.getvalue()) == METRICS


def test_small_and_large_values_keep_their_digits_and_an_empty_matrix_shows():
    """A loss of 3e-5 read 0.0000; a confusion matrix of no classes raised TypeError."""
    from scaletune.metrics_table import metrics_table

    table = metrics_table({"loss": 3.2e-05, "accuracy": 0.5, "mse": 1.5e7, "pearson": float("nan"), "steps": 3,
                           "confusion_matrix": {"labels": [], "counts": []}}).splitlines()
    assert table[:5] == ["loss      3.2e-05", "accuracy  0.5000", "mse       1.5e+07", "pearson   nan", "steps     3"]
    assert table[-2:] == ["confusion matrix (rows: gold, columns: predicted)", "gold \\ predicted  "]

