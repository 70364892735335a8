"""Quality metrics of predictions against references.

Speech recognition: corpus WER (total edits over total reference words) after the Whisper English
text normalizer, with substitutions, deletions and insertions, and CER; jiwer aligns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import jiwer
from whisper_normalizer.english import EnglishTextNormalizer


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


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> WordErrors:
    """Corpus-level error rates over normalized texts. An item whose reference normalizes to nothing
    still counts its hypothesis words as insertions."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs, hyps = [normalize(r) for r in references], [normalize(h) for h in hypotheses]
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    reference_words = words.hits + words.substitutions + words.deletions
    return WordErrors(
        wer=(words.substitutions + words.deletions + words.insertions) / max(reference_words, 1),
        cer=chars.cer,
        substitutions=words.substitutions,
        deletions=words.deletions,
        insertions=words.insertions,
        reference_words=reference_words,
        items=len(refs),
    )


def asr_rows_wer(rows: Sequence[dict]) -> WordErrors | None:
    """WER over the rows that are speech recognition, succeeded and carry a reference."""
    scored = [r for r in rows if r.get("task") == "asr" and r.get("error") is None and r.get("reference")]
    if not scored:
        return None
    return corpus_wer([_transcript(r["reference"]) for r in scored], [r["text"] for r in scored])


def _transcript(reference: str | list[str]) -> str:
    """An ASR item's transcript: its reference, or the first of a list (the job stores lists)."""
    return reference if isinstance(reference, str) else reference[0]
