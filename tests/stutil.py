"""Shared test helpers: synthetic data with learnable rules, tiny model settings, metrics reading.

A module with a unique name (not `conftest`): the sub-suites have conftest.py files of their own, and
`from conftest import ...` would resolve to whichever was imported first.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
         "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]
ENTITIES = {"PER": ["Alice", "Bob", "Carol", "Dave"], "LOC": ["Paris", "Oslo", "Lima", "Cairo"]}


def alpaca_records(n: int, seed: int = 0) -> list[dict]:
    """Variable-length instruction data with a learnable rule (echo the words in reverse order)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(1, 8))
        out.append({"instruction": "Reverse the order of these words.", "input": " ".join(words),
                    "output": " ".join(reversed(words))})
    return out


def dpo_records(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs (LLaMA-Factory's ShareGPT layout) of variable length: the chosen answer reverses the
    words, the rejected one shouts them back in their order."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 8))
        out.append({"conversations": [{"from": "human", "value": "Reverse: " + " ".join(words)}],
                    "chosen": {"from": "gpt", "value": " ".join(reversed(words))},
                    "rejected": {"from": "gpt", "value": " ".join(words).upper()}})
    return out


def kto_records(n: int, seed: int = 0) -> list[dict]:
    """Feedback (LLaMA-Factory's KTO layout): every other answer is desirable, reversing the words; the others,
    undesirable, shout them back in their order."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS, rng.randint(2, 8))
        answer = " ".join(reversed(words)) if i % 2 == 0 else " ".join(words).upper()
        out.append({"messages": [{"role": "user", "content": "Reverse: " + " ".join(words)},
                                 {"role": "assistant", "content": answer}], "label": i % 2 == 0})
    return out


def cls_records(n: int, seed: int = 0) -> list[dict]:
    """Label = whether 'alpha' occurs in the sentence (learnable from one token)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS[1:], rng.randint(2, 8))
        label = "pos" if i % 2 == 0 else "neg"
        if label == "pos":
            words.insert(rng.randrange(len(words) + 1), "alpha")
        out.append({"text": " ".join(words), "label": label})
    return out


SCORES = {"alpha": 0.0, "bravo": 1.0, "charlie": 2.0}  # reg_records' score of a sentence: its keyword's


def reg_records(n: int, seed: int = 0) -> list[dict]:
    """Score = SCORES of the one keyword among filler words (learnable from one token), STS-B's 0-5 range."""
    rng = random.Random(seed)
    keywords = list(SCORES)
    out = []
    for i in range(n):
        words = rng.sample(WORDS[3:], rng.randint(2, 8))
        keyword = keywords[i % len(keywords)]
        words.insert(rng.randrange(len(words) + 1), keyword)
        out.append({"text": " ".join(words), "label": SCORES[keyword]})
    return out


def ner_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(3, 9)):
            r = rng.random()
            if r < 0.2:
                tokens.append(rng.choice(ENTITIES["PER"]))
                tags.append("B-PER")
            elif r < 0.4:
                tokens.append(rng.choice(ENTITIES["LOC"]))
                tags.append("B-LOC")
            else:
                tokens.append(rng.choice(WORDS))
                tags.append("O")
        out.append({"tokens": tokens, "tags": tags})
    return out


ATTN = {"causal_lm": ["q_proj", "v_proj"], "dpo": ["q_proj", "v_proj"], "kto": ["q_proj", "v_proj"],
        "reward": ["q_proj", "v_proj"],
        "seq_cls": ["query", "value"], "token_cls": ["query", "value"],
        "seq_regression": ["query", "value"]}


