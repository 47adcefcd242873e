"""The run config's peft section: options checked against the method's peft config class, values that would
train nothing, method names and suggestions, modules_to_save that match nothing, keys the method does not
read, and peft problems reported with the rest."""

from __future__ import annotations

import pytest
import yaml

from scaletune.config import from_dict, load_config
from scaletune.errors import ConfigError

from stutil import BASE, problems_of


def test_peft_options_checked_against_peft_annotations():
    from scaletune.peft_options import peft_config

    cfg = from_dict({**BASE, "peft": {"method": "lora", "use_dora": "yes", "r": True, "rank": 8,
                                      "modules_to_save": "lm_head", "lora_alpha": "x",
                                      "target_modules": ["q_proj", 5]}})
    with pytest.raises(ConfigError) as err:
        peft_config(cfg, "CAUSAL_LM")
    assert err.value.problems == [
        "peft.rank: not a LoraConfig option (did you mean 'r'?)",
        "peft.use_dora: expected bool (true or false), got str 'yes'",
        "peft.r: expected int, got bool True",
        "peft.modules_to_save: expected a list of names or null, got str 'lm_head'",
        "peft.lora_alpha: expected int, got str 'x'",
        # (peft failed on the 5 with "'int' object has no attribute 'split'")
        "peft.target_modules: expected a list of names or a regular expression, got list ['q_proj', 5]",
    ]
    # what peft accepts still passes: a float alpha, null where peft's default is null, "1e-1" (a YAML 1.1 string)
    conf = peft_config(from_dict({**BASE, "peft": {"method": "lora", "lora_alpha": 0.5, "lora_dropout": "1e-1",
                                                   "use_dora": False, "modules_to_save": None}}), "CAUSAL_LM")
    assert conf.lora_dropout == pytest.approx(0.1) and conf.lora_alpha == 0.5
    peft_config(from_dict({**BASE, "peft": {"method": "prompt_tuning", "num_virtual_tokens": 4, "token_dim": None}}),
                "CAUSAL_LM")


def test_modules_to_save_entry_matching_nothing_is_refused(tiny_llama, tiny_bert):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from scaletune.model import apply_adapter
    from scaletune.tasks import get_task

    def adapt(task, model_dir, auto, modules, **kw):
        cfg = from_dict({**BASE, "task": task, "peft": {"method": "lora", "r": 2, "target_modules": "all-linear",
                                                       "modules_to_save": modules}})
        return cfg, apply_adapter(auto.from_pretrained(model_dir, **kw), cfg, get_task(task), None)

    with pytest.raises(ConfigError) as err:
        adapt("causal_lm", tiny_llama, AutoModelForCausalLM, ["lm_heads", "embed_tokens"])
    assert err.value.problems == ["peft.modules_to_save: 'lm_heads' matches no module of LlamaForCausalLM, so "
                                  "nothing would be trained for it (close names: lm_head)"]
    # seq_cls: peft adds its own head names (classifier, score; BERT has no score); only the user's are checked,
    # and the run config's list is not extended by peft
    cfg, model = adapt("seq_cls", tiny_bert, AutoModelForSequenceClassification, ["word_embeddings"], num_labels=2)
    assert cfg.peft["modules_to_save"] == ["word_embeddings"]
    assert any(p.requires_grad for n, p in model.named_parameters() if "word_embeddings.modules_to_save" in n)


def test_a_module_name_given_as_a_string_is_told_to_be_a_list(tiny_llama):
    """LLaMA-Factory's `lora_target: q_proj` carried over as target_modules: q_proj is a regular expression to
    peft, matched against whole names (model.layers.0.self_attn.q_proj): peft's error said only "not found"."""
    from transformers import AutoModelForCausalLM

    from scaletune.errors import UserError
    from scaletune.model import apply_adapter
    from scaletune.tasks import get_task

    cfg = from_dict({**BASE, "peft": {"method": "lora", "r": 2, "target_modules": "q_proj"}})
    with pytest.raises(UserError) as err:
        apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), cfg, get_task("causal_lm"), None)
    assert str(err.value).endswith("; a string is one regular expression matched against whole module names, for "
                                   "the modules named q_proj write a list: [q_proj]")


