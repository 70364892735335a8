"""Long recordings through any model's batched `generate` (the NOTA model, Whisper on either engine).

Each item comes with its pieces (`nota_model.segment.plan_pieces`). The pieces of all items fill the model's
batches together, longest first, so that a long item shares batches with the others rather than running
alone; the answers are put back in each item's order and stitched, with their signals (`nota_model.signals`).
An item whose piece is the whole clip gets exactly what `generate` gives for that clip; an item with no piece
(silence) gets an empty answer without running the model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from statistics import fmean
from typing import Any

import numpy as np

from nota_model.audio import SAMPLE_RATE, AudioClip
from nota_model.config import DecodingConfig, ModelConfig
from nota_model.decoding import GenerationOutput
from nota_model.features import ModelFeatures, check_feature_inputs, compute_features
from nota_model.segment import Piece
from nota_model.signals import AnswerSignals, PieceScore, answer_signals
from nota_model.word_times import Word


@dataclass(frozen=True)
class Segment:
    """One piece of an item: its start and end in seconds of the 16 kHz clip, and the model's answer."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class PieceAnswer(PieceScore):
    """The model's answer to one piece (`GenerationOutput`'s fields for one item: its text, tokens, log-probability
    and whether it ran to the token limit, a `PieceScore`), and its batch's size."""

    batch_size: int
    non_finite: bool
    language: str | None
    language_probability: float | None
    words: list[Word] | None  # times in seconds of the piece


@dataclass(frozen=True)
class ItemAnswer:
    """An item's answer, its pieces' stitched. `language`: the language of most of its pieces' audio, and
    `language_probability` its mean over those pieces, weighted by their length; `words`: its pieces' words, in
    seconds of the recording. All three None where the model gives none or no piece ran (silence)."""

    text: str
    segments: list[Segment]
    output_tokens: int
    batch_size: int | None  # pieces in the largest model batch that ran one of this item's pieces
    signals: AnswerSignals
    non_finite: bool = False  # a piece's scores held NaN or +inf (decoding.NonFiniteScores)
    language: str | None = None
    language_probability: float | None = None
    words: list[Word] | None = None


@dataclass(frozen=True)
class LongFormOutput:
    """Answers in item order, and the timing of the model batches that made them (None when none ran)."""

    answers: list[ItemAnswer]
    ttft_s: float | None
    tpot_s: float | None
    model_batches: int


def generate_pieces(
    model: Any,
    clips: Sequence[AudioClip],
    prompts: Sequence[str],
    pieces: Sequence[Sequence[Piece]],
    batch_size: int,
    decoding: DecodingConfig | None = None,
    features: Sequence[Sequence[ModelFeatures]] | None = None,
) -> LongFormOutput:
    """Run every piece of every item in model batches of up to `batch_size` pieces, longest pieces first.
    `features`: each item's pieces' features (`piece_features`), when computed elsewhere (the job's decode
    tasks). `ttft_s` and `tpot_s` are the means over the model batches."""
    work = [(item, number, piece) for item, item_pieces in enumerate(pieces) for number, piece in enumerate(item_pieces)]
    order = sorted(range(len(work)), key=lambda index: work[index][2][1] - work[index][2][0], reverse=True)
    min_samples = round(model.config.audio.min_seconds * SAMPLE_RATE)
    decoding = decoding or model.config.decoding
    answers: list[PieceAnswer | None] = [None] * len(work)
    ttfts, tpots = [], []
    for first in range(0, len(order), batch_size):
        indices = order[first : first + batch_size]
        batch = [work[index] for index in indices]
        output = model.generate(
            [piece_clip(clips[item], piece, min_samples) for item, _, piece in batch],
            [prompts[item] for item, _, _ in batch],
            decoding,
            features=None if features is None else [features[item][number] for item, number, _ in batch],
        )
        ttfts.append(output.ttft_s)
        tpots += [output.tpot_s] if output.tpot_s is not None else []
        for position, index in enumerate(indices):
            answers[index] = _piece_answer(output, position, len(batch), decoding.max_new_tokens)
    by_item: list[list[tuple[Piece, PieceAnswer]]] = [[] for _ in clips]
    for (item, _, piece), answer in zip(work, answers):
        by_item[item].append((piece, answer))
    return LongFormOutput(
        answers=[_item_answer(item_answers, clip.original_seconds) for item_answers, clip in zip(by_item, clips)],
        ttft_s=fmean(ttfts) if ttfts else None,
        tpot_s=fmean(tpots) if tpots else None,
        model_batches=len(ttfts),
    )


