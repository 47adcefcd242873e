"""The command line: bad input ends with a one-screen message and exit 2; outputs are never clobbered."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from scaletune.cli import main

from stutil import cls_records, write_jsonl


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


def test_eval_of_a_held_out_split_is_the_split_the_run_held_out(capsys, make_config, tmp_path):
    """data.eval_fraction's split follows train.seed: `eval` with another seed or fraction, or for a run that
    held nothing out, scored (exit 0) on examples the adapter trained on. Those are refused before loading;
    the run's own split gives the run's final eval."""
    path = make_config("seq_cls", data={"eval": None, "eval_fraction": 0.25}, train={"max_steps": 2, "seed": 7})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in final if r.get("event") == "eval"][-1]
    code, out, err = run_cli(["eval", path], capsys)
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(final["loss"], rel=1e-5)
    adapter = tmp_path / "run" / "adapter"
    code, _, err = run_cli(["eval", path, "train.seed=8"], capsys)
    assert_clean_error(code, err, f"the adapter at {adapter} was trained holding out a different split",
                       "seed 7 (given: 8)", "data.eval_fraction=0.25 train.seed=7")
    code, _, err = run_cli(["eval", path, "data.eval_fraction=0.5"], capsys)
    assert_clean_error(code, err, "eval_fraction 0.25 (given: 0.5)")
    code, out, err = run_cli(["eval", path, "train.seed=8", "--data", str(tmp_path / "data" / "eval.jsonl")], capsys)
    assert code == 0, err  # a file of its own: no split to match
    code, _, err = run_cli(["eval", path, f"data.train=[{tmp_path / 'data' / 'train.jsonl'}]"], capsys)
    assert code == 0, err  # a list of that one file splits as the file does
    copy = tmp_path / "elsewhere.jsonl"  # the same data at another path (another machine): compared by content
    shutil.copy(tmp_path / "data" / "train.jsonl", copy)
    assert run_cli(["eval", path, f"data.train={copy}"], capsys)[0] == 0
    code, _, err = run_cli(["eval", path, f"data.train={copy}", "train.seed=8"], capsys)
    assert_clean_error(code, err, "seed 7 (given: 8)")
    code, _, err = run_cli(["eval", path, f"data.train=[{copy},{tmp_path / 'data' / 'train.jsonl'}]"], capsys)
    # the file twice: its examples split among twice as many, so ones it trained on are held out
    assert_clean_error(code, err, "shares sources with the data the adapter at")
    # an adapter saved before adapters recorded their split: its run's run.json says which it was
    meta_file = adapter / "scaletune.json"
    meta = json.loads(meta_file.read_text())
    del meta["held_out"]
    meta_file.write_text(json.dumps(meta))
    code, _, err = run_cli(["eval", path, "train.seed=8"], capsys)
    assert_clean_error(code, err, "seed 7 (given: 8)")
    assert run_cli(["eval", path], capsys)[0] == 0
    whole = make_config("seq_cls", train={"max_steps": 1}, output_dir=str(tmp_path / "whole"))
    code, _, err = run_cli(["train", whole], capsys)
    assert code == 0, err
    code, _, err = run_cli(["eval", whole, "data.eval=null", "data.eval_fraction=0.25"], capsys)
    assert_clean_error(code, err, "was trained on all of its training file", "--data FILE")


def test_merge_out_that_cannot_be_created_is_refused_before_loading(capsys, make_config, tmp_path):
    """--out under a file, or a dangling symbolic link, failed in save_pretrained after the whole load and
    merge, with a traceback; now one line, exit 2, before anything is loaded (no run is needed for it)."""
    path = make_config("causal_lm")
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out, wanted in ((tmp_path / "a_file" / "merged", f"{tmp_path / 'a_file'} is not a directory"),
                        (tmp_path / "dangling", f"a symbolic link to {tmp_path / 'nowhere'}, which does not exist")):
        code, _, err = run_cli(["merge", path, "--out", out], capsys)
        assert_clean_error(code, err, wanted)
    assert (tmp_path / "a_file").read_text() == "mine"


def test_merge_refuses_an_out_filled_while_it_merged(capsys, make_config, tmp_path, monkeypatch):
    """--out is checked again just before the merged model is written: a file put into it after the argument
    check, while the model loaded and merged (by the user, another merge), was overwritten by the merged
    model's file of the same name."""
    from types import SimpleNamespace

    import scaletune.infer as infer

    path = make_config("causal_lm")
    out = tmp_path / "merged"
    out.mkdir()  # empty: the argument check lets it through

    class Merged:
        def save_pretrained(self, directory, **_):
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "config.json").write_text("merged")

    class Adapter:
        peft_config: dict = {}

        def merge_and_unload(self):
            (out / "config.json").write_text("the user's")
            return Merged()

    tok = SimpleNamespace(chat_template="{{ messages }}", save_pretrained=lambda directory: None)
    monkeypatch.setattr(infer, "load_trained", lambda *a, **kw: (Adapter(), tok, None, None, tmp_path))
    code, _, err = run_cli(["merge", path, "--out", out], capsys)
    assert_clean_error(code, err, f"--out {out} is not empty; choose a new directory")
    assert os.listdir(out) == ["config.json"] and (out / "config.json").read_text() == "the user's"


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
    # checkpoints/latest (a file naming the newest checkpoint) is followed; it was refused as "a file"
    code, _, err = run_cli(["eval", path, "--adapter", tmp_path / "run" / "checkpoints" / "latest"], capsys)
    assert code == 0, err
    # a run killed before its adapter/ was written: the error names the checkpoint to pass
    shutil.rmtree(tmp_path / "run" / "adapter")
    code, _, err = run_cli(["eval", path], capsys)
    assert_clean_error(code, err, "no trained adapter at", f"(e.g. --adapter {step}, the newest checkpoint)")


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
    import scaletune.cli as cli

    path = make_config()
    monkeypatch.setattr(cli, "dispatch", lambda args: 124)
    code, _, err = run_cli(["train", path, "train.max_steps=9"], capsys)
    assert code == 124 and err.strip() == f"continue with `scaletune train {path} train.max_steps=9 --resume auto`"
    # a finished run names the commands that use it, with the overrides that may name its model or output_dir
    monkeypatch.setattr(cli, "dispatch", lambda args: 0)
    code, out, _ = run_cli(["train", path, "output_dir=/tmp/my run"], capsys)
    assert code == 0 and out.splitlines() == ["next:", f"  scaletune eval {path} 'output_dir=/tmp/my run'  # scores the adapter",
                                              f"  scaletune predict {path} 'output_dir=/tmp/my run' --input FILE  # applies it",
                                              "  scaletune report '/tmp/my run'  # plots the run"]
    # a run with no eval set: eval needs --data (alone it refuses: "nothing to evaluate")
    code, out, _ = run_cli(["train", path, "data.eval=null"], capsys)
    assert code == 0 and out.splitlines()[1] == f"  scaletune eval {path} data.eval=null --data FILE  # scores the adapter"
    # a rank of a launched run: the launcher, which knows its own command, says it
    monkeypatch.setenv("WORLD_SIZE", "2")
    for returned in (124, 0):
        monkeypatch.setattr(cli, "dispatch", lambda args, code=returned: code)
        code, out, err = run_cli(["train", path], capsys)
        assert code == returned and out == err == ""


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


