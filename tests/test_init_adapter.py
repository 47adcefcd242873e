"""model.init_adapter: a new run starts from a saved adapter's weights (and classifier head), and every way the
saved adapter could mean something else than the run config says is one error before anything is written."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from safetensors.torch import load_file

from scaletune.cli import main
from scaletune.methods import MATRIX


def _train(path, capsys, *overrides) -> int:
    capsys.readouterr()
    return main(["train", str(path), *overrides])


def _evals(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == "eval"]


@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
def test_a_run_starts_from_the_saved_adapter(task, make_config, tmp_path, capsys, caplog):
    """A run at a learning rate too small to move anything ends where the adapter it started from ended: the
    same weights (head included) and the same eval loss; without init_adapter it does not."""
    path = make_config(task, train={"max_steps": 3, "learning_rate": 2e-2, "eval_every": None})
    assert _train(path, capsys) == 0
    first = tmp_path / "run"
    still = ["train.max_steps=1", "train.learning_rate=1e-12"]
    caplog.set_level(logging.INFO, logger="scaletune")
    start = f"model.init_adapter={first / 'adapter'}"
    assert _train(path, capsys, *still, f"output_dir={tmp_path / 'next'}", start) == 0
    assert "model.init_adapter: starting from the" in caplog.text, caplog.text
    assert _train(path, capsys, *still, f"output_dir={tmp_path / 'fresh'}") == 0

    saved = load_file(first / "adapter" / "adapter_model.safetensors")
    after = load_file(tmp_path / "next" / "adapter" / "adapter_model.safetensors")
    fresh = load_file(tmp_path / "fresh" / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == after.keys() and len(saved) > 0
    if task == "seq_cls":
        assert any("classifier" in k for k in saved)  # the head trained in full comes with it
    for key in saved:
        torch.testing.assert_close(after[key], saved[key], rtol=0, atol=1e-8)
    assert any(not torch.allclose(fresh[k], saved[k], atol=1e-4) for k in saved)
    assert _evals(tmp_path / "next")[-1]["loss"] == pytest.approx(_evals(first)[-1]["loss"], rel=1e-5)
    assert _evals(tmp_path / "fresh")[-1]["loss"] != pytest.approx(_evals(first)[-1]["loss"], rel=1e-3)


@pytest.fixture
def seq_cls_adapter(make_config, tmp_path, capsys):
    path = make_config("seq_cls", train={"max_steps": 1, "eval_every": None})
    assert _train(path, capsys) == 0
    return path, tmp_path / "run" / "adapter"


@pytest.mark.parametrize(("overrides", "wanted"), [
    (["peft.method=ia3", "~peft.r", "~peft.lora_alpha", "~peft.lora_dropout"],
     "holds a LORA adapter but peft.method is ia3: set peft.method: lora"),
    (["peft.r=8"], "peft.r: 8 in the run config, 4 in"),
    (["peft.method=adalora", "~peft.r", "peft.init_r=4", "peft.target_r=2", "peft.total_step=4"],
     "not with peft.method adalora"),
    (["peft.lora_alpha=2"], "peft.lora_alpha: 2 in the run config, 8 in"),
    (["peft.target_modules=[query]"], "22 of its weights have no place in the run's adapter"),  # fewer modules
    (["peft.modules_to_save=[pooler]"],
     "the run trains base_model.model.bert.pooler.dense.weight in full, which it has no weights for"),
])
def test_an_adapter_the_config_does_not_describe_is_refused(seq_cls_adapter, tmp_path, capsys, overrides, wanted):
    path, adapter = seq_cls_adapter
    out = tmp_path / "next"
    code = _train(path, capsys, f"output_dir={out}", f"model.init_adapter={adapter}", *overrides)
    err = capsys.readouterr().err
    assert code == 2 and wanted in err and "Traceback" not in err, err
    assert "model.init_adapter" in err and not out.exists()


def test_labels_in_another_order_are_refused(seq_cls_adapter, tmp_path, capsys):
    """The head's rows are the adapter's labels in its order: the same labels listed otherwise would swap them."""
    path, adapter = seq_cls_adapter
    labels = json.loads((adapter / "scaletune.json").read_text())["labels"]
    assert len(labels) > 1
    code = _train(path, capsys, f"output_dir={tmp_path / 'next'}", f"model.init_adapter={adapter}",
                  f"data.labels={json.dumps(labels[::-1])}")
    err = capsys.readouterr().err
    assert code == 2 and f"are not the adapter's {labels}" in err, err



def test_a_classifier_adapter_without_scaletune_json_needs_its_labels_named(seq_cls_adapter, tmp_path, capsys):
    """A seq_cls adapter from plain peft or TRL records no label names: the data's sorted labels were taken as its
    head's rows without a word, which may be another order (classes swapped). data.labels must name them."""
    path, adapter = seq_cls_adapter
    labels = json.loads((adapter / "scaletune.json").read_text())["labels"]
    (adapter / "scaletune.json").unlink()  # (what plain peft's save_pretrained writes: no scaletune.json)
    code = _train(path, capsys, f"output_dir={tmp_path / 'next'}", f"model.init_adapter={adapter}")
    err = capsys.readouterr().err
    assert code == 2 and "has no scaletune.json, so the order of its classifier's labels is unknown" in err, err
    assert not (tmp_path / "next").exists()
    code = _train(path, capsys, f"output_dir={tmp_path / 'next'}", f"model.init_adapter={adapter}",
                  f"data.labels={json.dumps(labels)}")
    assert code == 0, capsys.readouterr().err



