"""The method matrix under 2-process DeepSpeed on CPU: each method supported under ZeRO-3 trains there, and
each one refused under ZeRO-3 with the advice "use ZeRO-2" trains under ZeRO-2 (its loss falls), and its
gathered adapter is non-empty, loads through plain peft and changes the base model's logits. (That a
gathered ZeRO-3 adapter equals the single-process one is shown for LoRA in test_scale_out.py.)"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]

import forking  # noqa: E402
import stutil as helpers  # noqa: E402  (tests/ is on sys.path via tests/conftest.py)

method_keys = helpers.method_keys

from scaletune.methods import MATRIX  # noqa: E402

# stage -> the methods it is run with: ZeRO-3's supported ones, and ZeRO-2 for those refused under ZeRO-3
# whose refusal tells the user to use ZeRO-2 (AdaLoRA is refused under every stage)
METHODS = {3: [m for m, row in MATRIX.items() if row.zero3],
           2: [m for m, row in MATRIX.items() if not row.zero3 and not row.zero12_why]}
CASES = [(stage, name) for stage, names in METHODS.items() for name in names]


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """stage -> (root, specs) of one 2-process launch of that stage running its methods one after another;
    launched when a test first asks for it."""
    launched = {}

    def get(stage: int):
        if stage not in launched:
            launched[stage] = _launch(tmp_path_factory, stage)
        return launched[stage]

    return get


def _launch(tmp_path_factory, stage: int):
    from scaletune.demo.tiny import build_model_dir

    root = tmp_path_factory.mktemp(f"matrix_zero{stage}")
    model = build_model_dir(root / "llama", helpers.corpus(), arch="llama", hidden=32, layers=2, heads=2,
                            vocab_size=256)
    data = helpers.write_jsonl(root / "train.jsonl", helpers.alpaca_records(8))
    specs = {}
    for name in METHODS[stage]:
        specs[name] = helpers.tiny_lora_run(model, data, data={"eval": str(data)},
                                            train={"max_steps": 6, "learning_rate": 2e-2},
                                            # a rank left waiting (the other failed in main-only code)
                                            # fails in 5 min instead of hanging to the test's timeout
                                            distributed={"zero_stage": stage, "timeout_s": 300})
        specs[name]["peft"] = method_keys(name, "causal_lm")
    if stage == 3:  # then a run that starts from LoRA's adapter (model.init_adapter) and barely moves it
        specs["lora_init"] = {**specs["lora"], "model": {**specs["lora"]["model"],
                                                         "init_adapter": str(root / "lora" / "adapter")},
                              "train": {**specs["lora"]["train"], "max_steps": 1, "learning_rate": 1e-12}}
    spec_file = root / "specs.json"
    spec_file.write_text(json.dumps(specs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCALETUNE_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
           str(REPO / f"launch/cpu_2proc_zero{stage}.yaml"), "--main_process_port", str(helpers.free_port()),
           str(REPO / "tests/distributed/matrix_worker.py"), str(root), str(spec_file)]
    res = forking.launch(cmd, env, root, REPO, timeout=900)  # (its ranks forked: ~10 s less import each)
    assert res.returncode == 0, res.stdout[-6000:]
    return root, specs


@pytest.mark.parametrize(("stage", "name"), CASES)
def test_method_trains_under_zero_and_reloads_in_plain_peft(zero_runs, stage, name):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import scaletune.adapters  # noqa: F401

    root, specs = zero_runs(stage)
    failed = json.loads((root / "failures.json").read_text())
    assert name not in failed, failed[name]
    out = root / name
    losses = [r["loss"] for r in helpers.read_metrics(out)]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    base = AutoModelForCausalLM.from_pretrained(specs[name]["model"]["name_or_path"])
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    # (the saved tensors, not parameter names: each method names its own, and a new matrix row needs no entry here)
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert saved and all(t.numel() for t in saved.values()), "adapter has no (or empty) trained tensors"
    ref = AutoModelForCausalLM.from_pretrained(specs[name]["model"]["name_or_path"]).eval()
    ids = torch.tensor([[1, 5, 9, 12, 40, 41]])
    with torch.no_grad():
        got = model(ids).logits[:, -ids.shape[1]:]  # prompt tuning's output starts with its virtual tokens
        assert not torch.allclose(got, ref(ids).logits)  # the adapter changes the model


def test_a_run_under_zero3_starts_from_a_saved_adapter(zero_runs):
    """model.init_adapter under ZeRO-3 (2 processes): the run's weights start as the saved ones, so one step at a
    learning rate too small to move them gathers them back unchanged."""
    from safetensors.torch import load_file

    root, _ = zero_runs(3)
    failed = json.loads((root / "failures.json").read_text())
    assert "lora_init" not in failed, failed["lora_init"]
    saved = load_file(root / "lora" / "adapter" / "adapter_model.safetensors")
    after = load_file(root / "lora_init" / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == after.keys() and saved
    for key in saved:
        torch.testing.assert_close(after[key], saved[key], rtol=0, atol=1e-7, msg=key)
