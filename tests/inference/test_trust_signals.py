"""Rows a person can trust without references, on the real models: NOTA-small and Whisper-base over silence, noise
and music made here and over the LibriVox and cards samples (real speech with transcripts). Audio without speech
gets an empty answer and `no_speech`, a looping answer is flagged, and the confidence ranks the answers by WER."""

import json

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from jobs.predictions import OUTPUT_SCHEMA
from jobs.samples import default_dest, fetch_cards, fetch_librivox
from jobs.scoring.pipeline import score_blocks
from nota_model import LoadedModel, load_config, load_model
from nota_model.audio import SAMPLE_RATE, load_audio
from nota_model.config import DecodingConfig
from nota_model.long_form import generate_pieces
from nota_model.packs import build
from nota_model.transcribe import Item, run_batch

pytestmark = pytest.mark.real_weights

MODELS = ("whisper-base", "nota-small")
PACKS = {"whisper-base": ["whisper-base"], "nota-small": ["whisper-base", "smollm2-135m-instruct"]}


def unspoken(seconds: float = 3.0) -> dict[str, np.ndarray]:
    """Silence, white noise, a held chord and a melody of plucked notes: audio in which no one speaks."""
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    chord = sum(np.sin(2 * np.pi * f * t) for f in (261.6, 329.6, 392.0)) / 15
    note = round(SAMPLE_RATE / 4)
    pitches = np.resize([261.6, 329.6, 392.0, 523.3, 440.0, 349.2], len(t) // note + 1)
    melody = np.concatenate([sum(np.sin(2 * np.pi * f * k * t[:note]) / (3 * k) for k in range(1, 4)) * np.exp(-3 * t[:note])
                             for f in pitches])[: len(t)]
    return {"silence": np.zeros(len(t)), "white-noise": np.random.default_rng(0).normal(0, 0.1, len(t)), "chord": chord,
            "melody": melody}


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> list[Item]:
    """The unspoken clips, then the LibriVox and cards samples with their references."""
    root = tmp_path_factory.mktemp("unspoken")
    made = []
    for name, waveform in unspoken().items():
        sf.write(root / f"{name}.wav", waveform.astype(np.float32), SAMPLE_RATE)
        made.append(Item(name, str(root / f"{name}.wav"), "asr"))
    spoken = [json.loads(line) for fetch in (fetch_librivox, fetch_cards) for line in fetch(default_dest()).read_text().splitlines()]
    return made + [Item(item["id"], item["audio"], "asr", reference=item["reference"]) for item in spoken]


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModel]:
    """The models by preset, each loaded once (its packs built first)."""
    for pack in {pack for packs in PACKS.values() for pack in packs}:
        build(pack)
    return {name: load_model(load_config(name), device="cpu") for name in MODELS}


@pytest.fixture(scope="module", params=MODELS)
def answered(request, models, items) -> tuple[str, list[dict]]:
    """A model's rows for the items, as `nota_model.transcribe` makes them (the VAD's gate on, as by default)."""
    loaded = models[request.param]
    return loaded.identity, run_batch(loaded.model, items, loaded.identity)


def test_audio_without_speech_gets_an_empty_answer_and_no_speech_and_speech_is_answered(answered):
    _, rows = answered
    unheard, speech = rows[: len(unspoken())], rows[len(unspoken()):]
    assert [(row["text"], row["segments"], row["speech_share"], row["flags"]) for row in unheard] == [
        ("", [], 0.0, ["no_speech"])] * len(unheard)
    assert all(row["text"].strip() and row["speech_share"] > 0.5 and row["mean_logprob"] < 0 for row in speech)
    assert not any("no_speech" in row["flags"] for row in speech)


def test_the_most_confident_quarter_has_a_lower_wer_than_the_least_confident(answered):
    identity, rows = answered
    speech = [row for row in rows if row["reference"]]
    table = pa.Table.from_pylist([
        {**{name: None for name in OUTPUT_SCHEMA.names}, "id": row["id"], "corpus": "samples", "shard": 0, "index": index,
         "task": "asr", "model": identity, "reference": [row["reference"]], "text": row["text"],
         "mean_logprob": row["mean_logprob"], "flags": row["flags"]}
        for index, row in enumerate(speech)], schema=OUTPUT_SCHEMA)
    quarters = score_blocks([table]).analysis[("samples", "asr", identity)]["confidence_quarters"]
    assert sum(quarter["items"] for quarter in quarters) == len(speech) == 10
    assert quarters[0]["wer"] < quarters[-1]["wer"], quarters


def test_an_answer_made_to_run_on_past_its_end_loops_and_is_flagged(models, items):
    """NOTA-small kept from its stop token (min_new_tokens) repeats itself to the token limit, as greedy decoding
    can on its own: the row says so."""
    model = models["nota-small"].model
    config = model.config
    speech = [item for item in items if item.reference][::5]
    clips = [load_audio(item.audio, config.audio) for item in speech]
    run_on = DecodingConfig(num_beams=1, max_new_tokens=40, min_new_tokens=40)
    answers = generate_pieces(model, clips, [model.prompt_for("asr")] * len(clips), [[(0, len(c.waveform))] for c in clips],
                              len(clips), run_on).answers
    for answer in answers:
        assert answer.signals.token_limit and answer.signals.compression_ratio > config.signals.repetition_compression_ratio, answer.text