class Recorder(torch.nn.Module):
    """A stand-in classifier: records the input ids of every line; its logits are all zero (label 0)."""

    device = torch.device("cpu")

    def __init__(self, n_labels: int, per_token: bool):
        from types import SimpleNamespace

        super().__init__()
        self.n_labels, self.per_token, self.seen = n_labels, per_token, []
        self.config = SimpleNamespace(problem_type=None)  # (single-label, as predict reads a real model's config)

    def forward(self, input_ids, attention_mask=None, **_):
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        self.seen += [row[keep.bool()].tolist() for row, keep in zip(input_ids, mask)]  # each line, unpadded
        shape = (*input_ids.shape, self.n_labels) if self.per_token else (input_ids.shape[0], self.n_labels)
        return SimpleNamespace(logits=torch.zeros(shape))


def _fake_trained(monkeypatch, task_name: str, tokenizer_dir, task_state: dict | None, labels: list[str]):
    """load_trained -> a Recorder, the tiny model's tokenizer, and the task with the state an adapter's
    scaletune.json would give it (None: an adapter without one; the run config's data.* keys are used)."""
    from transformers import AutoTokenizer

    import scaletune.infer as infer
    from scaletune.tasks import get_task

    task = get_task(task_name)
    if task_state is not None:
        task.setup_cached({"task_state": task_state})
    model = Recorder(len(labels), per_token=task_name == "token_cls")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    monkeypatch.setattr(infer, "load_trained", lambda *a: (model, tok, task, labels, Path(tokenizer_dir)))
    return model, tok


def _predict(path, capsys, lines: list, *args):
    inp = Path(path).parent / "inputs.jsonl"
    inp.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    code, out, err = run_cli(["predict", path, "--input", inp, *args], capsys)
    return code, [json.loads(line) for line in out.splitlines()], err, inp


@pytest.mark.parametrize("state", [{"text": "premise", "pair": "hypothesis", "label": "label"}, None],
                         ids=["adapter-meta", "run-config"])
def test_predict_reads_the_trained_text_pair_columns(capsys, make_config, tiny_bert, monkeypatch, state):
    """A model trained on data.text_column: premise + data.text_pair_column: hypothesis gets both texts of a
    line (the hypothesis used to be dropped: only a key named `text_pair` was read), and the output echoes
    the pair; a line without the pair, or a plain-text line, is refused with its file:line."""
    path = make_config("seq_cls", data={"text_column": "premise", "text_pair_column": "hypothesis"})
    model, tok = _fake_trained(monkeypatch, "seq_cls", tiny_bert, state, ["neg", "pos"])
    lines = [{"premise": "alpha bravo", "hypothesis": "charlie"}, {"premise": "alpha bravo", "hypothesis": "delta"}]
    code, got, err, inp = _predict(path, capsys, lines)
    assert code == 0, err
    assert model.seen == [tok("alpha bravo", "charlie")["input_ids"], tok("alpha bravo", "delta")["input_ids"]]
    assert [(g["text"], g["text_pair"]) for g in got] == [("alpha bravo", "charlie"), ("alpha bravo", "delta")]
    code, _, err, inp = _predict(path, capsys, [lines[0], {"premise": "alpha bravo"}])
    assert_clean_error(code, err, f"{inp}:2: ", "'hypothesis'", "found keys ['premise']")
    code, _, err, inp = _predict(path, capsys, [lines[0], "alpha bravo charlie"])
    assert_clean_error(code, err, f"{inp}:2: a plain-text line, but the model classifies text pairs",
                       "'premise'", "'hypothesis'")


@pytest.mark.parametrize("state", [{"text": "text", "pair": None, "label": "label"}, None],
                         ids=["adapter-meta", "run-config"])
def test_predict_refuses_a_text_pair_for_a_single_text_classifier(capsys, make_config, tiny_bert, monkeypatch, state):
    """A line with `text_pair` for a classifier trained without data.text_pair_column would be scored on its
    `text` alone, the pair dropped without a word: it is refused naming its file:line, before any prediction."""
    path = make_config("seq_cls")
    model, _ = _fake_trained(monkeypatch, "seq_cls", tiny_bert, state, ["neg", "pos"])
    code, got, err, inp = _predict(path, capsys, ["alpha bravo", {"text": "alpha bravo", "text_pair": "charlie"}])
    assert_clean_error(code, err, f"{inp}:2: 'text_pair' given, but the model classifies single texts",
                       "data.text_pair_column")
    assert got == [] and model.seen == []
    code, got, err, _ = _predict(path, capsys, ["alpha bravo", {"text": "alpha bravo"}])  # without it: predicted
    assert code == 0 and len(got) == 2, err


def test_predict_reads_another_usual_text_column_where_training_detected_its_own(capsys, make_config, tiny_bert,
                                                                                monkeypatch):
    """Trained on a `text` file with no data.text_column (training takes the first usual name it finds), the
    classifier labels SST-2's `sentence` lines (they were refused: "expected key 'text'"), preferring the trained
    column where a line has both; a data.text_column named in the config stays the only column read."""
    state = {"text": "text", "pair": None, "label": "label"}
    model, tok = _fake_trained(monkeypatch, "seq_cls", tiny_bert, state, ["neg", "pos"])
    path = make_config("seq_cls")
    code, got, err, _ = _predict(path, capsys, [{"sentence": "alpha bravo"}, {"review": "x", "text": "charlie"}])
    assert code == 0, err
    assert model.seen == [tok("alpha bravo")["input_ids"], tok("charlie")["input_ids"]]
    path = make_config("seq_cls", data={"text_column": "text"})
    code, _, err, inp = _predict(path, capsys, [{"sentence": "alpha bravo"}])
    assert_clean_error(code, err, f"{inp}:1: no text to classify: expected key 'text'")


