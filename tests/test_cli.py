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


# ---------------------------------------------------------------------------------------------
# launch / launch-args / slurm: refused here, before any process starts or any job is queued


@pytest.fixture
def nothing_starts(monkeypatch, tmp_path):
    """Fail the test if `scaletune launch` would start accelerate (in process, or by exec as it once did) or
    `scaletune slurm` would run sbatch; run it in an empty directory (no logs/ where the tests run)."""
    import scaletune.launch

    def started(*args, **kwargs):
        raise AssertionError(f"started: {args}")

    monkeypatch.setattr(scaletune.launch, "run_accelerate", started, raising=False)
    monkeypatch.setattr(os, "execvp", started)
    monkeypatch.setattr(subprocess, "run", started)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("argv", [
    ["launch", "--nproc", "2", "peft.lora_r=8"],
    ["launch", "--nproc", "2", "--dry-run", "peft.lora_r=8"],
    ["launch-args", "peft.method=lorax"],
    ["slurm", "--dry-run", "peft.method=lorax"],
    ["slurm", "peft.lora_r=8"],
], ids=["launch", "launch-dry-run", "launch-args", "slurm-dry-run", "slurm"])
def test_launch_and_slurm_check_the_peft_section_first(capsys, make_config, nothing_starts, argv):
    """The peft section is checked as `train` checks it: once, before composing a command (a launch used to
    start every process to fail the same way; --dry-run, launch-args and slurm accepted it)."""
    path = make_config("causal_lm")
    code, out, err = run_cli([argv[0], path, *argv[1:]], capsys)
    wanted = "peft.lora_r: not a LoraConfig option" if "peft.lora_r=8" in argv else "unknown method 'lorax'"
    assert_clean_error(code, err, wanted)
    assert out == ""  # not even the command: nothing was composed


@pytest.mark.parametrize(("argv", "wanted"), [
    (["launch", "--dry-run", "--nproc", "0"], "--nproc must be >= 1"),
    (["launch", "--dry-run", "--nproc", "-1"], "--nproc must be >= 1"),
    (["launch", "--dry-run", "--nnodes", "0"], "--nnodes >= 1"),
    (["launch", "--dry-run", "--nnodes", "2", "--node-rank", "-1"], "--node-rank: must be in [0, 1]"),
    (["launch", "--dry-run", "--master-port", "0"], "--master-port: must be in [1, 65535]"),
    (["slurm", "--dry-run", "--nodes", "0"], "--nodes must be >= 1"),
    (["slurm", "--dry-run", "--gpus-per-node", "-1"], "--gpus-per-node >= 0"),
    (["slurm", "--dry-run", "--sbatch-arg=qos=high"], "--sbatch-arg 'qos=high': not an sbatch option"),
    (["plan", "--nodes", "0"], "--nodes must be >= 1"),
    (["plan", "--gpus-per-node", "-2"], "--gpus-per-node >= 0"),
    (["plan", "--gpu-memory", "0GiB"], "--gpu-memory: cannot read '0GiB'"),
    (["plan", "--cpu-memory", "0GiB"], "--cpu-memory: cannot read '0GiB'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_numeric_launch_options_out_of_range(capsys, make_config, nothing_starts, argv, wanted):
    """`--nproc 0` used to be taken as "one per GPU" (a dry run composed --num_processes 1)."""
    code, out, err = run_cli([argv[0], make_config("causal_lm"), *argv[1:]], capsys)
    assert_clean_error(code, err, wanted)
    assert "launch" not in out


def _fake_sbatch(bin_dir: Path, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\n{script}\n")
    sbatch.chmod(0o755)


def test_slurm_without_sbatch_is_one_error_and_creates_nothing(capsys, make_config, tmp_path, monkeypatch):
    path = make_config("causal_lm")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    code, out, err = run_cli(["slurm", path], capsys)
    assert_clean_error(code, err, "`sbatch` not found on PATH", "hint:", "--dry-run")
    assert not (work / "logs").exists() and out == ""
    code, out, _ = run_cli(["slurm", path, "--dry-run"], capsys)  # the hint's way out works without sbatch
    assert code == 0 and out.startswith("sbatch ")


def test_slurm_sbatch_refusal_names_command_and_message(capsys, make_config, tmp_path, monkeypatch):
    """sbatch without a reachable controller: its message inside a normal error (was: sbatch's raw stderr,
    exit 1, and a logs/ directory left behind)."""
    path = make_config("causal_lm")
    _fake_sbatch(tmp_path / "bin", "echo 'sbatch: fatal: Could not establish a configuration source' >&2; exit 1")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = run_cli(["slurm", path, "--gpus-per-node", "0"], capsys)
    assert_clean_error(code, err, "sbatch refused the job (exit 1)", "`sbatch --nodes=1",
                       "sbatch: fatal: Could not establish a configuration source", "--dry-run")
    assert not (work / "logs").exists()


def test_slurm_sbatch_arg_is_passed_to_sbatch(capfd, make_config, tmp_path, monkeypatch):
    path = make_config("causal_lm")
    record = tmp_path / "argv.txt"
    _fake_sbatch(tmp_path / "bin", f'printf "%s\\n" "$@" > {record}; echo "Submitted batch job 7"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["slurm", path, "--sbatch-arg=--qos=high", "--gpus-per-node", "0",
                              "--sbatch-arg=--mail-type=END", "train.learning_rate=1e-3"], capfd)
    assert code == 0, err
    assert "Submitted batch job 7" in out and (tmp_path / "logs").is_dir()
    argv = record.read_text().splitlines()
    template = next(i for i, a in enumerate(argv) if a.endswith("single_node.sbatch"))
    assert argv[template - 2:template] == ["--qos=high", "--mail-type=END"]
    assert argv[template + 1:] == [str(Path(path).resolve()), "train.learning_rate=1e-3"]


# ---------------------------------------------------------------------------------------------
# one rank's error under a launcher: one screen, exit 2


def test_a_rank_that_lost_its_peer_prints_one_line(capsys, make_config, monkeypatch):
    """A collective failing because another rank exited is that rank's error, printed above: one line and
    exit 2 instead of a gloo traceback. Outside a launched world the error is not hidden."""
    import scaletune.cli as cli

    def peer_gone(args):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:3290. This "
                           "is typically caused by a remote worker crashing.")

    monkeypatch.setattr(cli, "dispatch", peer_gone)
    path = make_config()
    with pytest.raises(RuntimeError):
        run_cli(["train", path], capsys)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, _, err = run_cli(["train", path], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "rank 1: stopped because another rank failed (Connection closed by peer); its error is above"]


def test_rank_0s_error_relayed_to_the_others_is_printed_once_per_node(capsys, make_config, monkeypatch):
    import scaletune.cli as cli
    from scaletune.errors import DataError

    relayed = DataError("data.train: no usable examples in x.jsonl")
    relayed.relayed_from = 0

    def fails(args):
        raise relayed

    monkeypatch.setattr(cli, "dispatch", fails)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    path = make_config()
    code, _, err = run_cli(["train", path], capsys)
    assert code == 2 and err.strip() == "rank 1: stopped by rank 0's error (above)"
    monkeypatch.setenv("LOCAL_RANK", "0")  # the first process of another node: its log needs the error itself
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "error: data.train: no usable examples in x.jsonl")
