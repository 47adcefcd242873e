"""Shared fixtures: tiny models built from configs and small synthetic data files (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("SCALETUNE_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from stutil import alpaca_records, cls_records, corpus, ner_records, write_jsonl  # noqa: F401,E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from scaletune.demo.tiny import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("models") / "llama", corpus(), arch="llama", hidden=32,
                           layers=2, heads=2, vocab_size=256)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from scaletune.demo.tiny import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("models") / "bert", corpus(), arch="bert", hidden=32,
                           layers=2, heads=2, vocab_size=256)


@pytest.fixture()
def make_config(tmp_path, tiny_llama, tiny_bert):
    """Write a small run config (task + overrides) to tmp and return its path."""

    def make(task: str = "causal_lm", *, n: int = 64, **sections) -> Path:
        data_dir = tmp_path / "data"
        data_dir.mkdir(exist_ok=True)
        if task == "causal_lm":
            train = write_jsonl(data_dir / "train.jsonl", alpaca_records(n))
            evalf = write_jsonl(data_dir / "eval.jsonl", alpaca_records(16, seed=1))
        elif task == "seq_cls":
            train = write_jsonl(data_dir / "train.jsonl", cls_records(n))
            evalf = write_jsonl(data_dir / "eval.jsonl", cls_records(16, seed=1))
        else:
            train = write_jsonl(data_dir / "train.jsonl", ner_records(n))
            evalf = write_jsonl(data_dir / "eval.jsonl", ner_records(16, seed=1))
        raw = {
            "task": task,
            "model": {"name_or_path": str(tiny_llama if task == "causal_lm" else tiny_bert), "dtype": "float32"},
            "peft": {"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
            "data": {"train": str(train), "eval": str(evalf), "max_length": 160, "cache": False},
            "train": {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "learning_rate": 1e-2,
                      "mixed_precision": "no", "log_every": 1, "eval_every": None, "save_every": None,
                      "report_to": [], "warmup_ratio": 0.0},
            "output_dir": str(tmp_path / "run"),
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                raw.setdefault(section, {}).update(values)
            else:
                raw[section] = values
        path = tmp_path / f"{task}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return make
