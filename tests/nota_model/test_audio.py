import io
import json
import struct

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor

from nota_model.audio import SAMPLE_RATE, AudioClip, decode_audio, load_audio, prepare_waveform, whisper_features
from nota_model.config import AudioConfig
from jobs.samples import default_dest, fetch_animals, fetch_librivox
from nota_model.errors import AudioError

CONFIG = AudioConfig()


def sine(frequency: float, seconds: float, sample_rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def encode(samples: np.ndarray, sample_rate: int, format: str = "WAV", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format=format, subtype=subtype)
    return buffer.getvalue()


def peak_frequency(waveform: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(waveform))
    return np.argmax(spectrum) * sample_rate / len(waveform)


def wav_bytes(format_tag: int, fmt_extra: bytes = b"", payload: bytes = bytes(3200), sample_rate: int = 16000) -> bytes:
    """A mono 16-bit RIFF/WAVE file with the given format tag, built by hand."""
    fmt = struct.pack("<HHIIHH", format_tag, 1, sample_rate, sample_rate * 2, 2, 16)
    if fmt_extra:
        fmt += struct.pack("<H", len(fmt_extra)) + fmt_extra
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def error_code(source, config: AudioConfig = CONFIG) -> str:
    with pytest.raises(AudioError) as caught:
        load_audio(source, config)
    return caught.value.code


needs_mp3 = pytest.mark.skipif("MP3" not in sf.available_formats(), reason="this libsndfile cannot write MP3")

FORMATS = [
    pytest.param("WAV", "PCM_16", id="wav-pcm16"),
    pytest.param("WAV", "FLOAT", id="wav-float"),
    pytest.param("FLAC", None, id="flac"),
    pytest.param("OGG", "VORBIS", id="ogg-vorbis"),
    pytest.param("OGG", "OPUS", id="ogg-opus"),
    pytest.param("MP3", None, id="mp3", marks=needs_mp3),
]


@pytest.mark.parametrize("format, subtype", FORMATS)
def test_every_format_decodes_to_the_signal(format, subtype):
    signal = sine(440, 2.0, 16000)
    samples, sample_rate = decode_audio(encode(signal, 16000, format, subtype))
    assert sample_rate == 16000
    assert samples.dtype == np.float32 and samples.shape == (len(signal), 1)
    assert abs(peak_frequency(samples[:, 0], sample_rate) - 440) < 1
    if format in ("WAV", "FLAC"):
        np.testing.assert_allclose(samples[:, 0], signal, atol=1e-4)


def test_path_and_bytes_give_the_same_clip(tmp_path):
    data = encode(sine(440, 2.0, 16000), 16000, "FLAC")
    path = tmp_path / "clip.flac"
    path.write_bytes(data)
    from_path, from_bytes = load_audio(path, CONFIG), load_audio(str(path), CONFIG)
    np.testing.assert_array_equal(from_path.waveform, load_audio(data, CONFIG).waveform)
    assert from_path.metadata() == from_bytes.metadata()


def test_a_clip_at_16k_passes_unchanged():
    signal = sine(440, 2.0, 16000)
    clip = load_audio(encode(signal, 16000, subtype="FLOAT"), CONFIG)
    np.testing.assert_array_equal(clip.waveform, signal)
    assert clip.metadata() == {
        "seconds": 2.0,
        "original_seconds": 2.0,
        "original_sample_rate": 16000,
        "original_channels": 1,
        "truncated": False,
        "padded": False,
    }


def test_a_short_clip_is_padded_with_zeros_at_the_end():
    signal = sine(440, 0.1, 16000)
    clip = load_audio(encode(signal, 16000, subtype="FLOAT"), CONFIG)
    assert clip.padded and not clip.truncated
    assert len(clip.waveform) == SAMPLE_RATE and clip.seconds == 1.0
    assert clip.original_seconds == pytest.approx(0.1)
    np.testing.assert_array_equal(clip.waveform[: len(signal)], signal)
    assert not clip.waveform[len(signal) :].any()


def test_a_short_clip_at_another_rate_is_padded_before_resampling():
    clip = load_audio(encode(sine(440, 0.1, 44100), 44100), CONFIG)
    assert clip.padded and len(clip.waveform) == SAMPLE_RATE


def test_stereo_mean_and_first_channel():
    signal = sine(440, 1.0, 16000)
    stereo = np.stack([signal, np.zeros_like(signal)], axis=1)
    data = encode(stereo, 16000, subtype="FLOAT")
    mean = load_audio(data, CONFIG)
    first = load_audio(data, AudioConfig(channel_mode="first"))
    np.testing.assert_array_equal(first.waveform, signal)
    np.testing.assert_allclose(mean.waveform, signal / 2, atol=1e-7)
    assert mean.original_channels == first.original_channels == 2


def test_six_channels():
    levels = np.arange(6, dtype=np.float32) / 10
    data = encode(np.tile(levels, (16000, 1)), 16000, subtype="FLOAT")
    mean = load_audio(data, CONFIG)
    first = load_audio(data, AudioConfig(channel_mode="first"))
    assert mean.original_channels == 6
    np.testing.assert_allclose(mean.waveform, levels.mean(), atol=1e-6)
    assert not first.waveform.any()


@pytest.mark.parametrize("sample_rate", [8000, 22050, 44100, 48000])
def test_resampling_keeps_length_and_frequency(sample_rate):
    clip = load_audio(encode(sine(1000, 2.0, sample_rate), sample_rate, subtype="FLOAT"), CONFIG)
    assert abs(len(clip.waveform) - 2 * SAMPLE_RATE) <= 1
    assert abs(peak_frequency(clip.waveform, SAMPLE_RATE) - 1000) < 1
    assert clip.original_sample_rate == sample_rate and clip.original_seconds == pytest.approx(2.0)
    assert clip.waveform.dtype == np.float32


def test_a_long_clip_is_truncated_to_30_seconds():
    clip = load_audio(encode(sine(440, 60.0, 16000), 16000), CONFIG)
    assert clip.truncated and not clip.padded
    assert len(clip.waveform) == 480000 and clip.seconds == 30.0
    assert clip.original_seconds == 60.0


def test_a_long_stereo_clip_at_44k_is_resampled_then_truncated():
    signal = sine(1000, 45.0, 44100)
    clip = load_audio(encode(np.stack([signal, signal], axis=1), 44100), CONFIG)
    assert clip.truncated and len(clip.waveform) == 480000
    assert abs(peak_frequency(clip.waveform, SAMPLE_RATE) - 1000) < 1


def test_prepare_waveform_takes_1d_float64_samples():
    clip = prepare_waveform(sine(440, 0.5, 8000).astype(np.float64), 8000, CONFIG)
    assert clip.waveform.dtype == np.float32 and clip.waveform.flags.c_contiguous
    assert clip.original_channels == 1 and clip.padded and len(clip.waveform) == SAMPLE_RATE


def test_empty_audio():
    assert error_code(b"") == "empty_audio"
    assert error_code(encode(np.zeros((0, 1), np.float32), 16000)) == "empty_audio"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(np.random.default_rng(0).bytes(4000), id="random"),
        pytest.param(b"hello, this is a plain text file\n" * 20, id="text"),
        pytest.param(b'{"audio": "not really", "seconds": 3}', id="json"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + bytes(200), id="png"),
    ],
)
def test_not_audio(data):
    assert error_code(data) == "not_audio"