def test_predict_reads_the_pair_of_a_trained_adapter(capsys, make_config, tmp_path):
    """End to end: the adapter trained on premise/hypothesis scores a premise differently with different
    hypotheses (every line used to get the same score)."""
    rows = [{"premise": r["text"], "hypothesis": h, "label": r["label"]}
            for r, h in zip(cls_records(32), ["charlie delta", "echo golf"] * 16)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    path = make_config("seq_cls", data={"train": str(data), "eval": str(data), "text_column": "premise",
                                        "text_pair_column": "hypothesis"}, train={"max_steps": 2})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    lines = [{"premise": "bravo kilo", "hypothesis": h} for h in ("lima mike", "alpha", "oscar papa quebec")]
    code, got, err, _ = _predict(path, capsys, lines)
    assert code == 0, err
    assert [g["text_pair"] for g in got] == ["lima mike", "alpha", "oscar papa quebec"]
    assert len({g["score"] for g in got}) == 3, got


@pytest.mark.parametrize("task,data,line,fragments", [
    ("seq_cls", {"text_column": "text"}, {"review": "alpha bravo"},
     ["no text to classify: expected key 'text'; found keys ['review']"]),
    ("seq_cls", {}, {}, ["no text to classify", "found no keys"]),
    ("seq_cls", {}, {"text": ""}, ["'text' is empty"]),
    ("seq_cls", {}, {"text": 5}, ["'text' must be a string, got int"]),
    ("seq_cls", {"text_column": "sentence"}, {"review": "a"}, ["'sentence' (or 'text')", "found keys ['review']"]),
    ("token_cls", {"tokens_column": "words"}, {"tokens_x": ["Alice"]}, ["'words' (or 'tokens')", "['tokens_x']"]),
    ("token_cls", {}, {"tokens": []}, ["'tokens' is empty"]),
    ("token_cls", {}, {"text": ""}, ["'text' has no words"]),
    ("token_cls", {}, {"text": "   "}, ["'text' has no words"]),
    ("token_cls", {}, {"tokens": ["Alice", ""]}, ["'tokens'[1] is an empty string"]),
    ("token_cls", {}, {"tokens": "Alice went"}, ["'tokens' must be a list of strings"]),
    ("causal_lm", {}, {"question": "what"}, ["nothing to prompt with", "'instruction'", "found keys ['question']"]),
    ("causal_lm", {}, {"prompt": 5}, ["'prompt' must be a string, got int"]),
    ("causal_lm", {}, {"text": ""}, ["the prompt is empty"]),
    ("causal_lm", {}, {"instruction": " "}, ["the prompt is empty"]),
])
def test_predict_refuses_a_line_without_usable_input(capsys, make_config, tiny_bert, tiny_llama, monkeypatch,
                                                      task, data, line, fragments):
    """A line whose expected key is missing, empty or of the wrong type is refused naming its file:line, the
    keys expected and those found (it used to be predicted on an empty input, exit 0); nothing is written."""
    path = make_config(task, data=data)
    labels = ["neg", "pos"] if task == "seq_cls" else ["B-PER", "O"]
    _fake_trained(monkeypatch, task, tiny_llama if task == "causal_lm" else tiny_bert, None, labels)
    good = {"seq_cls": "alpha bravo", "token_cls": "Alice went", "causal_lm": "Reverse alpha bravo"}[task]
    code, got, err, inp = _predict(path, capsys, [good, line], "--max-new-tokens", "2")
    assert_clean_error(code, err, f"{inp}:2: ", *fragments)
    assert got == []  # every line is checked before the first prediction is written


def test_predict_reads_the_trained_tokens_column(capsys, make_config, tiny_bert, monkeypatch):
    """token_cls trained with data.tokens_column: words reads `words` (it used to print empty tokens and tags)."""
    path = make_config("token_cls", data={"tokens_column": "words"})
    for state in ({"tokens": "words", "tags": "tags", "id_names": None}, None):
        model, tok = _fake_trained(monkeypatch, "token_cls", tiny_bert, state, ["B-PER", "O"])
        code, got, err, _ = _predict(path, capsys, [{"words": ["Alice", "went", "to", "Paris"]}])
        assert code == 0, err
        assert got == [{"line": 1, "tokens": ["Alice", "went", "to", "Paris"], "tags": ["B-PER"] * 4,
                        "entities": [{"text": w, "type": "PER", "start": i, "end": i + 1}
                                     for i, w in enumerate(["Alice", "went", "to", "Paris"])]}]


def test_predicted_tags_are_grouped_into_entities_as_the_eval_scores_them():
    """A tagger's user wants the entities, not only BIO tags per word: grouped as seqeval groups them for the
    metrics (I- after O starts one; IO tags: a run of one type is one entity)."""
    from scaletune.tasks.token_cls import entities

    words = ["Angela", "Merkel", "met", "Emmanuel", "Macron", "in", "Paris", "."]
    bio = ["B-PER", "I-PER", "O", "B-PER", "I-PER", "O", "B-LOC", "O"]
    want = [{"text": "Angela Merkel", "type": "PER", "start": 0, "end": 2},
            {"text": "Emmanuel Macron", "type": "PER", "start": 3, "end": 5},
            {"text": "Paris", "type": "LOC", "start": 6, "end": 7}]
    assert entities(words, bio) == want
    assert entities(words, ["PER", "PER", "O", "PER", "PER", "O", "LOC", "O"])[2] == want[2]
    assert entities(["a", "b"], ["I-ORG", "I-ORG"]) == [{"text": "a b", "type": "ORG", "start": 0, "end": 2}]
    assert entities(["a", "b"], ["O", "O"]) == []


def test_predict_output_names_its_input_line(capsys, make_config, tiny_bert, monkeypatch):
    """Blank input lines are skipped; each output object carries the number of the line it answers."""
    path = make_config("seq_cls")
    _fake_trained(monkeypatch, "seq_cls", tiny_bert, {"text": "text", "pair": None, "label": "label"}, ["a", "b"])
    code, got, err, _ = _predict(path, capsys, ["", "alpha bravo", "  ", "", {"text": "charlie"}, "delta"])
    assert code == 0, err
    assert [(g["line"], g["text"]) for g in got] == [(2, "alpha bravo"), (5, "charlie"), (6, "delta")]
    assert list(got[0]) == ["line", "text", "label", "score"]


def test_predict_from_stdin_names_it(capsys, make_config, tiny_bert, monkeypatch):
    """Errors in input read from stdin (`--input -`, the default) say <stdin>:N (they said -:N)."""
    import io

    path = make_config("seq_cls")
    _fake_trained(monkeypatch, "seq_cls", tiny_bert, None, ["a", "b"])
    for args in (["--input", "-"], []):
        monkeypatch.setattr(sys, "stdin", io.StringIO('alpha\n{"text": 5}\n'))
        code, _, err = run_cli(["predict", path, *args], capsys)
        assert_clean_error(code, err, "<stdin>:2: 'text' must be a string")


def test_predict_plain_line_starting_with_a_brace_says_how_to_pass_it(capsys, make_config, tiny_bert, monkeypatch):
    """A plain-text line that starts with '{' is read as JSON; when it is not, the error says how to give
    such a text (as {"text": ...}), and that form predicts."""
    path = make_config("seq_cls")
    _fake_trained(monkeypatch, "seq_cls", tiny_bert, None, ["a", "b"])
    code, _, err, inp = _predict(path, capsys, ["alpha", "{curly} bravo"])
    assert_clean_error(code, err, f"{inp}:2: invalid JSON", 'plain text that starts with "{"', '{"text": "..."}')
    code, got, err, _ = _predict(path, capsys, ["alpha", {"text": "{curly} bravo"}])
    assert code == 0 and got[1]["text"] == "{curly} bravo", err


def test_eval_data_problems_name_the_data_option(capsys, make_config, tmp_path, monkeypatch, caplog):
    """`eval --data FILE` names --data (not data.train) in its errors and warnings, and tokenises FILE once."""
    from scaletune.tasks.seq_cls import SeqCls

    path = make_config("seq_cls", train={"max_steps": 2}, data={"cache": False})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    nope = tmp_path / "d" / "nope.jsonl"
    code, _, err = run_cli(["eval", path, "--data", nope], capsys)
    assert_clean_error(code, err, f"--data {nope}: file not found")
    assert "data.train" not in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run_cli(["eval", path, "--data", empty], capsys)
    assert_clean_error(code, err, f"--data: {empty} contains no examples")
    code, _, err = run_cli(["eval", path, f"data.eval={empty}"], capsys)
    assert_clean_error(code, err, f"data.eval: {empty} contains no examples")
    rows = cls_records(6, seed=3)
    rows[4] = {"text": 5, "label": "pos"}
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, _, err = run_cli(["eval", path, "--data", bad], capsys)
    assert_clean_error(code, err, f"{bad}:5: column 'text' must be a non-empty string")
    other = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "a", "output": "b"}])  # another task's file
    code, _, err = run_cli(["train", path, f"data.eval={other}", f"output_dir={tmp_path / 'run2'}"], capsys)
    assert_clean_error(code, err, f"{other}:1: no column 'text'; the record has 'instruction', 'output'")
    calls = []
    encode = SeqCls.encode
    monkeypatch.setattr(SeqCls, "encode", lambda self, rec, *a: calls.append(rec) or encode(self, rec, *a))
    words = "bravo charlie delta echo foxtrot golf hotel india juliet"
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": f"alpha {words}", "label": "pos"},
                                                 {"text": words, "label": "neg"}] * 3)
    with caplog.at_level("WARNING", logger="scaletune"):
        code, out, err = run_cli(["eval", path, "--data", data, "data.max_length=8"], capsys)
    assert code == 0 and "accuracy" in json.loads(out), err
    assert len(calls) == 6  # each example once (the file used to be read and tokenised as train and as eval)
    assert "--data: 6 of 6 example(s) are longer than data.max_length=8 tokens" in caplog.text
    assert "data.train" not in caplog.text

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
    # the templates ask for the checkpoint 300 s before the limit: a job this short stopped itself at start
    (["slurm", "--dry-run", "--gpus-per-node", "0", "--time", "00:05:00"],
     "--time 00:05:00: the job is told to checkpoint 300 s before its time limit"),
    (["slurm", "--dry-run", "--gpus-per-node", "0", "--time", "2:00", "--sbatch-arg=--signal=B:USR1@150"],
     "--time 2:00: the job is told to checkpoint 150 s before"),
    (["slurm", "--dry-run", "--gpus-per-node", "0", "--time", "forever"],
     "--time 'forever' is not a Slurm time limit"),
    # (a limit given as an sbatch option was not checked)
    (["slurm", "--dry-run", "--gpus-per-node", "0", "--sbatch-arg=--time=3"],
     "--sbatch-arg=--time 3: the job is told to checkpoint 300 s before its time limit"),
    (["slurm", "--dry-run", "--gpus-per-node", "0", "--time", "10:00", "--sbatch-arg=-t4"],
     "--sbatch-arg=--time 4: the job is told to checkpoint 300 s"),  # (sbatch takes the last limit given)
    # CPU-only nodes (a process each) have a world size too: the batch check was skipped for them
    (["slurm", "--dry-run", "--nodes", "2", "--gpus-per-node", "0", "train.global_batch_size=8",
      "train.micro_batch_size=8"], "cannot run on 2 node(s) x 1 CPU process(es)"),
    (["plan", "--nodes", "0"], "--nodes must be >= 1"),
    (["plan", "--gpus-per-node", "-2"], "--gpus-per-node >= 0"),
    (["plan", "--gpu-memory", "0GiB"], "--gpu-memory: '0GiB' is no memory at all"),
    (["plan", "--cpu-memory", "0GiB"], "--cpu-memory: '0GiB' is no memory at all"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_numeric_launch_options_out_of_range(capsys, make_config, nothing_starts, argv, wanted):
    """`--nproc 0` used to be taken as "one per GPU" (a dry run composed --num_processes 1)."""
    code, out, err = run_cli([argv[0], make_config("causal_lm"), *argv[1:]], capsys)
    assert_clean_error(code, err, wanted)
    assert "launch" not in out


def test_slurm_time_longer_than_the_signal_lead_is_accepted(capsys, make_config, nothing_starts):
    path = make_config("causal_lm")
    for extra in (["--time", "00:05:01"], ["--time", "00:05:00", "--sbatch-arg=--signal=B:USR1@60"],
                  ["--time", "0"], ["--time", "-1"], ["--time", "00:00:00"], ["--time", "UNLIMITED"],
                  ["--time", "2-00"]):  # (any zero, -1: no limit)
        code, out, err = run_cli(["slurm", path, "--dry-run", "--gpus-per-node", "0", *extra], capsys)
        assert code == 0 and "sbatch" in out, err



def _fake_checkpoint(cfg_path: Path, root: Path, step: int) -> Path:
    """A checkpoint that verifies, written by the run config at `cfg_path` (for the resume checks only)."""
    from scaletune import checkpoint as ckpt
    from scaletune.config import load_config
    from scaletune.identity import config_fingerprint

    cfg = load_config(str(cfg_path), [])
    path = root / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True)
    for name in ckpt.REQUIRED_FILES:
        (path / name).write_text("{}")
    (path / "state.json").write_text(json.dumps({"step": step, "config": cfg.to_dict()}, default=str))
    ckpt.write_manifest(path, step, config_fingerprint(cfg))
    return path