def method_keys(name: str, task: str) -> dict:
    """Small per-method peft settings that fit the tiny test models (shared by the matrix tests)."""
    from scaletune.methods import MATRIX

    row = MATRIX[name]
    qv = ATTN[task]
    keys: dict = {"method": row.peft_method, **row.extra}
    if name in ("lora", "dora", "rslora"):
        keys.update(r=4, lora_alpha=8, target_modules="all-linear")
    elif name == "adalora":
        keys.update(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, target_modules=qv)
    elif name == "ia3":
        ff = ["down_proj"] if task in ("causal_lm", "dpo", "kto", "reward") else ["output.dense"]
        keys.update(target_modules=qv + ff, feedforward_modules=ff)
    elif name in ("loha", "lokr"):
        keys.update(r=4, alpha=8, target_modules=qv)
    elif name == "vera":
        keys.update(r=8, target_modules=qv)
    elif name == "oft":
        keys.update(r=0, oft_block_size=8, target_modules=qv)
    elif name in ("prefix_tuning", "prompt_tuning"):
        keys.update(num_virtual_tokens=4)
    elif name == "bottleneck_adapter":
        keys.update(reduction_factor=4)
    elif name == "ln_tuning" and task in ("seq_cls", "seq_regression", "token_cls"):
        keys.update(target_modules=["LayerNorm"])  # (peft knows Llama's norm layers, not BERT's)
    elif name == "ln_tuning":
        pass  # peft's defaults: every norm layer of a Llama
    else:  # (a new MATRIX row: every matrix test reads its settings here, so say where they go)
        raise KeyError(f"method_keys: no test settings for method {name!r}; add them in tests/stutil.py")
    return keys


def corpus() -> list[str]:
    texts = [" ".join(r.values()) for r in alpaca_records(200)] + [r["text"] for r in cls_records(100)]
    texts += [" ".join(r["tokens"]) for r in ner_records(100)]
    texts += ["### Instruction:\n### Response:\n" + " ".join(WORDS)] * 5
    return texts * 3


def tensor_peak_bytes(prof: Any) -> int:
    """Highest running sum of the allocation (+) and free (-) events of a `torch.profiler.profile(
    profile_memory=True)` run: peak live tensor bytes above what was live when it started (the CPU
    counterpart of `torch.cuda.max_memory_allocated`)."""
    running = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        running += nbytes
        peak = max(peak, running)
    return peak


def free_port() -> int:
    """A TCP port on localhost that is free right now (for a torch.distributed rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_caught(pid: int, sig: int, timeout: float = 120.0) -> None:
    """Wait until process `pid` has a handler for `sig` (Linux: the SigCgt mask in /proc). A test that signals a
    starting launcher after a fixed sleep killed it by the default action instead where the interpreter had not
    reached its handlers yet (a loaded CI machine: exit -15 for the expected 143)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return  # it has exited: the caller's wait reports how
        caught = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
        if caught >> (sig - 1) & 1:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} installed no handler for signal {sig} within {timeout:g} s")


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_CONFIG_FILE",
               "SCALETUNE_PREEMPT_MARKER")


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a run the tests start: this checkout's src first on PYTHONPATH, one OpenMP thread
    per process (2-process runs on a 2-core box must not oversubscribe), offline, no progress bars, and
    none of the rank/launcher variables a surrounding launcher may have set (the child would take them
    as its own). `extra` is applied last."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", SCALETUNE_NO_PROGRESS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for var in LAUNCH_VARS:
        env.pop(var, None)
    env.update(extra)
    return env


def compiling_with(backend: str):
    """A stand-in for `torch.nn.Module.compile` that compiles with `backend` (train.torch_compile uses the
    default, inductor, whose C++ code generation takes minutes on these CPUs)."""
    import torch

    compile_module = torch.nn.Module.compile
    return lambda self, *a, **kw: compile_module(self, *a, **{**kw, "backend": backend})


def loss_and_grads(run: Any, batch: dict, seed: int | None = None) -> tuple[float, dict]:
    """One micro-batch's summed loss through `run`'s task and the trainable parameters' gradients
    (fresh, not accumulated). `seed`: draw the same dropout masks as another call with that seed."""
    import torch
    from accelerate.utils import send_to_device

    run.model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    # the model's device: a run kept across tests may outlive its accelerator's (reset) state
    loss, _ = run.task.loss_sum(run.model, send_to_device(batch, next(run.model.parameters()).device))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in run.model.named_parameters() if p.requires_grad}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_metrics(run_dir: Path, event: str = "train") -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


