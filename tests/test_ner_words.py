"""Raw text for a tagger is split into words as CoNLL-style NER corpora split theirs, each word keeping its
character span, so predicted entities can point into the text the user gave."""

from __future__ import annotations

import pytest

from scaletune.tasks.token_cls import entities
from scaletune.tasks.words import char_entities, split_words


def _words(text: str) -> list[str]:
    return [text[start:end] for start, end in split_words(text)]


@pytest.mark.parametrize(("text", "want"), [
    ("John Smith lives in Paris, France.", ["John", "Smith", "lives", "in", "Paris", ",", "France", "."]),
    ("(Reuters) Smith's firm", ["(", "Reuters", ")", "Smith", "'s", "firm"]),
    ("They don't, WE'RE", ["They", "do", "n't", ",", "WE", "'RE"]),
    ("the U.S. and e.g. Mr. Brown of Acme Inc.", ["the", "U.S.", "and", "e.g.", "Mr.", "Brown", "of", "Acme", "Inc."]),
    ("up 3.5% to 1,000 at 10:30...", ["up", "3.5", "%", "to", "1,000", "at", "10:30", "..."]),
    ("Anglo-Dutch O'Neill on 1996-08-22", ["Anglo-Dutch", "O'Neill", "on", "1996-08-22"]),
    ("Smith’s “quote”", ["Smith", "’s", "“", "quote", "”"]),
    # combining marks (a decomposed accent, Devanagari vowel signs) and ZWNJ stay inside their word
    ("cafe\u0301 हिन्दी می\u200cخواهم 東京", ["cafe\u0301", "हिन्दी", "می\u200cخواهم", "東京"]),
    # so does ZWJ, which Sinhala and Malayalam conjuncts hold ("Sri Lanka")
    ("ශ්\u200dරී ලංකා", ["ශ්\u200dරී", "ලංකා"]),
    ("  \t ", []),
    # CoNLL-2003 keeps an initial ("M.", ~300 times, nearly all B-PER), state and month abbreviations whole
    ("M. Atherton and George W. Bush", ["M.", "Atherton", "and", "George", "W.", "Bush"]),
    ("in St. Louis, Mo., on Aug. 21, No. 1", ["in", "St.", "Louis", ",", "Mo.", ",", "on", "Aug.", "21", ",", "No.",
                                              "1"]),
    ("S&P and AT&T rose 1/2 in Calif.", ["S&P", "and", "AT&T", "rose", "1/2", "in", "Calif."]),
    # ...but a letter or month that ends a sentence gives its full stop back
    ("Plan B. it was Aug. Then", ["Plan", "B", ".", "it", "was", "Aug", ".", "Then"]),
])
def test_raw_text_is_split_as_ner_corpora_split_it(text, want):
    """Punctuation and clitics are words of their own (the tagger never saw "Paris," in training), while
    acronyms, numbers, hyphenated words and non-Latin words stay whole; every span slices the text."""
    assert _words(text) == want


def test_entities_of_raw_text_carry_character_offsets_into_it():
    """An entity of split text points into the original: text[char_start:char_end] is its "text", as written
    (spacing kept), and its word indices are kept too."""
    text = "  John  Smith lives in Paris, France."
    spans = split_words(text)
    tags = ["B-PER", "I-PER", "O", "O", "B-LOC", "O", "B-LOC", "O"]
    got = char_entities(entities(_words(text), tags), text, spans)
    assert got == [{"text": "John  Smith", "type": "PER", "start": 0, "end": 2, "char_start": 2, "char_end": 13},
                   {"text": "Paris", "type": "LOC", "start": 4, "end": 5, "char_start": 23, "char_end": 28},
                   {"text": "France", "type": "LOC", "start": 6, "end": 7, "char_start": 30, "char_end": 36}]
    assert all(text[e["char_start"]:e["char_end"]] == e["text"] for e in got)


@pytest.mark.parametrize(("text", "want"), [
    ("See https://example.com/a?b=1. Or www.example.org, then",
     ["See", "https://example.com/a?b=1", ".", "Or", "www.example.org", ",", "then"]),
    ("(https://en.wikipedia.org/wiki/Foo_(bar)) “HTTP://x.org/p”",
     ["(", "https://en.wikipedia.org/wiki/Foo_(bar)", ")", "“", "HTTP://x.org/p", "”"]),
    ("Mail jane.doe+ner@mail.example.co.uk.", ["Mail", "jane.doe+ner@mail.example.co.uk", "."]),
])
def test_urls_and_email_addresses_are_one_word(text, want):
    """OntoNotes keeps a URL or an e-mail address as one token, so the tagger sees it whole; the text's own
    full stop, comma, quotes and brackets around it are not part of it (a URL's balanced "(...)" is)."""
    assert _words(text) == want


