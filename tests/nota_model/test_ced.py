import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nota_model.ced import CEDAttention, CEDEncoder, hz_to_mel, melscale_fbanks, resize_position_embeddings
from nota_model.config import AudioEncoderConfig
from nota_model.errors import AudioError, ConfigError

SR = 16000
TINY = AudioEncoderConfig(embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def encoder() -> CEDEncoder:
    torch.manual_seed(0)
    model = CEDEncoder(TINY).eval()
    bn = model.init_bn[1]
    bn.running_mean.normal_(0.0, 0.3)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_(0.0, 0.1)
    return model


def _noise(samples: int, seed: int, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(samples, generator=torch.Generator().manual_seed(seed)) * scale


def _sine(samples: int, freq: float, amplitude: float) -> torch.Tensor:
    return amplitude * torch.sin(2 * math.pi * freq * torch.arange(samples) / SR)


def _reference_fbanks(n_freqs: int, f_min: float, f_max: float, n_mels: int) -> np.ndarray:
    freqs = np.linspace(0, SR // 2, n_freqs)
    mels = np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    centres = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    fb = np.zeros((n_freqs, n_mels))
    for m in range(n_mels):
        lower, centre, upper = centres[m : m + 3]
        rising = (freqs - lower) / (centre - lower)
        falling = (upper - freqs) / (upper - centre)
        fb[:, m] = np.maximum(0.0, np.minimum(rising, falling))
    return fb


def test_htk_mel_scale() -> None:
    assert hz_to_mel(0.0) == 0.0
    assert hz_to_mel(1000.0) == pytest.approx(2595.0 * math.log10(1.0 + 1000.0 / 700.0))
    assert hz_to_mel(1000.0) == pytest.approx(1000.0, abs=0.1)


def test_mel_filterbank_matches_reference_formula() -> None:
    fb = melscale_fbanks(257, 0.0, 8000.0, 64, SR)
    assert fb.shape == (257, 64) and fb.dtype == torch.float32
    np.testing.assert_allclose(fb.numpy(), _reference_fbanks(257, 0.0, 8000.0, 64), atol=1e-5)
    assert torch.all(fb >= 0) and torch.all(fb <= 1)
    # Each triangle peaks (at 1 on its centre frequency) in one of the two FFT bins around its centre.
    centres_hz = 700.0 * (10.0 ** (np.linspace(0.0, hz_to_mel(8000.0), 66)[1:-1] / 2595.0) - 1.0)
    centre_bins = centres_hz / (SR / 512)
    peak_bins = fb.argmax(dim=0).numpy()
    assert np.all((peak_bins == np.floor(centre_bins)) | (peak_bins == np.ceil(centre_bins)))
    assert torch.all(fb.amax(dim=0) > 0.5), "even the narrowest low-frequency triangles cover a bin well"
    # Between the first and last centres, neighbouring triangles overlap so that the filters sum to 1.
    inner = fb[int(np.ceil(centre_bins[0])) : int(np.floor(centre_bins[-1])) + 1].sum(dim=1)
    torch.testing.assert_close(inner, torch.ones_like(inner), atol=1e-5, rtol=0)


def test_spectrogram_matches_numpy_stft(encoder: CEDEncoder) -> None:
    wave = _noise(5000, seed=1, scale=0.5) + _sine(5000, 440.0, 0.3)
    spec = encoder.front_end[0].spectrogram(wave.unsqueeze(0))[0].double().numpy()

    x = np.pad(wave.double().numpy(), 256, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(512) / 512)
    frames = np.stack([x[i * 160 : i * 160 + 512] * window for i in range(1 + 5000 // 160)], axis=1)
    reference = np.abs(np.fft.rfft(frames, axis=0)) ** 2
    assert spec.shape == reference.shape == (257, 32)
    np.testing.assert_allclose(spec, reference, rtol=1e-4, atol=1e-4 * reference.max())


def test_front_end_features_formula(encoder: CEDEncoder) -> None:
    wave = _sine(8000, 1000.0, 0.5).unsqueeze(0)
    power = encoder.front_end[0](wave)
    db = 10 * torch.log10(power.clamp(min=1e-10))
    db = torch.maximum(db, db.max() - 120.0)
    expected = (db - 15.41663) / (2 * 6.55582)
    features = encoder.front_end_features(wave)
    assert features.shape == (1, 64, 51) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


def test_top_db_floor_is_per_item(encoder: CEDEncoder) -> None:
    loud = _sine(16000, 440.0, 1.0)
    quiet = torch.cat([_sine(8000, 440.0, 1e-3), torch.zeros(8000)])
    batch = encoder.front_end_features(torch.stack([loud, quiet]))
    alone = [encoder.front_end_features(w.unsqueeze(0))[0] for w in (loud, quiet)]
    torch.testing.assert_close(batch[0], alone[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(batch[1], alone[1], atol=1e-6, rtol=0)
    # A batch-wide peak (torchaudio's) would have lifted the quiet item's silence.
    assert batch[1].min() < batch[0].min() - 1.0


def test_token_counts() -> None:
    small = CEDEncoder(AudioEncoderConfig(depth=0))
    assert small.num_tokens(30 * SR) == 748 == 4 * 187
    assert small.num_tokens(10 * SR) == 4 * ((1001 - 16) // 16 + 1) == 248
    assert small.num_tokens(SR) == 4 * ((101 - 16) // 16 + 1)
    assert small.num_tokens(2400) == 4  # 16 frames, the fewest that give a patch
    with pytest.raises(AudioError, match="too_short"):
        small.num_tokens(2399)
    assert small.forward(torch.zeros(1, 30 * SR)).shape == (1, 748, 384)


@pytest.mark.parametrize("samples", [2400, 16000, 16000 * 3 + 77])
def test_num_tokens_agrees_with_forward(encoder: CEDEncoder, samples: int) -> None:
    with torch.no_grad():
        tokens = encoder(_noise(samples, seed=2).unsqueeze(0))
    assert tokens.shape == (1, encoder.num_tokens(samples), 32)


def test_state_dict_keys_match_published_and_seed_names() -> None:
    expected = {
        "front_end.fbank_mean",
        "front_end.fbank_std",
        "front_end.0.spectrogram.window",
        "front_end.0.mel_scale.fb",
        "init_bn.1.weight",
        "init_bn.1.bias",
        "init_bn.1.running_mean",
        "init_bn.1.running_var",
        "init_bn.1.num_batches_tracked",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "time_pos_embed",
        "freq_pos_embed",
        "norm.weight",
        "norm.bias",
    }
    for i in range(2):
        for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"}
    state = CEDEncoder(TINY).state_dict()
    assert set(state) == expected
    assert state["time_pos_embed"].shape == (1, 32, 1, 187)
    assert state["freq_pos_embed"].shape == (1, 32, 4, 1)
    assert state["front_end.0.mel_scale.fb"].shape == (257, 64)
    assert state["blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert state["blocks.0.mlp.fc1.weight"].shape == (128, 32)
    assert state["front_end.fbank_mean"].ndim == 0


def test_state_dict_round_trips_strictly(encoder: CEDEncoder) -> None:
    other = CEDEncoder(TINY).eval()
    other.load_state_dict(encoder.state_dict(), strict=True)
    wave = _noise(16000, seed=3).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(other(wave), encoder(wave), atol=0, rtol=0)


def test_front_end_buffers_are_deterministic() -> None:
    a, b = CEDEncoder(TINY).state_dict(), CEDEncoder(TINY).state_dict()
    for key in ("front_end.0.spectrogram.window", "front_end.0.mel_scale.fb", "front_end.fbank_mean", "front_end.fbank_std"):
        assert torch.equal(a[key], b[key])
    torch.testing.assert_close(a["front_end.0.spectrogram.window"], torch.hann_window(512))


def test_published_10_second_position_embeddings_are_resized_as_ced_does() -> None:
    encoder = CEDEncoder(TINY)
    published = {"time_pos_embed": torch.randn(1, 32, 1, 63), "freq_pos_embed": torch.randn(1, 32, 4, 1)}
    resized = resize_position_embeddings(published, encoder)
    assert resized["time_pos_embed"].shape == (1, 32, 1, 187)
    assert torch.equal(resized["freq_pos_embed"], published["freq_pos_embed"])
    # Bilinear, align_corners=False: the first target position samples the source at (0 + 0.5) * 63/187 - 0.5 < 0.
    torch.testing.assert_close(resized["time_pos_embed"][..., 0], published["time_pos_embed"][..., 0])
    position = (93 + 0.5) * 63 / 187 - 0.5
    low, weight = int(position), position - int(position)
    source = published["time_pos_embed"]
    expected = source[..., low] * (1 - weight) + source[..., low + 1] * weight
    torch.testing.assert_close(resized["time_pos_embed"][..., 93], expected)
    longer = resize_position_embeddings({"time_pos_embed": torch.randn(1, 32, 1, 300)}, encoder)
    assert longer["time_pos_embed"].shape[-1] == 187


def test_attention_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    attn = CEDAttention(TINY)
    x = torch.randn(2, 9, 32)
    qkv = attn.qkv(x).reshape(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) * 16**-0.5, dim=-1)
    reference = attn.proj((weights @ qkv[2]).transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(attn(x), reference, atol=1e-5, rtol=1e-5)


def test_tokens_are_frequency_major(encoder: CEDEncoder) -> None:
    spec = torch.randn(1, 1, 64, 48)
    x = encoder.patch_embed(spec) + encoder.time_pos_embed[..., :3] + encoder.freq_pos_embed
    reference = torch.stack([x[0, :, f, t] for f in range(4) for t in range(3)]).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_features(spec), encoder.norm(encoder.blocks(reference)))


# A padded batch's attention (key mask) sums over the padded length: equal to each item alone up to rounding.
PADDED_BATCH_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def test_encode_items_of_any_lengths_in_one_forward_match_each_alone(encoder: CEDEncoder) -> None:
    waves = [_noise(16000, 4), _noise(24000, 5), _noise(16000, 6, scale=1e-3), _noise(5000, 7), _noise(2400, 8)]
    with torch.no_grad():
        encoded = encoder.encode(waves)
        alone = [encoder(w.unsqueeze(0))[0] for w in waves]
    for got, want, wave in zip(encoded, alone, waves):
        assert got.shape == (encoder.num_tokens(len(wave)), 32)
        torch.testing.assert_close(got, want, **PADDED_BATCH_TOLERANCE)


def test_equal_lengths_in_one_forward_match_each_alone_exactly(encoder: CEDEncoder) -> None:
    waves = [_noise(16000, 4), _noise(16000, 6, scale=1e-3)]
    with torch.no_grad():
        assert all(torch.equal(got, encoder(w.unsqueeze(0))[0]) for got, w in zip(encoder.encode(waves), waves))


def test_a_mixed_length_batch_makes_one_attention_call_a_layer(monkeypatch) -> None:
    model = CEDEncoder(AudioEncoderConfig(embed_dim=32, depth=3, num_heads=2, target_length=201)).eval()
    calls, attention = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *args, **kwargs: calls.append(1) or attention(*args, **kwargs))
    with torch.no_grad():
        model.encode([_noise(length, seed) for seed, length in enumerate((451 * 160, 119 * 160, 16000, 5000, 2400))])
    assert len(calls) == 3


def test_encode_pads_chunks_of_long_and_short_items() -> None:
    torch.manual_seed(0)
    model = CEDEncoder(AudioEncoderConfig(embed_dim=32, depth=2, num_heads=2, target_length=201)).eval()
    # 452 frames: chunks of 201, 201 and 50 frames; 120 frames: one chunk; 211 frames: 201 and a chunk too short for a patch.
    waves = [_noise(451 * 160, seed=11), _noise(119 * 160, seed=12), _noise(210 * 160, seed=13)]
    with torch.no_grad():
        encoded = model.encode(waves)
        alone = [model(w.unsqueeze(0))[0] for w in waves]
    assert [len(tokens) for tokens in encoded] == [108, 28, 48]
    for got, want in zip(encoded, alone):
        torch.testing.assert_close(got, want, **PADDED_BATCH_TOLERANCE)


def test_long_input_is_encoded_in_chunks() -> None:
    torch.manual_seed(0)
    model = CEDEncoder(AudioEncoderConfig(embed_dim=32, depth=2, num_heads=2, target_length=201)).eval()
    # 201 + 201 + 50 frames: two full chunks of 12 time patches, then 3 from the short last chunk.
    wave = _noise(451 * 160, seed=8).unsqueeze(0)
    with torch.no_grad():
        tokens = model(wave)
        spec = model.init_bn(model.front_end_features(wave).unsqueeze(1))
        chunks = [model.forward_features(spec[..., start : start + 201]) for start in (0, 201, 402)]
    assert [c.shape[1] for c in chunks] == [48, 48, 12]
    assert tokens.shape == (1, 108, 32) and model.num_tokens(wave.shape[-1]) == 108
    torch.testing.assert_close(tokens, torch.cat(chunks, dim=1), atol=1e-6, rtol=1e-6)


def test_last_chunk_shorter_than_a_patch_gives_no_tokens() -> None:
    model = CEDEncoder(AudioEncoderConfig(embed_dim=32, depth=1, num_heads=2, target_length=201)).eval()
    wave = _noise(210 * 160, seed=9).unsqueeze(0)  # 211 frames: 201 + 10
    with torch.no_grad():
        assert model(wave).shape == (1, 48, 32) and model.num_tokens(wave.shape[-1]) == 48


def test_invalid_config_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="divisible by audio_encoder.patch_stride"):
        CEDEncoder(AudioEncoderConfig(embed_dim=32, depth=1, num_heads=2, n_mels=60))
    with pytest.raises(ConfigError, match="num_heads"):
        CEDEncoder(AudioEncoderConfig(embed_dim=30, depth=1, num_heads=4))


def test_bad_shapes_raise_value_error(encoder: CEDEncoder) -> None:
    with pytest.raises(ValueError, match="batch, samples"):
        encoder(torch.zeros(16000))
    with pytest.raises(ValueError, match="1-D"):
        encoder.encode([torch.zeros(1, 16000)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_runs_front_end_in_float32(encoder: CEDEncoder, dtype: torch.dtype) -> None:
    wave = _sine(16000, 440.0, 1.0).unsqueeze(0) + _noise(16000, 10)
    with torch.no_grad():
        reference = encoder(wave)
        low = CEDEncoder(TINY).eval()
        low.load_state_dict(encoder.state_dict())
        low.to(dtype)
        assert low.front_end_features(wave).dtype == torch.float32
        try:
            tokens = low(wave)
        except RuntimeError as err:
            pytest.skip(f"{dtype} not supported on CPU here: {err}")
    assert tokens.dtype == dtype
    assert torch.isfinite(tokens).all()
    assert F.cosine_similarity(tokens.float(), reference, dim=-1).min() > 0.99
