"""Audio input: decode bytes or a file with libsndfile, make a 16 kHz mono clip, compute Whisper's log-mel.

Every failure is an `AudioError` whose `code` is one of: empty_audio, not_audio, unsupported_codec,
truncated_audio, invalid_audio, decode_failed, audio_too_long (from `decode_audio`) and missing_audio (from
`load_audio`).
"""

from __future__ import annotations

import io
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from transformers import WhisperFeatureExtractor

from nota_model.config import AudioConfig
from nota_model.errors import AudioError

SAMPLE_RATE = 16000

_READ_BLOCK_FRAMES = 1 << 16

# libsndfile's public error number for data it cannot identify (sndfile.h).
_SF_ERR_UNRECOGNISED_FORMAT = 1

# libsndfile's messages for a known container holding an encoding it cannot decode.
_UNSUPPORTED_ENCODING_MESSAGE = re.compile(
    r"unsupported encoding|unsupported compression|unimplemented format|unknown (encoding )?format|WAVPACK", re.I
)

# WAV format tags libsndfile 1.2 decodes; it calls a file with any other tag a "Malformed 'fmt ' chunk".
_DECODABLE_WAV_FORMAT_TAGS = frozenset({0x1, 0x2, 0x3, 0x6, 0x7, 0x11, 0x31, 0x38, 0x40, 0x55, 0xFFFE})

# A chunk size that streaming writers put in a WAV header when they do not know the length.
_UNKNOWN_CHUNK_SIZE = 0xFFFFFFFF

# Audio containers libsndfile does not read: (offset, leading bytes, name).
_UNREADABLE_CONTAINERS = (
    (4, b"ftyp", "MP4/M4A"),
    (0, b"\x1aE\xdf\xa3", "Matroska/WebM"),
    (0, b"0&\xb2u\x8ef\xcf\x11", "ASF/WMA"),
    (0, b"#!AMR", "AMR"),
)

# Shortfall tolerated between the frames a header promises and the frames decoded: four MPEG audio
# frames. Real, whole MP3s decode up to about two frames short of their Xing/LAME count (gapless
# trimming of encoder delay and padding); a cut file misses far more.
_FRAME_COUNT_SLACK = 4 * 1152


@dataclass(frozen=True, eq=False)
class AudioClip:
    """A clip ready for the encoders: mono float32 at 16 kHz, padded and truncated as its AudioConfig asks."""

    waveform: np.ndarray
    seconds: float
    original_seconds: float
    original_sample_rate: int
    original_channels: int
    truncated: bool
    padded: bool

    def metadata(self) -> dict[str, float | int | bool]:
        """Every field but the waveform, for output rows."""
        return {field.name: getattr(self, field.name) for field in fields(self) if field.name != "waveform"}


def load_audio(
    source: bytes | str | os.PathLike, config: AudioConfig, name: str | None = None, whole: bool = False
) -> AudioClip:
    """Decode the bytes, or the file at a local path, and prepare the clip as `config` asks.
    `name` (a file name or URL) lends its extension to formats libsndfile cannot tell from their bytes.
    `whole`: keep the whole recording, up to `config.max_recording_seconds` (for segmentation), instead of
    truncating it to `config.max_seconds`."""
    max_seconds = config.max_recording_seconds if whole else None
    if isinstance(source, bytes):
        samples, sample_rate = decode_audio(source, name, max_seconds)
    else:
        samples, sample_rate = decode_audio(_read_file(source), name or os.fspath(source), max_seconds)
    return prepare_waveform(samples, sample_rate, config, truncate=not whole)


