"""scaletune.api: the commands from Python return what the CLI prints, raise instead of exiting, and leave the
process as a next call needs it (threads, repeated calls, accelerate's state, signal handlers, memory)."""

from __future__ import annotations

import copy
import gc
import json
import os
import signal
import threading

import pytest
import yaml

from scaletune import api
from scaletune.cli import main
from scaletune.errors import ConfigError, UserError


def cli_json_lines(args, capsys) -> list[dict]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def cli_eval(path, capsys) -> dict:
    capsys.readouterr()
    assert main(["eval", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
def test_train_evaluate_predict_merge_give_what_the_cli_gives(task, make_config, tmp_path, capsys, caplog):
    path = make_config(task, train={"max_steps": 2, "eval_every": 1})
    result = api.train(path)
    out = tmp_path / "run"
    assert (result.output_dir, result.adapter, result.steps, result.finished) == (out, out / "adapter", 2, True)
    assert (result.adapter / "adapter_config.json").is_file() and result.checkpoint.name == "step-2"
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in logged if r["event"] == "eval"][-1]
    assert result.eval_step == 2 and result.eval_metrics["loss"] == last_eval["loss"]

    metrics = api.evaluate(path)
    assert metrics == cli_eval(path, capsys)

    inputs = ["a short line to label", {"text": "another line"}] if task == "seq_cls" else \
        ["Reverse the order of these words.", {"prompt": "Name a colour."}]
    lines = tmp_path / "inputs.txt"
    lines.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in inputs) + "\n")
    options = ["--max-new-tokens", "4"] if task == "causal_lm" else ["--top-k", "2"]
    predicted = api.predict(path, inputs, **({"max_new_tokens": 4} if task == "causal_lm" else {"top_k": 2}))
    assert predicted == cli_json_lines(["predict", path, "--input", lines, *options], capsys)
    assert [p["line"] for p in predicted] == [1, 2]
    caplog.clear()
    assert api.predict(path, []) == []
    assert "no inputs were given" in caplog.text and "stdin" not in caplog.text  # (it read no stdin)

    with pytest.raises(ConfigError, match=r'resume it with resume="auto", pick a new output_dir, or pass '
                                          r"overwrite=True to replace it$") as caught:
        api.train(path)  # (the error speaks of this function's arguments, not the CLI's options)
    assert "--" not in str(caught.value)

    merged = api.merge(path, tmp_path / "merged")
    assert merged == tmp_path / "merged" and (merged / "config.json").is_file()
    with pytest.raises(UserError, match="is not empty"):
        api.merge(path, tmp_path / "merged")


def test_bad_config_raises_naming_the_key_and_writes_nothing(make_config, tmp_path):
    path = make_config("seq_cls")
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        api.train(path, {"train.learning_rate": "fast"})
    raw = yaml.safe_load(path.read_text())
    raw["train"]["no_such_key"] = 1
    with pytest.raises(ConfigError, match=r"train\.no_such_key"):
        api.train(raw)
    with pytest.raises(UserError, match="^error: resume and overwrite=True contradict"):
        api.train(path, resume="auto", overwrite=True)
    with pytest.raises(UserError, match="top_p") as caught:
        api.predict(path, ["x"], top_p=0.5)
    assert "--" not in str(caught.value)
    with pytest.raises(UserError, match="top_k: must be >= 1"):
        api.predict(path, ["x"], top_k=0)
    with pytest.raises(UserError, match=r"inputs\[1\]: expected a non-blank str or a dict"):
        api.predict(path, ["x", "  "])
    with pytest.raises(UserError, match="inputs: expected a list of inputs, got one str"):
        api.predict(path, "one text")  # (iterated, each character was an input)
    assert not (tmp_path / "run").exists()


def test_dict_config_from_a_worker_thread_twice_in_one_process(make_config, tmp_path):
    """A dict config, called from a thread (no signal handlers can be installed there) and then again from the
    main thread with another mixed precision (accelerate keeps one per process unless reset)."""
    raw = yaml.safe_load(make_config("seq_cls", train={"max_steps": 2}).read_text())
    given = copy.deepcopy(raw)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    results, errors = [], []

    def work():
        try:
            results.append(api.train(raw))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread's assertion
            errors.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert not errors, errors
    assert results[0].finished and results[0].steps == 2
    again = api.train(raw, {"train.mixed_precision": "bf16", "output_dir": str(tmp_path / "run2")}, overwrite=True)
    assert again.finished and (tmp_path / "run2" / "adapter" / "adapter_config.json").is_file()
    assert raw == given  # the caller's dict is not changed by the overrides
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the handlers from before are back
    gc.collect()
    from peft import PeftModel

    assert not [o for o in gc.get_objects() if isinstance(o, PeftModel)]  # nothing of the runs is kept


def test_logging_is_added_once_and_yields_to_the_callers(make_config, monkeypatch):
    import logging

    root, log = logging.getLogger(), logging.getLogger("scaletune")
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(api, "_handler", None)
    monkeypatch.setattr(log, "level", logging.NOTSET)
    api._logging()
    api._logging()
    assert len(log.handlers) == 1 and log.level == logging.INFO
    monkeypatch.setattr(root, "handlers", [logging.NullHandler()])  # the caller configures logging
    api._logging()
    assert log.handlers == [] and log.level == logging.NOTSET