def tiny_lora_run(model_dir: Path | str, train_file: Path | str, /, **sections: Any) -> dict:
    """The run config the multi-process suites share: LoRA r=4 on every linear layer of the tiny Llama,
    float32, global batch 8 in micro-batches of 2, lr 1e-2, no eval/saving/trackers unless overridden.
    A dict value updates that section; anything else replaces it."""
    raw = {
        "task": "causal_lm",
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "peft": {"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(train_file), "max_length": 160, "cache": False},
        "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": 4, "learning_rate": 1e-2,
                  "mixed_precision": "no", "log_every": 1, "eval_every": None, "save_every": None,
                  "report_to": [], "warmup_ratio": 0.0},
    }
    return override(raw, **sections)


def override(raw: dict, **sections: Any) -> dict:
    """`raw` with each given section updated (a dict value) or replaced (anything else)."""
    raw = dict(raw)
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return raw


def data_config(tmp_path: Path, model: Path | str, task: str = "causal_lm", data: Any = None, **extra: Any) -> Any:
    """The run config (a RunConfig) the data tests build datasets from: `data` as data.train, max_length 256,
    no cache, float32 on CPU; `extra` are more data.* keys."""
    from scaletune.config import from_dict

    raw = {"task": task, "model": {"name_or_path": str(model), "dtype": "float32"},
           "data": {"train": str(data), "max_length": 256, "cache": False, **extra},
           "train": {"mixed_precision": "no"}, "output_dir": str(tmp_path / "out")}
    return from_dict(raw)


def run_cli(args: list, capsys: Any) -> tuple[int, str, str]:
    """`scaletune ARGS` in this process: its exit code and what it printed (capsys or capfd)."""
    from scaletune.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code: int, err: str, *fragments: str) -> None:
    """The command ended as bad input should: exit 2, one screen of `error:` without a traceback, naming each
    of `fragments`."""
    assert code == 2, err
    assert "Traceback" not in err and "error:" in err
    assert len(err[err.index("error:"):].splitlines()) <= 25
    for f in fragments:
        assert f in err, err


BASE = {"task": "causal_lm", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}  # a minimal valid config


def metrics_around_training(make_config: Any, task: str, **train: Any) -> tuple[dict, dict]:
    """(eval metrics on the training data before, after) 30 steps of `task` on 32 examples, micro-batch 8 at a
    constant learning rate 5e-3 (`train` adds or replaces train.* keys): dpo's and kto's learning tests."""
    from scaletune.config import load_config
    from scaletune.evaluate import evaluate
    from scaletune.loop import fit
    from scaletune.train import StopFlag, setup

    path = make_config(task, n=32, train={"global_batch_size": 8, "micro_batch_size": 8, "max_steps": 30,
                                          "learning_rate": 5e-3, "lr_scheduler": "constant", **train},
                       data={"eval": None})
    run, _ = setup(load_config(path))
    data = run.data["train"]
    before = evaluate(run.accelerator, run.model, run.task, data, None, 8, run.tokenizer.pad_token_id)
    assert fit(run, StopFlag()) == "done"
    return before, evaluate(run.accelerator, run.model, run.task, data, None, 8, run.tokenizer.pad_token_id)


def task_config_problems(task: str, /, **changes: Any) -> list[str]:
    """The problems of a minimal `task` config with `changes` (a section's dict updates it; task= replaces the
    task), each a line of from_dict's one error, or cross_field_problems' list when it builds (none: empty)."""
    from scaletune.config import from_dict
    from scaletune.errors import ConfigError
    from scaletune.rules import cross_field_problems

    raw = {"task": task, "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    try:
        return cross_field_problems(from_dict(raw))
    except ConfigError as exc:
        return str(exc).splitlines()


def problems_of(raw: dict, **kw) -> list[str]:
    """The problems `from_dict(raw, **kw)` refuses `raw` with (the config tests, test_config*.py)."""
    import pytest

    from scaletune.config import from_dict
    from scaletune.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        from_dict(raw, **kw)
    return err.value.problems


class StopAt:
    """Stands in for a SIGUSR1 arriving while step `at` runs, after its eval if it has one (heard at the next
    step boundary; tests/test_eval_preemption.py stops during an eval)."""

    def __init__(self, run, at: int):
        self.run, self.at = run, at

    @property
    def signal(self):
        return 10 if self.run.step >= self.at and self.run.model.training else None

    def catch_interrupts(self) -> None:  # (Ctrl-C is left as the test process has it)
        pass

    def release_interrupts(self) -> None:
        pass
