"""model.rope_scaling: a rotary model's positions stretched (transformers' rope_parameters) in training, eval, predict
and merge; refused at config time when malformed and before anything is written for a model without rotary
positions; data.max_length up to factor x max_position_embeddings is expected, past it warned about."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from stutil import BASE, assert_clean_error, data_config, run_cli

LINEAR = {"type": "linear", "factor": 2.0}
# (the tiny random model barely uses positions: a strong stretch moves its loss well past rounding)
STRONG = {"type": "linear", "factor": 32.0}


def test_bad_rope_scaling_is_refused_at_config_time_with_every_problem():
    from scaletune.config import from_dict
    from scaletune.errors import ConfigError

    bad = {"type": "yarn", "factor": 1, "beta_fast": "x", "low_freq_factor": 1.0, "original_max_position_embeddings": 2.5}
    with pytest.raises(ConfigError) as err:
        from_dict({**BASE, "model": {"name_or_path": "m", "rope_scaling": bad}, "train": {"learning_rate": -1}})
    text = str(err.value)
    for fragment in ("model.rope_scaling: factor must be a number > 1, got 1",
                     "model.rope_scaling: beta_fast must be a number, got 'x'",
                     "model.rope_scaling: low_freq_factor not taken by type yarn",
                     "original_max_position_embeddings must be a whole number > 0, got 2.5",
                     "train.learning_rate"):
        assert fragment in text, text
    for spec, fragment in [({"type": "ntk", "factor": 2}, "'ntk' is not one of linear | dynamic | yarn | llama3"),
                           ({"rope_type": "llama3", "factor": 8}, "type llama3 needs low_freq_factor, high_freq_factor"),
                           ({"factor": 2}, "needs a type"),
                           ({"type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1},
                            "high_freq_factor (1) must be above low_freq_factor (4)"),
                           ("linear", "model.rope_scaling: expected dict, got str")]:
        with pytest.raises(ConfigError, match="model.rope_scaling") as err:
            from_dict({**BASE, "model": {"name_or_path": "m", "rope_scaling": spec}})
        assert fragment in str(err.value)
    # every tool's spelling of the type is one; axolotl's top-level key points to scaletune's
    assert from_dict({**BASE, "model": {"name_or_path": "m", "rope_scaling": {"rope_type": "dynamic", "factor": 4}}})
    with pytest.raises(ConfigError, match="did you mean 'model.rope_scaling'"):
        from_dict({**BASE, "rope_scaling": LINEAR})


def test_the_scaling_reaches_the_model(tmp_path, tiny_llama):
    """The loaded model's rotary embedding is the linear one, and its logits differ from the unscaled model's."""
    from scaletune.model import load_model, load_tokenizer
    from scaletune.tasks import get_task

    logits = {}
    for spec in (None, LINEAR):
        cfg = data_config(tmp_path, tiny_llama, data=tmp_path / "unused.jsonl")
        cfg.model.rope_scaling = spec
        model = load_model(cfg, get_task("causal_lm"), None, load_tokenizer(cfg)).eval()
        assert model.config.rope_parameters["rope_type"] == ("linear" if spec else "default")
        with torch.no_grad():
            logits[bool(spec)] = model(torch.arange(1, 60)[None]).logits
    assert not torch.allclose(logits[False], logits[True], atol=1e-5)


def test_eval_predict_and_merge_of_a_scaled_run_apply_the_scaling(capsys, make_config, tmp_path):
    """`eval` of the adapter gives the run's final eval loss only with the run's scaling (the run's config carries
    it); the merged model's config.json carries it, so it gives base + adapter's logits on its own."""
    path = make_config("causal_lm", model={"rope_scaling": STRONG}, train={"max_steps": 3, "eval_every": 3})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r.get("event") == "eval"][-1]
    code, out, err = run_cli(["eval", path], capsys)
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(final["loss"], rel=1e-7)  # (the same computation: equal)
    saved_config = tmp_path / "saved.yaml"  # the run's own record of its config carries the key
    saved_config.write_text(yaml.safe_dump(json.loads((tmp_path / "run" / "run.json").read_text())["config"]))
    code, out, err = run_cli(["eval", saved_config], capsys)
    assert code == 0, err
    assert json.loads(out)["loss"] == pytest.approx(final["loss"], rel=1e-7)
    code, out, err = run_cli(["eval", path, "model.rope_scaling=null"], capsys)
    assert code == 0, err
    assert json.loads(out)["loss"] != pytest.approx(final["loss"], rel=1e-5)  # (measured: 5e-5 apart)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Reverse the order of these words.\n")
    code, _, err = run_cli(["predict", path, "--input", prompts, "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["merge", path, "--out", tmp_path / "merged"], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())["rope_parameters"]
    assert saved["rope_type"] == "linear" and saved["factor"] == 32.0

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = yaml.safe_load(path.read_text())["model"]["name_or_path"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, rope_parameters=saved)
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_model_without_rotary_positions_is_refused_before_anything_is_written(capsys, make_config, tmp_path):
    path = make_config("seq_cls", model={"rope_scaling": LINEAR})
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "model.rope_scaling:", "(bert) has no rotary position embeddings")
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli(["plan", path], capsys)
    assert_clean_error(code, err, "model.rope_scaling:", "(bert) has no rotary position embeddings")


_LLAMA31 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128, "rope_theta": 500000.0}  # (128 pretrained, stated as 512)


@pytest.mark.parametrize("spec,length,warned,own", [
    (None, 512, False, None), (None, 513, True, None),
    (LINEAR, 1024, False, None), (LINEAR, 1025, True, None),
    ({"type": "yarn", "factor": 4}, 2048, False, None), ({"type": "yarn", "factor": 4}, 2049, True, None),
    # a new factor of the model's own scheme stretches its pretrained 128, not the 512 it states: x8 is 1024
    ({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 1024, False, _LLAMA31),
    ({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 1025, True, _LLAMA31),
])
def test_max_length_warns_only_past_what_the_scaling_covers(tmp_path, spec, length, warned, own):
    from transformers import AutoConfig

    from scaletune.rope import scaled_rope_parameters
    from scaletune.seqlen import effective_max_length

    cfg = data_config(tmp_path, "m", data="t.jsonl", max_length=length)
    cfg.model.rope_scaling = spec
    config = AutoConfig.for_model("llama", max_position_embeddings=512, hidden_size=64, num_attention_heads=2,
                                  **({"rope_parameters": own} if own else {}))
    if spec:  # (as read_model_config gives it to training and plan)
        config.rope_parameters = scaled_rope_parameters(config, spec, "m")
    kept, notes = effective_max_length(cfg, None, config)
    assert kept == length
    assert bool(notes) == warned
    if warned:
        assert "model.rope_scaling" in notes[0] and f"data.max_length={length}" in notes[0]


def test_eval_predict_and_merge_say_when_the_config_scales_otherwise_than_the_run(capsys, make_config, tmp_path, caplog):
    """model.rope_scaling is read from the config given: one without the run's scaling (or with another factor)
    runs the adapter on positions it was not trained on, and merge would write that into config.json, so each
    command says so, naming the key and both values; the run's own config says nothing."""
    path = make_config("causal_lm", model={"rope_scaling": LINEAR}, train={"max_steps": 1})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err
    with caplog.at_level("WARNING", logger="scaletune"):
        code, _, err = run_cli(["eval", path], capsys)
    assert code == 0, err
    assert "rope_scaling" not in caplog.text
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Reverse the order of these words.\n")
    for command in (["eval", path, "model.rope_scaling=null"],
                    ["predict", path, "--input", prompts, "--max-new-tokens", "2", "model.rope_scaling.factor=4.0"],
                    ["merge", path, "--out", tmp_path / "merged", "model.rope_scaling=null"]):
        caplog.clear()
        with caplog.at_level("WARNING", logger="scaletune"):
            code, _, err = run_cli(command, capsys)
        assert code == 0, err
        assert "was trained with model.rope_scaling: {type: linear, factor: 2.0}; this config has " in caplog.text
    assert "this config has none" in caplog.text


