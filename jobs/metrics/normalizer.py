"""The Whisper English text normalizer, with the same output at a fraction of the cost.

whisper_normalizer's `EnglishTextNormalizer` runs about seventy regular expressions on every text,
nearly all of which find nothing; on transcripts it was most of the scorer's work per item.
`EnglishNormalizer` runs the same steps in the same order, on the library's own patterns and tables,
and skips only what cannot change the text:

- a replacement whose pattern needs a literal (`won't`, `'s been`, `(`, ...) that the text lacks;
- on ASCII text, symbol removal is one `str.translate` through a table the library's own function
  filled, character by character (NFKD leaves ASCII as it is);
- the number normalizer, on a text with no digit, no "half" and no number word, where it only
  re-joins the words with single spaces;
- the last whitespace clean-up where the spelling step, which joins the words with single spaces,
  was followed by no symbol removal.

tests/metrics/test_wer.py compares it with the library's normalizer on thousands of varied texts.
"""

from __future__ import annotations

import re

from whisper_normalizer.basic import remove_symbols_and_diacritics
from whisper_normalizer.english import EnglishTextNormalizer

KEPT_SYMBOLS = ".%$¢€£"  # the library keeps them for its number normalizer
CURRENCY_SYMBOLS = ".$¢€£"
DIGIT = re.compile(r"\d")
WHITESPACE = re.compile(r"\s+")
LEFT_SYMBOL = re.compile(r"[.$¢€£]([^0-9])")
RIGHT_PERCENT = re.compile(r"([^0-9])%")


class EnglishNormalizer:
    """`EnglishTextNormalizer()(text)`, faster; the same string for every input."""

    def __init__(self):
        library = EnglishTextNormalizer()
        self.numbers = library.standardize_numbers
        self.spellings = library.standardize_spellings.mapping
        if any(spelling.split() != [spelling] for word, spelling in self.spellings.items() if word.split() == [word]):
            raise ValueError("whisper_normalizer's spelling of a word is no longer one word")
        # (literals one of which a match must hold, pattern, replacement), in the library's order
        self.replacements = [
            (("<", "["), re.compile(r"[<\[][^>\]]*[>\]]"), ""),  # words between brackets
            (("(",), re.compile(r"\(([^)]+?)\)"), ""),  # words between parentheses
            (("mm", "mhm", "uh", "um"), re.compile(library.ignore_patterns), ""),  # hmm, mm, mhm, mmm, uh, um
            (("'",), re.compile(r"\s+'"), "'"),  # a space before an apostrophe
            *[((literal_of(pattern),), re.compile(pattern), replacement) for pattern, replacement in library.replacers.items()],
            ((",",), re.compile(r"(\d),(\d)"), r"\1\2"),  # commas between digits
            ((".",), re.compile(r"\.([^0-9]|$)"), r" \1"),  # periods not followed by a digit
        ]
        self.ascii_symbols = str.maketrans({chr(c): remove_symbols_and_diacritics(chr(c), keep=KEPT_SYMBOLS) for c in range(128)})

    def __call__(self, text: str) -> str:
        s = text.lower()
        for literals, pattern, replacement in self.replacements:
            for literal in literals:
                if literal in s:
                    s = pattern.sub(replacement, s)
                    break
        s = s.translate(self.ascii_symbols) if s.isascii() else remove_symbols_and_diacritics(s, keep=KEPT_SYMBOLS)
        words = s.split()
        if self._may_hold_numbers(s, words):
            words = self.numbers(s).split()
        s = " ".join(map(self.spellings.get, words, words))  # single spaces from here on
        if not any(symbol in s for symbol in KEPT_SYMBOLS):
            return s
        if any(symbol in s for symbol in CURRENCY_SYMBOLS):
            s = LEFT_SYMBOL.sub(r" \1", s)
        if "%" in s:
            s = RIGHT_PERCENT.sub(r"\1 ", s)
        return WHITESPACE.sub(" ", s)

    def _may_hold_numbers(self, s: str, words: list[str]) -> bool:
        return "half" in s or DIGIT.search(s) is not None or not self.numbers.words.isdisjoint(words)


def literal_of(pattern: str) -> str:
    """The text a replacement pattern of the library matches: its pattern without word boundaries,
    which must leave a plain literal."""
    literal = pattern.replace(r"\b", "")
    if not re.fullmatch(r"[a-z' ]+", literal):
        raise ValueError(f"whisper_normalizer's replacement {pattern!r} is not a literal between word boundaries")
    return literal
