"""`predict`'s input: lines of plain text or JSON objects (or a CSV/TSV/parquet/CoNLL file or a JSON array, read
as training reads it), and what each task reads from a line.

A JSON line is read by the columns the run was trained with (as the adapter's scaletune.json records them,
else data.text_column / data.text_pair_column / data.tokens_column of the run config, else the columns
training would detect), so a file shaped like the training data predicts as it is; `text` (and `text_pair`,
`tokens`) are read too when the trained column is absent. A line with no usable input (the key missing,
empty or of the wrong type) is refused naming its file:line, the keys expected and the keys found: it is
never predicted on an empty string.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

from .data.formats import FORMATS
from .data.readers import WHERE, surrogate_problem, text_lines
from .errors import DataError
from .tasks.seq_cls import _TEXT_COLUMNS
from .tasks.token_cls import _TOKEN_COLUMNS
from .tasks.words import split_words

LINE = "__line__"  # the input's line number: each output object carries it as "line"
PLAIN = "__plain__"  # the line was plain text (held as {"text": line}), not a JSON object
STDIN = "<stdin>"
log = logging.getLogger("scaletune")
_OURS = (WHERE, LINE, PLAIN)
# the keys prompt_segments reads a prompt from, in the order it tries them (the formats' own, data/formats.py)
_PROMPT_KEYS = tuple(dict.fromkeys(k for fmt in FORMATS.values() for k in fmt.asks))


def source_name(source: str | None) -> str:
    """How messages name the input: its path, or <stdin> (`--input -`, the default)."""
    return STDIN if source in (None, "-") else source


def read_inputs(source: str | None, stdin: TextIO, conll_columns: list[int] | None = None,
                tags: list[str] | None = None) -> list[dict]:
    """The non-blank lines of `source` (or stdin): JSON objects (a line starting with '{') or plain text, held
    as {"text": line}; each with its file:line (WHERE) and line number (LINE). Blank lines are skipped, and
    the line number keeps every output matched to its input. `conll_columns`: the run's data.conll_columns,
    for a CoNLL file. `tags` (token_cls: the tagger's labels): a .txt file whose lines are CoNLL columns
    ending in those tags (`conll_lines`) is read as the CoNLL file it is."""
    name = source_name(source)
    if name != STDIN and _table_file(Path(source)):
        return _table_records(source, conll_columns)
    text = _read_text(source, name, stdin)
    if tags and name != STDIN and conll_lines(text_lines(text), tags, (conll_columns or [1, -1])[1]):
        log.info("predict: %s holds CoNLL columns (word ... tag): read as a CoNLL file, one input per sentence",
                 name)
        return _table_records(source, conll_columns, conll=True)
    items = []
    for n, line in enumerate(text_lines(text), start=1):
        if line.strip():
            items.append(_parse_line(line, f"{name}:{n}", n))
    return items


def given_inputs(inputs: Any) -> list[dict]:
    """A Python caller's inputs (scaletune.api.predict) as `read_inputs` holds lines: a str is plain text (even
    one starting with "{"), a dict a JSON line's object. Each is named inputs[i] in messages and numbered i + 1
    ("line", as the same inputs one a line in a file would be); none is skipped, so the outputs pair with them."""
    if isinstance(inputs, (str, bytes, Mapping)):  # (a str would be iterated: one prediction per character)
        raise DataError(f"inputs: expected a list of inputs, got one {type(inputs).__name__}: wrap it in a list")
    if hasattr(inputs, "columns") and hasattr(inputs, "iterrows"):  # (iterated, a table gives its column names)
        raise DataError(f"inputs: expected a list of inputs, got a {type(inputs).__name__} (iterated, it gives its "
                        "column names): pass its rows, table.to_dict('records'), or one column, table['text']")
    items = []
    for i, given in enumerate(inputs):
        where = f"inputs[{i}]"
        if isinstance(given, str) and given.strip():
            item = {"text": given, PLAIN: True}
        elif isinstance(given, dict):
            item = dict(given)
        else:
            raise DataError(f"{where}: expected a non-blank str or a dict, got {_short_repr(given)}")
        problem = surrogate_problem({k: v for k, v in item.items() if k != PLAIN}, where)
        if problem:
            raise DataError(problem)
        items.append({**item, WHERE: where, LINE: i + 1})
    return items


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Files a data reader reads as records, as training reads them: a CSV/TSV row or a CoNLL sentence spans one line
# or more (read as lines, a TSV's header and its label column were labelled as text, a CoNLL file's tags and
# -DOCSTART- tagged as words). A .txt is plain lines unless its lines are a tagger's CoNLL columns (`conll_lines`).
_TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".conll", ".iob", ".bio", ".conllu")


def _table_file(path: Path) -> bool:
    """Whether `path` is read as records (`_TABLE_SUFFIXES`, or a .json holding one array)."""
    suffix = path.suffix.lower()
    if suffix == ".json" and path.is_file():
        with path.open("rb") as f:
            return f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
    return suffix in _TABLE_SUFFIXES


def conll_lines(lines: list[str], tags: list[str], tag_column: int = -1, sample: int = 200) -> bool:
    """Whether the first `sample` lines are CoNLL columns: two or more columns with one of the tagger's `tags`
    in `tag_column` (data.conll_columns' second, counted from 1, negative from the end). Training reads a .txt
    as CoNLL, as CoNLL-2003 ships, while predict reads a .txt as sentences, one a line: each column of
    "EU NNP B-NP B-ORG" was tagged as a word. Blank, -DOCSTART- and "#" comment lines (read_conll skips them)
    are not sampled, and one sampled line in ten may miss (a tag the tagger does not know): one odd line
    should not make every column of the file a word to tag. Below ten lines every line must fit. Sentence
    lines that end in a tag nine times in ten are not seen in practice."""
    known, at = set(tags), tag_column - 1 if tag_column > 0 else tag_column
    fits = [_tagged(cols, known, at) for cols in islice(_sampled(lines, known, at), sample)]
    return bool(fits) and fits.count(False) <= len(fits) // 10


def _sampled(lines: list[str], known: set[str], at: int) -> Iterator[list[str]]:
    """The columns of the lines `conll_lines` judges: not blank, -DOCSTART- or a "#" comment (a "#" line that
    fits is the "#" word of a sentence, so it stays)."""
    for line in lines:
        cols = line.split()
        if cols and cols[0] != "-DOCSTART-" and not (cols[0].startswith("#") and not _tagged(cols, known, at)):
            yield cols


def _tagged(cols: list[str], known: set[str], at: int) -> bool:
    """Whether a line's columns are a word and more with one of the `known` tags in place `at` (from 0)."""
    return 1 < len(cols) > at >= -len(cols) and cols[at] in known


def _table_records(source: str, conll_columns: list[int] | None, conll: bool = False) -> list[dict]:
    """The records of a table or CoNLL file (`conll`: whatever its suffix), each with its file:line (or row)
    and a number for "line": the line its record starts on, or its row (parquet, a JSON array), counted
    from 1."""
    from .data.readers import read_records

    records = read_records(source, key="--input", conll=conll, conll_columns=conll_columns)
    for i, rec in enumerate(records, start=1):
        where = rec[WHERE]
        tail = where.rsplit(":", 1)[-1]
        rec[LINE] = int(tail) if tail.isdecimal() else i
    return records


def _read_text(source: str | None, name: str, stdin: TextIO) -> str:
    """The whole input as text, without a byte-order mark (it would make the first JSON line plain text)."""
    if name == STDIN:
        if stdin.isatty():  # (else the command waits on the terminal with nothing on screen)
            print("reading inputs from the terminal, one per line; Ctrl-D ends them", file=sys.stderr, flush=True)
        try:
            return stdin.read().removeprefix("\ufeff")
        except UnicodeDecodeError as exc:
            raise DataError(f"{name}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    raw = Path(source).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{name}:{line}: not valid UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start})") from None


def _parse_line(line: str, where: str, n: int) -> dict:
    if line.lstrip().startswith("{"):
        item = _json_object(line, where)
    else:
        item = {"text": line, PLAIN: True}
    # every line, not only those with a \u escape: stdin in the C locale decodes bad bytes to surrogates
    problem = surrogate_problem({k: v for k, v in item.items() if k != PLAIN}, where)
    if problem:
        raise DataError(problem)
    return {**item, WHERE: where, LINE: n}


def _json_object(line: str, where: str) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        # plain text may start with "{" too: say how to give such a line
        raise DataError(f'{where}: invalid JSON ({exc.msg} at column {exc.colno}); a line starting with "{{" is read '
                        'as a JSON object: to predict on plain text that starts with "{", give the line as '
                        '{"text": "..."} (JSON-escaped)') from None
    except RecursionError:  # json's decoder recurses per level: {"a": {"a": ... exhausts the stack
        raise DataError(f"{where}: invalid JSON (nested too deeply)") from None


def _found(item: dict) -> str:
    keys = sorted(k for k in item if k not in _OURS)
    return f"found keys {keys}" if keys else "found no keys"


def _expected(keys: list[str]) -> str:
    return repr(keys[0]) + (f" (or {', '.join(map(repr, keys[1:]))})" if len(keys) > 1 else "")


def _candidates(trained: str | None, alias: str, defaults: tuple[str, ...]) -> list[str]:
    """Keys to read, in order: the trained column and the generic alias, or training's default columns."""
    keys = [trained, alias] if trained else list(defaults)
    return list(dict.fromkeys(keys))


# ---------------------------------------------------------------------------------------------
# seq_cls


def text_columns(task: Any, cfg: Any) -> tuple[str | None, str | None, bool]:
    """(text column, pair column or None, detected) the classifier was trained on: the adapter's record, else the
    run config's data.text_column / data.text_pair_column (a None text column: training's default detection).
    `detected`: the config names no text column, so training took the first of the usual names it found."""
    detected = cfg.data.text_column is None
    if getattr(task, "text", None):
        return task.text, getattr(task, "pair", None), detected
    return cfg.data.text_column, cfg.data.text_pair_column, detected


def seq_cls_input(item: dict, text_col: str | None, pair_col: str | None,
                  detected: bool = False) -> tuple[str, str | None]:
    """(text, pair or None) of one line, checked as training checks a record: non-empty strings. `detected`
    (training chose the column from the usual names): a line without that column is read by the same rule, so a
    classifier trained on a `text` file labels SST-2's `sentence` TSV, as training would have read it."""
    where = item[WHERE]
    if pair_col and item.get(PLAIN):
        raise DataError(f"{where}: a plain-text line, but the model classifies text pairs: give a JSON object with "
                        f"{text_col!r} and {pair_col!r}")
    keys = _candidates(text_col, "text", _TEXT_COLUMNS)
    if detected:
        keys = list(dict.fromkeys([*keys, *_TEXT_COLUMNS]))
    text = _text(item, keys, "no text to classify")
    if not pair_col:
        if "text_pair" in item:  # else the second text would be dropped without a word
            raise DataError(f"{where}: 'text_pair' given, but the model classifies single texts (it was trained "
                            "without data.text_pair_column)")
        return text, None
    pair = _text(item, [pair_col, "text_pair"], f"no text pair (the model classifies {keys[0]!r} + {pair_col!r} "
                                                 "pairs)")
    return text, pair


def _text(item: dict, keys: list[str], missing: str) -> str:
    where = item[WHERE]
    key = next((k for k in keys if k in item), None)
    if key is None:
        raise DataError(f"{where}: {missing}: expected key {_expected(keys)}; {_found(item)}")
    value = item[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {key!r} is empty: nothing to predict on")
    return value


# ---------------------------------------------------------------------------------------------
# token_cls


def tokens_column(task: Any, cfg: Any) -> str | None:
    """The word-list column the tagger was trained on: the adapter's record, else data.tokens_column."""
    return getattr(task, "tokens", None) or cfg.data.tokens_column


class TextWords(list):
    """The words of a raw-text line (a list of str, as a word list is) and the text they were split from,
    with each word's (start, end) character span in it: what the entities' character offsets come from."""

    def __init__(self, text: str, spans: list[tuple[int, int]]) -> None:
        super().__init__(text[start:end] for start, end in spans)
        self.text, self.spans = text, spans


def token_cls_input(item: dict, column: str | None, cjk_chars: bool = False) -> list[str]:
    """The words of one line: its word list, or its text split into words and punctuation as NER corpora
    split theirs (a `TextWords`; `cjk_chars`: Chinese and Japanese one character a word); non-empty strings, as
    training requires."""
    where = item[WHERE]
    keys = _candidates(column, "tokens", _TOKEN_COLUMNS)
    key = next((k for k in keys if k in item), None)
    if key is None and "text" in item:
        if not isinstance(item["text"], str):
            raise DataError(f"{where}: 'text' must be a string, got {type(item['text']).__name__}")
        spans = split_words(item["text"], cjk_chars)
        if not spans:
            raise DataError(f"{where}: 'text' has no words: nothing to tag")
        return TextWords(item["text"], spans)
    if key is None:
        raise DataError(f"{where}: no words to tag: expected key {_expected(keys)} (a list of words) or 'text' "
                        f"(split into words and punctuation); {_found(item)}")
    words = item[key]
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise DataError(f"{where}: {key!r} must be a list of strings, got {type(words).__name__}")
    if not words:
        raise DataError(f"{where}: {key!r} is empty: nothing to tag")
    empty = next((i for i, w in enumerate(words) if not w), None)
    if empty is not None:
        raise DataError(f"{where}: {key!r}[{empty}] is an empty string; every word must be non-empty (as in training)")
    return words


# ---------------------------------------------------------------------------------------------
# causal_lm


def check_prompt_input(item: dict) -> None:
    """Refuse a line `prompt_segments` would find no prompt in (it would generate from an empty turn)."""
    where = item[WHERE]
    if not any(k in item for k in _PROMPT_KEYS):
        raise DataError(f"{where}: nothing to prompt with: expected one of the keys {list(_PROMPT_KEYS)}, or a "
                        f"plain-text line; {_found(item)}")
    if "prompt" in item and "instruction" not in item and not isinstance(item["prompt"], str) \
            and not (isinstance(item["prompt"], list) and item["prompt"]):  # (TRL's conversational prompt)
        raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of messages, got "
                        f"{type(item['prompt']).__name__}")


def check_prompt(prompt: str, where: str) -> None:
    """Refuse an empty prompt (`{"text": ""}`, an empty instruction): there is nothing to answer."""
    if not prompt.strip():
        raise DataError(f"{where}: the prompt is empty: nothing to generate from")
