"""The synthetic training corpus: its texts (answers, exclusions), voices (disjoint pools), plan (a pure function
of seed and number, held-out sentences apart) and rendering (augmented 16 kHz speech, resumable)."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import soundfile as sf

from jobs.corpus.voices import SAMPLE_RATE, Voice, augment, voices
from jobs.corpus.synthetic_speech import _is_held_out, plan, render, train_split
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
