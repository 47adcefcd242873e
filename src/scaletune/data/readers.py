"""Read data files into lists of records, with errors that name the file and line.

Supported: .jsonl/.json, .csv/.tsv, .parquet, CoNLL column files (.conll/.txt/.iob/.bio/.conllu), and
`hub:<id>[:split]` through `datasets`. Every record remembers where it came from (`__where__`),
so later validation (missing columns, bad labels) can point at the exact line.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import re
from pathlib import Path
from typing import Any

from ..errors import DataError

WHERE = "__where__"
MAX_ERRORS = 10
_CONLL_SUFFIXES = (".conll", ".txt", ".iob", ".bio", ".conllu")
_CONLL_SEP = re.compile(r"[ \t]+")
_CHAT_COLUMNS = {"conversations", "messages"}  # list-valued fields of one chat record (data/formats.py)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start})") from None


def text_lines(text: str) -> list[str]:
    """Lines split at \n (\r\n too) only: str.splitlines also splits at U+2028, U+0085, form feeds and
    the like, which JSON strings may hold raw, and would shift every later line number."""
    return [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]


# A JSON escape that decodes to a surrogate code point; text decoded from UTF-8 holds none otherwise.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _shown(name: Any) -> str:
    """A field name safe to print: a lone surrogate in it would break writing the error itself."""
    return str(name).encode("utf-8", "backslashreplace").decode("utf-8")


def _bad_text(value: str) -> str | None:
    """The first lone surrogate in `value` as a \\uXXXX escape, or None for valid Unicode text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"\\u{ord(value[exc.start]):04x}"
    return None


def fields_of(record: dict) -> str:
    """The record's own field names, for a message about one it lacks: "'instruction', 'input'"."""
    return ", ".join(repr(k) for k in record if k != WHERE) or "no fields"


