"""The command line: bad input ends with a one-screen message and exit 2; outputs are never clobbered.

Here: config and argument errors, output_dir, config-help, the demo, interrupts and what to run next,
ranks' errors. eval/merge/--adapter, predict, launch and slurm have files of their own (test_*_cli.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scaletune.errors import UserError

import forking
from stutil import assert_clean_error, run_cli, write_jsonl


def edit(path: Path, **sections) -> Path:
    raw = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    path.write_text(yaml.safe_dump(raw))
    return path


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(["train", tmp_path / "nope.yaml"], capsys)
    assert_clean_error(code, err, "nope.yaml: file not found")
    (tmp_path / "loop.yaml").symlink_to(tmp_path / "loop.yaml")
    code, _, err = run_cli(["train", tmp_path / "loop.yaml"], capsys)
    assert_clean_error(code, err, "loop.yaml: too many levels of symbolic links")
    code, _, err = run_cli(["train", "/dev/null"], capsys)
    assert_clean_error(code, err, "run config /dev/null: not a regular file")


def test_all_config_problems_at_once(capsys, make_config):
    path = make_config("causal_lm")
    code, _, err = run_cli(["train", path, "train.lerning_rate=1", "model.dtype=float64", "task=clm"], capsys)
    assert_clean_error(code, err, "3 problems", "did you mean 'learning_rate'", "model.dtype", "task:")


def test_nul_bytes_long_values_and_long_paths_are_named(capsys, make_config, tmp_path):
    """Found by fuzzing configs: a NUL byte in output_dir and a path component past the file system's 255
    characters crashed train with a traceback (exit 1); a 5,000-character task was echoed whole."""
    path = make_config("causal_lm")
    code, _, err = run_cli(["train", edit(path, output_dir=str(tmp_path / "a\0b"),
                                          data={"train": [str(tmp_path / "x\0.jsonl")]})], capsys)
    assert_clean_error(code, err, "2 problems", "output_dir: contains a NUL byte", "data.train: contains a NUL")
    assert not (tmp_path / "a").exists()
    code, _, err = run_cli(["plan", path, "task=" + "x" * 5000], capsys)
    assert_clean_error(code, err, "task: 'xxxxx")
    assert len(err) < 500, err
    long = tmp_path / ("y" * 300)
    for argv in (["train", "data.chat_template"], ["train", "data.train"], ["plan", None], ["eval", "--data"]):
        config = make_config("causal_lm")  # (written when used: each call rewrites the same file)
        if argv[1] is None:
            argv[1] = long
        else:
            argv[1:] = [config, f"{argv[1]}={long}"] if "." in argv[1] else [config, argv[1], long]
        code, _, err = run_cli(argv, capsys)
        assert_clean_error(code, err, f"{tmp_path}"[:40], f"({len(str(long))} characters): File name too long")
    assert not (tmp_path / "run").exists()  # (the train runs stopped before making output_dir)


def test_missing_model_dir(capsys, make_config, tmp_path):
    path = make_config("causal_lm", model={"name_or_path": str(tmp_path / "no-model")})
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "model.name_or_path: directory not found")


def test_tokens_added_to_the_tokenizer_without_embedding_rows_are_refused(capsys, make_config, tmp_path, tiny_llama):
    """A tokenizer given tokens the model has no embedding row for (ChatML's markers added, the model not
    resized) tokenised the data and then failed at the first step with torch's IndexError."""
    import shutil

    from transformers import AutoTokenizer

    model = shutil.copytree(tiny_llama, tmp_path / "grown")
    tok = AutoTokenizer.from_pretrained(model)
    rows = len(tok)  # (the tiny model's embedding has one row per token)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(model)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"text": f"<|im_start|>user hi {i}<|im_end|>"} for i in range(8)])
    path = make_config("causal_lm", model={"name_or_path": str(model)}, data={"train": str(data), "eval": None})
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, f"data.train: the examples hold token ids up to {rows + 1}", f"ids below {rows} only",
                       f"'<|im_start|>' ({rows}), '<|im_end|>' ({rows + 1})", "resize_token_embeddings")
    # the same tokenizer on text without the added tokens trains
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": f"user hi {i}"} for i in range(8)])
    code, _, err = run_cli(["train", path, f"data.train={plain}", "train.max_steps=1", "--overwrite"], capsys)
    assert code == 0, err
    # the run's predict and eval given the added tokens: were torch's IndexError from the embedding lookup
    lines = tmp_path / "in.txt"
    lines.write_text("hi\n<|im_start|>user hi\n")
    code, _, err = run_cli(["predict", path, f"data.train={plain}", "--input", lines], capsys)
    assert_clean_error(code, err, f"{lines}:2: holds '<|im_start|>' ({rows})", "no embedding for")
    code, _, err = run_cli(["eval", path, f"data.train={plain}", "--data", data], capsys)
    assert_clean_error(code, err, f"--data: the examples hold token ids up to {rows + 1}")
    # a pad token beyond the embedding (a [PAD] added to a tokenizer without one): every padded batch failed
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_special_tokens({"pad_token": "[PAD]"})
    tok.save_pretrained(model)
    code, _, err = run_cli(["train", path, f"data.train={plain}", "train.max_steps=1", "--overwrite"], capsys)
    assert_clean_error(code, err, f"the tokenizer's pad token '[PAD]' is id {rows}", "resize_token_embeddings")


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
    # --resume auto and --overwrite both refuse a directory of the user's files: the error offered them
    assert_clean_error(code, err, "is not empty and not a scaletune run's output (it holds precious.txt)",
                       "pick a new output_dir")
    assert "--resume auto" not in err and "pass --overwrite" not in err
    code, _, err = run_cli(["train", path, "--resume", "auto"], capsys)
    assert_clean_error(code, err, "has no checkpoint to resume", "--overwrite would not replace it either")
    assert "pass --overwrite" not in err
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "metrics.jsonl").write_text("")  # an earlier run's, which --overwrite may replace: offered
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "is not empty; resume it with --resume auto",
                       "--overwrite would not replace it either: it holds files scaletune did not write")
    (out / "precious.txt").unlink()
    (out / "run.json").write_text('{"config_fingerprint": "an earlier run"}')
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "is not empty; resume it with --resume auto, pick a new output_dir, or pass "
                                  "--overwrite to replace it")


