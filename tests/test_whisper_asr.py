"""The Whisper reference model on the real converted whisper-base weights and the real LibriVox clips."""

import json

import pytest

from jobs.metrics import corpus_wer
from jobs.packs import build
from jobs.samples import default_dest, fetch_librivox
from nota_model import load_audio, load_config, load_model
from nota_model.config import DecodingConfig
from nota_model.errors import ConfigError

pytestmark = pytest.mark.real_weights


@pytest.fixture(scope="module")
def whisper_base():
    build("whisper-base")
    return load_model(load_config("whisper-base"), device="cpu")


@pytest.fixture(scope="module")
def librivox():
    return [json.loads(line) for line in fetch_librivox(default_dest()).read_text().splitlines()]


def test_whisper_base_transcribes_librivox_under_10_percent_wer_batched_and_alone(whisper_base, librivox):
    model = whisper_base.model
    clips = [load_audio(item["audio"], model.config.audio) for item in librivox]
    batch = model.generate(clips)
    alone = [model.generate([clip]).texts[0] for clip in clips]
    assert batch.texts == alone
    result = corpus_wer([item["reference"] for item in librivox], batch.texts)
    assert result.wer < 0.10, (result, batch.texts)
    assert all(n > 3 for n in batch.output_tokens) and batch.ttft_s > 0 and batch.tpot_s > 0
    assert whisper_base.identity.startswith("whisper-base+weights:sha256:")


def test_whisper_reference_model_does_asr_only(whisper_base):
    model = whisper_base.model
    assert model.prompt_for("asr") == "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"
    with pytest.raises(ConfigError, match="speech recognition only"):
        model.prompt_for("aac")


def test_whisper_beam_search_runs_batched(whisper_base, librivox):
    model = whisper_base.model
    clips = [load_audio(item["audio"], model.config.audio) for item in librivox[:2]]
    beam = DecodingConfig(num_beams=3, max_new_tokens=40)
    assert model.generate(clips, decoding=beam).texts == [model.generate([c], decoding=beam).texts[0] for c in clips]