def test_peft_values_that_would_train_nothing_are_refused():
    from scaletune.peft_options import peft_config

    cfg = from_dict({**BASE, "peft": {"method": "lora", "lora_alpha": 0, "r": 0, "lora_dropout": 1.0}})
    with pytest.raises(ConfigError) as err:
        peft_config(cfg, "CAUSAL_LM")
    assert err.value.problems == [
        "peft.lora_alpha: must be > 0, got 0 (it scales the adapter's update: the model would never change)",
        "peft.r: must be >= 1 (the adapter's rank), got 0",
        "peft.lora_dropout: must be in [0, 1), got 1.0 (1 drops every input: nothing would be trained)",
    ]
    problems = problems_of({**BASE, "peft": {"method": "loha", "alpha": -1, "module_dropout": "1e0"}}, check_peft=True)
    assert problems == ["peft.alpha: must be > 0, got -1", "peft.module_dropout: must be in [0, 1), got 1.0 "
                        "(1 drops every input: nothing would be trained)"]
    # a scale past float32's range passed, then the fused LoRA product failed at step 1 with a traceback
    problems = problems_of({**BASE, "peft": {"method": "lora", "lora_alpha": 1e308}}, check_peft=True)
    assert problems == ["peft.lora_alpha: must be at most 3.4e+38 (the largest float32), got 1e+308"]
    # OFT's r may be 0 (its block size is set instead); a positive float alpha is fine
    from_dict({**BASE, "peft": {"method": "oft", "r": 0, "oft_block_size": 4}}, check_peft=True)
    from_dict({**BASE, "peft": {"method": "lora", "lora_alpha": 0.5, "lora_dropout": 0}}, check_peft=True)


@pytest.mark.parametrize(("init", "wanted"), [
    ("eva", "initialize_lora_eva_weights, a pass scaletune does not run"),
    ("lora_ga", "preprocess_loraga, a pass scaletune does not run"),
    ("corda", "preprocess_corda, a pass scaletune does not run"),
    ("pissa_niter_4", "the loaded model would not be the trained one; use pissa"),
])
def test_lora_inits_that_would_not_be_the_adapter_loaded_or_asked_for_are_refused(init, wanted):
    """eva and lora_ga trained as plain LoRA without a word (peft falls back without its data pass); pissa_niter_N's
    randomized SVD is drawn again at every load, so eval, predict and merge scored another residual base."""
    for method in ("lora", "adalora"):
        problems = problems_of({**BASE, "peft": {"method": method, "init_lora_weights": init}}, check_peft=True)
        assert len(problems) == 1 and problems[0].startswith(f"peft.init_lora_weights: {init} ") \
            and wanted in problems[0], problems
    for fine in ("pissa", "olora", "gaussian", True):
        from_dict({**BASE, "peft": {"method": "lora", "init_lora_weights": fine}}, check_peft=True)


def test_method_suggestions_are_methods_peft_accepts():
    from scaletune.methods import MATRIX

    suggested = ", ".join(m for m, row in MATRIX.items()  # (after lora, adalora and ia3, in the matrix's order)
                          if "token_cls" in row.tasks and m == row.peft_method and m not in ("lora", "adalora", "ia3"))
    problems = problems_of({**BASE, "task": "token_cls", "peft": {"method": "prompt_tuning"}})
    assert problems == ["peft.method=prompt_tuning with task token_cls is not supported (virtual input tokens; "
                        "dpo, kto: the reference (adapter off) has no virtual tokens; reward: peft passes embeddings, "
                        "so a padded row's last token is not found; token_cls: outputs would include "
                        "the virtual tokens); use one of: lora (use_dora: true for "
                        f"DoRA, use_rslora: true for rsLoRA), adalora, ia3, {suggested}"]
    # (each suggestion is a method peft knows, and a method row added to the matrix is suggested with no edit here)
    import peft

    import scaletune.adapters  # noqa: F401  (registers bottleneck_adapter with peft)
    known = {str(getattr(k, "value", k)).lower() for k in peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING}
    assert set(suggested.split(", ")) <= known
    for method, how in (("dora", "DoRA is peft.method: lora with peft.use_dora: true"),
                        ("rsLoRA", "rsLoRA is peft.method: lora with peft.use_rslora: true"),
                        ("qlora", "QLoRA is peft.method: lora with model.quantization: 4bit")):
        problems = problems_of({**BASE, "peft": {"method": method}}, check_peft=True)
        assert problems == [f"peft.method: unknown method {method!r} ({how})"]


