"""The synthetic training corpus: its texts (answers, exclusions), voices (disjoint pools), plan (a pure function
of seed and number, held-out sentences apart) and rendering (augmented 16 kHz speech, resumable); a perturbed part's
speed perturbation and vocal-tract-length warp, on tones and chirps, and the plain render's samples as before them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil

import numpy as np
import pytest
import soundfile as sf

import jobs.corpus.synthetic_speech as synthetic_speech
from jobs.corpus.voices import (SAMPLE_RATE, SPEED_FACTORS, VTLP_BOUNDARY, Voice, augment, draw_perturbation, perturb,
                                speed_perturb, voices, vtlp, vtlp_warp)
from jobs.corpus.synthetic_speech import (PlannedItem, _is_held_out, _write_sources, perturbation_of, perturbed_split,
                                          plan, render, train_split)
from nota_model.errors import ConfigError
from jobs.corpus.texts import Exclusions, is_speakable, transcript, wordnet_texts

LIBRIVOX = "and mister john dashwood had then leisure to consider how much there might be prudently in his power"
needs_tools = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or not wordnet_texts.__defaults__[0].is_dir(),
    reason="needs Debian's espeak-ng, wordnet-base and wamerican (make test installs them)")


def test_answers_are_lower_case_words():
    assert transcript("He wasn't going -- to admit his cross-country error!") == "he wasn't going to admit his cross country error"
    assert transcript("'quoted' words; and more.") == "quoted words and more"
    assert is_speakable("the separation of church and state")
    assert not is_speakable("the amide of propionic acid (C2H5CONH2)")
    assert not is_speakable("a prissy creature...settles into a mold")
    assert not is_speakable("one")


def test_evaluation_transcripts_are_kept_out():
    exclusions = Exclusions.of([LIBRIVOX, "ten of clubs"])
    assert exclusions.excludes("we had then leisure to consider the matter")  # a shared 5-gram
    assert not exclusions.excludes("we had then leisure to rest")  # 4 words in common only
    assert exclusions.excludes("she drew the Ten of Clubs at last")  # a whole short transcript
    assert not exclusions.excludes("ten of the clubs closed")


def test_voice_pools_are_disjoint_and_cover_every_engine():
    train, held_out = voices(held_out=False), voices(held_out=True)
    assert not {voice.label for voice in train} & {voice.label for voice in held_out}
    for pool in (train, held_out):
        assert {voice.engine for voice in pool} == {"espeak-ng", "flite", "festival"}
    assert not {v.name for v in train if v.engine == "espeak-ng"} & {v.name for v in held_out if v.engine == "espeak-ng"}
    assert not {v.variant for v in train} & {v.variant for v in held_out if v.variant}


def test_augmentation_is_seeded_and_keeps_the_speech():
    speech = np.sin(np.arange(SAMPLE_RATE) / 10).astype(np.float32) * 0.5
    first, again = augment(speech, random.Random(7)), augment(speech, random.Random(7))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, augment(speech, random.Random(8)))
    assert SAMPLE_RATE + 0.1 * SAMPLE_RATE <= len(first) <= 2 * SAMPLE_RATE
    assert 0.09 < np.abs(first).max() < 0.9  # a peak between -20 and -1 dB
    assert first.dtype == np.float32


@needs_tools
def test_the_plan_is_a_pure_function_of_seed_and_number_and_holds_sentences_out():
    exclusions = Exclusions.of([LIBRIVOX])
    train = plan("train", 300, 0, exclusions)
    assert train[:100] == plan("train", 100, 0, exclusions)  # a longer build extends a shorter one
    assert train != plan("train", 300, 1, exclusions)
    assert {item.kind for item in train} == {"example", "examples", "gloss", "words"}
    assert all(item.reference == transcript(item.text) and item.reference for item in train)
    assert not any(exclusions.excludes(item.text) for item in train)
    held_out = plan("held-out", 100, 0, exclusions)
    assert all(_is_held_out(item.text) for item in held_out)
    assert not any(_is_held_out(item.text) for item in train if item.kind in ("example", "gloss"))
    assert {item.voice for item in held_out} <= set(voices(held_out=True))
    second = plan(train_split(2), 300, 0, exclusions)  # a further training part: other draws, other ids
    assert train_split(1) == "train" and second[0].id == "train-2-000000"
    assert {item.text for item in second} != {item.text for item in train}
    assert not any(_is_held_out(item.text) for item in second if item.kind in ("example", "gloss"))


@needs_tools
def test_an_item_renders_once_as_16_khz_speech(tmp_path):
    item = plan("train", 1, 3, Exclusions.of([]))[0]
    item = type(item)(item.id, "the quick brown fox", "the quick brown fox", "example", Voice("espeak-ng", "en-us", "m3"), 5)
    path = render(item, tmp_path)
    audio, rate = sf.read(path)
    assert rate == SAMPLE_RATE and audio.ndim == 1 and 0.8 < len(audio) / rate < 4.0
    assert path.with_suffix(".txt").read_text() == "the quick brown fox\n"
    written = path.stat().st_mtime_ns
    assert render(item, tmp_path) == path and path.stat().st_mtime_ns == written


def tone(frequency: float, seconds: float = 1.0, level: float = 0.5) -> np.ndarray:
    return (level * np.sin(2 * np.pi * frequency * np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE)).astype(np.float32)


def peak_frequency(audio: np.ndarray) -> float:
    """The frequency of the spectrum's peak, to 0.25 Hz (Hann window, zero-padded to 4 s)."""
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio)), 4 * SAMPLE_RATE))
    return float(np.fft.rfftfreq(4 * SAMPLE_RATE, 1 / SAMPLE_RATE)[np.argmax(spectrum)])


