"""Hub model names on machines that cannot reach the Hugging Face hub (cluster compute nodes, air-gapped
hosts): read the local cache at once instead of retrying the network for a minute or more."""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Any

PROBE_TIMEOUT_S = 5.0


@functools.cache
def hub_reachable(endpoint: str | None = None) -> bool:
    """Whether one HEAD request to the hub's endpoint gets any answer within PROBE_TIMEOUT_S.

    huggingface_hub's own session is used so that proxy settings (HTTPS_PROXY, ...) apply as they will for
    the download itself. Asked once per process, from a thread waited on for PROBE_TIMEOUT_S at most: the
    request's timeout does not cover the name lookup, which a node whose DNS server is silent waits out."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    answered: list[bool] = []

    def ask() -> None:
        try:
            get_session().head(endpoint or constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
        except Exception:  # noqa: BLE001  (DNS failure, refused, timed out, proxy error: all mean "no hub")
            return
        answered.append(True)

    probe = threading.Thread(target=ask, name="scaletune-hub-probe", daemon=True)
    probe.start()
    probe.join(PROBE_TIMEOUT_S)
    return bool(answered)


def _offline_by_choice() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_model_source(name: str) -> None:
    """ConfigError for a `model.name_or_path` that names a local model directory that is not there (or not a
    model): a hub id is "name" or "org/name", and "models/llama-typo" beside an existing ./models is a local
    path too, else the hub client's "couldn't connect" or "Repo id must be..." would be the error."""
    from .errors import ConfigError

    p = Path(name)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.name_or_path: {name} has no config.json (not a transformers model directory)")
        return
    looks_local = (name.startswith((".", "/", "~")) or name.count("/") > 1
                   or (name.count("/") == 1 and p.parent.is_dir()))
    if looks_local:
        raise ConfigError(f"model.name_or_path: directory not found: {name} ({p.absolute()})")


def recorded_base(name: str) -> str:
    """`name` as an adapter records its base: made absolute where it is a relative path to a local directory.
    peft writes the name the base was loaded by into adapter_config.json's base_model_name_or_path, and a
    `models/llama` there is relative to the directory training ran in: from anywhere else (a server loading
    the adapter with AutoPeftModel*, `eval` of the run directory) it named nothing, or another model."""
    import os

    return name if os.path.isabs(name) or not Path(name).is_dir() else os.path.abspath(name)


def same_base(recorded: str, name: str) -> bool:
    """Whether an adapter's recorded base `recorded` is model.name_or_path `name`: as `recorded_base` makes them,
    or a run moved with its base (another machine, a renamed project directory): the absolute path recorded
    there, which names nothing here, ends with the relative one the config gives (`eval RUN_DIR` warned of
    another base)."""
    import os

    if recorded_base(recorded) == recorded_base(name):
        return True
    given = os.path.normpath(name)
    return not os.path.isabs(name) and Path(name).is_dir() and os.path.isabs(recorded) \
        and not os.path.exists(recorded) and os.path.normpath(recorded).endswith(os.sep + given)


def hub_kwargs(name: str) -> dict[str, Any]:
    """from_pretrained kwargs for `name`: `local_files_only=True` when it is a hub id and the hub cannot be
    reached. Without it, each of a run's loads (config, tokenizer, weights) spends ~25 s in the hub client's
    retries, with a screen of retry messages, before the same answer the local cache gives at once."""
    if Path(name).exists() or _offline_by_choice() or hub_reachable():
        return {}
    return {"local_files_only": True}


_REMOTE_CODE_SAID: set[str] = set()


def trust_remote_code(cfg: Any, name: str) -> bool:
    """model.trust_remote_code, for a from_pretrained of `name`; when on, said loudly at the first load of `name`
    in this process, which is the one that runs its code (the tokenizer or config, before the weights): said at
    the weights' load, it came after the code had run."""
    on = bool(cfg.model.trust_remote_code)
    if on and name not in _REMOTE_CODE_SAID:
        _REMOTE_CODE_SAID.add(name)
        logging.getLogger("scaletune").warning(
            "!!! model.trust_remote_code is ON: code shipped with %s will run on this machine !!!", name)
    return on


def unreachable_hint(name: str) -> str:
    """A sentence to append to a load error of `name` when only the local cache was read: the hub could not be
    reached (hub_kwargs), or HF_HUB_OFFLINE is set, where the hub client's own message still says it "couldn't
    connect" and names neither the cache it read nor how to fill it."""
    from huggingface_hub import constants

    fill = (f"download the model where the hub can be reached (`hf download {name}`) into the same HF_HOME, "
            f"or give a local directory")
    if Path(name).exists():
        return ""
    if _offline_by_choice():
        return f"; HF_HUB_OFFLINE is set, so only the local cache ({constants.HF_HUB_CACHE}) was read: {fill}"
    if not hub_kwargs(name):
        return ""
    return (f"; the hub ({constants.ENDPOINT}) cannot be reached from this machine, so only the local cache "
            f"({constants.HF_HUB_CACHE}) was read: {fill}")