def test_library_noise_while_loading_the_config_is_filtered(make_config, monkeypatch, caplog):
    """The first call's config loading imports peft and so bitsandbytes, which warns at import that it could not
    fetch a 4-bit CPU kernel from the hub: the filters for that line must be in place before the config loads."""
    import logging

    import scaletune.config

    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    monkeypatch.setattr(noisy, "filters", [])  # as in a fresh process, before any call added the filter
    real = scaletune.config.load_config

    def importing_bitsandbytes(*args, **kwargs):
        noisy.warning("Failed to load CPU gemm_4bit_forward from kernels-community: untrusted")
        return real(*args, **kwargs)

    monkeypatch.setattr(scaletune.config, "load_config", importing_bitsandbytes)
    with pytest.raises(ConfigError, match=r"train\.no_such_key"):
        api.train(make_config("seq_cls"), {"train.no_such_key": 1})
    assert "kernels-community" not in caplog.text


@pytest.mark.parametrize("failure", ["oom", "interrupt"])
def test_a_failed_runs_error_keeps_nothing_of_the_run(failure, make_config, monkeypatch):
    """The error a failed call raises is kept (a notebook's last error, a sweep's log of it): it must not keep the
    run's model alive through its traceback's frames, or the next call (a smaller batch) finds the memory taken."""
    import torch
    from peft import PeftModel

    import scaletune.loop

    def failing(*args, **kwargs):
        if failure == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise KeyboardInterrupt  # (a second Ctrl-C: stops at once)

    monkeypatch.setattr(scaletune.loop, "step_head", failing)
    kept = []
    with pytest.raises(UserError if failure == "oom" else KeyboardInterrupt) as caught:
        api.train(make_config("seq_cls", train={"max_steps": 2}))
    kept.append(caught.value)
    if failure == "oom":
        assert "out of memory at step 1" in str(caught.value) and "--" not in str(caught.value)
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, PeftModel)]
    assert caught.traceback  # (where it came from is still shown)


def test_overrides_given_as_one_str_are_refused(make_config):
    with pytest.raises(ConfigError, match="overrides: expected a list of 'key=value' strings or a dict, got one str"):
        api.train(make_config("seq_cls"), "train.max_steps=2")  # (iterated, each character was an override)


def test_transformers_progress_bars_are_left_as_the_caller_had_them(make_config):
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        api.train(make_config("seq_cls", train={"max_steps": 1}))
        assert hf_logging.is_progress_bar_enabled()  # (the caller's own from_pretrained shows its bar again)
    finally:
        if not was:
            hf_logging.disable_progress_bar()


def test_a_sweeps_runs_each_log_to_mlflow_in_their_own_output_dir(make_config, tmp_path, monkeypatch):
    """The first run set MLFLOW_TRACKING_URI (its output_dir's store) for the process: the next call took it for
    the caller's and logged there, its own output_dir holding no MLflow store."""
    mlflow = pytest.importorskip("mlflow")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(None)  # (an earlier test in this process may have set one)
    path = make_config("seq_cls", train={"max_steps": 1, "report_to": ["mlflow"]})
    for name in ("a", "b"):
        api.train(path, {"output_dir": str(tmp_path / name)})
        assert "MLFLOW_TRACKING_URI" not in os.environ
    for name in ("a", "b"):
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / name / 'mlruns' / 'mlflow.db'}")
        runs = mlflow.search_runs(experiment_names=["scaletune"], output_format="list")
        assert [r.info.run_name for r in runs] == [name]
    mlflow.set_tracking_uri(None)


def test_predict_refuses_a_table_that_would_give_its_column_names(make_config):
    pd = pytest.importorskip("pandas")
    table = pd.DataFrame({"text": ["a short line to label", "another line"]})
    with pytest.raises(UserError, match=r"got a DataFrame \(iterated, it gives its column names\)"):
        api.predict(make_config("seq_cls"), table)  # (was one prediction, of the text "text")


@pytest.mark.parametrize("resume", [True, "", 3])
def test_a_resume_that_names_no_checkpoint_is_refused_in_python_words(resume, make_config, tmp_path):
    with pytest.raises(UserError, match=r'^error: resume: expected "auto", a checkpoint directory or None, got '):
        api.train(make_config("seq_cls"), resume=resume)  # (True and 3: a TypeError; "": the working directory)
    assert not (tmp_path / "run").exists()


def test_calls_from_a_thread_pool_train_what_the_same_calls_train_one_after_another(make_config, tmp_path):
    """Two runs at once shared the process's accelerate state and random generators: each trained another model
    than it trains alone, silently. Calls from threads run one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    path = make_config("seq_cls", train={"max_steps": 3, "global_batch_size": 8, "micro_batch_size": 2,
                                         "eval_every": 3})

    def run(name, lr):
        result = api.train(path, {"output_dir": str(tmp_path / name), "train.learning_rate": lr})
        return result.eval_metrics["loss"]

    alone = [run("a", 1e-3), run("b", 3e-3)]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(run, ["c", "d"], [1e-3, 3e-3]))
    assert together == alone