def surrogate_problem(record: dict, where: str) -> str | None:
    """Say which field of `record` (nested lists/dicts too, names included) holds a lone surrogate.

    json.loads accepts an unpaired "\\ud800" escape (and stdin in the C locale turns non-UTF-8 bytes into
    lone surrogates); such a string is not Unicode text, and the tokenizer fails on it with a traceback."""
    # (printable name, raw key or None for a list item, value); iterative: JSON nests as deep as json.loads allowed
    stack: list[tuple[str, Any, Any]] = [(_shown(k), k, v) for k, v in reversed(record.items()) if k != WHERE]
    while stack:
        name, key, value = stack.pop()
        bad = _bad_text(key) if isinstance(key, str) else None
        if isinstance(value, str):
            bad = bad or _bad_text(value)
        elif isinstance(value, dict):
            stack.extend((f"{name}.{_shown(k)}", k, v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{name}[{i}]", None, v) for i, v in reversed(list(enumerate(value))))
        if bad:
            return (f"{where}: field '{name}' holds a lone surrogate ({bad}), which is not Unicode text "
                    "(an unpaired \\uD800-\\uDFFF escape, or bytes that are not UTF-8)")
    return None


def _read_jsonl(path: Path) -> list[dict]:
    records, problems = [], []
    for lineno, line in enumerate(text_lines(_read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})")
        except RecursionError:
            problems.append(f"{path}:{lineno}: invalid JSON (nested too deeply)")
        else:
            where = f"{path}:{lineno}"
            if not isinstance(obj, dict):
                problems.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
            elif _SURROGATE_ESCAPE.search(line) and (problem := surrogate_problem(obj, where)):
                problems.append(problem)
            else:
                obj[WHERE] = where
                records.append(obj)
        if len(problems) >= MAX_ERRORS:
            problems.append("... (stopping after 10 problems)")
            break
    if problems:
        raise DataError(problems, title=f"{path} has unreadable lines")
    return records


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array_lines(text: str) -> tuple[list, list[int]] | None:
    """A top-level JSON array parsed item by item, with the line each item starts on (a record's problems
    then name file:line, as in JSON lines, not an index into a 500k-line file). None when the text is not
    one array alone (the caller parses it whole and says what is wrong)."""
    decoder = json.JSONDecoder()
    pos = _JSON_SPACE.match(text).end()
    if text[pos:pos + 1] != "[":
        return None
    items, lines = [], []
    line, counted = 1, 0
    pos = _JSON_SPACE.match(text, pos + 1).end()
    if text[pos:pos + 1] == "]":
        pos += 1
    else:
        while True:
            line += text.count("\n", counted, pos)
            counted = pos
            item, pos = decoder.raw_decode(text, pos)  # (a JSONDecodeError here names the line itself)
            items.append(item)
            lines.append(line)
            pos = _JSON_SPACE.match(text, pos).end()
            sep = text[pos:pos + 1]
            pos = _JSON_SPACE.match(text, pos + 1).end()
            if sep == "]":
                break
            if sep != ",":
                return None
    return (items, lines) if pos >= len(text) else None


def _read_json(path: Path) -> list[dict]:
    text = _read_text(path)
    try:
        parsed = _json_array_lines(text)
        if parsed is not None:
            return _json_records(path, text, *parsed)
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        # A .json file that is really JSON lines is common; accept it.
        if exc.msg == "Extra data":
            return _read_jsonl(path)
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: invalid JSON (nested too deeply)") from None
    if isinstance(obj, dict):
        # Column-oriented {"col": [...], ...}, a wrapper like {"data": [...]}, or one record.
        lists = {k: v for k, v in obj.items() if isinstance(v, list)}
        if not lists or set(lists) & _CHAT_COLUMNS:  # one record (a chat's turns are not a wrapper's records)
            obj = [obj]
        elif len(lists) == 1 and all(isinstance(x, dict) for x in next(iter(lists.values()))):
            obj = next(iter(lists.values()))
        elif lists and len(lists) == len(obj) and len({len(v) for v in lists.values()}) == 1:
            n = len(next(iter(lists.values())))
            obj = [{k: v[i] for k, v in lists.items()} for i in range(n)]
        else:
            raise DataError(f"{path}: expected a list of objects (or JSON lines), a wrapper {{\"data\": [...]}} or "
                            "columns of equal length; for a single record write [{...}]")
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a list of objects, got {type(obj).__name__}")
    return _json_records(path, text, obj, None)


def _json_records(path: Path, text: str, items: list, lines: list[int] | None) -> list[dict]:
    """Records of a JSON file's list, each named file:line (`lines`: where each item starts, when every item
    starts on a line of its own) or file[index]."""
    records, problems = [], []
    check = _SURROGATE_ESCAPE.search(text) is not None  # the walk is needed only if such an escape occurs
    by_line = lines is not None and len(set(lines)) == len(lines)  # (a one-line array: its index says more)
    for i, item in enumerate(items):
        where = f"{path}:{lines[i]}" if by_line else f"{path}[{i}]"
        if not isinstance(item, dict):
            raise DataError(f"{where if by_line else path}: item {i} is {type(item).__name__}, expected an object")
        if check and (problem := surrogate_problem(item, where)):
            problems.append(problem)
            if len(problems) >= MAX_ERRORS:
                problems.append("... (stopping after 10 problems)")
                break
        item[WHERE] = where
        records.append(item)
    if problems:
        raise DataError(problems, title=f"{path} has unreadable items")
    return records


def _delimited_rows(path: Path, text: str, delimiter: str) -> list[tuple[int, int, list[str]]]:
    """Each row with the physical lines it spans (first, last), counted from 1.

    The csv module reads the text as a file opened with newline="" would give it: lines end at \\n, \\r\\n
    or \\r only, endings kept, so a quoted field may hold line breaks (and U+2028 and the like stay data,
    which str.splitlines would split at) and `line_num` counts the lines an editor shows."""
    kind = "TSV" if delimiter == "\t" else "CSV"
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))  # a long document in one field is data, not an error
    rows = []
    try:
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return rows
            rows.append((start, reader.line_num, row))
    except csv.Error as exc:
        seen = f", seen at line {reader.line_num}" if reader.line_num > start else ""
        raise DataError(f"{path}:{start}: malformed {kind} ({exc}{seen})") from None
    finally:
        csv.field_size_limit(limit)


def _read_delimited(path: Path, delimiter: str) -> list[dict]:
    rows = _delimited_rows(path, _read_text(path), delimiter)
    if not rows:
        raise DataError(f"{path}: file is empty")
    header = [h.strip() for h in rows[0][2]]
    if delimiter == "," and len(header) == 1 and "\t" in header[0]:
        # (else the error is "N fields, header has 1" at the first sentence with a comma, or a missing column)
        raise DataError(f"{path}:1: the header {header[0]!r} is tab-separated, but a .csv file is read as "
                        "comma-separated: name the file .tsv")
    if len(set(header)) != len(header) or any(not h for h in header):
        raise DataError(f"{path}:1: the first line must be a header with distinct, non-empty column names")
    records = []
    for start, end, row in rows[1:]:
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            # a quote left open swallows the lines after it into one field: say where the record ran to
            span = f"; this record runs to line {end}: is a quote left open?" if end > start else ""
            raise DataError(f"{path}:{start}: {len(row)} fields, header has {len(header)} ({', '.join(header)}){span}")
        rec: dict[str, Any] = dict(zip(header, row))
        rec[WHERE] = f"{path}:{start}"
        records.append(rec)
    return records


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    records = table.to_pylist()
    for i, rec in enumerate(records):
        rec[WHERE] = f"{path}[row {i}]"
    return records


