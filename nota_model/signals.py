"""What an answer says about how far to trust it, without a reference: its signals and its flags.

Signals are measured on the model's own output (and the VAD's view of the audio): the mean log-probability of
the answer's tokens, the compression ratio of its text (a looping answer compresses well: Whisper's own
repetition test), whether it ran to the token limit, and the share of the audio the VAD hears as speech. Flags
turn them into stable names a user can filter on, by the thresholds of the model config's `signals` section.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from nota_model.config import SignalsConfig

NO_SPEECH = "no_speech"  # the VAD heard no speech in speech recognition audio
REPETITION = "repetition"  # the answer's compression ratio is above `repetition_compression_ratio`
TOKEN_LIMIT = "token_limit"  # the answer (one of its pieces) ran to `decoding.max_new_tokens` without its stop token
LOW_CONFIDENCE = "low_confidence"  # the mean token log-probability is below `low_confidence_logprob`
FLAGS = (NO_SPEECH, REPETITION, TOKEN_LIMIT, LOW_CONFIDENCE)  # every flag, in the order a row lists them


@dataclass(frozen=True)
class PieceScore:
    """What the model gave for one piece, besides its text: its token count, the sum of the log-probabilities of
    its tokens and its stop token (None: the engine gave none), and whether it ran to the token limit."""

    text: str
    output_tokens: int
    logprob_sum: float | None
    token_limit: bool

    @property
    def scored_tokens(self) -> int:
        """The tokens `logprob_sum` covers: the answer's, and its stop token unless it ran to the limit."""
        return self.output_tokens + (not self.token_limit)


@dataclass(frozen=True)
class AnswerSignals:
    """An item's signals over all its pieces: the mean token log-probability (None where a piece has none, or
    no piece ran), the highest compression ratio of a piece's text (None without text), and whether a piece
    ran to the token limit."""

    mean_logprob: float | None
    compression_ratio: float | None
    token_limit: bool


def compression_ratio(text: str) -> float | None:
    """The text's UTF-8 bytes over their zlib-compressed bytes, as Whisper measures repetition; None for no text."""
    data = text.strip().encode()
    return len(data) / len(zlib.compress(data)) if data else None


def answer_signals(pieces: Sequence[PieceScore]) -> AnswerSignals:
    """The signals of an item answered in `pieces` (none for audio that never reached the model)."""
    sums = [piece.logprob_sum for piece in pieces]
    scored = sum(piece.scored_tokens for piece in pieces)
    mean = sum(sums) / scored if pieces and None not in sums and scored else None
    ratios = [ratio for piece in pieces if (ratio := compression_ratio(piece.text)) is not None]
    return AnswerSignals(mean, max(ratios, default=None), any(piece.token_limit for piece in pieces))


def flags(signals: AnswerSignals, speech_share: float | None, config: SignalsConfig) -> list[str]:
    """The flags an answer raises (FLAGS' order); `speech_share` None where the VAD did not listen (other tasks)."""
    raised = {
        NO_SPEECH: speech_share == 0.0,
        REPETITION: signals.compression_ratio is not None and signals.compression_ratio > config.repetition_compression_ratio,
        TOKEN_LIMIT: signals.token_limit,
        LOW_CONFIDENCE: signals.mean_logprob is not None and signals.mean_logprob < config.low_confidence_logprob,
    }
    return [name for name in FLAGS if raised[name]]