def test_a_mistyped_local_model_path_is_named_not_sent_to_the_hub(capsys, make_config, tmp_path, monkeypatch):
    """"models/llamaa" beside an existing ./models, and the examples' "path/to/..." placeholder under eval,
    got the hub client's errors ("couldn't connect to huggingface.co", "Repo id must be in the form ...")."""
    path = make_config("causal_lm")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    for cmd, name in [(["train"], "models/llamaa"), (["eval", "--adapter", str(adapter)], "path/to/all-MiniLM-L6-v2")]:
        code, _, err = run_cli([cmd[0], path, f"model.name_or_path={name}", *cmd[1:]], capsys)
        assert_clean_error(code, err, f"model.name_or_path: directory not found: {name} ({tmp_path / name})")
        assert "huggingface" not in err and "Repo id" not in err


def test_python_dash_m_entry_point_exit_code(make_config):
    path = make_config("causal_lm")
    res = subprocess.run([sys.executable, "-m", "scaletune", "train", str(path), "train.micro_batch_size=3"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "divisible by train.micro_batch_size" in res.stderr
    assert "Traceback" not in res.stderr


def test_config_help_lists_keys(capsys):
    from scaletune.config_help import config_reference, config_rows

    code, out, _ = run_cli(["config-help"], capsys)
    assert code == 0 and "train.global_batch_size: int = 64\n    " in out
    meanings = [line for line in out.splitlines() if line.startswith("    ")]
    assert len(meanings) >= len(config_rows()) and max(map(len, meanings)) <= 100  # (the table's rows: 400)
    code, out, _ = run_cli(["config-help", "warmup", "SEED"], capsys)
    assert [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")] == \
        ["train.warmup_ratio", "train.warmup_steps", "train.seed"]
    code, out, _ = run_cli(["config-help", "--markdown"], capsys)
    assert out == config_reference() + "\n"
    code, out, _ = run_cli(["config-help", "--markdown", "warmup"], capsys)
    assert [row.split(" | ")[0] for row in out.splitlines()[2:]] == ["| `train.warmup_ratio`", "| `train.warmup_steps`"]
    code, _, err = run_cli(["config-help", "lerning"], capsys)
    assert code == 2 and "no run-config key contains 'lerning'" in err and "--method" in err


def test_config_help_lists_a_methods_peft_options(capsys):
    """The table stops at `peft: dict`: a method's own options (peft.r, the bottleneck adapter's
    reduction_factor) and their defaults were nowhere a user would look."""
    code, out, _ = run_cli(["config-help", "--method", "lora", "alpha"], capsys)
    assert code == 0 and out.startswith("peft.method: lora (LoraConfig)\n"), out
    assert "peft.lora_alpha: int = 8\n    Lora alpha" in out and "peft.r:" not in out
    code, out, _ = run_cli(["config-help", "--method", "qlora", "r"], capsys)
    assert out.startswith("peft.method: lora (LoraConfig); QLoRA is peft.method: lora with model.quantization: 4bit")
    code, out, _ = run_cli(["config-help", "--method", "DoRA"], capsys)
    assert "DoRA is peft.method: lora with peft.use_dora: true" in out.splitlines()[0] and "peft.r: int = 8" in out
    code, out, _ = run_cli(["config-help", "--method", "bottleneck_adapter", "reduction"], capsys)
    assert code == 0 and "peft.reduction_factor: int = 16" in out
    code, out, _ = run_cli(["config-help", "--method", "bottleneck_adapter", "reduction", "--markdown"], capsys)
    assert code == 0 and "| `peft.reduction_factor` | int | 16 | bottleneck width = hidden // reduction_factor |" in out
    code, _, err = run_cli(["config-help", "--method", "loar"], capsys)
    assert code == 2 and "--method loar: not a peft method (did you mean 'lora'?)" in err
    code, _, err = run_cli(["config-help", "--method", "ia3", "nothing_like_it"], capsys)
    assert code == 2 and "IA3Config has no option containing 'nothing_like_it'" in err
    # where scaletune sets an option itself, the listing says so (it showed peft's null)
    code, out, _ = run_cli(["config-help", "--method", "adalora", "total_step"], capsys)
    assert "= null; scaletune: the run's optimizer steps" in out, out
    code, out, _ = run_cli(["config-help", "--method", "lora", "exclude_modules"], capsys)
    assert "scaletune: ['classifier', 'score'] for seq_cls/token_cls" in out, out


def test_a_peft_option_of_a_config_class_is_built_from_its_mapping():
    """peft.runtime_config: {ephemeral_gpu_offload: true} was kept a dict where peft wants its LoraRuntimeConfig
    (an AttributeError when the model is built); it is built from the mapping, and a wrong key is one problem."""
    from scaletune.config import from_dict
    from scaletune.errors import ConfigError
    from scaletune.peft_options import peft_config

    def cfg(runtime: dict):
        return from_dict({"task": "causal_lm", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
                          "peft": {"method": "lora", "runtime_config": runtime}})

    built = peft_config(cfg({"ephemeral_gpu_offload": True}), "CAUSAL_LM").runtime_config
    assert type(built).__name__ == "LoraRuntimeConfig" and built.ephemeral_gpu_offload is True
    with pytest.raises(ConfigError, match="peft.runtime_config: not a LoraRuntimeConfig .*'nope'"):
        peft_config(cfg({"nope": 1}), "CAUSAL_LM")
    # its own options are checked as the peft section's are ("yes" is truthy), and the class's own refusal of a
    # value is a problem too, not a traceback
    with pytest.raises(ConfigError, match="peft.runtime_config.ephemeral_gpu_offload: expected bool"):
        peft_config(cfg({"ephemeral_gpu_offload": "yes"}), "CAUSAL_LM")
    eva = from_dict({"task": "causal_lm", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"},
                     "peft": {"method": "lora", "eva_config": {"rho": 0.5}}})
    with pytest.raises(ConfigError, match="peft.eva_config: not a EvaConfig"):
        peft_config(eva, "CAUSAL_LM")


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
    # the random base's output head is trained with the adapter and saved in it, so `predict` answers as the demo did
    from safetensors import safe_open

    with safe_open(str(tmp_path / "demo/run/adapter/adapter_model.safetensors"), "pt") as fh:
        assert any("lm_head" in key for key in fh.keys())
    # the next steps it prints run exactly as printed, in a POSIX sh too (bash's `<<<` did not: sh, dash, fish)
    nexts = [row.split("next:")[-1].split("#")[0].strip() for row in res.stdout.splitlines()
             if row.startswith("[demo] next:") or (row.startswith("      ") and "scaletune eval" in row)]
    assert len(nexts) == 2 and nexts[0].startswith("echo "), res.stdout[-1500:]
    path = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # its `scaletune`
    ran = [subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=300, env=path) for line in nexts]
    assert [r.returncode for r in ran] == [0, 0], [r.stderr[-1500:] for r in ran]
    assert '"completion": "' in ran[0].stdout and '"exact_match"' in ran[1].stdout, [r.stdout for r in ran]
    # a second demo into the same directory replaces the previous demo, but never a foreign directory
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("mine")
    res = forking.run(["demo", "--out", str(other)], dict(os.environ), tmp_path / "refused.log", timeout=120)
    assert res.returncode == 2 and (other / "x").read_text() == "mine"


def test_ctrl_c_before_the_demo_trains_names_the_command_to_start_it_again():
    """Ctrl-C while the demo builds its model or scores it before training printed a bare `interrupted`."""
    import argparse

    from scaletune.cli import _resume_hint

    assert _resume_hint(argparse.Namespace(command="demo", out="my demo", steps=None)) == (
        "; run `scaletune demo --out 'my demo'` to start it again")
    assert _resume_hint(argparse.Namespace(command="demo", out="runs/demo", steps=50)) == (
        "; run `scaletune demo --steps 50` to start it again")


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys, where no one may create a directory")
def test_a_demo_it_cannot_write_names_where_it_writes_and_out(capsys):
    """Run from a directory the user cannot write (root ignores permissions; /sys refuses root too), the demo
    said only `runs: Operation not permitted` and to free disk space, not where it writes or that --out exists."""
    code, _, err = run_cli(["demo", "--out", "/sys/scaletune-demo"], capsys)
    assert_clean_error(code, err, "/sys/scaletune-demo", "pass --out DIR")
    assert "free disk space" not in err


def test_demo_help_says_what_it_does_and_writes(capsys):
    with pytest.raises(SystemExit):
        run_cli(["demo", "--help"], capsys)
    out = " ".join(capsys.readouterr().out.split())
    assert "train LoRA" in out and "OUT/demo.yaml" in out and "OUT/run" in out, out


def test_a_second_demo_keeps_what_was_added_to_the_first(tmp_path, monkeypatch):
    import scaletune.demo.tiny as tiny
    from scaletune.demo import MARKER, run_demo

    def not_reached(*args, **kwargs):
        raise AssertionError("the demo was rebuilt")

    monkeypatch.setattr(tiny, "build_model_dir", not_reached)
    out = tmp_path / "demo"
    (out / "base-model").mkdir(parents=True)
    (out / MARKER).write_text("")
    (out / "my-run" / "checkpoints").mkdir(parents=True)  # e.g. `train demo.yaml output_dir=.../demo/my-run`
    with pytest.raises(UserError, match="also holds my-run"):
        run_demo(str(out))
    assert (out / "my-run" / "checkpoints").is_dir() and (out / "base-model").is_dir()


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
    assert code == 130 and f"newest checkpoint {out / 'checkpoints' / 'step-12'}" in err
    assert f"continue with `scaletune train {path} --resume auto`" in err
    # overrides are part of the command to continue with: output_dir among them, the hint named another run
    other = out.parent / "other run"
    (other / "checkpoints" / "step-5").mkdir(parents=True)
    code, _, err = run_cli(["train", path, f"output_dir={other}", "train.max_steps=9"], capsys)
    assert f"newest checkpoint {other / 'checkpoints' / 'step-5'}" in err
    assert f"continue with `scaletune train {path} 'output_dir={other}' train.max_steps=9 --resume auto`" in err
    # a rank of a launched run: `scaletune train` would run one process (refused under ZeRO); the first rank
    # says to repeat the launch, the others say nothing more
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_cli(["train", path], capsys)
    assert code == 130 and "newest checkpoint" in err and "the same launch command plus --resume auto" in err
    assert "scaletune train" not in err
    monkeypatch.setenv("RANK", "1")
    code, _, err = run_cli(["train", path], capsys)
    assert code == 130 and err.strip() == "interrupted"


def test_a_stopped_or_finished_train_says_what_to_run_next(make_config, capsys, monkeypatch):
    """The first Ctrl-C ends in a checkpoint and exit 124: it named the checkpoint but, unlike a second Ctrl-C,
    not the command that goes on from it."""
    import scaletune.train

    path = make_config()
    monkeypatch.setattr(scaletune.train, "train", lambda cfg, **kw: ("preempted", 3))  # (what fit returned)
    code, _, err = run_cli(["train", path, "train.max_steps=9"], capsys)
    assert code == 124 and err.strip() == f"continue with `scaletune train {path} train.max_steps=9 --resume auto`"
    # a finished run names the commands that use it: by its output directory, whose run.json holds the config
    # it trained with, overrides included
    monkeypatch.setattr(scaletune.train, "train", lambda cfg, **kw: ("done", 9))
    code, out, _ = run_cli(["train", path, "output_dir=/tmp/my run"], capsys)
    assert code == 0 and out.splitlines() == ["next:", "  scaletune eval '/tmp/my run'  # scores the adapter",
                                              "  scaletune predict '/tmp/my run' --input FILE  # applies it",
                                              "  scaletune report '/tmp/my run'  # plots the run"]
    # a run with no eval set: eval needs --data (alone it refuses: "nothing to evaluate")
    code, out, _ = run_cli(["train", path, "data.eval=null", "output_dir=/tmp/r"], capsys)
    assert code == 0 and out.splitlines()[1] == "  scaletune eval /tmp/r --data FILE  # scores the adapter"
    # a rank of a launched run: the launcher, which knows its own command, says it
    monkeypatch.setenv("WORLD_SIZE", "2")
    for result, returned in (("preempted", 124), ("done", 0)):
        monkeypatch.setattr(scaletune.train, "train", lambda cfg, result=result, **kw: (result, 3))
        code, out, err = run_cli(["train", path], capsys)
        assert code == returned and out == err == "", (out, err)


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
    # 3, not 2 (bad input): a node that lost its peer node made the launch look like a config error
    assert code == 3 and err.strip().splitlines() == [
        "rank 1: stopped because another rank failed (Connection closed by peer); its error is printed by that rank "
        "(in its node's log, unless that node was lost)"]

    def peer_silent(args):  # a hung rank: gloo's timeout (distributed.timeout_s) was a 47-line traceback
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting "
                           "30000ms for send operation to complete")

    monkeypatch.setattr(cli, "dispatch", peer_silent)
    code, _, err = run_cli(["train", path], capsys)
    assert code == 3 and err.strip().splitlines() == [
        "rank 1: stopped: another rank did not answer within distributed.timeout_s (it hung, or its node stopped)"]


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
    assert code == 2 and err.strip() == "rank 1: stopped by rank 0's error (rank 0 prints it)"
    monkeypatch.setenv("LOCAL_RANK", "0")  # the first process of another node: its log needs the error itself
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "error: data.train: no usable examples in x.jsonl")


