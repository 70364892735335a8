"""The models' input features, from a clip and the model config alone (no weights): Whisper's log-mel and
CED's normalised mel spectrogram. CPU workers compute them (the job's decode tasks) and ship them to the
model, which then only runs its forwards.

Whisper's log-mel is computed over the frames the clip reaches only: every later frame up to 30 s sees
nothing but the silence Whisper pads with, and holds one value, `whisper_fill`. The features equal the
transformers feature extractor's on the clip padded to 30 s (to 1e-5; tests/nota_model/test_features.py).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from nota_model.audio import SAMPLE_RATE, AudioClip
from nota_model.ced import CEDFrontEnd, check_ced_length
from nota_model.config import WHISPER_MEL_FRAMES, AudioEncoderConfig, ModelConfig, NotaConfig

WHISPER_N_FFT = 400
WHISPER_HOP = 160
WHISPER_SAMPLES = WHISPER_MEL_FRAMES * WHISPER_HOP
# The log-mel's floor (power clamped at 1e-10) and its dynamic range, as Whisper computes it.
LOG_MEL_FLOOR = -10.0
LOG_MEL_RANGE = 8.0


@dataclass(frozen=True, eq=False)
class ModelFeatures:
    """One clip's features, float32 (float16 would cost the 1e-5 parity: the values are of order 1).
    `whisper`: (num_mel_bins, frames the clip reaches, at most 3000); `whisper_fill`: every later frame's
    value; `ced`: (n_mels, frames) for a model with a CED encoder, else None."""

    whisper: np.ndarray
    whisper_fill: float
    ced: np.ndarray | None = None

    def whisper_frames(self, frames: int = WHISPER_MEL_FRAMES) -> np.ndarray:
        """Whisper's log-mel cut, or padded with the fill, to `frames` (3000: the clip padded to 30 s)."""
        out = np.full((len(self.whisper), frames), self.whisper_fill, dtype=np.float32)
        kept = min(frames, self.whisper.shape[1])
        out[:, :kept] = self.whisper[:, :kept]
        return out

    def to_bytes(self) -> bytes:
        """A compact binary form (numpy's .npy arrays one after the other; no pickle)."""
        buffer = io.BytesIO()
        arrays = [self.whisper, np.float32(self.whisper_fill)] + ([] if self.ced is None else [self.ced])
        for array in arrays:
            np.save(buffer, array, allow_pickle=False)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelFeatures:
        buffer = io.BytesIO(data)
        whisper, fill = np.load(buffer), float(np.load(buffer))
        ced = np.load(buffer) if buffer.tell() < len(data) else None
        return cls(whisper=whisper, whisper_fill=fill, ced=ced)


def compute_features(clips: Sequence[AudioClip], config: ModelConfig) -> list[ModelFeatures]:
    """Each clip's features for the model `config` describes, each clip on its own.
    Raises AudioError (too_short) for a clip shorter than CED's one patch. The front ends compute in float32
    whatever autocast the caller runs under (training's validation runs under `run.amp`): a bfloat16 log-mel
    would be coarser than what the encoders were trained on."""
    mel_bins = config.num_mel_bins if config.model_kind == "whisper" else config.speech_encoder.num_mel_bins
    ced = _ced_config(config)
    with torch.autocast("cpu", enabled=False):
        return [ModelFeatures(*whisper_log_mel(clip.waveform, mel_bins), ced=None if ced is None else ced_mel(clip.waveform, ced))
                for clip in clips]


def check_feature_inputs(clips: Sequence[AudioClip], config: ModelConfig) -> None:
    """Raises the AudioError `compute_features` would for these clips, without computing any feature (for a
    run that writes no model output but must still name every clip the model could not take)."""
    ced = _ced_config(config)
    for clip in clips if ced is not None else ():
        check_ced_length(ced, len(clip.waveform))


def _ced_config(config: ModelConfig) -> AudioEncoderConfig | None:
    return config.audio_encoder if isinstance(config, NotaConfig) and config.audio_encoder.kind == "ced" else None


def whisper_log_mel(waveform: np.ndarray, num_mel_bins: int) -> tuple[np.ndarray, float]:
    """Whisper's log-mel of the first 30 s of `waveform` padded with silence to 30 s, as the frames the
    waveform reaches and the value of all later ones. The transformers extractor's torch computation,
    on those frames alone."""
    samples = min(len(waveform), WHISPER_SAMPLES)
    frames = min(WHISPER_MEL_FRAMES, -(-(samples + WHISPER_N_FFT // 2) // WHISPER_HOP))
    # Enough silence after the clip that no frame kept reaches the STFT's reflection at the end.
    padded = np.zeros(min(WHISPER_SAMPLES, frames * WHISPER_HOP + WHISPER_N_FFT), dtype=np.float32)
    padded[:samples] = waveform[:samples]
    stft = torch.stft(torch.from_numpy(padded), WHISPER_N_FFT, WHISPER_HOP, window=_hann_window(), return_complex=True)
    power = (stft[..., :frames].abs() ** 2).contiguous()
    log_mel = torch.clamp(_mel_filters(num_mel_bins) @ power, min=10.0**LOG_MEL_FLOOR).log10()
    # The later frames are silence, at the floor: the peak over all 3000 frames is that of these.
    floor = log_mel.max() - LOG_MEL_RANGE
    log_mel = (torch.maximum(log_mel, floor) + 4.0) / 4.0
    return log_mel.numpy(), float((torch.clamp(floor, min=LOG_MEL_FLOOR) + 4.0) / 4.0)


def ced_mel(waveform: np.ndarray, config: AudioEncoderConfig) -> np.ndarray:
    """CED's normalised log-mel of the clip: (n_mels, frames)."""
    check_ced_length(config, len(waveform))
    with torch.inference_mode():
        return _ced_front_end(config)(torch.from_numpy(waveform).unsqueeze(0))[0].numpy()


@lru_cache(maxsize=None)
def _mel_filters(num_mel_bins: int) -> torch.Tensor:
    extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE)
    return torch.from_numpy(extractor.mel_filters).float().T


@lru_cache(maxsize=1)
def _hann_window() -> torch.Tensor:
    return torch.hann_window(WHISPER_N_FFT)


@lru_cache(maxsize=8)
def _ced_front_end(config: AudioEncoderConfig) -> CEDFrontEnd:
    return CEDFrontEnd(config).eval()
