"""The command line: bad input ends with a one-screen message and exit 2; outputs are never clobbered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from scaletune.cli import main

from stutil import write_jsonl


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def edit(path: Path, **sections) -> Path:
    raw = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    path.write_text(yaml.safe_dump(raw))
    return path


def assert_clean_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err and "error:" in err
    assert len(err[err.index("error:"):].splitlines()) <= 25
    for f in fragments:
        assert f in err, err


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(["train", tmp_path / "nope.yaml"], capsys)
    assert_clean_error(code, err, "nope.yaml: file not found")


def test_all_config_problems_at_once(capsys, make_config):
    path = make_config("causal_lm")
    code, _, err = run_cli(["train", path, "train.lerning_rate=1", "model.dtype=float64", "task=clm"], capsys)
    assert_clean_error(code, err, "3 problem(s)", "did you mean 'learning_rate'", "model.dtype", "task:")


def test_missing_model_dir(capsys, make_config, tmp_path):
    path = make_config("causal_lm", model={"name_or_path": str(tmp_path / "no-model")})
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "model.name_or_path: directory not found")


def test_unknown_peft_method_and_kwargs(capsys, make_config):
    path = make_config("causal_lm")
    code, _, err = run_cli(["train", path, "peft.method=lorra"], capsys)
    assert_clean_error(code, err, "unknown method 'lorra'", "did you mean 'lora'")
    code, _, err = run_cli(["train", path, "peft.rank=8", "train.output_dir=x"], capsys)
    assert_clean_error(code, err, "train.output_dir: unknown key")
    code, _, err = run_cli(["train", path, "peft.rank=8", "--overwrite"], capsys)
    assert_clean_error(code, err, "peft.rank: not a LoraConfig option")


def test_bad_data_line_named(capsys, make_config, tmp_path):
    path = make_config("causal_lm")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    code, _, err = run_cli(["train", path, f"data.train={bad}"], capsys)
    assert_clean_error(code, err, f"{bad}:2: invalid JSON")


def test_missing_columns_and_empty_data(capsys, make_config, tmp_path):
    path = make_config("seq_cls")
    data = write_jsonl(tmp_path / "x.jsonl", [{"sentence": "a", "y": 1}])
    code, _, err = run_cli(["train", path, f"data.train={data}"], capsys)
    assert_clean_error(code, err, "no label column")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run_cli(["train", path, f"data.train={empty}"], capsys)
    assert_clean_error(code, err, "contains no examples")


def test_global_batch_larger_than_data(capsys, make_config):
    path = make_config("causal_lm", n=16, train={"global_batch_size": 32, "micro_batch_size": 4})
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "larger than the training set (16")


def test_quantization_without_bitsandbytes(capsys, make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    path = make_config("causal_lm", model={"quantization": "4bit", "dtype": "bfloat16"},
                       train={"mixed_precision": "bf16"})
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "needs bitsandbytes")


def test_non_empty_output_dir_is_never_overwritten_silently(capsys, make_config, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    path = make_config("causal_lm")
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "is not empty", "--resume auto", "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"


def test_predict_input_nested_too_deeply_is_named(capsys, make_config, tmp_path, monkeypatch):
    """A line of 100000 nested objects (`{"a": {"a": ...`) used to end in a RecursionError traceback; it is
    named by file and line."""
    import scaletune.infer as infer

    path = make_config("token_cls")
    # no adapter is needed: the inputs are read (and refused) before the model is used
    monkeypatch.setattr(infer, "load_trained", lambda *a: (None, None, None, ["O"], tmp_path))
    inp = tmp_path / "inputs.jsonl"
    inp.write_text('{"tokens": ["fine"]}\n' + '{"a": ' * 100_000 + "\n")
    code, out, err = run_cli(["predict", path, "--input", inp], capsys)
    assert_clean_error(code, err, f"{inp}:2: invalid JSON (nested too deeply)")
    assert out == ""


def test_train_predict_eval_merge_roundtrip(capsys, make_config, tmp_path):
    path = make_config("causal_lm", train={"max_steps": 3})
    code, out, err = run_cli(["train", path], capsys)
    assert code == 0, err
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer.json").is_file()
    inp = tmp_path / "prompts.txt"
    inp.write_text("Reverse the order of these words.\n")
    code, out, err = run_cli(["predict", path, "--input", inp, "--max-new-tokens", "5"], capsys)
    assert code == 0, err
    assert json.loads(out.splitlines()[0])["prompt"] == "Reverse the order of these words."
    code, out, err = run_cli(["eval", path], capsys)
    assert code == 0 and "perplexity" in json.loads(out)
    code, out, err = run_cli(["merge", path, "--out", tmp_path / "merged"], capsys)
    assert code == 0, err
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = yaml.safe_load(path.read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(cfg["model"]["name_or_path"])
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)
    code, _, err = run_cli(["merge", path, "--out", tmp_path / "merged"], capsys)
    assert_clean_error(code, err, "is not empty")


def test_adapter_may_be_a_checkpoint_dir(capsys, make_config, tmp_path, caplog):
    """--adapter checkpoints/step-N (the adapter is in its adapter/) works for eval, predict and merge, with
    an info line saying which directory was loaded (was: "no trained adapter ... pass --adapter")."""
    path = make_config("causal_lm", train={"max_steps": 2})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    step = tmp_path / "run" / "checkpoints" / "step-2"
    inp = tmp_path / "prompts.txt"
    inp.write_text("alpha bravo\n")
    for args in (["eval", path], ["predict", path, "--input", inp, "--max-new-tokens", "2"],
                 ["merge", path, "--out", tmp_path / "merged"]):
        caplog.clear()
        with caplog.at_level("INFO", logger="scaletune"):
            code, out, err = run_cli([*args, "--adapter", step], capsys)
        assert code == 0, err
        assert f"--adapter {step}: using the adapter in its adapter/ subfolder" in caplog.text, args[0]
    assert (tmp_path / "merged" / "config.json").is_file()


def test_adapter_that_is_neither_says_what_was_expected(capsys, make_config, tmp_path):
    path = make_config("causal_lm")
    run = tmp_path / "old-run"
    (run / "checkpoints" / "step-3").mkdir(parents=True)
    (run / "checkpoints" / "step-12").mkdir()
    (tmp_path / "file.json").write_text("{}")
    for adapter, expected in [
        (tmp_path / "nope", "directory not found"),
        (tmp_path / "file.json", "is a file; pass the directory that holds adapter_config.json"),
        (run / "checkpoints" / "step-3", "neither an adapter directory (no adapter_config.json) nor a checkpoint "
                                         "directory (no adapter/adapter_config.json)"),
        (run, f"it holds checkpoints, the newest is {run / 'checkpoints' / 'step-12'}"),
        (run / "checkpoints", f"it holds checkpoints, the newest is {run / 'checkpoints' / 'step-12'}"),
    ]:
        for cmd in ("eval", "predict"):
            code, _, err = run_cli([cmd, path, "--adapter", adapter], capsys)
            assert_clean_error(code, err, f"--adapter {adapter}: ", expected)


def test_python_dash_m_entry_point_exit_code(make_config):
    path = make_config("causal_lm")
    res = subprocess.run([sys.executable, "-m", "scaletune", "train", str(path), "train.micro_batch_size=3"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "divisible by train.micro_batch_size" in res.stderr
    assert "Traceback" not in res.stderr


def test_config_help_lists_keys(capsys):
    code, out, _ = run_cli(["config-help"], capsys)
    assert code == 0 and "`train.global_batch_size`" in out


@pytest.mark.slow
def test_demo_runs_and_improves(tmp_path):
    env = {**os.environ, "SCALETUNE_NO_PROGRESS": "0"}  # as a newcomer runs it (progress on), into a pipe
    res = subprocess.run([sys.executable, "-m", "scaletune", "demo", "--out", str(tmp_path / "demo"), "--steps", "60"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    # what a newcomer reads: plain progress lines, none of the libraries' deprecations, bars or tables
    assert "step 60/60 loss=" in res.stderr and "\r" not in res.stderr
    for noise in ("Warning", "LOAD REPORT", "Setting accelerator", "Writing model shards", "Loading weights"):
        assert noise not in res.stdout + res.stderr, noise
    line = next(row for row in res.stdout.splitlines() if row.strip().startswith("loss"))
    before, after = map(float, line.split()[1:3])
    assert after < before
    assert (tmp_path / "demo/run/adapter/adapter_config.json").is_file()
    # a second demo into the same directory replaces the previous demo, but never a foreign directory
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("mine")
    res = subprocess.run([sys.executable, "-m", "scaletune", "demo", "--out", str(other)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and (other / "x").read_text() == "mine"


def test_ctrl_c_in_train_names_the_checkpoint_to_resume_from(make_config, capsys, monkeypatch):
    import scaletune.cli as cli

    path = make_config()
    out = Path(yaml.safe_load(Path(path).read_text())["output_dir"])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "dispatch", interrupted)
    code, _, err = run_cli(["train", path], capsys)
    assert code == 130 and "no checkpoint was written yet" in err
    (out / "checkpoints" / "step-3").mkdir(parents=True)
    (out / "checkpoints" / "step-12").mkdir()
    code, _, err = run_cli(["train", path], capsys)
    assert code == 130 and f"newest checkpoint {out / 'checkpoints' / 'step-12'}" in err and "--resume auto" in err


def test_output_cut_short_by_the_reader_is_not_a_traceback(tmp_path):
    """`scaletune plan ... | head`: the pipe closes while scaletune still writes."""
    code = ("import sys\nfrom scaletune import cli\n"
            "def chatty(args):\n    for _ in range(200000):\n        print('x' * 100)\n    return 0\n"
            "cli.dispatch = chatty\nsys.exit(cli.main(['config-help']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err and "BrokenPipe" not in err