# CoNLL-U's comment form, "# sent_id = 1", "# newdoc id = d1", "# text = ...": never a word and its tags
_KEY_VALUE_COMMENT = re.compile(r"#\s*\S+( \S+)?\s+=(\s|$)")
# CoNLL-U's multiword-token ("1-2 du") and empty-node ("8.1") lines: the words themselves are on other lines
_CONLLU_EXTRA_ID = re.compile(r"\d+[-.]\d+")


def _conll_split(line: str) -> list[str]:
    # spaces and tabs only: str.split() would also split a token at a no-break space ("New\xa0York")
    return _CONLL_SEP.split(line.strip(" \t"))


def _conll_layout(lines: list[str]) -> int | None:
    """The file's column count: its first line that is neither blank, -DOCSTART- nor starts with "#"."""
    for line in lines:
        if line.strip() and not line.lstrip(" \t").startswith("#"):
            cols = _conll_split(line)
            if cols[0] != "-DOCSTART-":
                return len(cols)
    return None


def _conll_columns(path: Path, columns: list[int] | None) -> tuple[int, int]:
    """(word, tag) column numbers as data.conll_columns gives them; a CoNLL-U file must give them."""
    if columns is None and path.suffix.lower() == ".conllu":
        raise DataError(f"{path}: a CoNLL-U file (ID FORM LEMMA ... MISC) has no NER tag column: set "
                        "data.conll_columns: [2, N], FORM and the column that holds the tags")
    return (columns[0], columns[1]) if columns is not None else (1, -1)


def _is_comment(line: str, cols: list[str], *, in_sentence: bool, word_first: bool, ncols: int | None) -> bool:
    """Whether a line is a comment (CoNLL-U's "# text = ...", GermEval's "#<TAB>url date") rather than data.

    Where the word is not the first column, the first is an index (GermEval, CoNLL-U), so a "#" there starts
    only comments. Where it is, "#" is also a word (CoNLL-2003's "# NN I-NP O", a tweet's "#hashtag O"): the
    line is a comment only before a sentence's first word, and only when it lacks the file's layout (another
    column count) or reads "# key = value"."""
    if not line.lstrip(" \t").startswith("#"):
        return False
    if not word_first:
        return True
    if in_sentence:
        return False
    return (ncols is not None and len(cols) != ncols) or _KEY_VALUE_COMMENT.match(line.strip()) is not None


def _word_and_tag(cols: list[str], columns: tuple[int, int], where: str) -> tuple[str, str]:
    """The word and tag of one line's columns, picked by data.conll_columns (`columns`, counted from 1)."""
    n = len(cols)
    index = [c - 1 if c > 0 else n + c for c in columns]
    missing = next((c for c, i in zip(columns, index) if not 0 <= i < n), None)
    if missing is not None:
        raise DataError(f"{where}: data.conll_columns {list(columns)}: this line has {n} column(s), no column {missing}")
    if index[0] == index[1]:
        raise DataError(f"{where}: data.conll_columns {list(columns)}: the word and the tag are the same column of "
                        f"this line's {n}")
    return cols[index[0]], cols[index[1]]


def read_conll(path: Path, columns: list[int] | None = None) -> list[dict]:
    """CoNLL columns: blank line between sentences, -DOCSTART- and comment lines skipped; the word and tag
    columns are data.conll_columns (`columns`, counted from 1, negative from the end), default the first and
    the last."""
    picked = _conll_columns(path, columns)
    records: list[dict] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 1
    lines = text_lines(_read_text(path))
    ncols = _conll_layout(lines)
    word_first = picked[0] == 1 or (ncols is not None and picked[0] == -ncols)
    # CoNLL-U by its name or its layout (ten columns, an ID first): data.format: conll reads a .txt or .tsv as
    # CoNLL, and its "1-2 du" lines would be words tagged "_"
    conllu = path.suffix.lower() == ".conllu" or (ncols == 10 and not word_first)
    for lineno, line in enumerate(lines, start=1):
        # -DOCSTART- starts a document, so it ends any sentence before it: a file that drops the blank line
        # above it (documents concatenated) would otherwise join the last sentence to the next document's first
        docstart = bool(line.strip()) and _conll_split(line)[0] == "-DOCSTART-"
        if not line.strip() or docstart:
            if tokens:
                records.append({"tokens": tokens, "tags": tags, WHERE: f"{path}:{start}"})
            tokens, tags, start = [], [], lineno + 1
            continue
        cols = _conll_split(line)
        if conllu and _CONLLU_EXTRA_ID.fullmatch(cols[0]):
            continue
        if _is_comment(line, cols, in_sentence=bool(tokens), word_first=word_first, ncols=ncols):
            continue
        if len(cols) < 2 and columns is None:
            raise DataError(f"{path}:{lineno}: expected 'token ... tag' columns, got {line.strip()!r}")
        if ncols is None:
            ncols = len(cols)
        elif len(cols) != ncols:
            hint = (" (a .txt file is read as CoNLL columns: token ... tag; for plain text use a .jsonl file "
                    'with a "text" field)') if path.suffix.lower() == ".txt" else ""
            raise DataError(f"{path}:{lineno}: {len(cols)} columns, earlier lines have {ncols}{hint}")
        word, tag = _word_and_tag(cols, picked, f"{path}:{lineno}")
        if not tokens:
            start = lineno
        tokens.append(word)
        tags.append(tag)
    if tokens:
        records.append({"tokens": tokens, "tags": tags, WHERE: f"{path}:{start}"})
    return records