@pytest.mark.parametrize(("text", "want"), [
    ("I 👩\u200d💻 for 👨\u200d👩\u200d👧!", ["I", "👩\u200d💻", "for", "👨\u200d👩\u200d👧", "!"]),
    ("in 🇩🇪🇫🇷, 👍🏽👍 ❤️", ["in", "🇩🇪", "🇫🇷", ",", "👍🏽", "👍", "❤️"]),
])
def test_an_emoji_sequence_is_one_word(text, want):
    """A ZWJ sequence, a flag and a skin tone are one grapheme cluster: one word, never parts or a bare ZWJ."""
    assert _words(text) == want


def test_initials_may_be_any_capital_letter():
    """An initial keeps its full stop for any capital before a capitalised name; a small letter does not."""
    assert _words("Ö. Yılmaz met É. Macron and A. Öztürk, Plan é. Then") == [
        "Ö.", "Yılmaz", "met", "É.", "Macron", "and", "A.", "Öztürk", ",", "Plan", "é", ".", "Then"]


def test_spans_of_urls_emoji_and_initials_slice_the_text():
    text = " É. Roy  👩\u200d💻 https://x.org/a. j@x.io"
    spans = split_words(text)
    assert [text[a:b] for a, b in spans] == ["É.", "Roy", "👩\u200d💻", "https://x.org/a", ".", "j@x.io"]
    assert spans[0] == (1, 3) and spans[-1] == (len(text) - 6, len(text))


def test_a_character_level_tagger_gets_chinese_and_japanese_one_character_a_word():
    """With cjk_chars (training's words in those scripts were single characters: MSRA, Weibo), a run holding
    Chinese or Japanese characters is split into its characters, Latin letters in it too, as such corpora write
    it; other words, and the same text without cjk_chars, split as before."""
    from scaletune.tasks.words import cjk_char_level

    text = "我在北京工作，iPhone手机 が゙ Paris, 2019."
    spans = split_words(text, cjk_chars=True)
    assert [text[a:b] for a, b in spans] == ["我", "在", "北", "京", "工", "作", "，", "i", "P", "h", "o", "n", "e",
                                             "手", "机", "が゙", "Paris", ",", "2019", "."]
    assert _words(text) == ["我在北京工作", "，", "iPhone手机", "が゙", "Paris", ",", "2019", "."]
    assert cjk_char_level([["我", "在", "北", "京"], ["Paris", "東"]]) is True
    assert cjk_char_level([["我", "在", "北京", "工作"]]) is False  # (a segmented corpus: words of 2+)
    assert cjk_char_level([["Paris", "é"]]) is None


@pytest.mark.parametrize(("text", "want"), [
    ("Visit example.com.", ["Visit", "example.com", "."]),
    ("Amazon.com Inc. and news.bbc.co.uk, Yahoo.co.jp!", ["Amazon.com", "Inc.", "and", "news.bbc.co.uk", ",",
                                                           "Yahoo.co.jp", "!"]),
    # sentences run together, and words that only look like one, still split at the full stop
    ("via t.co, bit.io", ["via", "t.co", ",", "bit.io"]),
    ("in Paris.Then Paris.It was foo.comedy x.com-y", ["in", "Paris", ".", "Then", "Paris", ".", "It", "was", "foo",
                                                       ".", "comedy", "x", ".", "com-y"]),
])
def test_a_bare_domain_is_one_word(text, want):
    assert _words(text) == want


def test_a_corpus_is_character_level_from_nine_in_ten_single_characters():
    """cjk_char_level's line: 9 of 10 Chinese words single characters is a character-level corpus (MSRA's odd
    multi-character token), 8 of 10 a segmented one."""
    from scaletune.tasks.words import cjk_char_level

    assert cjk_char_level([["我"] * 9 + ["北京"]]) is True
    assert cjk_char_level([["我"] * 8, ["北京", "工作"]]) is False