def test_peft_problems_reported_with_the_rest_for_commands_that_train(tmp_path, capsys):
    from scaletune.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    expected = ["train.lr: unknown key (did you mean 'learning_rate'?) (from override train.lr=1)",
                "peft.lora_r: not a LoraConfig option (did you mean 'r'?) (from override peft.lora_r=8)"]
    with pytest.raises(ConfigError) as err:
        load_config(path, ["peft.lora_r=8", "train.lr=1"], check_peft=True)
    assert err.value.problems == expected
    for command in (["plan"], ["launch", "--dry-run", "--nproc", "1"], ["slurm", "--dry-run"], ["train"]):
        assert main([*command, str(path), "peft.lora_r=8", "train.lr=1"]) == 2
        err = capsys.readouterr().err
        assert "has 2 problems" in err and all(p in err for p in expected), (command, err)
    # without the peft check (eval/predict/merge read the trained adapter's config) the peft section is not asked
    with pytest.raises(ConfigError) as err:
        load_config(path, ["peft.lora_r=8", "train.lr=1"])
    assert err.value.problems == expected[:1]


def test_method_name_case_does_not_change_what_is_checked():
    # peft reads `Prefix_Tuning` as prefix_tuning: the checks of its combinations must too
    for name in ("prefix_tuning", "Prefix_Tuning", "PREFIX_TUNING"):
        raw = {**BASE, "peft": {"method": name}, "data": {"train": "t.jsonl", "packing": True}}
        assert any("virtual tokens cannot be isolated" in p for p in problems_of(raw)), name
    from_dict({**BASE, "peft": {"method": "LoRA"}, "train": {"loraplus_lr_ratio": 16}})


def test_a_peft_key_the_method_does_not_read_can_be_removed_from_the_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "peft": {"method": "lora", "r": 16, "lora_alpha": 32}}))
    with pytest.raises(ConfigError) as err:
        load_config(path, ["peft.method=ia3"], check_peft=True)
    assert "peft.r: not an IA3Config option (remove it, or give ~peft.r)" in err.value.problems
    with pytest.raises(ConfigError) as err:
        load_config(path, ["peft.method=adalora", "~peft.lora_alpha"], check_peft=True)
    assert err.value.problems == ["peft.r: AdaLoRA does not read it: its ranks start at peft.init_r and are pruned "
                                  "down to peft.target_r; remove peft.r (or give ~peft.r)"]
    cfg = load_config(path, ["peft.method=ia3", "~peft.r", "~peft.lora_alpha"], check_peft=True)
    assert cfg.peft == {"method": "ia3"}
    with pytest.raises(ConfigError, match=r"override '~peft\.rr': the config has no key peft\.rr to remove"):
        load_config(path, ["~peft.rr"])
    with pytest.raises(ConfigError, match=r"override '~peft\.r=5': ~peft\.r removes a key and takes no value; "
                                          r"give peft\.r=5 to set it"):
        load_config(path, ["~peft.r=5"])


def test_p_tuning_is_refused_under_zero3():
    """peft saves a p-tuning adapter by running its prompt encoder on the main rank alone, whose weights ZeRO-3
    gathers from every rank: the last save would hang (prefix and prompt tuning are refused by the matrix)."""
    raw = {**BASE, "peft": {"method": "p_tuning", "num_virtual_tokens": 4}, "distributed": {"zero_stage": 3}}
    assert any("peft.method=p_tuning with distributed.zero_stage=3" in p for p in problems_of(raw))
    assert not [p for p in problems_of({**raw, "train": {"learning_rate": "x"}}) if "p_tuning" in p and "zero_stage=2" in p]