def _read_hub(spec: str) -> list[dict]:
    ident, _, split = spec[len("hub:"):].partition(":")
    if not ident.strip():
        raise DataError(f"{spec!r} names no dataset: write hub:<dataset id>[:split], e.g. hub:stanfordnlp/sst2:train")
    import datasets

    try:
        ds = datasets.load_dataset(ident, split=split or "train")
    except Exception as exc:  # offline, missing, or bad split: all user-facing
        raise DataError(f"{spec}: cannot load from the datasets hub ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    records = ds.to_list()
    for i, rec in enumerate(records):
        rec[WHERE] = f"{spec}[{i}]"
    return records


def _registry_hint(spec: str, path: Path) -> str:
    """What a missing data.train that is LLaMA-Factory's way of naming data means: a comma-separated list of
    dataset names, or a name its dataset_info.json (beside the name, or in ./data, its default dataset_dir)
    maps to a file."""
    if "," in spec:
        items = ", ".join(s.strip() for s in spec.split(","))
        return f"; several files are a YAML list, not one comma-separated string: [{items}]"
    if path.suffix or len(path.parts) > 1:
        return ""
    for info in (Path("dataset_info.json"), Path("data") / "dataset_info.json"):
        try:
            entry = json.loads(info.read_text(encoding="utf-8")).get(spec)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
            return (f"; {spec!r} is a dataset name in {info.absolute()}: data.train takes the file, "
                    f"{info.parent.absolute() / entry['file_name']}")
    return ""


def read_records(spec: str, *, key: str = "data.train", conll: bool = False,
                 conll_columns: list[int] | None = None) -> list[dict]:
    """Read a data file (or hub dataset) into a list of dict records; never returns an empty list.
    `conll_columns`: data.conll_columns, the word and tag columns of a CoNLL file."""
    if spec.startswith("hub:"):
        records = _read_hub(spec)
    else:
        path = Path(spec)
        if not path.exists():  # a relative path is the working directory's, not the config file's
            where = "" if path.is_absolute() else f" (relative paths are read from the working directory: {path.absolute()})"
            what = "no file matches" if glob.has_magic(spec) else "file not found:"
            raise DataError(f"{key}: {what} {path}{where}{_registry_hint(spec, path)}")
        if path.is_dir():
            raise DataError(f"{key}: {path} is a directory, expected a data file")
        if not path.is_file():  # a pipe would block the open for ever (and is read more than once: hashed, then read)
            raise DataError(f"{key}: {path} is not a regular file (a pipe or a device?), expected a data file")
        suffix = path.suffix.lower()
        try:
            if conll:  # data.format: conll names the layout, whatever the file is called (ner.tsv)
                records = read_conll(path, conll_columns)
            elif suffix == ".jsonl":
                records = _read_jsonl(path)
            elif suffix == ".json":
                records = _read_json(path)
            elif suffix in (".csv", ".tsv"):
                records = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
            elif suffix == ".parquet":
                records = _read_parquet(path)
            elif suffix in _CONLL_SUFFIXES:
                records = read_conll(path, conll_columns)
            else:
                raise DataError(
                    f"{key}: {path}: unknown file type {suffix!r} (jsonl, json, csv, tsv, parquet, conll/txt)"
                )
        except DataError as exc:  # a list of bad lines: say which setting (or flag) named the file, too
            if exc.title and not exc.title.startswith(key):
                raise DataError(exc.problems, title=f"{key}: {exc.title}", hint=exc.hint) from None
            raise
    if not records:
        raise DataError(f"{key}: {spec} contains no examples")
    return records
