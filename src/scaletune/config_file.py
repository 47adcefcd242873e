"""Reading a run config: the YAML file (line-numbered errors, duplicate keys found) and `key=value`
command-line overrides (read as YAML, but as typed for string keys). config.py validates the result."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .fileutil import missing

# what parse_override returns as the value of a `~a.b.c` override: remove that key from the YAML
REMOVE = object()


def is_override(text: str) -> bool:
    """Whether a command-line word is an override: `a.b.c=value`, or `~a.b.c` (remove the key)."""
    return "=" in text or text.startswith("~")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one `a.b.c=value` override; the value is read as YAML (so 1e-4, true, [a, b] work). `~a.b.c`
    (Hydra's spelling) removes the key: a setting the YAML has that another method or task does not read."""
    if text.startswith("~") and "=" not in text:
        key = text[1:].strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {text!r}: bad key {key!r}")
        return key.split("."), REMOVE
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.learning_rate=1e-4, or ~key to "
                          "remove a key")
    key, _, value = text.partition("=")
    key = key.strip()
    if key.startswith("~"):
        raise ConfigError(f"override {text!r}: ~{key[1:]} removes a key and takes no value; give "
                          f"{key[1:]}={value} to set it")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    if not value.strip():  # (a shell variable that expanded to nothing, most likely)
        raise ConfigError(f"override {text!r}: no value after '='; write {key}=null to unset it")
    try:
        parsed = yaml.safe_load(value)
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: ints over Python's digit limit
        parsed = value
    if problem := _size_problem(parsed):  # (the file's check: an alias within the value)
        raise ConfigError(f"override {text[:60]!r}: {problem}")
    path = key.split(".")
    return path, _override_value(_key_type(path), value, parsed)