def decode_audio(data: bytes, name: str | None = None, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode any format libsndfile reads into float32 samples of shape (frames, channels) and the sample rate.
    Where the bytes alone are not recognised, `name`'s extension is tried (libsndfile does so for paths: an MP3
    whose ID3 tag is malformed is found only by its extension).

    Raises AudioError with code:
    - empty_audio: `data` is zero bytes, or decodes to zero frames and is not cut (a cut file is truncated_audio).
    - not_audio: libsndfile recognises no format in `data`.
    - unsupported_codec: a container libsndfile knows with an encoding it cannot decode (a WAV format tag it lacks,
      an unknown WAVE_FORMAT_EXTENSIBLE subformat, ...), or an audio container it does not read at all (MP4/M4A,
      WebM, WMA, AMR).
    - truncated_audio: the data ends before the audio its header promises: a WAV chunk runs past the end of the
      data, an Ogg stream stops inside a page, decoding raises partway (a cut FLAC) or yields more than one MPEG
      frame fewer than the header's count (a cut MP3 with a Xing/LAME header, a corrupt Ogg).
    - invalid_audio: a sample is NaN or infinite.
    - decode_failed: any other libsndfile error; the message carries libsndfile's text.
    - audio_too_long: the audio lasts more than `max_seconds` (by its header, before decoding, or decoded).

    Partial decodes that cannot be told apart from whole files are returned as they are: an MP3 without a
    Xing/LAME header (libsndfile estimates its length from the file size, so a cut one looks whole) and an Ogg
    stream cut exactly at a page boundary.
    """
    if not data:
        raise AudioError("empty_audio", "the audio is zero bytes")
    samples, sample_rate, promised_frames = _read_samples(data, Path(name or "").suffix, max_seconds)
    if _wav_is_cut(data):
        raise AudioError("truncated_audio", "a WAV chunk runs past the end of the data: the file is cut")
    if _ogg_is_cut(data):
        raise AudioError("truncated_audio", "the Ogg stream stops inside a page: the file is cut")
    if len(samples) + _FRAME_COUNT_SLACK < promised_frames:
        raise AudioError(
            "truncated_audio",
            f"decoded only {len(samples)} of the {promised_frames} frames its header promises: it is cut or corrupt",
        )
    if len(samples) == 0:
        raise AudioError("empty_audio", "the audio decodes to zero frames")
    if not np.isfinite(samples).all():
        raise AudioError("invalid_audio", "the audio has NaN or infinite samples")
    return samples, sample_rate


def prepare_waveform(samples: np.ndarray, sample_rate: int, config: AudioConfig, truncate: bool = True) -> AudioClip:
    """Make the clip the encoders take, in the seed's order: mono as `config.channel_mode` says, zero-padded at
    the end to `config.min_seconds` at the original rate, resampled to 16 kHz (soxr "HQ"), truncated to
    `config.max_seconds` unless `truncate` is False. `samples` is (frames, channels) or (frames,)."""
    samples = np.asarray(samples, dtype=np.float32)
    frames = samples[:, None] if samples.ndim == 1 else samples
    mono = frames.mean(axis=1) if config.channel_mode == "mean" else frames[:, 0]

    min_frames = round(config.min_seconds * sample_rate)
    padded = len(mono) < min_frames
    if padded:
        mono = np.pad(mono, (0, min_frames - len(mono)))

    if sample_rate == SAMPLE_RATE:
        resampled = mono
    else:
        resampled = soxr.resample(np.ascontiguousarray(mono), sample_rate, SAMPLE_RATE, quality="HQ")

    max_samples = round(config.max_seconds * SAMPLE_RATE) if truncate else len(resampled)
    waveform = np.array(resampled[:max_samples], dtype=np.float32)
    return AudioClip(
        waveform=waveform,
        seconds=len(waveform) / SAMPLE_RATE,
        original_seconds=len(frames) / sample_rate,
        original_sample_rate=int(sample_rate),
        original_channels=frames.shape[1],
        truncated=len(resampled) > max_samples,
        padded=padded,
    )


def whisper_features(clips: Sequence[AudioClip], num_mel_bins: int) -> torch.Tensor:
    """Whisper's log-mel of each clip padded with silence to 30 s: float32 (len(clips), num_mel_bins, 3000).

    Each clip is computed alone: the log-mel is clamped to the clip's own maximum minus 8, so a clip's features
    must not depend on its batch-mates."""
    extractor = _feature_extractor(num_mel_bins)
    if not clips:
        return torch.zeros((0, num_mel_bins, extractor.nb_max_frames))
    features = [
        extractor(clip.waveform, sampling_rate=SAMPLE_RATE, padding="max_length", return_tensors="np").input_features[0]
        for clip in clips
    ]
    return torch.from_numpy(np.stack(features))


@lru_cache(maxsize=None)
def _feature_extractor(num_mel_bins: int) -> WhisperFeatureExtractor:
    # Right padding is explicit: a side inherited from a tokenizer that pads left would put the silence first.
    return WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE, padding_side="right")


def _read_file(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise AudioError("missing_audio", f"cannot read audio file {os.fspath(path)!r}: {err.strerror}") from err


def _read_samples(data: bytes, suffix: str, max_seconds: float | None) -> tuple[np.ndarray, int, int]:
    """Samples, sample rate and the frame count the header promises; refused over `max_seconds` (None: no limit)."""
    with _open_sound(data, suffix) as sound:
        max_frames = None if max_seconds is None else math.floor(max_seconds * sound.samplerate)
        if max_frames is not None and sound.frames > max_frames:
            raise _too_long(sound.frames / sound.samplerate, max_seconds)
        try:
            samples = _read_blocks(sound, max_frames)
        except sf.LibsndfileError as err:
            raise AudioError(
                "truncated_audio",
                f"decoding broke off before the {sound.frames} frames the header promises: {err.error_string}",
            ) from err
        if max_frames is not None and len(samples) > max_frames:
            raise _too_long(len(samples) / sound.samplerate, max_seconds)
        return samples, sound.samplerate, sound.frames


def _too_long(seconds: float, max_seconds: float) -> AudioError:
    return AudioError(
        "audio_too_long", f"the audio lasts {seconds:.0f} s, over the {max_seconds:.0f} s limit (audio.max_recording_seconds)"
    )


def _open_sound(data: bytes, suffix: str) -> sf.SoundFile:
    try:
        return sf.SoundFile(io.BytesIO(data))
    except sf.LibsndfileError as err:
        if err.code != _SF_ERR_UNRECOGNISED_FORMAT or not suffix:
            raise _open_error(err, data) from err
        return _open_by_extension(data, suffix, err)


def _open_by_extension(data: bytes, suffix: str, error: sf.LibsndfileError) -> sf.SoundFile:
    # libsndfile falls back on the extension only when it opens a path. The open file outlives its name.
    with tempfile.NamedTemporaryFile(suffix=suffix) as file:
        file.write(data)
        file.flush()
        try:
            return sf.SoundFile(file.name)
        except sf.LibsndfileError:
            raise _open_error(error, data) from error


def _read_blocks(sound: sf.SoundFile, max_frames: int | None) -> np.ndarray:
    # Block by block, so that a header promising absurdly many frames does not allocate them up front, and
    # reading stops one block past `max_frames` when the header understates the length.
    blocks, frames = [], 0
    while (max_frames is None or frames <= max_frames) and len(block := sound.read(_READ_BLOCK_FRAMES, dtype="float32", always_2d=True)):
        blocks.append(block)
        frames += len(block)
    return np.concatenate(blocks) if blocks else np.zeros((0, sound.channels), dtype=np.float32)


def _open_error(err: sf.LibsndfileError, data: bytes) -> AudioError:
    reason = err.error_string
    if err.code == _SF_ERR_UNRECOGNISED_FORMAT:
        container = _unreadable_container(data)
        if container:
            return AudioError("unsupported_codec", f"libsndfile cannot read {container}; convert it to WAV or FLAC")
        return AudioError("not_audio", f"libsndfile recognises no audio format in the data: {reason}")
    if _wav_is_cut(data) or _ogg_is_cut(data):
        return AudioError("truncated_audio", f"the file is cut: {reason}")
    format_tag = _wav_format_tag(data)
    if format_tag is not None and format_tag not in _DECODABLE_WAV_FORMAT_TAGS:
        return AudioError("unsupported_codec", f"libsndfile cannot decode WAV format tag 0x{format_tag:04X}")
    if _UNSUPPORTED_ENCODING_MESSAGE.search(reason):
        return AudioError("unsupported_codec", f"libsndfile cannot decode the encoding: {reason}")
    return AudioError("decode_failed", f"libsndfile cannot decode the audio: {reason}")


def _unreadable_container(data: bytes) -> str | None:
    return next((name for offset, magic, name in _UNREADABLE_CONTAINERS if data[offset:].startswith(magic)), None)


def _riff_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(id, payload offset, declared size) of each chunk of a RIFF/WAVE file; empty for other data."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return []
    chunks = []
    offset = 12
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset + 4 : offset + 8], "little")
        chunks.append((data[offset : offset + 4], offset + 8, size))
        offset += 8 + size + size % 2
    return chunks


def _wav_is_cut(data: bytes) -> bool:
    """Whether a chunk up to the data chunk runs past the end: libsndfile silently shortens such a WAV.
    Chunks after the data chunk hold only metadata."""
    for chunk_id, start, size in _riff_chunks(data):
        if size != _UNKNOWN_CHUNK_SIZE and start + size > len(data):
            return True
        if chunk_id == b"data":
            return False
    return False


def _wav_format_tag(data: bytes) -> int | None:
    for chunk_id, start, size in _riff_chunks(data):
        if chunk_id == b"fmt " and size >= 2:
            return int.from_bytes(data[start : start + 2], "little")
    return None


def _ogg_is_cut(data: bytes) -> bool:
    """Whether an Ogg stream stops inside a page (trailing bytes that do not begin a page are not a cut)."""
    if not data.startswith(b"OggS"):
        return False
    offset = 0
    while data.startswith(b"OggS", offset) and offset + 27 <= len(data):
        segment_table_end = offset + 27 + data[offset + 26]
        offset = segment_table_end + sum(data[offset + 27 : segment_table_end])
    rest = data[offset:]
    return offset > len(data) or (0 < len(rest) < 27 and b"OggS".startswith(rest[:4]))