@pytest.mark.parametrize("case", ["finished", "foreign-file", "config-change"])
def test_launch_refuses_output_dir_and_resume_before_starting(capsys, make_config, nothing_starts, tmp_path, case):
    """output_dir / --resume refusals need no model: `launch` used to start every rank to print the same
    error once per rank (with torch's W/E lines). Now one error, exit 2, nothing started; a dry run
    composes the command without looking at the directory."""
    path = make_config("causal_lm")
    out = tmp_path / "run"  # make_config's output_dir
    out.mkdir()
    argv = ["launch", path, "--nproc", "2"]
    if case == "finished":
        (out / "adapter").mkdir()
        (out / "run.json").write_text("{}")
        wanted = "is not empty; resume it with --resume auto"
    elif case == "foreign-file":
        (out / "notes.txt").write_text("mine")
        argv += ["--resume", "auto"]
        wanted = "it holds files scaletune did not write (notes.txt)"
    else:
        step = _fake_checkpoint(path, out, 4)
        argv += ["--resume", step, "train.learning_rate=0.02"]
        wanted = "was written by a different run config (changed: train.learning_rate"
    code, out_text, err = run_cli(argv, capsys)
    assert_clean_error(code, err, wanted)
    assert err.count("error:") == 1 and out_text == ""
    code, out_text, _ = run_cli([*argv, "--dry-run"], capsys)
    assert code == 0 and " launch " in out_text


def test_launch_resume_checks_let_a_resumable_run_through(capsys, make_config, monkeypatch, tmp_path):
    """--resume auto on a run with a checkpoint of the same config reaches the launch."""
    import scaletune.launch

    path = make_config("causal_lm")
    _fake_checkpoint(path, tmp_path / "run", 4)
    started = []
    monkeypatch.setattr(scaletune.launch, "run_accelerate", lambda cmd, usr1=None: started.append(cmd) or 0)
    code, _, err = run_cli(["launch", path, "--nproc", "2", "--resume", "auto"], capsys)
    assert code == 0 and len(started) == 1, err


def _fake_accelerate(monkeypatch, *, writes: str | None, ends: BaseException | None):
    """Replace accelerate's launch_command: optionally write `writes` to the preemption marker the ranks
    would write, then raise `ends` (how accelerate ends a launch stopped by a signal). Returns the list of
    marker paths it saw."""
    import accelerate.commands.launch as acl

    seen = []

    def launch_command(args):
        marker = os.environ.get("SCALETUNE_PREEMPT_MARKER")
        seen.append(marker)
        if writes is not None:
            Path(marker).write_text(writes + "\n")
        if ends is not None:
            raise ends

    monkeypatch.setattr(acl, "launch_command", launch_command)
    return seen


