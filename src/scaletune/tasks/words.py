"""Raw text into words as CoNLL-style NER corpora split theirs, each with its character span in the text: what
`predict` tags a token_cls model's plain-text input by, and how its entities point back into that text."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable


def char_entities(found: list[dict], text: str, spans: list[tuple[int, int]]) -> list[dict]:
    """`entities` of words split from `text` (`split_words`), each with "char_start" / "char_end" (exclusive)
    into the text and, as its "text", the text as written there (not its words joined by spaces)."""
    out = []
    for ent in found:
        start, end = spans[ent["start"]][0], spans[ent["end"] - 1][1]
        out.append({**ent, "text": text[start:end], "char_start": start, "char_end": end})
    return out


# Raw text is split as CoNLL-style NER corpora (CoNLL-2003, OntoNotes: Penn Treebank rules) split theirs, so
# a tagger sees words shaped like its training data ("Paris" ",", not "Paris,"): punctuation is a word of its
# own (a run of one mark, "..." or "--", one word), clitics split off ("Smith" "'s", "do" "n't"), while
# acronyms ("U.S.", "e.g."), a name's initial before the next name ("M. Atherton": 300 "M."-like words
# in CoNLL-2003's training set, nearly all B-PER), title, company and US state abbreviations ("Mr.",
# "Inc.", "Calif."), a month or "No." before a number ("Aug. 21"), names joined by "&" ("S&P", "AT&T"),
# numbers ("3.5", "1,000", "10:30", "1/2") and words joined by a hyphen or an inner apostrophe
# ("Anglo-Dutch", "O'Neill"), URLs, domains, e-mail addresses and emoji sequences stay whole. Rules, not a trained
# splitter: nothing to download, and every word keeps its span in the text.
_CLITIC = r"(?i:['’](?:s|re|ve|ll|d|m)|n['’]t)(?!\w)"
_ABBREVIATIONS = ("Mrs|Mr|Ms|Dr|Prof|Sr|Jr|St|Mt|Gen|Gov|Sen|Rep|Lt|Col|Capt|Sgt|Maj|Rev|Inc|Corp|Ltd|Co|Bros|vs|"
                  "Ala|Ariz|Ark|Calif|Colo|Conn|Del|Fla|Ga|Ill|Ind|Kan|Ky|La|Md|Mass|Mich|Minn|Miss|Mo|Mont|"
                  "Neb|Nev|Okla|Ore|Pa|Tenn|Tex|Va|Wash|Wis|Wyo")
_BEFORE_NUMBER = "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec|No"  # "Aug. 21", "No. 1" (a word elsewhere)
_URL = (r"(?i:https?://|ftp://|www\.)(?:\([^\s()<>]*\)|[^\s()<>\"])*"  # balanced "(...)" stays: Foo_(bar)
        r"(?:\([^\s()<>]*\)|[^\s()<>\"'.,;:!?’”\]}*])")  # a trailing full stop, comma or quote is the text's
_EMAIL = r"\w[\w.+-]{0,63}@\w[\w-]*(?:\.\w[\w-]*)+"
# a bare domain ("example.com", "Amazon.com"): only before a common top-level domain that is no word of its own
# (not .it, .in, .no, .de, ...), so that two sentences run together ("in Paris.Then", "Paris.It") still split
_DOMAIN = (r"(?i:[a-z0-9][a-z0-9-]*(?:\.[a-z0-9][a-z0-9-]*)*\.(?:com|org|net|edu|gov|mil|info|biz|io|ai|co|uk|"
           r"fr|nl|ch|dk|fi|pl|cz|ru|ua|jp|cn|kr|au|nz|ca|br|mx|eu|dev))(?!\w)(?![.-]\w)")
_WORD = re.compile(rf"""
    {_URL}                              # https://example.com/a?b=1, www.example.org: one word, as in OntoNotes
  | {_EMAIL}                            # jane.doe@example.com
  | {_DOMAIN}                           # example.com, Amazon.com
  | (?:[^\W\d_]\.){{2,}}                 # acronyms: U.S., e.g.
  | (?P<initial>[^\W\d_])\.(?=\s+(?P<next>[^\W\d_]))  # an initial: M. Atherton, Ö. Yılmaz (`_spans`)
  | (?:{_ABBREVIATIONS})\.(?!\w)        # Mr., Inc., Calif.
  | (?:{_BEFORE_NUMBER})\.(?=\s*\d)      # Aug. 21, No. 1
  | [A-Z]+&[A-Z]+\b                     # S&P, AT&T
  | \d+(?:[.,:/]\d+)+                   # 3.5, 1,000, 10:30, 1/2
  | {_CLITIC}                           # 's, n't: after their word
  | \w+?(?=(?i:n['’]t)(?!\w))           # the "do" of don't
  | \w+(?:-\w+|(?!{_CLITIC})['’]\w+)*   # words, Anglo-Dutch, O'Neill
  | (?P<mark>[^\w\s])(?P=mark)*          # punctuation
""", re.VERBOSE)
# ZWNJ and ZWJ join the parts of one word in Persian and Indic scripts (Sinhala's "ශ්\u200dරී", Sri, holds a ZWJ)
_JOINERS = ("\u200c", "\u200d")


def split_words(text: str, cjk_chars: bool = False) -> list[tuple[int, int]]:
    """The (start, end) character spans of the words of `text`, split as CoNLL-style corpora split theirs
    (`_WORD`); whitespace is in no word. `cjk_chars`: a run holding Chinese or Japanese characters is split
    into single characters, as character-level corpora give those scripts (`cjk_char_level`)."""
    spans = [span for m in _WORD.finditer(_marks_as_letters(text)) for span in _spans(m)]
    if text.isascii():
        return spans
    spans = _join_clusters(text, spans)
    return _single_characters(text, spans) if cjk_chars else spans


# Han ideographs (and their extensions), Hiragana and Katakana: scripts written without spaces between words
_CJK = re.compile("[\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")


def has_cjk(text: str) -> bool:
    """Whether `text` holds a Chinese or Japanese character."""
    return not text.isascii() and _CJK.search(text) is not None


def cjk_char_level(sentences: Iterable[list[str]]) -> bool | None:
    """Whether a corpus gives Chinese/Japanese text one character a word, as the usual character-level NER sets
    do (MSRA, Weibo, Resume: raw text is then split so at predict time): True where at least 90% of its words
    holding such characters are single characters, False where they are longer (a segmented corpus), None where
    no word holds one."""
    n = single = 0
    for words in sentences:
        for word in words:
            if has_cjk(word):
                n += 1
                single += len(word) == 1
    return None if n == 0 else single >= 0.9 * n


def _spans(match: re.Match) -> list[tuple[int, int]]:
    """The word(s) of one `_WORD` match. re has no class for uppercase letters, so an initial is matched as any
    letter and its full stop given back unless it and the next name's letter are capitals ("Plan b. it"):
    "b" and "." are what the other patterns would have matched there."""
    start, end = match.span()
    if match["initial"] is None or (match["initial"].isupper() and match["next"].isupper()):
        return [(start, end)]
    return [(start, start + 1), (start + 1, end)]


def _single_characters(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`spans` with each one that holds a Chinese or Japanese character split into its characters (grapheme
    clusters: a kana and a combining sound mark stay one), Latin letters and digits in it too ("iPhone手机":
    one character a word, as character-level corpora write such a run)."""
    import regex

    out: list[tuple[int, int]] = []
    for start, end in spans:
        if has_cjk(text[start:end]):
            out += [(start + m.start(), start + m.end()) for m in regex.finditer(r"\X", text[start:end])]
        else:
            out.append((start, end))
    return out


def _join_clusters(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`spans` with each pair of touching words joined where the joint falls inside one grapheme cluster
    (regex's \\X): an emoji ZWJ sequence (👩‍💻), a flag (🇩🇪) or a skin tone (👍🏽) is one symbol, not parts
    and a bare joiner."""
    import regex  # (a dependency of transformers and tokenizers; only non-ASCII text needs it)

    bounds = {m.start() for m in regex.finditer(r"\X", text)}
    out: list[tuple[int, int]] = []
    for start, end in spans:
        if out and out[-1][1] == start and start not in bounds:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def _marks_as_letters(text: str) -> str:
    """`text` with every combining mark (and ZWNJ, ZWJ) as a letter, one character for one: re's \\w leaves out
    the vowel signs and viramas of Indic scripts and a decomposed accent (e + U+0301), which would split
    "हिन्दी" or a decomposed "café" into pieces. Spans found in it are spans of `text`."""
    if text.isascii():
        return text
    return "".join("a" if c in _JOINERS or unicodedata.category(c).startswith("M") else c for c in text)
