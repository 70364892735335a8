"""Long recordings cut into pieces that fit the model's window.

Speech (task `asr`) is cut at pauses that Silero VAD finds (the `silero-vad` package ships its model, so
nothing is downloaded), and neighbouring speech is merged back into pieces of up to the window, as WhisperX
and faster-whisper's batched pipeline do; speech longer than the window with no pause is split at its
quietest point (Silero's own rule), else at the window. Other tasks (captioning) are cut into fixed windows.
Audio that fits the window stays one piece, the whole clip. Speech audio of any length is heard by the VAD, which
gives its speech share (a signal of the row) and keeps audio without speech from the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from nota_model.audio import SAMPLE_RATE

if TYPE_CHECKING:
    import onnxruntime

SPEECH_TASK = "asr"

# (start, end) sample of a piece at 16 kHz, end excluded.
Piece = tuple[int, int]

# Silero's defaults but for the padding kept around speech: a fifth of a second, so that no word's onset or
# trailing consonant is cut. Pieces merged from neighbouring spans also keep the pauses between them.
SPEECH_PAD_MS = 200
MIN_SILENCE_MS = 100

# Silero's model hears 32 ms windows at 16 kHz, each with the 64 samples before it, and carries a state between them.
VAD_WINDOW = 512
VAD_CONTEXT = 64
VAD_STATE_SHAPE = (2, 1, 128)


@dataclass(frozen=True)
class PiecePlan:
    """The pieces the model is to run of a recording, and the share of its samples in the VAD's speech spans
    (each widened as the pieces are; None where the VAD did not listen: tasks other than speech recognition)."""

    pieces: list[Piece]
    speech_share: float | None


def plan_pieces(waveform: np.ndarray, task: str, window_seconds: float, skip_silence: bool = True) -> PiecePlan:
    """The pieces to run for a 16 kHz mono waveform. Speech (`asr`): none where the VAD hears no speech (with
    `skip_silence`; a recording over the window gets none either way), else the whole clip when it fits the
    window, else the speech cut into pieces. Other tasks: the whole clip, or fixed windows."""
    window = round(window_seconds * SAMPLE_RATE)
    if task != SPEECH_TASK:
        return PiecePlan([(0, len(waveform))] if len(waveform) <= window else fixed_windows(len(waveform), window), None)
    spans = speech_spans(waveform, window_seconds)
    share = sum(end - start for start, end in spans) / len(waveform)
    if len(waveform) > window:
        return PiecePlan(merge_spans(spans, window), share)
    return PiecePlan([] if skip_silence and not spans else [(0, len(waveform))], share)


def fixed_windows(length: int, window: int) -> list[Piece]:
    return [(start, min(start + window, length)) for start in range(0, length, window)]


def speech_spans(waveform: np.ndarray, max_seconds: float, pad_ms: int = SPEECH_PAD_MS) -> list[Piece]:
    """Where Silero VAD hears speech in a 16 kHz waveform, each span at most `max_seconds` long and widened
    by `pad_ms` on each side."""
    session, spans_from_probabilities = _silero()
    timestamps = spans_from_probabilities(
        speech_probabilities(session, waveform),
        sampling_rate=SAMPLE_RATE,
        max_speech_duration_s=max_seconds,
        min_silence_duration_ms=MIN_SILENCE_MS,
        speech_pad_ms=pad_ms,
        audio_length_samples=len(waveform),
    )
    return [(span["start"], span["end"]) for span in timestamps]


def speech_probabilities(session: onnxruntime.InferenceSession, waveform: np.ndarray) -> list[float]:
    """Silero's speech probability for each window of a 16 kHz waveform (the last one zero-padded), as its
    `get_speech_timestamps` computes them, but asked of its ONNX session directly: the package's wrapper turns
    every 32 ms window into torch tensors and back, about a quarter of the VAD's time (benchmarks/README.md). The
    model's state and each window's context are this call's own, so threads may share the session."""
    windows = -(-len(waveform) // VAD_WINDOW)
    padded = np.zeros(VAD_CONTEXT + windows * VAD_WINDOW, dtype=np.float32)
    padded[VAD_CONTEXT : VAD_CONTEXT + len(waveform)] = waveform
    state = np.zeros(VAD_STATE_SHAPE, dtype=np.float32)
    rate = np.array(SAMPLE_RATE, dtype=np.int64)
    probabilities = []
    for start in range(0, windows * VAD_WINDOW, VAD_WINDOW):
        window = padded[None, start : start + VAD_CONTEXT + VAD_WINDOW]
        probability, state = session.run(None, {"input": window, "state": state, "sr": rate})
        probabilities.append(float(probability[0, 0]))
    return probabilities


def merge_spans(spans: list[Piece], window: int) -> list[Piece]:
    """Neighbouring spans joined while the piece from the first one's start to the last one's end fits the
    window; the pauses inside a piece stay in it."""
    pieces: list[Piece] = []
    for start, end in spans:
        if pieces and end - pieces[-1][0] <= window:
            pieces[-1] = (pieces[-1][0], end)
        else:
            pieces.append((start, end))
    return pieces


@lru_cache(maxsize=1)
def _silero() -> tuple[onnxruntime.InferenceSession, Callable[..., list[dict[str, int]]]]:
    """Silero's model (the package's ONNX file on onnxruntime, one thread: it takes less CPU a window than its
    TorchScript twin, measured in benchmarks/README.md) and its span finder over the windows' probabilities."""
    threads = torch.get_num_threads()
    from silero_vad import load_silero_vad  # importing it sets torch to one thread: the caller keeps its own
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    torch.set_num_threads(threads)
    return load_silero_vad(onnx=True).session, get_speech_timestamps_from_probs