def chirp(seconds: float = 1.0) -> np.ndarray:
    time = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * (200 * time + 3000 * time**2 / seconds))).astype(np.float32)


# Before perturbations existed (numpy 2.4, x86-64): augment over seeds 0-11 (rooms, a telephone band, noise) of
# `_modulated_tone`, and `render` of ITEM with `_fake_synthesise`, its FLAC's 16-bit samples.
AUGMENT_SHA256 = "7c407f66aea96f945b5380f02c7a47a2b5cf443d3655e09e9fc5e211b6d31604"
RENDER_SHA256 = "d7cac6215599fd09206f7a57dd5733a1fa57867c4786b7f809b105d905bd17dc"
ITEM = PlannedItem("train-000001", "a b", "a b", "example", Voice("espeak-ng", "en-us", "m3"), 1234)


def _modulated_tone() -> np.ndarray:
    time = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * 440 * time) * np.sin(2 * np.pi * 3 * time)).astype(np.float32)


def _fake_synthesise(text, voice, rng):  # draws from the item's rng as a synthesiser does
    return (_modulated_tone() * rng.uniform(0.5, 1.0)).astype(np.float32)


def test_the_plain_render_gives_the_samples_it_gave_before_perturbations(tmp_path, monkeypatch):
    digest = hashlib.sha256()
    for seed in range(12):
        digest.update(augment(_modulated_tone(), random.Random(seed)).tobytes())
    assert digest.hexdigest() == AUGMENT_SHA256
    monkeypatch.setattr(synthetic_speech, "synthesise", _fake_synthesise)
    audio, rate = sf.read(render(ITEM, tmp_path), dtype="int16")
    assert rate == SAMPLE_RATE and hashlib.sha256(audio.tobytes()).hexdigest() == RENDER_SHA256
    assert np.array_equal(perturb(_modulated_tone()), _modulated_tone())  # no factors, or 1.0: the speech itself
    assert np.array_equal(perturb(_modulated_tone(), 1.0, 1.0), _modulated_tone())


def test_speed_perturbation_changes_tempo_and_pitch_together():
    for factor in (1.1, 0.9):
        fast = speed_perturb(tone(1000.0), factor)
        assert abs(len(fast) - SAMPLE_RATE / factor) <= 2
        assert peak_frequency(fast) == pytest.approx(1000.0 * factor, abs=1.0)
        assert fast.dtype == np.float32 and 0.45 < np.abs(fast[100:-100]).max() < 0.55


def test_vtlp_keeps_the_length_and_moves_formants_by_alpha_below_the_boundary():
    for alpha in (0.9, 0.95, 1.1):
        for frequency in (300.0, 1000.0, 3500.0):
            warped = vtlp(tone(frequency), alpha)
            assert len(warped) == SAMPLE_RATE and warped.dtype == np.float32
            assert peak_frequency(warped) == pytest.approx(frequency * alpha, abs=2.0)
        above = vtlp(tone(6000.0), alpha)  # above the knee: the line to Nyquist, less than alpha's shift
        assert peak_frequency(above) == pytest.approx(float(vtlp_warp(np.array(6000.0), alpha)), abs=2.0)
        assert abs(peak_frequency(above) - 6000.0) < abs(6000.0 * alpha - 6000.0)
        ends = vtlp_warp(np.array([0.0, VTLP_BOUNDARY * min(alpha, 1) / alpha, SAMPLE_RATE / 2]), alpha)
        assert ends == pytest.approx([0.0, VTLP_BOUNDARY * min(alpha, 1), SAMPLE_RATE / 2])
    # a voice-like buzz, 29 harmonics of a gliding pitch: its harmonics stay coherent (phase locking), its energy kept
    pitch = 2 * np.pi * np.cumsum(120 + 15 * np.sin(2 * np.pi * 3 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)) / SAMPLE_RATE
    buzz = (0.3 * sum(np.sin(harmonic * pitch) / harmonic for harmonic in range(1, 30))).astype(np.float32)
    for alpha in (0.9, 1.1):
        assert np.sqrt(np.mean(vtlp(buzz, alpha) ** 2)) > 0.75 * np.sqrt(np.mean(buzz**2))
    signal = chirp() + np.random.default_rng(0).standard_normal(SAMPLE_RATE).astype(np.float32) * 0.1
    assert np.abs(vtlp(signal, 1.0) - signal).max() < 1e-5  # alpha 1.0: the identity
    assert np.abs(vtlp(signal, 1.02) - signal).max() > 0.01


