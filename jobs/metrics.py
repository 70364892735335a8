"""Quality metrics of predictions against references.

Speech recognition: corpus WER (total edits over total reference words) after the Whisper English
text normalizer, with substitutions, deletions and insertions, and CER; jiwer aligns. Each item's
edit counts come from its own alignment, so counts of any split of the items add up to the corpus's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import jiwer
import numpy as np
from whisper_normalizer.english import EnglishTextNormalizer

EDITS = ("substitutions", "deletions", "insertions", "hits")
EDIT_COLUMNS = tuple(f"{unit}_{edit}" for unit in ("word", "char") for edit in EDITS)
_CHUNK_EDIT = {"replace": "substitutions", "substitute": "substitutions", "delete": "deletions", "insert": "insertions",
               "equal": "hits"}


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
def _normalizer() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    """The Whisper English normalizer, after lower-casing (the seed lower-cases for scoring)."""
    return _normalizer()(text.lower())


def edit_counts(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, np.ndarray]:
    """Per item, the word and character edits of the normalized texts (EDIT_COLUMNS -> int64 arrays)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs, hyps = [normalize(r) for r in references], [normalize(h) for h in hypotheses]
    counts = {}
    for unit, process in (("word", jiwer.process_words), ("char", jiwer.process_characters)):
        alignments = process(refs, hyps).alignments if refs else []
        for edit in EDITS:
            counts[f"{unit}_{edit}"] = np.zeros(len(refs), dtype=np.int64)
        for item, chunks in enumerate(alignments):
            for chunk in chunks:
                span = chunk.hyp_end_idx - chunk.hyp_start_idx if chunk.type == "insert" else chunk.ref_end_idx - chunk.ref_start_idx
                counts[f"{unit}_{_CHUNK_EDIT[chunk.type]}"][item] += span
    return counts


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
