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
from rapidfuzz.distance import Levenshtein

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


def edit_counts(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, np.ndarray]:
    """Per item, the word and character edits of the normalized texts (EDIT_COLUMNS -> int64 arrays):
    what jiwer's process_words and process_characters count, from the same rapidfuzz alignment of the
    same tokens, without building jiwer's alignment objects."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    normalized = {text: normalize(text) for text in {*references, *hypotheses}}  # each distinct text once
    word_ids = defaultdict(int)
    word_ids.default_factory = word_ids.__len__  # a number for each distinct word, as jiwer maps them
    counts = []
    for reference, hypothesis in zip(references, hypotheses):
        ref, hyp = normalized[reference], normalized[hypothesis]
        counts.append(_edits([word_ids[w] for w in _words(ref)], [word_ids[w] for w in _words(hyp)])
                      + _edits(ref.strip(), hyp.strip()))
    table = np.array(counts, dtype=np.int64).reshape(len(counts), len(EDIT_COLUMNS))
    return {name: table[:, column] for column, name in enumerate(EDIT_COLUMNS)}


def _words(text: str) -> list[str]:
    """jiwer's default word tokens: runs of spaces made one, stripped, split on spaces."""
    return [word for word in MULTIPLE_SPACES.sub(" ", text).strip().split(" ") if word]


def _edits(reference: Sequence, hypothesis: Sequence) -> list[int]:
    """Substitutions, deletions, insertions and hits (EDITS' order) of rapidfuzz's Levenshtein
    alignment, counted as jiwer counts them."""
    edits = dict.fromkeys(EDITS, 0)
    for tag, ref_start, ref_end, hyp_start, hyp_end in Levenshtein.opcodes(reference, hypothesis):
        edits[_CHUNK_EDIT[tag]] += hyp_end - hyp_start if tag == "insert" else ref_end - ref_start
    return list(edits.values())


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