def test_perturbation_factors_are_seeded_per_item():
    draws = [draw_perturbation(("speed", "vtlp"), seed) for seed in range(200)]
    assert draws == [draw_perturbation(("speed", "vtlp"), seed) for seed in range(200)]
    assert {speed for speed, _ in draws} == set(SPEED_FACTORS)
    assert all(0.9 <= alpha <= 1.1 for _, alpha in draws) and len({alpha for _, alpha in draws}) > 100
    # each kind alone keeps its factor: the parts -speed, -vtlp and -speed-vtlp of a plan agree item by item
    assert [draw_perturbation(("speed",), seed) for seed in range(200)] == [(speed, None) for speed, _ in draws]
    assert [draw_perturbation(("vtlp",), seed) for seed in range(200)] == [(None, alpha) for _, alpha in draws]
    speech = chirp()
    assert np.array_equal(perturb(speech, 1.1, 0.95), perturb(speech, 1.1, 0.95))


def test_a_perturbed_render_is_repeatable_and_keeps_the_plain_items_draws(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic_speech, "synthesise", _fake_synthesise)
    perturbed = dataclasses.replace(ITEM, speed=1.1, alpha=1.05)
    for name in ("first", "again"):
        (tmp_path / name).mkdir()
    first, again = (sf.read(render(perturbed, tmp_path / name), dtype="int16")[0] for name in ("first", "again"))
    assert np.array_equal(first, again)
    plain = sf.read(render(ITEM, tmp_path), dtype="int16")[0]
    # the same silences (the augmentation's draws): only the speech between them is shorter by 1/1.1
    assert len(plain) - len(first) == pytest.approx(SAMPLE_RATE - SAMPLE_RATE / 1.1, abs=2)


def test_a_perturbed_part_is_named_by_its_perturbations_and_held_out_never_is():
    assert perturbed_split("train-3", ("vtlp", "speed")) == "train-3-speed-vtlp"
    assert perturbed_split("train", ["vtlp"]) == "train-vtlp" and perturbed_split("train-2", ()) == "train-2"
    assert perturbation_of("train-3-speed-vtlp") == ("train-3", ("speed", "vtlp"))
    assert perturbation_of("train-vtlp") == ("train", ("vtlp",))
    for plain in ("train", "train-2", "held-out"):
        assert perturbation_of(plain) == (plain, ())
    with pytest.raises(ConfigError, match="never perturbed"):
        perturbed_split("held-out", ("speed",))
    with pytest.raises(ConfigError, match="unknown perturbation pitch"):
        perturbed_split("train-3", ("speed", "pitch"))
    with pytest.raises(ConfigError, match="once each"):
        perturbation_of("train-3-vtlp-speed")


def test_build_perturbs_the_last_part_alone(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(synthetic_speech, "check_synthesisers", lambda: None)
    monkeypatch.setattr(synthetic_speech, "build_split", lambda split, count, *rest: built.append((split, count)) or split)
    synthetic_speech.build(tmp_path, 10, 4, 0, [], train_parts=3)
    synthetic_speech.build(tmp_path, 10, 4, 0, [], train_parts=3, perturb=("speed", "vtlp"))
    synthetic_speech.build(tmp_path, 10, 4, 0, [], train_parts=1, perturb=("vtlp",))
    assert built == [("held-out", 4), ("train", 10), ("train-2", 10), ("train-3", 10),
                     ("held-out", 4), ("train", 10), ("train-2", 10), ("train-3-speed-vtlp", 10),
                     ("held-out", 4), ("train-vtlp", 10)]


@needs_tools
def test_a_perturbed_part_is_its_plain_parts_twin_with_factors_in_its_sources(tmp_path):
    exclusions = Exclusions.of([LIBRIVOX])
    plain, twin = plan("train-2", 40, 0, exclusions), plan("train-2-speed-vtlp", 40, 0, exclusions)
    assert [(i.text, i.voice, i.seed) for i in plain] == [(i.text, i.voice, i.seed) for i in twin]
    assert twin[0].id == "train-2-speed-vtlp-000000" and plain[0].speed is None and plain[0].alpha is None
    assert [(i.speed, i.alpha) for i in twin] == [draw_perturbation(("speed", "vtlp"), i.seed) for i in twin]
    assert [i.speed for i in plan("train-2-speed", 40, 0, exclusions)] == [i.speed for i in twin]
    _write_sources(tmp_path / "plain.jsonl", plain[:1])
    _write_sources(tmp_path / "twin.jsonl", twin[:1])
    assert list(json.loads((tmp_path / "plain.jsonl").read_text())) == ["id", "text", "reference", "kind", "voice", "seed"]
    row = json.loads((tmp_path / "twin.jsonl").read_text())
    assert (row["speed"], row["alpha"]) == (twin[0].speed, twin[0].alpha) and row["voice"] == twin[0].voice.label