def _piece_answer(output: GenerationOutput, position: int, batch_size: int, max_new_tokens: int) -> PieceAnswer:
    """The answer at `position` of a model batch's output; a piece that gave `max_new_tokens` tokens ran to the
    limit (a stop token would have been one of them)."""
    def of(values: tuple, missing: object = None) -> object:
        return values[position] if values else missing

    return PieceAnswer(
        text=output.texts[position],
        output_tokens=output.output_tokens[position],
        logprob_sum=of(output.logprob_sums),
        token_limit=output.output_tokens[position] >= max_new_tokens,
        batch_size=batch_size,
        non_finite=bool(of(output.non_finite, False)),
        language=of(output.languages),
        language_probability=of(output.language_probabilities),
        words=of(output.words),
    )


def piece_clip(clip: AudioClip, piece: Piece, min_samples: int) -> AudioClip:
    """The clip the model gets for a piece: the clip itself when the piece is all of it, else its samples,
    zero-padded to `min_samples` as a short recording is."""
    start, end = piece
    if (start, end) == (0, len(clip.waveform)):
        return clip
    waveform = clip.waveform[start:end]
    padded = len(waveform) < min_samples
    if padded:
        waveform = np.pad(waveform, (0, min_samples - len(waveform)))
    return replace(clip, waveform=waveform, seconds=len(waveform) / SAMPLE_RATE, truncated=False, padded=padded)


def piece_features(clip: AudioClip, pieces: Sequence[Piece], config: ModelConfig) -> list[ModelFeatures]:
    """The model's features of each piece of a clip, as `generate_pieces` runs them."""
    return compute_features(_piece_clips(clip, pieces, config), config)


def check_pieces(clip: AudioClip, pieces: Sequence[Piece], config: ModelConfig) -> None:
    """Raises the AudioError `piece_features` would, without computing the features."""
    check_feature_inputs(_piece_clips(clip, pieces, config), config)


def _piece_clips(clip: AudioClip, pieces: Sequence[Piece], config: ModelConfig) -> list[AudioClip]:
    min_samples = round(config.audio.min_seconds * SAMPLE_RATE)
    return [piece_clip(clip, piece, min_samples) for piece in pieces]


def stitch(texts: Sequence[str]) -> str:
    """One answer from the pieces' answers in order: a single piece's as it is, else the stripped, non-empty
    answers joined by spaces."""
    if len(texts) == 1:
        return texts[0]
    return " ".join(text.strip() for text in texts if text.strip())


def _item_answer(piece_answers: list[tuple[Piece, PieceAnswer]], audio_seconds: float) -> ItemAnswer:
    segments = [Segment(start / SAMPLE_RATE, end / SAMPLE_RATE, answer.text) for (start, end), answer in piece_answers]
    language, probability = _language(piece_answers)
    return ItemAnswer(
        text=stitch([segment.text for segment in segments]),
        segments=segments,
        output_tokens=sum(answer.output_tokens for _, answer in piece_answers),
        batch_size=max((answer.batch_size for _, answer in piece_answers), default=None),
        signals=answer_signals([answer for _, answer in piece_answers]),
        non_finite=any(answer.non_finite for _, answer in piece_answers),
        language=language,
        language_probability=probability,
        words=_recording_words(piece_answers, audio_seconds),
    )


def _language(piece_answers: list[tuple[Piece, PieceAnswer]]) -> tuple[str | None, float | None]:
    """The language of most of the pieces' audio, and its probability's mean over those pieces, weighted by their
    length (a single piece's own)."""
    samples: Counter[str] = Counter()
    for (start, end), answer in piece_answers:
        if answer.language is not None:
            samples[answer.language] += end - start
    if not samples:
        return None, None
    language = samples.most_common(1)[0][0]
    weighted = [(end - start, answer.language_probability) for (start, end), answer in piece_answers
                if answer.language == language and answer.language_probability is not None]
    total = sum(weight for weight, _ in weighted)
    return language, (sum(weight * probability for weight, probability in weighted) / total if weighted else None)


def _recording_words(piece_answers: list[tuple[Piece, PieceAnswer]], audio_seconds: float) -> list[Word] | None:
    """The pieces' words in seconds of the recording, each kept inside its piece and the audio (a piece padded to
    the model's minimum length has no words in its padding); None where the model gave none."""
    if not piece_answers or any(answer.words is None for _, answer in piece_answers):
        return None
    return [word.shifted(start / SAMPLE_RATE, min(end / SAMPLE_RATE, audio_seconds))
            for (start, end), answer in piece_answers for word in answer.words]
