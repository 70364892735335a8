"""The Whisper reference model on the real whisper-base weights and the real LibriVox clips: the
CTranslate2 engine (the presets' default) and the transformers engine it is checked against."""

import json

import pytest

from jobs.metrics.wer import corpus_wer
from jobs.samples import default_dest, fetch_librivox
from nota_model import load_audio, load_config, load_model
from nota_model.config import DecodingConfig
from nota_model.errors import ConfigError
from nota_model.packs import build
from nota_model.whisper_ct2 import WhisperCT2

pytestmark = pytest.mark.real_weights


@pytest.fixture(scope="module")
def whisper_base():
    build("whisper-base")
    return load_model(load_config("whisper-base"), device="cpu")


@pytest.fixture(scope="module")
def clips(whisper_base, librivox):
    return [load_audio(item["audio"], whisper_base.model.config.audio) for item in librivox]


@pytest.fixture(scope="module")
def librivox():
    return [json.loads(line) for line in fetch_librivox(default_dest()).read_text().splitlines()]


@pytest.fixture(scope="module")
def batch(whisper_base, clips):
    return whisper_base.model.generate(clips)


@pytest.fixture(scope="module")
def alone(whisper_base, clips):
    return [whisper_base.model.generate([clip]) for clip in clips]


def test_whisper_base_transcribes_librivox_under_10_percent_wer_batched_and_alone(whisper_base, librivox, batch, alone):
    assert batch.texts == [output.texts[0] for output in alone]
    result = corpus_wer([item["reference"] for item in librivox], batch.texts)
    assert result.wer < 0.10, (result, batch.texts)
    assert all(n > 3 for n in batch.output_tokens) and batch.ttft_s > 0 and batch.tpot_s > 0
    assert whisper_base.identity.startswith("whisper-base+weights:sha256:")


def test_whisper_says_the_language_it_heard_and_each_words_times_inside_the_clip_in_order(clips, batch, alone):
    assert batch.languages == ("en",) * len(clips) and all(p > 0.9 for p in batch.language_probabilities)
    for clip, text, words in zip(clips, batch.texts, batch.words):
        assert "".join(word.word for word in words) == text and len(words) > 5
        assert all(0 <= w.start <= w.end <= clip.seconds and 0 < w.probability <= 1 for w in words)
        assert all(a.end <= b.start for a, b in zip(words, words[1:])), words
    assert [output.words[0] for output in alone] == list(batch.words)
    assert [output.language_probabilities[0] for output in alone] == list(batch.language_probabilities)


def test_whisper_detects_the_language_where_none_is_set(clips, batch):
    model = load_model(load_config("whisper-base", {"language": None}), device="cpu").model
    assert model.prompt_for("asr") == "<|startoftranscript|><|transcribe|><|notimestamps|>"
    out = model.generate(clips[:2])
    assert out.languages == ("en", "en") and out.texts == batch.texts[:2] and out.words == batch.words[:2]
    with pytest.raises(ConfigError, match="knows no language 'xx'"):
        load_model(load_config("whisper-base", {"language": "xx"}), device="cpu")


def test_whisper_reference_model_does_asr_only(whisper_base):
    model = whisper_base.model
    assert model.prompt_for("asr") == "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"
    with pytest.raises(ConfigError, match="speech recognition only"):
        model.prompt_for("aac")


def test_whisper_beam_search_runs_batched(whisper_base, clips):
    model = whisper_base.model
    beam = DecodingConfig(num_beams=3, max_new_tokens=40)
    assert model.generate(clips[:2], decoding=beam).texts == [model.generate([c], decoding=beam).texts[0] for c in clips[:2]]


def test_the_presets_run_ctranslate2_and_say_so(whisper_base):
    assert isinstance(whisper_base.model, WhisperCT2) and whisper_base.model.compute_type.startswith("int8")  # int8 weights, float32 activations
    assert whisper_base.identity.endswith("+ctranslate2:int8")  # the compute type auto resolved on the CPU


def test_ctranslate2_in_float32_gives_the_transformers_engines_tokens_and_log_probabilities(clips):
    engines = [load_model(load_config("whisper-base", {"engine": engine, "compute_type": "float32"}), device="cpu").model
               for engine in ("transformers", "ctranslate2")]
    reference, ct2 = (model.generate(clips) for model in engines)
    assert ct2.token_ids == reference.token_ids and ct2.texts == reference.texts
    assert ct2.languages == reference.languages and ct2.language_probabilities == pytest.approx(reference.language_probabilities, abs=1e-3)
    assert reference.words == ()  # the transformers engine gives no word times
    assert ct2.output_tokens == reference.output_tokens and ct2.decode_steps == reference.decode_steps
    assert ct2.logprob_sums == pytest.approx(reference.logprob_sums, abs=0.01) and all(s < 0 for s in ct2.logprob_sums)
    # at the token limit too: CTranslate2 given half its max_length would stop at 14 of the first clip's 27 tokens
    limit = DecodingConfig(num_beams=1, max_new_tokens=24)
    reference, ct2 = (model.generate(clips[:1], decoding=limit) for model in engines)
    assert ct2.token_ids == reference.token_ids and ct2.output_tokens == [24]


def test_ctranslate2_stops_at_max_new_tokens_and_reports_its_steps(whisper_base, clips):
    out = whisper_base.model.generate(clips[:2], decoding=DecodingConfig(num_beams=1, max_new_tokens=3))
    assert out.output_tokens == [3, 3] and out.decode_steps == 3 and out.ttft_s > out.tpot_s > 0
    with pytest.raises(ConfigError, match="min_new_tokens"):
        whisper_base.model.generate(clips[:1], decoding=DecodingConfig(num_beams=1, min_new_tokens=2))