def test_a_plain_peft_adapter_saved_without_a_task_type_is_a_starting_point(make_config, tmp_path, capsys):
    """A LoraConfig without task_type (peft's examples, many hub adapters) saves task_type null: it was refused as
    "peft.task_type: 'CAUSAL_LM' in the run config, None in ...", a key scaletune refuses to take."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = make_config("causal_lm", train={"max_steps": 1})
    base = yaml.safe_load(path.read_text())["model"]["name_or_path"]
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False))
    plain.save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["task_type"] is None
    assert _train(path, capsys, f"model.init_adapter={tmp_path / 'plain'}") == 0, capsys.readouterr().err


@pytest.mark.parametrize("what", ["missing", "no adapter files", "other task"])
def test_a_path_that_holds_no_usable_adapter_is_a_config_error(seq_cls_adapter, tmp_path, capsys, what):
    path, adapter = seq_cls_adapter
    target = tmp_path / "nowhere"
    if what == "no adapter files":
        target.mkdir()
        (target / "adapter_config.json").write_text("{}")
    elif what == "other task":
        target = adapter
        meta = json.loads((adapter / "scaletune.json").read_text())
        (adapter / "scaletune.json").write_text(json.dumps({**meta, "task": "token_cls"}))
    code = _train(path, capsys, f"output_dir={tmp_path / 'next'}", f"model.init_adapter={target}")
    err = capsys.readouterr().err
    wanted = {"missing": "is not a directory", "no adapter files": "is not a peft adapter directory",
              "other task": "the adapter was trained for token_cls"}[what]
    assert code == 2 and wanted in err and "Traceback" not in err, err


def test_a_checkpoint_or_a_run_directory_stands_for_its_adapter(make_config, tmp_path, capsys):
    """(as eval's --adapter reads them; it was refused as no peft adapter directory)"""
    path = make_config("seq_cls", train={"max_steps": 2, "save_every": 1, "save_total_limit": None,
                                         "eval_every": None})
    assert _train(path, capsys) == 0
    run = tmp_path / "run"
    for given, adapter in ((run / "checkpoints" / "step-1", run / "checkpoints" / "step-1" / "adapter"),
                           (run, run / "adapter")):
        out = tmp_path / f"next-{given.name}"
        code = _train(path, capsys, f"output_dir={out}", f"model.init_adapter={given}", "train.max_steps=1",
                      "train.learning_rate=1e-12")
        assert code == 0, capsys.readouterr().err
        saved, after = (load_file(d / "adapter_model.safetensors") for d in (adapter, out / "adapter"))
        assert saved.keys() == after.keys() and saved
        for key in saved:
            torch.testing.assert_close(after[key], saved[key], rtol=0, atol=1e-7, msg=key)



@pytest.mark.slow
# every matrix row but lora (the tests above) and adalora (refused: its saved ranks are pruned)
@pytest.mark.parametrize("name", [m for m in MATRIX if m not in ("lora", "adalora")])
def test_every_method_starts_from_its_saved_adapter(name, make_config, tmp_path, capsys):
    """Each method's saved weights come back as the next run's start (peft names them per method, and the
    prompt-learning ones live outside the model's own state)."""
    from stutil import method_keys

    path = make_config("causal_lm", train={"max_steps": 2, "learning_rate": 2e-2, "eval_every": None})
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "peft": method_keys(name, "causal_lm")}))
    assert _train(path, capsys) == 0, capsys.readouterr().err
    first = tmp_path / "run" / "adapter"
    code = _train(path, capsys, "train.max_steps=1", "train.learning_rate=1e-12", f"output_dir={tmp_path / 'next'}",
                  f"model.init_adapter={first}")
    assert code == 0, capsys.readouterr().err
    saved = load_file(first / "adapter_model.safetensors")
    after = load_file(tmp_path / "next" / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == after.keys() and len(saved) > 0
    for key in saved:
        torch.testing.assert_close(after[key], saved[key], rtol=0, atol=1e-7, msg=key)


def test_a_resume_needs_no_longer_the_adapter_it_started_from(seq_cls_adapter, tmp_path, capsys):
    """A resume continues from its checkpoint, so the adapter the run started from may be gone by then (the
    Slurm templates resume every requeued job with --resume auto)."""
    import shutil

    path, adapter = seq_cls_adapter
    source = tmp_path / "first_adapter"
    shutil.copytree(adapter, source)
    args = [f"output_dir={tmp_path / 'next'}", f"model.init_adapter={source}"]
    assert _train(path, capsys, *args) == 0
    shutil.rmtree(source)
    code = _train(path, capsys, *args, "train.max_steps=2", "--resume", "auto", "--allow-config-change")
    out, err = capsys.readouterr()
    assert code == 0 and "resumed from" in out + err, err


def test_overwrite_refuses_a_run_that_holds_the_adapter_it_starts_from(seq_cls_adapter, tmp_path, capsys):
    """--overwrite deletes the old output_dir once the new run ends: like the run's other inputs, the adapter it
    starts from must not be in there (a fresh start after a stop would find it gone)."""
    path, adapter = seq_cls_adapter
    code = _train(path, capsys, f"model.init_adapter={adapter}", "--overwrite")
    err = capsys.readouterr().err
    assert code == 2 and f"model.init_adapter ({adapter}) is inside it" in err, err
    assert (adapter / "adapter_model.safetensors").is_file()


def test_labels_the_adapter_has_no_head_row_for_are_refused(seq_cls_adapter, tmp_path, capsys):
    """Data with a class the saved head does not score cannot start from it: setting data.labels would not help."""
    from stutil import cls_records, write_jsonl

    path, adapter = seq_cls_adapter
    more = write_jsonl(tmp_path / "more.jsonl", [*cls_records(16), {"text": "alpha bravo", "label": "maybe"}])
    code = _train(path, capsys, f"output_dir={tmp_path / 'next'}", f"model.init_adapter={adapter}",
                  f"data.train={more}")
    err = capsys.readouterr().err
    assert code == 2 and "labels the adapter's head does not score ('maybe'" in err, err
    assert "more classes need a new head" in err and not (tmp_path / "next").exists()


def test_an_adapter_of_another_base_model_names_it(seq_cls_adapter, tmp_path, capsys):
    """The same architecture at other sizes: the shapes differ, and the error says which base the adapter is for."""
    from scaletune.demo.tiny import build_model_dir

    from stutil import corpus

    path, adapter = seq_cls_adapter
    other = build_model_dir(tmp_path / "wider", corpus(), arch="bert", hidden=48, layers=2, heads=2, vocab_size=256)
    code = _train(path, capsys, f"output_dir={tmp_path / 'next'}", f"model.init_adapter={adapter}",
                  f"model.name_or_path={other}")
    err = capsys.readouterr().err
    assert code == 2 and "size mismatch" in err and "Traceback" not in err, err
    assert "names base model" in err and str(other) in err


def test_other_peft_settings_are_refused_by_the_config_check(seq_cls_adapter, tmp_path):
    """The config check (what launch, slurm and plan run before submitting anything) compares the peft section
    with the adapter's adapter_config.json, without loading the model."""
    from scaletune.config import load_config
    from scaletune.errors import ConfigError

    path, adapter = seq_cls_adapter
    start = [f"output_dir={tmp_path / 'next'}", f"model.init_adapter={adapter}"]
    load_config(path, start, check_peft=True)  # the same settings: no problem
    with pytest.raises(ConfigError) as err:
        load_config(path, [*start, "peft.r=8", "peft.use_dora=true"], check_peft=True)
    assert "peft.r: 8 in the run config, 4 in" in str(err.value)
    assert "peft.use_dora: True in the run config, False in" in str(err.value)


@pytest.mark.parametrize("task", ["dpo", "kto"])
def test_an_sft_adapter_under_dpo_or_kto_is_refused_by_the_config_check_naming_the_merge(task, make_config,
                                                                                        tmp_path, capsys):
    """SFT then DPO: continuing the SFT adapter would score against the base without the SFT (the adapter
    switched off), not the SFT model TRL and LLaMA-Factory keep as the reference; the config check says so,
    before any tokenising, and names the way that works (merge, then train on the merged model)."""
    from scaletune.config import load_config
    from scaletune.errors import ConfigError

    sft = make_config("causal_lm", train={"max_steps": 1, "eval_every": None})
    assert _train(sft, capsys) == 0
    path = make_config(task)
    with pytest.raises(ConfigError) as err:
        load_config(path, [f"output_dir={tmp_path / 'next'}", f"model.init_adapter={tmp_path / 'run' / 'adapter'}"],
                    check_peft=True)
    assert "is a causal_lm (SFT) adapter" in str(err.value) and "scaletune merge" in str(err.value), err.value


@pytest.mark.parametrize("peft", [["peft.method=p_tuning", "peft.encoder_hidden_size=16"],
                                  ["peft.method=prefix_tuning", "peft.prefix_projection=true"]])
def test_a_prompt_encoder_method_is_refused_since_peft_saves_only_its_output(peft, make_config, tmp_path):
    """p_tuning (and prefix_tuning with prefix_projection) train an encoder whose output peft saves, not the
    encoder: p_tuning's output would silently land in a fresh encoder's input (same shape), prefix_projection's
    was a bare size mismatch; the config check refuses both, naming the key."""
    from scaletune.config import load_config
    from scaletune.errors import ConfigError

    path = make_config("causal_lm")
    keys = ["~peft.r", "~peft.lora_alpha", "~peft.lora_dropout", "~peft.target_modules", "peft.num_virtual_tokens=4"]
    with pytest.raises(ConfigError) as err:
        load_config(path, [*keys, *peft, f"model.init_adapter={tmp_path}"], check_peft=True)
    assert "model.init_adapter: not with peft.method" in str(err.value), err.value
    assert "saves only its prompt encoder's output" in str(err.value)
    load_config(path, [*keys, *peft], check_peft=True)  # (the settings themselves are fine)


@pytest.mark.parametrize(("first", "then"), [("pissa", "true"), ("true", "olora")])
def test_an_init_that_changes_the_base_must_be_the_adapters(first, then, make_config, tmp_path, capsys):
    """PiSSA and OLoRA subtract their first adapter weights from the base, and the saved adapter is an update of
    that residual base: started on the plain base (or a LoRA adapter on a residual one), the run began from
    another model than the adapter's, without a word (init_lora_weights was allowed to differ)."""
    path = make_config("causal_lm", train={"max_steps": 1, "eval_every": None})
    assert _train(path, capsys, f"peft.init_lora_weights={first}", "peft.target_modules=[q_proj]") == 0
    code = _train(path, capsys, f"peft.init_lora_weights={then}", "peft.target_modules=[q_proj]",
                  f"output_dir={tmp_path / 'next'}", f"model.init_adapter={tmp_path / 'run' / 'adapter'}")
    err = capsys.readouterr().err
    assert code == 2 and "peft.init_lora_weights:" in err and "model.init_adapter" in err, err
    assert "Traceback" not in err and not (tmp_path / "next").exists()
    # an init that only sets the first weights (replaced by the saved ones) may differ
    assert _train(path, capsys, "peft.init_lora_weights=gaussian", f"output_dir={tmp_path / 'g'}") == 0
    assert _train(path, capsys, "peft.init_lora_weights=true", f"output_dir={tmp_path / 'next2'}",
                  f"model.init_adapter={tmp_path / 'g' / 'adapter'}") == 0


@pytest.mark.parametrize("task", ["dpo", "kto"])
def test_an_adapter_recording_no_task_under_dpo_or_kto_is_refused_too(task, make_config, tmp_path, capsys):
    """An adapter without scaletune.json (trained by another tool: TRL's or LLaMA-Factory's SFT, say) may be an
    SFT adapter just as well: continued under dpo or kto it would score against the base without the SFT, which
    is what the check above refuses for scaletune's own SFT adapters. Nothing tells which it is, so it is refused
    the same way, naming the merge."""
    from scaletune.config import load_config
    from scaletune.errors import ConfigError

    sft = make_config("causal_lm", train={"max_steps": 1, "eval_every": None})
    assert _train(sft, capsys) == 0
    (tmp_path / "run" / "adapter" / "scaletune.json").unlink()  # (as another tool saves an adapter)
    path = make_config(task)
    with pytest.raises(ConfigError) as err:
        load_config(path, [f"output_dir={tmp_path / 'next'}", f"model.init_adapter={tmp_path / 'run' / 'adapter'}"],
                    check_peft=True)
    assert "records no task" in str(err.value) and "scaletune merge" in str(err.value), err.value
