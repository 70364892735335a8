"""Quality metrics of predictions against references.

Speech recognition: corpus WER (total edits over total reference words) after the Whisper English
text normalizer, with substitutions, deletions and insertions, and CER, counted as jiwer counts them
(rapidfuzz aligns). Each item's edit counts come from its own alignment, so counts of any split of the
items add up to the corpus's.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from rapidfuzz.distance import Levenshtein, Opcodes

from jobs.metrics.normalizer import EnglishNormalizer

EDITS = ("substitutions", "deletions", "insertions", "hits")
EDIT_COLUMNS = tuple(f"{unit}_{edit}" for unit in ("word", "char") for edit in EDITS)
_CHUNK_EDIT = {"replace": "substitutions", "delete": "deletions", "insert": "insertions", "equal": "hits"}
MULTIPLE_SPACES = re.compile(r"\s\s+")


@dataclass(frozen=True)
class WordErrors:
    wer: float
    cer: float
    substitutions: int
    deletions: int
    insertions: int
    reference_words: int
    items: int


@lru_cache(maxsize=1)
def _normalizer() -> EnglishNormalizer:
    return EnglishNormalizer()


def normalize(text: str) -> str:
    """The Whisper English normalizer (jobs.metrics.normalizer: the library's output, faster), after lower-casing
    (the seed lower-cases for scoring)."""
    return _normalizer()(text.lower())


@dataclass
class Alignments:
    """What scoring keeps of each item's alignment: its edit counts (EDIT_COLUMNS -> int64 arrays), its
    normalized texts, and the words of each word edit (`word_edits`: per item, (kind, reference word,
    hypothesis word) with '' for the missing side; kind is 'substitution', 'deletion' or 'insertion')."""

    counts: dict[str, np.ndarray]
    references: list[str]
    hypotheses: list[str]
    word_edits: list[list[tuple[str, str, str]]]


def edit_counts(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, np.ndarray]:
    """Per item, the word and character edits of the normalized texts (EDIT_COLUMNS -> int64 arrays)."""
    return align(references, hypotheses).counts


def align(references: Sequence[str], hypotheses: Sequence[str]) -> Alignments:
    """Each item's normalized texts aligned by words and by characters: what jiwer's process_words and
    process_characters count, from the same rapidfuzz alignment of the same tokens, without building
    jiwer's alignment objects."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    normalized = {text: normalize(text) for text in {*references, *hypotheses}}  # each distinct text once
    word_ids = defaultdict(int)
    word_ids.default_factory = word_ids.__len__  # a number for each distinct word, as jiwer maps them
    counts, word_edits = [], []
    for reference, hypothesis in zip(references, hypotheses):
        ref, hyp = normalized[reference], normalized[hypothesis]
        ref_words, hyp_words = _words(ref), _words(hyp)
        opcodes = Levenshtein.opcodes([word_ids[w] for w in ref_words], [word_ids[w] for w in hyp_words])
        counts.append(_edits(opcodes) + _edits(Levenshtein.opcodes(ref.strip(), hyp.strip())))
        word_edits.append(_word_edits(opcodes, ref_words, hyp_words))
    table = np.array(counts, dtype=np.int64).reshape(len(counts), len(EDIT_COLUMNS))
    return Alignments({name: table[:, column] for column, name in enumerate(EDIT_COLUMNS)},
                      [normalized[text] for text in references], [normalized[text] for text in hypotheses], word_edits)


def _words(text: str) -> list[str]:
    """jiwer's default word tokens: runs of spaces made one, stripped, split on spaces."""
    return [word for word in MULTIPLE_SPACES.sub(" ", text).strip().split(" ") if word]


def _edits(opcodes: Opcodes) -> list[int]:
    """Substitutions, deletions, insertions and hits (EDITS' order) of a rapidfuzz Levenshtein
    alignment, counted as jiwer counts them."""
    edits = dict.fromkeys(EDITS, 0)
    for tag, ref_start, ref_end, hyp_start, hyp_end in opcodes:
        edits[_CHUNK_EDIT[tag]] += hyp_end - hyp_start if tag == "insert" else ref_end - ref_start
    return list(edits.values())


def _word_edits(opcodes: Opcodes, ref_words: list[str], hyp_words: list[str]) -> list[tuple[str, str, str]]:
    """The words of each edit (a substitution block pairs its words in order, as jiwer's alignment does)."""
    edits = []
    for tag, ref_start, ref_end, hyp_start, hyp_end in opcodes:
        if tag == "replace":
            edits += [("substitution", r, h) for r, h in zip(ref_words[ref_start:ref_end], hyp_words[hyp_start:hyp_end])]
        elif tag == "delete":
            edits += [("deletion", r, "") for r in ref_words[ref_start:ref_end]]
        elif tag == "insert":
            edits += [("insertion", "", h) for h in hyp_words[hyp_start:hyp_end]]
    return edits


def word_errors(totals: dict[str, int], items: int) -> WordErrors:
    """Corpus error rates from summed edit counts (EDIT_COLUMNS). An item whose reference normalizes
    to nothing still counts its hypothesis words as insertions; with no reference character at all,
    CER is the insertion count, as jiwer gives it."""
    reference_words = totals["word_hits"] + totals["word_substitutions"] + totals["word_deletions"]
    reference_chars = totals["char_hits"] + totals["char_substitutions"] + totals["char_deletions"]
    char_edits = totals["char_substitutions"] + totals["char_deletions"] + totals["char_insertions"]
    return WordErrors(
        wer=(totals["word_substitutions"] + totals["word_deletions"] + totals["word_insertions"]) / max(reference_words, 1),
        cer=float(char_edits) / float(reference_chars) if reference_chars else totals["char_insertions"],
        substitutions=int(totals["word_substitutions"]),
        deletions=int(totals["word_deletions"]),
        insertions=int(totals["word_insertions"]),
        reference_words=int(reference_words),
        items=items,
    )


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> WordErrors:
    """Corpus-level error rates over normalized texts."""
    counts = edit_counts(references, hypotheses)
    return word_errors({name: int(values.sum()) for name, values in counts.items()}, len(references))


def transcript(reference: str | list[str]) -> str:
    """An ASR item's transcript: its reference, or the first of a list (the job stores lists)."""
    return reference if isinstance(reference, str) else reference[0]