def _key_type(path: list[str]) -> Any:
    """The annotation of the dotted key `path` in RunConfig; None for a key it does not define (peft's options,
    unknown keys)."""
    from .config import RunConfig, _is_dataclass_type  # (config.py imports this module)

    tp: Any = RunConfig
    for part in path:
        if not _is_dataclass_type(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _without_none(tp: Any) -> Any:
    """`X` for `X | None`, else `tp`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else tp
    return tp


def _admits_text(tp: Any) -> bool:
    """Whether one of the types a key of type `tp` takes is str (data.train: str | list)."""
    return _is_text(tp) or any(_is_text(a) for a in typing.get_args(tp))


def _is_text(tp: Any) -> bool:
    """Whether a key of type `tp` takes a string: str, or a choice of strings (`no | fp16 | bf16`)."""
    tp = _without_none(tp)
    if typing.get_origin(tp) is Literal:
        return all(isinstance(c, str) for c in typing.get_args(tp))
    return tp is str


def _override_value(tp: Any, text: str, parsed: Any) -> Any:
    """The value of a `key=text` override that YAML read as `parsed`, for a key of type `tp`. A key that takes
    a string gets the text as typed, unless it is quoted or null: YAML would turn a revision 0123e45 into a
    float and `no` into False, read `run #2` as `run` and a comment, `a: b` as a mapping, and fold a newline
    into a space. A key that takes a string or a list (data.train) gets a list where YAML read one. A float
    key gets a number where YAML 1.1 left one a string ("1e-4"). Other keys get what YAML read."""
    quoted = text.strip()[:1] in ("'", '"') and isinstance(parsed, str)
    if parsed is None or quoted:
        return parsed
    if _is_text(tp) or (_admits_text(tp) and not isinstance(parsed, (list, dict))):
        return text.strip()
    if isinstance(parsed, (list, dict)):
        return parsed
    if _without_none(tp) is float and isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`raw` (the YAML's mapping) with each override applied in order."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                if value is REMOVE:
                    node = {}
                    break
                node[part] = {}
            node = node[part]
        if value is not REMOVE:
            node[path[-1]] = value
        elif path[-1] in node:
            del node[path[-1]]
        else:  # a misspelt key would otherwise be a silent no-op
            raise ConfigError(f"override {text!r}: the config has no key {'.'.join(path)} to remove")
    return raw


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that records every duplicate key of a mapping: PyYAML keeps the last one silently, so a
    second `train:` section would drop the first without a word."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, Any, int]] = []  # (line, key, line of its first occurrence)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        merge_line: int | None = None
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                # `<<: *base` entries are meant to be overridden by the mapping's own keys; but of two `<<:` lines
                # PyYAML silently lets the first win each key (`<<: [*a, *b]` says which on purpose)
                if merge_line is not None:
                    self.duplicates.append((line, "<<", merge_line))
                merge_line = merge_line or line
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
                if first is None:
                    seen[key] = line
                    continue
            except TypeError:
                continue  # an unhashable key: SafeLoader itself refuses it
            self.duplicates.append((line, key, first))
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> tuple[Any, list[tuple[int, Any, int]]]:
    """The YAML document in `text` and its duplicate keys (see _StrictLoader)."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data(), loader.duplicates
    finally:
        loader.dispose()


def read_run_dir(run_dir: Path) -> dict:
    """The config a run trained with, from its output directory's run.json (`scaletune eval RUN_DIR`): the
    resolved config, output_dir the directory it is read from (a run moved since still finds its adapter), and
    each relative path made absolute from the directory the run was started in, where it names something there
    (the run's own command line read them from there; an eval from elsewhere would miss them)."""
    import json
    import os
    from glob import glob

    from .fileutil import map_paths
    from .identity import PATH_KEYS  # (the keys a resume compares by what they name: those made absolute here)

    where = run_dir / "run.json"
    try:
        info = json.loads(where.read_text(encoding="utf-8"))
        raw = info["config"]
        if not isinstance(raw, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = "has no 'config' mapping" if isinstance(exc, (KeyError, TypeError)) else f"is unreadable ({exc})"
        raise ConfigError(f"run config {run_dir}: a run's output directory, but its run.json {why}") from None
    # (a resumed run's config paths are as its latest start's command line gave them)
    resumes = info.get("resumes")  # (a run.json edited by hand may hold anything here: no traceback)
    starts = [info, *(s for s in (resumes if isinstance(resumes, list) else []) if isinstance(s, dict))]
    cwd = next((s["cwd"] for s in reversed(starts) if isinstance(s.get("cwd"), str)), None)

    def absolute(spec: str) -> str:
        if cwd is None or os.path.isabs(spec) or spec.startswith(("hub:", "~")):
            return spec
        there = os.path.join(cwd, spec)
        # (recursive: a data/**/*.jsonl pattern matches data/x.jsonl as training read it, sources._matching_files)
        return there if os.path.exists(there) or glob(there, recursive=True) else spec

    for section, key in PATH_KEYS:
        if isinstance(raw.get(section), dict) and raw[section].get(key) is not None:
            raw[section][key] = map_paths(raw[section][key], absolute)
    if "max_length" not in info and isinstance(raw.get("data"), dict):
        given = checkpoints_max_length(run_dir)
        if given is not None:
            raw["data"]["max_length"] = given
    raw["output_dir"] = str(run_dir)
    return raw


def checkpoints_max_length(run_dir: Path) -> int | None:
    """data.max_length as given, from the newest complete checkpoint's config. A run.json without a top-level
    `max_length` is an older scaletune's, whose config held the value loading lowered it to (a BERT's 512 for
    1024): `train RUN --resume` compared that with the checkpoints' given one and refused it as a change."""
    import json

    from .checkpoint import MANIFEST, checkpoint_dirs

    for path in checkpoint_dirs(run_dir):
        if not (path / MANIFEST).is_file():  # (a write cut short)
            continue
        try:
            value = json.loads((path / "state.json").read_text(encoding="utf-8"))["config"]["data"]["max_length"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    return None


def read_yaml(path: str | Path) -> tuple[dict, list[str]]:
    """The run config file's mapping, and its problems that no value shows: duplicate keys (named by line, to be
    reported with the rest). Unreadable or invalid YAML raises ConfigError."""
    path = Path(path)
    if path.is_dir() and (path / "run.json").is_file():
        return read_run_dir(path), []
    if path.is_dir():
        raise ConfigError(f"run config {path}: is a directory, expected a YAML file (or a run's output directory, "
                          "which holds run.json)")
    if not path.is_file():
        raise ConfigError(f"run config {path}: " + ("not a regular file (a device, a pipe?), expected a YAML file"
                                                    if path.exists() else missing(path)))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"run config {path}: cannot read ({exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # (a Latin-1 accent in a comment: the line, not a byte offset, finds it)
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"run config {path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the file as "
                          "UTF-8") from None
    try:
        raw, duplicates = _parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"run config {path}{where}: invalid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"run config {path}: invalid YAML (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise ConfigError(f"run config {path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"run config {path}: top level must be a mapping, got {type(raw).__name__}")
    if problem := _size_problem(raw):
        raise ConfigError(f"run config {path}: {problem}")
    return raw, [f"{path}:{line}: a second merge key '<<' (first at line {first}; YAML would let the first win "
                 "each key): merge several as one `<<: [*a, *b]`" if key == "<<" else
                 f"{path}:{line}: duplicate key {key!r} (first at line {first}; YAML would keep only this one)"
                 for line, key, first in sorted(duplicates, key=lambda d: d[0])]


# YAML aliases share one value among all its uses, so a few hundred bytes can stand for 10**8 values: every
# walk over the config (validation, an error quoting a value, the fingerprint's JSON) would write them all out.
MAX_CONFIG_VALUES = 100_000
_TOO_BIG = f"it holds more than {MAX_CONFIG_VALUES:,} values (each use of a YAML alias *name counted); a run " \
           "config holds a few hundred"


class _Cycle(Exception):
    pass


def _size_problem(value: object) -> str | None:
    """What is wrong with a parsed YAML value whose aliases make it too big, or hold it in itself; else None."""
    try:
        size = _written_out_size(value, {}, set())
    except _Cycle:
        return "a YAML alias (*name) refers to a value that holds it"
    return _TOO_BIG if size > MAX_CONFIG_VALUES else None


def _written_out_size(value: object, memo: dict[int, int], open_: set[int]) -> int:
    """How many values `value` holds with each alias written out (a shared list counted at each use), counted
    without writing them out: each shared value is counted once and its count reused (`memo`, by id). Raises
    _Cycle for a value that holds itself (`&a [*a]`)."""
    if not isinstance(value, (dict, list)):
        return 1
    key = id(value)
    if key in memo:
        return memo[key]
    if key in open_:
        raise _Cycle
    open_.add(key)
    items = [x for kv in value.items() for x in kv] if isinstance(value, dict) else value
    total = 1
    for item in items:
        total += _written_out_size(item, memo, open_)
        if total > MAX_CONFIG_VALUES:
            break
    open_.discard(key)
    memo[key] = total
    return total
