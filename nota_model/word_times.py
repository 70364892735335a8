"""Word timestamps from Whisper's cross-attention, the method of openai-whisper and faster-whisper.

An alignment (CTranslate2's `Whisper.align`) runs the decoder over a transcript and returns each text token's
probability and a monotonic path of (token, encoder frame) pairs: dynamic time warping over the cross-attention
of the model's alignment heads, median filtered. A token starts at the first frame the path gives it. A word is
the tokens from one whose text begins with a space (or is punctuation) to the next such token; it starts when
its first token does and ends when the next word (or the end of text) starts; its probability is its tokens'
mean. Punctuation is then joined to its word: opening marks to the next word, closing marks to the previous
one, the word keeping its own times. Languages written without spaces get a word a character.

Each word keeps the text the model gave it, leading space included: the words joined give the text back.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from nota_model.config import WHISPER_FRAMES_PER_SECOND

# Marks joined to the word after them, and to the word before them (openai-whisper's defaults).
OPENING_MARKS = "\"'“¿([{-"
CLOSING_MARKS = "\"'.。,，!！?？:：”)]}、"
# Whisper's languages written without spaces between words.
UNSPACED_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})
REPLACEMENT_CHARACTER = "\ufffd"


@dataclass(frozen=True)
class Word:
    """A word as the model wrote it (leading space included), its start and end in seconds, and its
    probability (the mean of its tokens')."""

    word: str
    start: float
    end: float
    probability: float

    def shifted(self, seconds: float, limit: float) -> Word:
        """The word `seconds` later, its times kept within [0, limit]."""
        start = min(max(self.start + seconds, 0.0), limit)
        return replace(self, start=start, end=min(max(self.end + seconds, start), limit))


def aligned_words(
    token_ids: Sequence[int],
    token_probabilities: Sequence[float],
    path: Sequence[tuple[int, int]],
    decode: Callable[[list[int]], str],
    language: str | None,
) -> list[Word]:
    """The words of `token_ids` (text tokens only) with their times, from an alignment's token probabilities
    and path of (token index, encoder frame) pairs; the path's last token index is the end of text."""
    starts = token_start_seconds(path, len(token_ids) + 1)
    words, first = [], 0
    for text, count in word_tokens(token_ids, decode, language):
        probabilities = token_probabilities[first : first + count]
        words.append(Word(text, starts[first], starts[first + count], sum(probabilities) / count))
        first += count
    return joined_punctuation(words)


def token_start_seconds(path: Sequence[tuple[int, int]], tokens: int) -> list[float]:
    """When each of `tokens` token indices starts: the first encoder frame the path gives it."""
    starts: list[float | None] = [None] * tokens
    for token, frame in path:
        if starts[token] is None:
            starts[token] = frame / WHISPER_FRAMES_PER_SECOND
    if None in starts:
        raise ValueError("the alignment's path skips a token")
    return starts


def word_tokens(token_ids: Sequence[int], decode: Callable[[list[int]], str], language: str | None) -> list[tuple[str, int]]:
    """Each word's text and token count, in order."""
    characters = whole_characters(token_ids, decode)
    if language in UNSPACED_LANGUAGES:
        return characters
    words: list[tuple[str, int]] = []
    for text, count in characters:
        if not words or text.startswith(" ") or is_punctuation(text):
            words.append((text, count))
        else:
            words[-1] = (words[-1][0] + text, words[-1][1] + count)
    return words


def whole_characters(token_ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[tuple[str, int]]:
    """The tokens in runs whose text is whole characters (a character's UTF-8 bytes may span tokens), with each
    run's token count."""
    runs, pending = [], []
    for token in token_ids:
        pending.append(token)
        text = decode(pending)
        if REPLACEMENT_CHARACTER not in text:
            runs.append((text, len(pending)))
            pending = []
    if pending:
        runs.append((decode(pending), len(pending)))
    return runs


def is_punctuation(text: str) -> bool:
    stripped = text.strip()
    return bool(stripped) and all(unicodedata.category(character).startswith("P") for character in stripped)


def joined_punctuation(words: list[Word]) -> list[Word]:
    """Opening marks (a word of them after a space) joined to the next word, closing marks (a word of them
    right after a word) to the previous one; the word keeps its own times and probability."""
    opened: list[Word] = []
    for word in reversed(words):
        if opened and word.word.startswith(" ") and _only(word.word, OPENING_MARKS):
            opened[-1] = replace(opened[-1], word=word.word + opened[-1].word)
        else:
            opened.append(word)
    closed: list[Word] = []
    for word in reversed(opened):
        if closed and not word.word.startswith(" ") and not closed[-1].word.endswith(" ") and _only(word.word, CLOSING_MARKS):
            closed[-1] = replace(closed[-1], word=closed[-1].word + word.word)
        else:
            closed.append(word)
    return closed


def _only(text: str, marks: str) -> bool:
    stripped = text.strip()
    return bool(stripped) and all(character in marks for character in stripped)
