"""Hub model names on a machine that cannot reach the hub: the local cache is read at once, no retries."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import yaml

from scaletune.hub import hub_reachable

from stutil import alpaca_records, child_env, free_port, tiny_lora_run, write_jsonl


class _Answers(BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802  (http.server's name)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_probe_tells_an_answering_endpoint_from_a_closed_one(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; the session then refuses
    server = HTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert hub_reachable(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    start = time.monotonic()
    assert not hub_reachable(f"http://127.0.0.1:{free_port()}")  # nothing listens: refused at once
    assert time.monotonic() - start < 2


def _cached_as_hub_model(cache, model_dir, repo="someorg/tiny-llama"):
    """`model_dir` laid out as huggingface_hub's cache holds a downloaded `repo` (refs/main -> snapshot)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(model_dir, folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return repo


def _train(tmp_path, name, cache, **model):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_records(16))
    raw = tiny_lora_run(name, train, train={"micro_batch_size": 4, "max_steps": 2}, output_dir=str(tmp_path / "run"))
    raw["model"].update(model)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = child_env(HF_HUB_CACHE=str(cache), HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    del env["HF_HUB_OFFLINE"]  # the user did not say "offline": the hub is simply not there
    return subprocess.run([sys.executable, "-m", "scaletune", "train", str(cfg)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_hub_model_in_the_local_cache_trains_without_retrying_the_hub(tmp_path, tiny_llama):
    cache = tmp_path / "hub"
    name = _cached_as_hub_model(cache, tiny_llama)
    res = _train(tmp_path, name, cache)
    assert res.returncode == 0, res.stderr[-3000:]
    # without local_files_only each load (config, tokenizer, weights, adapter probe) retried 5 times
    assert "Retrying" not in res.stderr and "thrown while requesting" not in res.stderr, res.stderr[-3000:]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_the_adapter_records_the_hub_revision_it_trained_on(tmp_path, tiny_llama):
    """adapter_config.json's revision is the version AutoPeftModel* loads the base at: it said null for a run on
    model.revision, so the adapter went onto the hub's newest version of the base instead of the one trained."""
    cache = tmp_path / "hub"
    name = _cached_as_hub_model(cache, tiny_llama)
    res = _train(tmp_path, name, cache, revision="0" * 40)
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (name, "0" * 40)


def test_hub_model_missing_from_the_cache_says_the_hub_is_unreachable(tmp_path):
    res = _train(tmp_path, "someorg/not-downloaded", tmp_path / "empty-hub")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Retrying" not in res.stderr and "Traceback" not in res.stderr
    assert "cannot be reached from this machine" in res.stderr and "hf download someorg/not-downloaded" in res.stderr


def test_offline_by_choice_still_says_which_cache_was_read_and_how_to_fill_it(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from scaletune.hub import unreachable_hint

    # HF_HUB_OFFLINE=1 (as the README suggests for compute nodes): the hub client's error then claims it
    # "couldn't connect", so the hint is the only place the user learns where the model must go
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hint = unreachable_hint("someorg/not-downloaded")
    assert "HF_HUB_OFFLINE" in hint and str(tmp_path / "hub") in hint
    assert "hf download someorg/not-downloaded" in hint
    assert unreachable_hint(str(tmp_path)) == ""  # a local directory: no hub involved