# (scaling, prompt positions, the limit a 64-token completion is warned about: None, none)
_COVERED = [(None, 100, "128 positions"),
            (LINEAR, 100, None),  # (128 x 2: the completion stays within what the scaled run trained on)
            (LINEAR, 200, "256 positions"),
            ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8}, 100, "128 positions")]  # (Llama 3.1's: the stretch stated)


def test_generation_warns_past_the_positions_the_scaling_covers(caplog):
    """predict's and eval --generate's warning that a completion runs past the trained positions counts a RoPE
    scaling's stretch: a scaled run's completions within it are not warned about, nor is the limit misnamed."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from scaletune import generation

    for rope, used, warned in _COVERED:
        config = LlamaConfig(max_position_embeddings=128)
        if rope is not None:
            kind = rope.get("type", rope.get("rope_type"))
            config.rope_parameters = {"rope_theta": 10000.0, **{k: v for k, v in rope.items() if k != "type"},
                                      "rope_type": kind}
        generation._CAPPED.clear()
        caplog.clear()
        with caplog.at_level("WARNING", logger="scaletune"):
            assert generation._budget(SimpleNamespace(config=config), used, 64) == 64
        generation._CAPPED.clear()
        if warned is None:
            assert "completions may run past" not in caplog.text, rope
        else:
            assert f"completions may run past the {warned} the model was trained for" in caplog.text, rope


def test_longrope_factors_of_the_wrong_length_are_refused_naming_the_key(capsys, make_config):
    """one factor per rotary frequency (the tiny Llama: head_dim 16, 8 frequencies); transformers only logs a
    wrong length, and a single number would be broadcast over every frequency, so the run is refused before
    it trains."""
    factors = {"type": "longrope", "short_factor": [1.0] * 8}
    path = make_config("causal_lm", model={"rope_scaling": {**factors, "long_factor": [2.0]}})
    code, _, err = run_cli(["train", path], capsys)
    assert_clean_error(code, err, "model.rope_scaling:", "8 frequencies", "long_factor has 1")
    assert "short_factor has" not in err
    path = make_config("causal_lm", model={"rope_scaling": {**factors, "long_factor": [2.0] * 8}},
                       train={"max_steps": 1})
    code, _, err = run_cli(["train", path], capsys)
    assert code == 0, err


def test_a_new_factor_of_the_models_own_scheme_stretches_its_pretrained_length(caplog):
    """A Llama 3.1-like config (llama3: 128 pretrained positions stretched x4 to its 512): model.rope_scaling
    llama3 x8 keeps the 128 its frequencies are relative to (1024 positions), as a changed factor means; not
    the stretched 512, which would move every frequency the model was trained with, without a word. Another
    scheme replaces the model's (with a warning), stretching max_position_embeddings as the key's doc says."""
    from transformers import LlamaConfig

    from scaletune.rope import scaled_rope_parameters

    own = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 128, "rope_theta": 500000.0}
    config = LlamaConfig(max_position_embeddings=512, hidden_size=64, num_attention_heads=2, rope_parameters=own)
    llama3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    with caplog.at_level("WARNING", logger="scaletune"):
        params = scaled_rope_parameters(config, llama3, "m")
    assert params["original_max_position_embeddings"] == 128 and params["factor"] == 8.0
    assert params["rope_theta"] == 500000.0 and "replaces" not in caplog.text
    assert scaled_rope_parameters(config, {**llama3, "original_max_position_embeddings": 256},
                                  "m")["original_max_position_embeddings"] == 256  # (given: taken as given)
    with caplog.at_level("WARNING", logger="scaletune"):
        yarn = scaled_rope_parameters(config, {"type": "yarn", "factor": 2.0}, "m")
    assert yarn["original_max_position_embeddings"] == 512 and "replaces m's own RoPE scaling" in caplog.text
