"""What a trained adapter records about its run (scaletune.json beside the peft files), and the checks
`eval` and `predict` make with it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .config import RunConfig
from .errors import ConfigError, UserError

log = logging.getLogger("scaletune")

_OTHER_COPY = "use another copy of the adapter, or a checkpoint's: --adapter OUTPUT_DIR/checkpoints/step-N"


def adapter_config(path: Path) -> dict:
    """The adapter's adapter_config.json as written ({} where missing or unreadable: the loaders, peft's or
    init_adapter's, say what is wrong with the directory)."""
    try:
        conf = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return conf if isinstance(conf, dict) else {}


def adapter_meta(path: Path) -> dict:
    """The adapter's scaletune.json ({} if it has none); a damaged one is one error naming it."""
    meta_file = path / "scaletune.json"
    if not meta_file.is_file():
        return {}
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"the adapter at {path}: its scaletune.json cannot be read ({exc})", hint=_OTHER_COPY) from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not (labels is None or (isinstance(labels, list)
                                                             and all(isinstance(x, str) for x in labels))):
        raise UserError(f"the adapter at {path}: its scaletune.json is not what scaletune writes (an object "
                        "with the task, base model and labels)", hint=_OTHER_COPY)
    return meta


def check_held_out(cfg: RunConfig, path: Path) -> None:
    """data.eval_fraction scores the part of data.train that a split by (fraction, seed) holds out: only
    the split the adapter's run made keeps its training examples out. Another seed or fraction, or a run
    that held nothing out, would score on trained examples without a sign; refused (exit 2) instead."""
    from .saving import held_out

    meta = adapter_meta(path)
    trained, asked = meta["held_out"] if "held_out" in meta else _recorded_split(path), held_out(cfg)
    if meta.get("train_digest"):  # the data itself, wherever its copy lies: compared by content, not path
        from .data import train_digest

        now, then = train_digest(cfg), meta["train_digest"]
        ours, theirs = now.split(","), then.split(",")
        if sorted(ours) != sorted(theirs) and set(ours) & set(theirs):
            # some of the run's sources (a subset, a superset): split together with others than the run's, so
            # other examples of them are held out, and the ones it trained on are scored
            raise ConfigError(f"data.eval_fraction: data.train shares sources with the data the adapter at {path} "
                              "trained on but is not the same list, which splits them differently: this split "
                              "would score on examples it trained on",
                              hint="give data.train as the run's (same sources, same order), or --data FILE")
        if sorted(ours) != sorted(theirs):
            log.info("data.train holds other data than the adapter at %s trained on: its held-out split is not "
                     "compared with the run's", path)
            return
        if now != then:  # the same sources in another order: another concatenation, another split
            raise ConfigError(f"data.eval_fraction: data.train lists the sources the adapter at {path} trained on "
                              "in another order, which splits them differently: this split would score on "
                              "examples it trained on", hint="list them in the run's order, or give --data FILE")
        trained, asked = ({k: v for k, v in d.items() if k != "train"} if isinstance(d, dict) else d
                          for d in (trained, asked))
    if trained == "unknown":
        log.warning("data.eval_fraction: the adapter at %s does not say which split its run held out, and no "
                    "run.json beside it does: make sure train.seed, data.eval_fraction and data.train are the "
                    "run's, or the score includes examples it trained on", path)
        return
    if trained == asked:
        return
    if trained is None:
        raise ConfigError(f"data.eval_fraction: the adapter at {path} was trained on all of its training file "
                          "(its run held nothing out), so a held-out split of it would be examples it trained on",
                          hint="evaluate on a file it never saw: --data FILE (or data.eval)")
    want = f"data.eval_fraction={trained['eval_fraction']} train.seed={trained['seed']}"
    # (a cap the run had not is undone with data.max_samples=null, as an override and the YAML write it: the
    # hint left it out and the split named it Python's None)
    if trained.get("max_samples") or asked.get("max_samples"):
        want += f" data.max_samples={_yaml_value(trained.get('max_samples'))}"
    differs = [f"{key} {_yaml_value(trained.get(key))} (given: {_yaml_value(asked.get(key))})"
               for key in ("train", "eval_fraction", "seed", "max_samples")
               if (key in trained or key == "max_samples") and trained.get(key) != asked.get(key)]
    raise ConfigError(f"data.eval_fraction: the adapter at {path} was trained holding out a different split; "
                      f"this one would score on examples it trained on. The run's split: {'; '.join(differs)}",
                      hint=f"evaluate its own held-out split with {want} (and its data.train), or give "
                           "--data FILE")


def _yaml_value(value: object) -> object:
    return "null" if value is None else value


def _recorded_split(path: Path) -> dict | None | str:
    """The held-out split of an adapter saved before adapters recorded it, from its run's saved config:
    state.json of the checkpoint it belongs to, or the run's run.json. "unknown" when neither is there."""
    from .saving import data_source

    for record in (path.parent / "state.json", path.parent / "run.json", path.parent.parent.parent / "run.json"):
        try:
            conf = json.loads(record.read_text(encoding="utf-8"))["config"]
            d, t = conf["data"], conf["train"]
            if not d.get("eval_fraction") or d.get("eval"):
                return None
            split = {"train": data_source(d["train"]), "eval_fraction": d["eval_fraction"], "seed": t["seed"]}
            return split if d.get("max_samples") is None else {**split, "max_samples": d["max_samples"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return "unknown"


def check_rope_scaling(cfg: RunConfig, path: Path, meta: dict) -> None:
    """Warn where the config scales the base's RoPE otherwise than the adapter's run did (model.rope_scaling is
    read from the config given, not from the adapter): its weights were learned on other position encodings, and
    a merge would write the config's scaling into the merged config.json. Adapters from before scaletune
    recorded it are not checked."""
    if "rope_scaling" not in meta or meta["rope_scaling"] == cfg.model.rope_scaling:
        return
    log.warning("the adapter at %s was trained with model.rope_scaling: %s; this config has %s: positions are "
                "encoded otherwise than in training; give model.rope_scaling as the run did", path,
                _flow(meta["rope_scaling"]), _flow(cfg.model.rope_scaling))


def _flow(spec: dict | None) -> str:
    """A rope_scaling value as the YAML config writes it ({type: linear, factor: 2.0}; none)."""
    if spec is None:
        return "none"
    return "{" + ", ".join(f"{k}: {v}" for k, v in spec.items()) + "}"
