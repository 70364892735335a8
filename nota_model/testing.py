"""Inputs for tests and benchmarks that need no audio files: reproducible synthetic clips."""

from __future__ import annotations

import numpy as np

from nota_model.audio import AudioClip, prepare_waveform
from nota_model.config import AudioConfig


def synthetic_clip(seconds: float, seed: int = 0, sample_rate: int = 16000) -> AudioClip:
    """A reproducible clip with structure for the encoders: a chirp plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    samples = 0.3 * np.sin(2 * np.pi * (200 + 150 * seed) * t * (1 + t)) + 0.05 * rng.standard_normal(len(t))
    return prepare_waveform(samples.astype(np.float32), sample_rate, AudioConfig())
