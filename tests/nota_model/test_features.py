"""The models' input features computed off the model (nota_model.features): equal to today's, compact,
and the model gives the same tokens from shipped features as from its own."""

import numpy as np
import pytest
import torch

from nota_model.audio import AudioClip, prepare_waveform, whisper_features
from nota_model.config import AudioConfig, load_config
from nota_model.decoding import GenerationOutput, generate_in_groups
from nota_model.errors import AudioError
from nota_model.features import ModelFeatures, compute_features, whisper_log_mel
from tests.conftest import make_clip


def noise_clip(samples: int, seed: int = 0, scale: float = 0.1) -> AudioClip:
    rng = np.random.default_rng(seed)
    return prepare_waveform((rng.standard_normal(samples) * scale).astype(np.float32), 16000, AudioConfig(min_seconds=0.0))


@pytest.mark.parametrize("num_mel_bins", [80, 128])
@pytest.mark.parametrize("samples", [300, 16000, 7 * 16000 + 13, 479_850, 480_000])
def test_whisper_log_mel_equals_the_feature_extractor_on_the_padded_clip(num_mel_bins, samples):
    clip = noise_clip(samples, seed=samples % 7, scale=10.0 ** -(samples % 3))
    features = ModelFeatures(*whisper_log_mel(clip.waveform, num_mel_bins))
    reference = whisper_features([clip], num_mel_bins)[0].numpy()
    assert features.whisper.shape == (num_mel_bins, min(3000, -(-(samples + 200) // 160)))
    np.testing.assert_allclose(features.whisper_frames(), reference, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(features.whisper_frames(1000), features.whisper_frames()[:, :1000])


def test_features_survive_their_bytes_and_are_float32():
    clip = make_clip(2.0)
    for config in (load_config("tiny"), load_config("whisper-base")):
        features = compute_features([clip], config)[0]
        back = ModelFeatures.from_bytes(features.to_bytes())
        assert back.whisper.dtype == np.float32 and np.array_equal(back.whisper, features.whisper)
        assert back.whisper_fill == features.whisper_fill
        assert (back.ced is None) == (config.model_kind == "whisper")
        if back.ced is not None:
            assert back.ced.dtype == np.float32 and np.array_equal(back.ced, features.ced)


def test_features_stay_float32_under_cpu_bfloat16_autocast(tiny):
    """Training validates under `run.amp` (bfloat16 on a CPU): the front ends ignore it, and generation runs."""
    clips = [make_clip(2.0), make_clip(3.3, seed=4)]
    expected = compute_features(clips, tiny.model.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = compute_features(clips, tiny.model.config)
        texts = tiny.model.generate(clips, [tiny.model.config.prompt.task_prompt("asr")] * 2).texts
    for got, want in zip(features, expected):
        assert got.whisper.dtype == np.float32 and np.array_equal(got.whisper, want.whisper)
        assert got.ced.dtype == np.float32 and np.array_equal(got.ced, want.ced)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)


def test_ced_features_are_the_encoders_own_front_end(tiny):
    clip = make_clip(3.3, seed=4)
    shipped = compute_features([clip], tiny.model.config)[0].ced
    own = tiny.model.ced.front_end_features(torch.from_numpy(clip.waveform).unsqueeze(0))[0]
    assert torch.equal(torch.from_numpy(shipped), own)


def test_a_clip_too_short_for_ced_is_an_audio_error():
    with pytest.raises(AudioError, match="too_short"):
        compute_features([noise_clip(1000)], load_config("tiny"))


def test_the_model_gives_the_same_tokens_from_shipped_features(tiny):
    model = tiny.model
    clips = [make_clip(1.5), make_clip(6.0, seed=1)]
    shipped = [ModelFeatures.from_bytes(f.to_bytes()) for f in compute_features(clips, model.config)]
    own, from_shipped = model.audio_tokens(clips), model.audio_tokens(clips, shipped)
    assert all(torch.equal(a, b) for a, b in zip(own, from_shipped))


def test_generate_in_groups_puts_results_back_in_item_order():
    def run(indices: list[int]) -> GenerationOutput:
        return GenerationOutput(texts=[f"item {i}" for i in indices], token_ids=[[i] for i in indices], output_tokens=[1] * len(indices),
                                ttft_s=float(len(indices)), tpot_s=0.5 if len(indices) > 1 else None, decode_steps=3)

    merged = generate_in_groups([[2, 0], [1], [3, 4]], run)
    assert merged.texts == [f"item {i}" for i in range(5)] and merged.token_ids == [[i] for i in range(5)]
    assert merged.ttft_s == 2.0 and merged.tpot_s == 0.5 and merged.decode_steps == 9