CMD = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m", "scaletune", "train", "r.yaml"]


def test_launch_stopped_by_sigterm_after_a_checkpoint_exits_124(capsys, monkeypatch):
    """torchrun passes a SIGTERM on to the ranks, which checkpoint and exit 124; accelerate then ends with
    sys.exit(143). The launch used to exit 143 without a word; now 124 and the checkpoint, and the
    temporary marker is gone again."""
    from scaletune.launch import run_accelerate

    monkeypatch.delenv("SCALETUNE_PREEMPT_MARKER", raising=False)
    # (the ranks' marker: the checkpoint, then the signal that stopped them)
    seen = _fake_accelerate(monkeypatch, writes="/r/checkpoints/step-3\nSIGTERM", ends=SystemExit(143))
    assert run_accelerate(CMD) == 124
    err = capsys.readouterr().err
    assert err.strip() == ("scaletune launch: stopped by SIGTERM; checkpoint /r/checkpoints/step-3 "
                           "(continue with --resume auto)")
    assert seen[0] and not Path(seen[0]).parent.exists()
    assert "SCALETUNE_PREEMPT_MARKER" not in os.environ


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM, None])
def test_the_preemption_marker_names_the_checkpoint_and_the_signal(tmp_path, monkeypatch, signum):
    """The Slurm templates requeue a job whose ranks were stopped by SIGUSR1, which `scancel --signal=USR1
    JOBID` (no --batch) sends to the ranks alone: the marker's second line says which signal it was (empty
    when another rank had it), as the templates read it (sed -n 2p)."""
    from types import SimpleNamespace

    from scaletune.loop import mark_preempted

    marker = tmp_path / "marker"
    monkeypatch.setenv("SCALETUNE_PREEMPT_MARKER", str(marker))
    mark_preempted(SimpleNamespace(is_local_main_process=False), "/r/checkpoints/step-3", signum)
    assert not marker.exists()  # (one process a node writes it)
    mark_preempted(SimpleNamespace(is_local_main_process=True), "/r/checkpoints/step-3", signum)
    second = subprocess.run(["sed", "-n", "2p", str(marker)], capture_output=True, text=True).stdout.strip()
    assert marker.read_text().splitlines()[0] == "/r/checkpoints/step-3"
    assert second == (signal.Signals(signum).name if signum else "")


def test_launch_stopped_by_sigterm_without_a_checkpoint(capsys, monkeypatch, tmp_path):
    """No checkpoint written (a user's marker left by an earlier run does not count): 128 + SIGTERM, said
    in one line; the user's marker is left where it is."""
    from scaletune.launch import run_accelerate

    marker = tmp_path / "marker"
    marker.write_text("/old/checkpoints/step-1\n")
    monkeypatch.setenv("SCALETUNE_PREEMPT_MARKER", str(marker))
    seen = _fake_accelerate(monkeypatch, writes=None, ends=SystemExit(143))
    assert run_accelerate(CMD) == 143
    assert capsys.readouterr().err.strip() == "scaletune launch: stopped by SIGTERM; the ranks saved no checkpoint"
    assert seen == [str(marker)] and marker.exists()


def test_launch_restores_the_signal_handlers(monkeypatch):
    """torchrun installs handlers for TERM/INT/HUP/QUIT and the launch one for USR1: all are put back."""
    import signal

    from scaletune.launch import run_accelerate

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
    _fake_accelerate(monkeypatch, writes=None, ends=None)
    import accelerate.commands.launch as acl

    inner = acl.launch_command

    def launch_command(args):
        assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, before[signal.SIGUSR1])
        signal.signal(signal.SIGTERM, lambda *a: None)  # as torchrun's PContext.start does
        inner(args)

    monkeypatch.setattr(acl, "launch_command", launch_command)
    assert run_accelerate(CMD) == 0
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_one_process_launch_alone_passes_ctrl_c_on_as_a_stop(monkeypatch):
    """Only accelerate's one-process launcher (one process, one machine, no DeepSpeed) stops its rank on a
    Ctrl-C with SIGTERM and SIGKILL 5 s later: there the launch catches SIGINT itself and passes the first on
    as SIGTERM, and stops passing once the launch has ended. torchrun (several processes, or DeepSpeed) passes
    a Ctrl-C on itself: nothing of scaletune's handles it there."""
    import signal

    import accelerate.commands.launch as acl

    from scaletune.launch import run_accelerate

    _fake_accelerate(monkeypatch, writes=None, ends=None)
    handlers = []
    monkeypatch.setattr(acl, "launch_command", lambda args: handlers.append(signal.getsignal(signal.SIGINT)))
    one = ["accelerate", "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "-m", "scaletune",
           "train", "r.yaml"]
    ds = ["accelerate", "launch", "--use_deepspeed", *one[3:]]
    for cmd in (one, CMD, ds):
        assert run_accelerate(cmd) == 0
    passer = getattr(handlers[0], "__self__", None)
    assert passer is not None and passer.first_as == signal.SIGTERM and passer.stopped.is_set()
    assert not any(type(getattr(h, "__self__", None)).__name__ == "_PassOn" for h in handlers[1:]), handlers


def test_rank_pids_are_the_scaletune_train_children_only():
    """SIGUSR1 to the launcher is forwarded to its rank processes, not to any other child it has."""
    from scaletune.launch import rank_pids

    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "scaletune", "train", "r.yaml"])
    other = subprocess.Popen(["sleep", "60"])
    try:
        found = rank_pids(os.getpid())
    finally:
        for child in (rank, other):
            child.kill()
            child.wait()
    assert rank.pid in found and other.pid not in found


def test_sigusr1_to_the_launcher_waits_until_a_rank_handles_it():
    """A SIGUSR1 that reaches the launcher while a rank is still starting (a Slurm preemption notice at job
    start) is held and passed on once the rank handles it: not lost, and not the default action that
    would kill the rank (it exits 7 from its handler here, instead of -SIGUSR1)."""
    import signal

    from scaletune.launch import _PassOn, catches

    code = "import signal, sys, time; time.sleep(1.5); signal.signal(signal.SIGUSR1, lambda *a: sys.exit(7)); " \
           "time.sleep(60)"
    rank = subprocess.Popen([sys.executable, "-c", code, "-m", "scaletune", "train", "r.yaml"])
    passer = _PassOn()
    try:
        assert not catches(rank.pid, signal.SIGUSR1)
        passer.handler(signal.SIGUSR1, None)  # as the signal would call it
        assert rank.wait(timeout=30) == 7
    finally:
        passer.stop()
        if rank.poll() is None:
            rank.kill()
            rank.wait()

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
    assert argv[template - 3:template - 1] == ["--qos=high", "--mail-type=END"]
    assert argv[template - 1] == f"--comment=scaletune output_dir={(tmp_path / 'run').resolve()}"
    assert argv[template + 1:] == [str(Path(path).resolve()), "train.learning_rate=1e-3"]


