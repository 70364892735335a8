"""jobs.samples' real-speech development set: its clips read and resampled from package files, references
taken from the package or transcribed, duplicates of the report-only samples left out; and the fetched set
itself shares no id and no recording with the LibriVox and cards samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from jobs.samples import (
    DEV_CLIPS,
    WHISPER_REFERENCE,
    DevClip,
    build_dev_set,
    default_dest,
    fetch_cards,
    fetch_librivox,
    fetch_real_speech_dev,
    shares_recording,
)


def speech_like(seconds: float, rate: int, seed: int) -> np.ndarray:
    """Noise shaped by a slow envelope: no two seeds correlate."""
    rng = np.random.default_rng(seed)
    frames = round(seconds * rate)
    envelope = 0.5 + 0.5 * np.sin(np.linspace(0, 6 * np.pi, frames)) ** 2
    return (0.2 * rng.standard_normal(frames) * envelope).astype(np.float32)


def test_a_cut_of_a_recording_at_another_gain_shares_it_and_other_speech_does_not():
    recording = speech_like(3.0, 16000, seed=1)
    assert shares_recording(recording, 0.5 * recording[8000:24000])
    assert shares_recording(recording[4000:20000], recording)
    assert not shares_recording(recording, speech_like(1.0, 16000, seed=2))
    assert not shares_recording(recording, np.zeros(16000, np.float32))


@pytest.fixture
def packages(tmp_path: Path) -> dict[str, Path]:
    """Two fake extracted packages: an 8 kHz headerless `.raw`, a 16 kHz WAV, a WAV of a report-only recording
    and a `.raw` that repeats the first clip's second half."""
    first, second = tmp_path / "pkg-a", tmp_path / "pkg-b"
    (first / "data").mkdir(parents=True)
    (second / "sounds").mkdir(parents=True)
    raw = speech_like(2.0, 8000, seed=3)
    (np.clip(raw, -1, 1) * 32767).astype("<i2").tofile(first / "data" / "talk.raw")
    (np.clip(raw[8000:], -1, 1) * 32767).astype("<i2").tofile(first / "data" / "talk-part.raw")
    sf.write(second / "sounds" / "Front_Left.wav", speech_like(1.5, 16000, seed=4), 16000)
    sf.write(second / "sounds" / "report.wav", speech_like(1.0, 16000, seed=5), 16000)
    return {"a": first, "b": second}


def test_the_dev_set_is_built_from_package_files_with_duplicates_left_out(tmp_path, packages, capsys):
    clips = [
        DevClip("talk", "a", "data/talk.raw", raw_rate=8000),
        DevClip("front-left", "b", "sounds/Front_Left.wav", "front left", "file name"),
        DevClip("report", "b", "sounds/report.wav", "a report-only clip", "file name"),
        DevClip("talk-part", "a", "data/talk-part.raw", raw_rate=8000),
    ]
    report_only = [sf.read(packages["b"] / "sounds" / "report.wav", dtype="float32")[0]]
    transcribed: list[list[Path]] = []

    def transcribe(paths):
        transcribed.append(list(paths))
        return [f" words of {path.stem}." for path in paths]

    items = build_dev_set(clips, packages, report_only, tmp_path / "dev", transcribe)

    assert [item["id"] for item in items] == ["talk", "front-left"]
    assert transcribed == [[tmp_path / "dev" / "talk.wav"]]
    assert items[0] | {"audio": None} == {"id": "talk", "audio": None, "task": "asr", "reference": "words of talk.",
                                          "reference_source": WHISPER_REFERENCE, "package": "a", "file": "data/talk.raw"}
    assert (items[1]["reference"], items[1]["reference_source"]) == ("front left", "file name")
    talk, rate = sf.read(items[0]["audio"])
    assert rate == 16000 and len(talk) == 32000  # 2 s at 8 kHz, resampled
    left_out = capsys.readouterr().err
    assert "report: left out" in left_out and "talk-part: left out" in left_out


def test_dev_clips_have_unique_ids_and_name_their_reference_source():
    assert len({clip.id for clip in DEV_CLIPS}) == len(DEV_CLIPS)
    for clip in DEV_CLIPS:
        assert (clip.reference is None) == (clip.reference_source == WHISPER_REFERENCE)
        assert clip.path.endswith(".raw") == (clip.raw_rate is not None)
        assert "librivox" not in clip.path and "/cards/" not in clip.path


def test_the_fetched_dev_set_shares_no_id_or_recording_with_the_report_only_samples():
    dev = [json.loads(line) for line in fetch_real_speech_dev(default_dest()).read_text().splitlines()]
    report_only = [json.loads(line) for fetch in (fetch_librivox, fetch_cards) for line in fetch(default_dest()).read_text().splitlines()]
    assert not {item["id"] for item in dev} & {item["id"] for item in report_only}
    assert not {Path(item["audio"]).resolve() for item in dev} & {Path(item["audio"]).resolve() for item in report_only}
    report_waveforms = [sf.read(item["audio"], dtype="float32")[0] for item in report_only]
    for item in dev:
        waveform, rate = sf.read(item["audio"], dtype="float32")
        assert rate == 16000 and len(waveform) <= 30 * rate
        assert not any(shares_recording(waveform, other) for other in report_waveforms), item["id"]
