"""Sentences to synthesise a speech-recognition training corpus from, all from Debian packages with open licences.

- `wordnet-base` (WordNet 3.0 licence: free to use, copy, modify and distribute): the example sentences in the
  glosses (`"he ran the race in record time"`) and the glosses themselves;
- `wamerican` (SCOWL word list, free licence): plain lower-case words, drawn at random into word sequences that
  no language prior predicts, so that a model must listen to get them right.

A text is kept only when it reads as plain English words (letters, apostrophes, hyphens and light punctuation):
no digits, brackets or symbols that a synthesiser would read in a way its transcript does not say. Texts that
share a word 5-gram with an evaluation transcript (or hold a whole short one) are left out (`Exclusions`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
WORD_LIST = Path("/usr/share/dict/american-english")

_QUOTED = re.compile(r'"([^"]+)"')
_SPEAKABLE = re.compile(r"^[A-Za-z][A-Za-z' ,;:.!?-]*$")
_PUNCTUATION = re.compile(r"[^a-z' ]+")
_WORD = re.compile(r"^[a-z]{2,12}$")
EXCLUSION_NGRAM = 5


def transcript(text: str) -> str:
    """The training answer for a spoken text: lower case, words only (apostrophes kept), single spaces."""
    words = _PUNCTUATION.sub(" ", text.lower().replace("-", " ")).split()
    return " ".join(word.strip("'") for word in words if word.strip("'"))


def is_speakable(text: str, min_words: int = 2, max_words: int = 24) -> bool:
    return bool(_SPEAKABLE.match(text)) and min_words <= len(text.split()) <= max_words and "..." not in text


def wordnet_texts(directory: Path = WORDNET_DIR) -> tuple[list[str], list[str]]:
    """WordNet's example sentences and its glosses (without their examples), each speakable one once, in file order."""
    examples: dict[str, None] = {}
    glosses: dict[str, None] = {}
    for name in WORDNET_FILES:
        for line in (directory / name).read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "| " not in line:
                continue  # the licence header
            gloss = line.split("| ", 1)[1].strip()
            for example in _QUOTED.findall(gloss):
                if is_speakable(example.strip()):
                    examples[example.strip()] = None
            definition = _QUOTED.sub("", gloss).strip(" ;")
            if is_speakable(definition, min_words=3):
                glosses[definition] = None
    return list(examples), list(glosses)


def common_words(path: Path = WORD_LIST) -> list[str]:
    """Plain lower-case words of 2 to 12 letters (no proper nouns, possessives or abbreviations)."""
    return [word for word in path.read_text(encoding="utf-8", errors="ignore").split() if _WORD.match(word)]


def word_sequence(words: Sequence[str], rng: random.Random, low: int = 3, high: int = 10) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))


@dataclass(frozen=True)
class Exclusions:
    """What must not enter a training corpus: the evaluation corpora's transcripts."""

    ngrams: frozenset[tuple[str, ...]]
    whole: frozenset[str]

    @classmethod
    def of(cls, transcripts: Iterable[str]) -> Exclusions:
        ngrams, whole = set(), set()
        for text in transcripts:
            words = transcript(text).split()
            if len(words) < EXCLUSION_NGRAM:
                whole.add(" ".join(words))
            ngrams.update(_ngrams(words))
        return cls(frozenset(ngrams), frozenset(whole))

    def excludes(self, text: str) -> bool:
        words = transcript(text).split()
        joined = f" {' '.join(words)} "
        return any(gram in self.ngrams for gram in _ngrams(words)) or any(f" {short} " in joined for short in self.whole)


def _ngrams(words: Sequence[str]) -> Iterable[tuple[str, ...]]:
    return (tuple(words[i : i + EXCLUSION_NGRAM]) for i in range(len(words) - EXCLUSION_NGRAM + 1))