def test_hub_warnings_are_printed_once(tmp_path):
    """Offline, the hub client warns at each retry; its own handler and the root one printed each twice."""
    code = ("import logging\nfrom scaletune import console_log\nconsole_log.setup_logging()\n"
            "import huggingface_hub.utils.logging as hub\n"
            "hub.get_logger('huggingface_hub.utils._http').warning('retrying in 1s')\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stderr
    assert err.count("retrying in 1s") == 1, err


def test_torch_info_lines_are_quiet_before_torch_sets_its_levels():
    """A Ctrl-C during torch's import left its loggers at the root's INFO: its exit hook then printed FakeTensor
    cache statistics after "interrupted". The command line's logging keeps torch's loggers at WARNING."""
    code = ("import logging\nfrom scaletune import console_log\nconsole_log.setup_logging()\n"
            "logging.getLogger('torch._subclasses.fake_tensor').info('FakeTensor cache stats:')\n"
            "logging.getLogger('torch._dynamo').warning('a real warning')\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stderr
    assert "cache stats" not in err and "a real warning" in err, err


@pytest.mark.parametrize("key", ["data.train", "data.eval"])
def test_a_data_path_of_bytes_that_are_not_utf8_is_named_not_a_traceback(key, make_config, tmp_path, monkeypatch):
    """A Latin-1 file name on the command line (`data.train=caf\\xe9.jsonl`, a messy filesystem) reaches Python as a
    str with surrogates; a missing one's name went into the data-cache key, whose encode() raised
    UnicodeEncodeError (exit 1, a traceback) instead of the reader's "file not found"."""
    import io

    from scaletune.cli import main

    path = make_config("causal_lm")
    name = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.jsonl")
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # (a real stderr writes a surrogate escaped; capsys refuses it)
    code, err = main(["train", str(path), f"{key}={name}"]), sys.stderr.getvalue()
    assert_clean_error(code, err, f"{key}: file not found")
    assert not (tmp_path / "run").exists()