def test_slurm_refuses_an_output_dir_a_queued_job_was_submitted_for(capfd, make_config, tmp_path, monkeypatch):
    """A job still waiting in the queue holds no run lock: a second `scaletune slurm` of the same run was
    accepted and queued behind it, to be refused (or to find the run complete) only when it started. Each job
    carries its output_dir in its comment, and squeue shows it."""
    path = make_config("causal_lm")
    out = (tmp_path / "run").resolve()
    record = tmp_path / "argv.txt"
    _fake_sbatch(tmp_path / "bin", f'printf "%s\\n" "$@" > {record}; echo "Submitted batch job 7"')
    squeue = tmp_path / "bin" / "squeue"
    squeue.write_text(f"#!/bin/sh\necho '5|RUNNING|other'\necho '7|PENDING|scaletune output_dir={out}'\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)
    assert_clean_error(code, err, "job 7 (pending) was submitted for it", "--dependency=afterany:7")
    assert not record.exists()  # nothing submitted
    code, _, err = run_cli(["slurm", path, "--gpus-per-node", "0", "--sbatch-arg=--dependency=afterany:7"], capfd)
    assert code == 0, err
    assert run_cli(["slurm", path, "--gpus-per-node", "0", "--sbatch-arg=--dependency=singleton"], capfd)[0] == 0
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # job 7 submitting its own continuation: not a duplicate of itself
    assert run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)[0] == 0
    monkeypatch.delenv("SLURM_JOB_ID")
    assert f"--comment=scaletune output_dir={out}" in record.read_text().splitlines()
    squeue.write_text("#!/bin/sh\necho 'squeue: error: Unable to contact slurm controller' >&2\nexit 1\n")
    assert run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)[0] == 0  # (squeue cannot tell: sbatch decides)


def test_slurm_tells_the_job_which_python_submitted_it(capfd, make_config, tmp_path, monkeypatch):
    """`.venv/bin/scaletune slurm` without activating the venv: the job looked for `python` on PATH, found
    one without scaletune and failed after its wait in the queue. It now gets this python (SCALETUNE_PYTHON,
    exported to the job), unless SCALETUNE_VENV or SCALETUNE_PYTHON says otherwise."""
    path = make_config("causal_lm")
    record = tmp_path / "env.txt"
    _fake_sbatch(tmp_path / "bin", f'echo "$SCALETUNE_PYTHON" > {record}; echo "Submitted batch job 7"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCALETUNE_PYTHON", raising=False)
    monkeypatch.delenv("SCALETUNE_VENV", raising=False)
    assert run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)[0] == 0
    assert record.read_text().strip() == sys.executable
    monkeypatch.setenv("SCALETUNE_VENV", str(tmp_path / "venv"))  # the user's choice stands
    assert run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)[0] == 0
    assert record.read_text().strip() == ""
    monkeypatch.delenv("SCALETUNE_VENV")
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)  # a system or module python: the nodes' PATH finds theirs
    assert run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)[0] == 0
    assert record.read_text().strip() == ""


def test_slurm_gpus_asked_for_by_sbatch_arg_are_not_checked_as_cpu_nodes(capsys, make_config, nothing_starts):
    """GPUs asked for with --sbatch-arg=--gres (--gpus-per-node left at 0): the job runs a process per GPU,
    so the CPU-node world (one process, no CUDA) must not refuse its batch arithmetic or bf16."""
    path = make_config("causal_lm")
    code, out, err = run_cli(["slurm", path, "--dry-run", "--nodes", "2", "--gpus-per-node", "0",
                              "--sbatch-arg=--gres=gpu:4", "train.global_batch_size=16", "train.micro_batch_size=8",
                              "train.mixed_precision=bf16"], capsys)
    assert code == 0 and "--gres=gpu:4" in out, err
    code, _, err = run_cli(["slurm", path, "--dry-run", "--nodes", "2", "--gpus-per-node", "0",  # (no GPU in it)
                            "--sbatch-arg=--gres=lscratch:100", "train.global_batch_size=8",
                            "train.micro_batch_size=8"], capsys)
    assert_clean_error(code, err, "cannot run on 2 node(s) x 1 CPU process(es)")


def _hold_lock(out: str, ready, release) -> None:
    from scaletune import runlock

    runlock.acquire(Path(out))
    ready.set()
    release.wait(60)