def test_a_text_file_on_disk_is_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("these are notes, not audio\n" * 10)
    assert error_code(path) == "not_audio"


def test_a_wav_format_tag_libsndfile_lacks_is_unsupported():
    with pytest.raises(AudioError) as caught:
        decode_audio(wav_bytes(0x2000))
    assert caught.value.code == "unsupported_codec" and "0x2000" in caught.value.message


def test_an_unknown_wave_format_extensible_subformat_is_unsupported():
    extensible = struct.pack("<HI", 16, 4) + bytes(range(16))
    assert error_code(wav_bytes(0xFFFE, extensible)) == "unsupported_codec"


def test_an_mp4_container_is_unsupported_not_garbage():
    assert error_code(b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00" + bytes(200)) == "unsupported_codec"


def test_a_wav_cut_in_the_middle_is_truncated():
    data = encode(sine(440, 2.0, 16000), 16000)
    assert error_code(data[: len(data) // 2]) == "truncated_audio"
    assert error_code(data[:-1]) == "truncated_audio"


def test_a_wav_cut_inside_its_header_is_truncated():
    data = encode(sine(440, 2.0, 16000), 16000, subtype="FLOAT")
    assert error_code(data[:30]) == "truncated_audio"


def test_a_wav_cut_right_after_its_header_is_truncated_not_empty():
    data = encode(sine(440, 2.0, 16000), 16000)
    assert error_code(data[:44]) == "truncated_audio"


def test_a_flac_cut_in_the_middle_is_truncated():
    data = encode(sine(440, 2.0, 16000), 16000, "FLAC")
    assert error_code(data[: len(data) // 2]) == "truncated_audio"


def test_a_header_promising_absurdly_many_frames_is_truncated_not_a_memory_error():
    data = bytearray(encode(sine(440, 1.0, 16000), 16000, "FLAC"))
    data[21] |= 0x0F  # STREAMINFO's 36-bit frame count, bytes 21 (low nibble) to 25: 2**36 - 1 frames
    data[22:26] = b"\xff" * 4
    assert error_code(bytes(data)) == "truncated_audio"


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_an_ogg_cut_inside_a_page_is_truncated(keep):
    data = encode(sine(440, 2.0, 16000), 16000, "OGG", "VORBIS")
    assert error_code(data[: int(len(data) * keep)]) == "truncated_audio"


@needs_mp3
def test_an_mp3_with_a_xing_header_cut_in_the_middle_is_truncated():
    data = encode(sine(440, 2.0, 16000), 16000, "MP3")
    assert error_code(data[: len(data) // 2]) == "truncated_audio"


def test_a_streaming_wav_of_unknown_length_decodes_whole():
    data = bytearray(encode(sine(440, 1.0, 16000), 16000))
    data[4:8] = data[40:44] = b"\xff\xff\xff\xff"
    samples, _ = decode_audio(bytes(data))
    assert len(samples) == 16000


def test_a_cut_metadata_chunk_after_the_audio_does_not_reject_it():
    data = encode(sine(440, 1.0, 16000), 16000) + b"LIST" + struct.pack("<I", 1000) + b"INFO"
    samples, _ = decode_audio(data)
    assert len(samples) == 16000


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nan_or_inf_samples_are_invalid(bad_value):
    signal = sine(440, 1.0, 16000)
    signal[100] = bad_value
    assert error_code(encode(signal, 16000, subtype="FLOAT")) == "invalid_audio"


def test_other_libsndfile_errors_are_decode_failed():
    fmt_only = wav_bytes(0x0001)[:36]
    fmt_only = fmt_only[:4] + struct.pack("<I", len(fmt_only) - 8) + fmt_only[8:]
    with pytest.raises(AudioError) as caught:
        decode_audio(fmt_only)
    assert caught.value.code == "decode_failed" and "'data' chunk" in caught.value.message


def test_a_missing_path(tmp_path):
    path = tmp_path / "nowhere.wav"
    with pytest.raises(AudioError) as caught:
        load_audio(path, CONFIG)
    assert caught.value.code == "missing_audio" and str(path) in caught.value.message
    assert error_code(tmp_path) == "missing_audio"


def clips() -> list[AudioClip]:
    rng = np.random.default_rng(0)
    loud = prepare_waveform(rng.standard_normal(3 * 16000).astype(np.float32), 16000, CONFIG)
    quiet = prepare_waveform(sine(440, 0.5, 8000, amplitude=0.01), 8000, CONFIG)
    return [loud, quiet]


@pytest.mark.parametrize("num_mel_bins", [80, 128])
def test_whisper_features_match_the_feature_extractor_per_clip(num_mel_bins):
    batch = clips()
    features = whisper_features(batch, num_mel_bins)
    assert features.shape == (2, num_mel_bins, 3000) and features.dtype == torch.float32
    extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=16000, padding_side="right")
    for clip, clip_features in zip(batch, features):
        alone = whisper_features([clip], num_mel_bins)[0]
        direct = extractor(clip.waveform, sampling_rate=16000, padding="max_length", return_tensors="pt")
        assert torch.equal(clip_features, alone)
        assert torch.equal(clip_features, direct.input_features[0])


def test_whisper_features_pad_with_silence_after_the_clip():
    loud = clips()[0]
    features = whisper_features([loud], 80)[0]
    speech_frames, silence_frames = features[:, :250], features[:, 350:]
    assert speech_frames.mean() > silence_frames.mean() + 1
    assert torch.all(silence_frames == silence_frames.min())


def test_whisper_features_of_no_clips():
    assert whisper_features([], 128).shape == (0, 128, 3000)


@needs_mp3
def test_an_mp3_that_only_its_name_reveals_decodes_with_the_name():
    """An empty ID3 tag hides the MP3 from libsndfile's sniffing (as in the real horse.mp3 sample)."""
    hidden = b"ID3\x03\x00\x00\x00\x00\x00\x00" + encode(sine(440, 1.0, 48000), 48000, "MP3")
    assert error_code(hidden) == "not_audio"
    samples, sample_rate = decode_audio(hidden, "s3://bucket/horse.mp3")
    assert sample_rate == 48000 and abs(len(samples) - 48000) <= 1152
    with pytest.raises(AudioError, match="not_audio"):
        decode_audio(b"not audio at all", "clip.mp3")


def test_the_real_sample_clips_all_decode():
    """Among them rooster.mp3, whole but 2320 frames short of its Xing count (gapless trimming)."""
    for items in (fetch_librivox(default_dest()), fetch_animals(default_dest())):
        for line in items.read_text().splitlines():
            audio = json.loads(line)["audio"]
            clip = load_audio(audio, CONFIG)
            assert 0.9 < clip.original_seconds < 30 and clip.waveform.dtype == np.float32