def test_slurm_refuses_at_submit_an_output_dir_a_live_run_holds(capfd, make_config, tmp_path, monkeypatch):
    """A job for an output_dir that a running run holds would wait in the queue only to be refused at
    start: it is refused before sbatch, naming that run, with nothing submitted. A job chained after that
    run (--dependency) is submitted; so is the job once the run has ended."""
    import multiprocessing

    path = make_config("causal_lm")
    out = Path(yaml.safe_load(Path(path).read_text())["output_dir"])
    record = tmp_path / "argv.txt"
    _fake_sbatch(tmp_path / "bin", f'printf "%s\\n" "$@" > {record}; echo "Submitted batch job 7"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(out), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        code, out_text, err = run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)
        assert_clean_error(code, err, f"output_dir: {out} is in use by another run (pid {holder.pid} on ",
                           "--sbatch-arg=--dependency=afterany:JOBID")
        assert not record.exists() and "Submitted" not in out_text
        for waits_for_nothing in ("--sbatch-arg=--dependency=singleton", "--sbatch-arg=--dependency="):
            code, _, err = run_cli(["slurm", path, "--gpus-per-node", "0", waits_for_nothing], capfd)
            assert_clean_error(code, err, "is in use by another run")
        code, out_text, err = run_cli(["slurm", path, "--gpus-per-node", "0",
                                       "--sbatch-arg=--dependency=afterany:6"], capfd)
        assert code == 0 and "Submitted batch job 7" in out_text, err
        assert "--dependency=afterany:6" in record.read_text().splitlines()
    finally:
        release.set()
        holder.join(60)
    record.unlink()
    code, out_text, err = run_cli(["slurm", path, "--gpus-per-node", "0"], capfd)
    assert code == 0 and "Submitted batch job 7" in out_text, err
    assert sorted(p.name for p in out.iterdir()) == [".scaletune.lock"]  # the probe wrote nothing there


def test_slurm_singleton_queues_after_the_running_job_of_its_name(capfd, make_config, tmp_path, monkeypatch):
    """`--dependency=singleton` for the output_dir a running job of the same name trains (that job holds the
    run lock) was refused as "in use by another run", though Slurm starts it only after that job. A job of
    another name, which singleton does not wait for, is still refused."""
    import multiprocessing

    path = make_config("causal_lm")
    out = Path(yaml.safe_load(Path(path).read_text())["output_dir"]).resolve()
    record = tmp_path / "argv.txt"
    _fake_sbatch(tmp_path / "bin", f'printf "%s\\n" "$@" > {record}; echo "Submitted batch job 8"')
    squeue = tmp_path / "bin" / "squeue"  # (job 7, named scaletune, runs for out: no job is named other)
    squeue.write_text(f"#!/bin/sh\ncase \" $* \" in *\" -n other \"*) exit 0;; esac\n"
                      f"echo '7|RUNNING|scaletune output_dir={out}'\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SBATCH_JOB_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(out), ready, release))  # (job 7's run)
    holder.start()
    try:
        assert ready.wait(60)
        code, out_text, err = run_cli(["slurm", path, "--gpus-per-node", "0",
                                       "--sbatch-arg=--dependency=singleton"], capfd)
        assert code == 0 and "Submitted batch job 8" in out_text, err
        assert "--dependency=singleton" in record.read_text().splitlines()
        record.unlink()
        code, _, err = run_cli(["slurm", path, "--gpus-per-node", "0", "--sbatch-arg=--dependency=singleton",
                                "--sbatch-arg=--job-name=other"], capfd)
        assert_clean_error(code, err, "is in use by another run")
        assert not record.exists()
    finally:
        release.set()
        holder.join(60)


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
    code = ("import logging\nfrom scaletune import cli\ncli._setup_logging()\n"
            "import huggingface_hub.utils.logging as hub\n"
            "hub.get_logger('huggingface_hub.utils._http').warning('retrying in 1s')\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stderr
    assert err.count("retrying in 1s") == 1, err


def test_launch_args_prints_the_deepspeed_flags_or_says_why_there_are_none(capsys, make_config):
    """launch-args printed one empty line for a DDP config, with nothing to say why."""
    path = make_config("causal_lm")
    code, out, err = run_cli(["launch-args", path], capsys)
    assert code == 0 and out == "\n" and "no DeepSpeed flags: distributed.zero_stage is 0" in err
    code, out, err = run_cli(["launch-args", path, "distributed.zero_stage=3"], capsys)
    assert code == 0 and "--use_deepspeed" in out and "--zero_stage 3" in out and err == "", (out, err)


def test_a_long_eval_says_it_is_alive(capsys, make_config, tmp_path, monkeypatch):
    """CoNLL's 3,250 validation sentences took minutes on a CPU after the last step line with nothing on
    screen. Off a terminal a line comes every half minute (here time runs 40 s per batch)."""
    path = make_config("causal_lm", n=24, train={"max_steps": 1, "micro_batch_size": 4, "global_batch_size": 4})
    assert run_cli(["train", path], capsys)[0] == 0
    import scaletune.progress

    clock = iter(range(0, 10**6, 40))
    monkeypatch.setattr(scaletune.progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setenv("SCALETUNE_NO_PROGRESS", "0")
    code, out, err = run_cli(["eval", path], capsys)
    assert code == 0 and "perplexity" in json.loads(out)
    done = [tuple(map(int, line.removeprefix("eval: ").removesuffix(" batches").split("/")))
            for line in err.splitlines() if line.startswith("eval: ") and line.endswith(" batches")]
    assert len(done) >= 2 and len({n for _, n in done}) == 1, err  # batch k of the whole set's count
    assert [k for k, _ in done] == sorted({k for k, _ in done}) and done[-1][0] <= done[-1][1]


@pytest.mark.parametrize("task,base", [("seq_cls", "bert"), ("seq_cls", "llama"), ("token_cls", "bert")])
def test_predict_in_batches_labels_as_one_line_at_a_time(capsys, make_config, tiny_llama, monkeypatch, task, base):
    """Lines are labelled 32 per forward (padded on the right; a decoder classifies by its last real
    token), each window of lines batched by length: the same labels, scores and tags as one line per forward,
    across batch and window boundaries, with lines of very different lengths, and the lines in input order."""
    import random

    import scaletune.infer as infer

    from stutil import cls_records, ner_records

    extra = {"model": {"name_or_path": str(tiny_llama)}} if base == "llama" else {}
    path = make_config(task, train={"max_steps": 2}, **extra)
    assert run_cli(["train", path], capsys)[0] == 0
    rng = random.Random(0)
    if task == "seq_cls":
        lines = [{"text": " ".join([r["text"]] * rng.randint(1, 6))} for r in cls_records(40, seed=3)]
    else:
        lines = [{"tokens": r["tokens"] * rng.randint(1, 6)} for r in ner_records(40, seed=3)]
    monkeypatch.setattr(infer, "PREDICT_BATCH", 8)
    monkeypatch.setattr(infer, "PREDICT_WINDOW", 2)  # windows of 16 lines: 16, 16 and 8, each batched by length
    sizes, answer = [], infer._answer
    monkeypatch.setattr(infer, "_answer", lambda cfg, model, tok, labels, batch, *a:
                        sizes.append([infer._size(x) for x in batch]) or answer(cfg, model, tok, labels, batch, *a))
    code, batched, err, _ = _predict(path, capsys, lines)
    assert code == 0, err
    assert [len(b) for b in sizes] == [8, 8, 8, 8, 8]
    for first, second in (sizes[0:2], sizes[2:4]):  # (a batch of real sentences in input order was half padding)
        assert min(first) >= max(second)
    monkeypatch.setattr(infer, "PREDICT_BATCH", 1)
    code, single, err, _ = _predict(path, capsys, lines)
    assert code == 0, err
    assert [g["line"] for g in batched] == list(range(1, 41))
    for b, s in zip(batched, single):
        assert {k: v for k, v in b.items() if k != "score"} == {k: v for k, v in s.items() if k != "score"}
        if task == "seq_cls":
            assert b["score"] == pytest.approx(s["score"], abs=1e-5)


def test_data_labels_name_integer_labels_only_when_they_are_names():
    """data.labels names integer labels by id only where it lists names: integer labels given integer
    data.labels (`[1, 0]`, an order of the classes) are their own names, not ids into that list (label 0 is
    class "0", not "1"); labels that are names already are not ids; HF datasets' -1 (unlabelled) is an id."""
    from scaletune.tasks.base import id_names_for

    assert id_names_for(["0", "1"], [1, 0]) is None and id_names_for(["0", "1"], ["1", "0"]) is None
    assert id_names_for(["0", "1"], ["negative", "positive"]) == ["negative", "positive"]
    assert id_names_for(["-1", "0", "1"], ["negative", "positive"]) == ["negative", "positive"]
    assert id_names_for(["negative", "positive"], ["negative", "positive"]) is None
    assert id_names_for(["0", "1"], None) is None


def test_integer_class_ids_are_named_by_data_labels(make_config, tmp_path, capsys):
    """SST-2 and other HF ClassLabel data hold 0/1: data.labels [negative, positive] names them by id, as it
    names token_cls' integer ner_tags (it was refused: "label 0 is not in the label set"); eval on a file of ids
    and predict speak the names."""
    import json

    from stutil import cls_records, write_jsonl

    ids = [{"text": r["text"], "label": int(r["label"] == "pos")} for r in cls_records(64)]
    train = write_jsonl(tmp_path / "ids.jsonl", ids)
    evalf = write_jsonl(tmp_path / "ids_eval.jsonl", ids[:16])
    path = make_config("seq_cls", data={"train": str(train), "eval": str(evalf), "labels": ["negative", "positive"]},
                       train={"max_steps": 6, "learning_rate": 0.05})
    assert main(["train", str(path)]) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "run" / "adapter" / "scaletune.json").read_text())
    assert meta["labels"] == ["negative", "positive"]
    capsys.readouterr()
    assert main(["eval", str(path), "--data", str(evalf)]) == 0
    out = capsys.readouterr().out
    assert "negative" in out and "positive" in out, out
    code, got, err, _ = _predict(path, capsys, ["alpha bravo", "charlie delta"])
    assert code == 0, err
    assert {g["label"] for g in got} <= {"negative", "positive"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a b", "label": 2}])
    assert main(["eval", str(path), "--data", str(bad)]) == 2
    assert "label 2 is not an id of data.labels (0..1)" in capsys.readouterr().err
    # HF's -1 marks an unlabelled row (GLUE's test splits): that row is named, not a valid 0 blamed
    unlabelled = write_jsonl(tmp_path / "unlabelled.jsonl", [{"text": "a b", "label": 0}, {"text": "c", "label": -1}])
    assert main(["eval", str(path), "--data", str(unlabelled)]) == 2
    assert "unlabelled.jsonl:2: label -1 is not an id of data.labels (0..1)" in capsys.readouterr().err


def test_seq_cls_data_labels_listing_two_spellings_keeps_them_apart():
    """Labels that differ only in spaces are refused unless data.labels lists both (the refusal's own hint);
    that held until the label column was read for id naming with data.labels given too."""
    from types import SimpleNamespace as NS

    from scaletune.tasks.seq_cls import SeqCls

    data = NS(text_column=None, text_pair_column=None, label_column=None, label_separator=None, labels=["neg", "neg ", "pos"])
    recs = [{"text": "a", "label": "neg"}, {"text": "b", "label": "neg "}, {"text": "c", "label": "pos"}]
    assert SeqCls().setup(recs, NS(data=data), "f") == ["neg", "neg ", "pos"]


def test_predict_reads_table_and_conll_files_as_training_reads_them(capsys, make_config, tiny_bert, monkeypatch):
    """A TSV (header, label column) or a CoNLL file given to predict was read line by line as text: the header
    was labelled, each row's label stayed glued to its text, and a CoNLL file's tags and -DOCSTART- were tagged
    as words. They are read as training reads them; each output names the line its record starts on."""
    path = make_config("seq_cls")
    _fake_trained(monkeypatch, "seq_cls", tiny_bert, {"text": "sentence", "pair": None, "label": "label"},
                  ["neg", "pos"])
    tsv = Path(path).parent / "dev.tsv"
    tsv.write_text("sentence\tlabel\nalpha bravo\t1\ncharlie delta\t0\n")
    code, out, err = run_cli(["predict", path, "--input", tsv], capsys)
    assert code == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert [(g["line"], g["text"]) for g in got] == [(2, "alpha bravo"), (3, "charlie delta")]
    path = make_config("token_cls")
    _fake_trained(monkeypatch, "token_cls", tiny_bert, {"tokens": "tokens", "tags": "tags", "id_names": None},
                  ["B-PER", "O"])
    conll = Path(path).parent / "test.conll"
    conll.write_text("-DOCSTART- O\n\nAlice B-PER\nwent O\n\nBob B-PER\n")
    code, out, err = run_cli(["predict", path, "--input", conll], capsys)
    assert code == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert [(g["line"], g["tokens"]) for g in got] == [(3, ["Alice", "went"]), (6, ["Bob"])]


def test_predict_says_which_classified_lines_max_length_cut(capsys, make_config, tiny_bert, monkeypatch, caplog):
    """A text past data.max_length was labelled by its first tokens without a word (NER predict said so per line
    and in a warning; seq_cls did not): the line says "truncated": true and one warning counts them."""
    path = make_config("seq_cls", data={"max_length": 8})
    _fake_trained(monkeypatch, "seq_cls", tiny_bert, {"text": "text", "pair": None, "label": "label"}, ["neg", "pos"])
    with caplog.at_level("WARNING", logger="scaletune"):
        code, got, err, inp = _predict(path, capsys, ["alpha bravo", " ".join(["charlie"] * 30)])
    assert code == 0, err
    assert "truncated" not in got[0] and got[1]["truncated"] is True
    assert f"1 of 2 input(s) are longer than data.max_length=8 tokens (first: {inp}:2)" in caplog.text


@pytest.mark.parametrize("line", ["John Smith lives in Paris, France.", {"text": "John Smith lives in Paris, France."}],
                         ids=["plain", "json"])
def test_predict_splits_raw_text_like_ner_data_with_character_offsets(capsys, make_config, tiny_bert, monkeypatch,
                                                                       line):
    """Raw text is tagged as words split like CoNLL data ("Paris" ",", not "Paris,", which the tagger never
    saw), and each entity says where it is in the text: text[char_start:char_end] is its "text"."""
    text = "John Smith lives in Paris, France."
    words = ["John", "Smith", "lives", "in", "Paris", ",", "France", "."]
    path = make_config("token_cls")
    _fake_trained(monkeypatch, "token_cls", tiny_bert, None, ["B-PER", "O"])  # every word its own entity
    code, got, err, _ = _predict(path, capsys, [line])
    assert code == 0, err
    assert (got[0]["text"], got[0]["tokens"]) == (text, words)
    ents = got[0]["entities"]
    assert [e["text"] for e in ents] == words
    assert all(text[e["char_start"]:e["char_end"]] == e["text"] for e in ents)
    assert (ents[4]["char_start"], ents[4]["char_end"], ents[5]["char_start"]) == (20, 25, 25)
    _fake_trained(monkeypatch, "token_cls", tiny_bert, None, ["I-PER", "O"])  # the whole line one entity
    code, got, err, _ = _predict(path, capsys, [line])
    assert code == 0, err
    assert got[0]["entities"] == [{"text": text, "type": "PER", "start": 0, "end": 8, "char_start": 0,
                                   "char_end": len(text)}]  # as written, not "Paris , France ."


def test_a_character_level_chinese_tagger_tags_raw_text_one_character_a_word(capsys, make_config, tmp_path,
                                                                              caplog):
    """Trained on Chinese one character a word (as MSRA and Weibo NER are), the adapter records it, and raw
    text given to predict is split so (before, a run of characters was one word the tagger never saw); a tagger
    trained on segmented Chinese words is warned of instead."""
    chars = [{"tokens": list("我在北京工作"), "tags": ["O", "O", "B-LOC", "I-LOC", "O", "O"]},
             {"tokens": list("张三去上海"), "tags": ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]}] * 4
    path = make_config("token_cls", train={"max_steps": 1, "global_batch_size": 4})
    write_jsonl(tmp_path / "data" / "train.jsonl", chars)
    write_jsonl(tmp_path / "data" / "eval.jsonl", chars[:2])
    assert main(["train", str(path)]) == 0
    meta = json.loads((tmp_path / "run" / "adapter" / "scaletune.json").read_text())
    assert meta["task_state"]["cjk_chars"] is True
    capsys.readouterr()
    text = "李四在深圳，iPhone很好"
    code, got, err, _ = _predict(path, capsys, [text])
    assert code == 0, err
    assert got[0]["tokens"] == list("李四在深圳，iPhone很好")
    assert all(text[e["char_start"]:e["char_end"]] == e["text"] for e in got[0]["entities"])

    words = [{"tokens": ["我", "在", "北京", "工作"], "tags": ["O", "O", "B-LOC", "O"]}] * 8
    write_jsonl(tmp_path / "data" / "train.jsonl", words)
    write_jsonl(tmp_path / "data" / "eval.jsonl", words[:2])
    assert main(["train", str(path), "--overwrite"]) == 0
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="scaletune"):
        code, got, err, _ = _predict(path, capsys, [text])
    assert code == 0, err
    assert got[0]["tokens"] == ["李四在深圳", "，", "iPhone很好"]
    assert "trained on Chinese/Japanese text split into words" in caplog.text
