"""A synthetic speech-recognition corpus: texts (`jobs.corpus.texts`) spoken by many voices (`jobs.corpus.voices`),
packed as WebDataset tar shards with a manifest, like any corpus the job reads.

Two splits, disjoint in voices and in sentences:
- `train`: WordNet example sentences (alone or two joined), WordNet glosses and random word sequences, spoken
  by the training voices; more of it comes as further parts `train-2`, `train-3`, ... (each its own draws, ids,
  shards and manifest, so a corpus grows without changing the parts already built or cached);
- `held-out`: WordNet sentences of the held-out share (1 in 50, by a hash of the text) spoken by held-out voices.

A training part may also be built perturbed (`build(..., perturb=("speed", "vtlp"))`, `python -m jobs.synthesize
--perturb speed,vtlp`): its last part K then comes as `train-K-speed-vtlp` (or `-speed`, `-vtlp`) in place of
`train-K`, the same texts, voices, synthesis and augmentation draws as `train-K`, other ids, each item's speech
speed-perturbed and/or vocal-tract-length warped (`jobs.corpus.voices.perturb`) before its augmentation, with
factors drawn per item (`speed`, `alpha` in `<split>-items.jsonl`). A plain part is never perturbed, nor held-out.

Every item is a pure function of (seed, split, number), a perturbed part's perturbation named by its split: a
killed build resumes where it stopped and a rebuild gives the same corpus. Nothing of the evaluation corpora (the
LibriVox and spoken-card transcripts) enters.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import soundfile as sf

from jobs.corpus.voices import (PERTURBATIONS, SAMPLE_RATE, Voice, augment, check_synthesisers, draw_perturbation,
                                perturb, pick_voice, synthesise, voices)
from jobs.corpus.texts import Exclusions, common_words, transcript, wordnet_texts, word_sequence
from jobs.corpus.make import build_shards
from nota_model.errors import ConfigError

HELD_OUT_SHARE = 50  # one sentence in this many is held out
ITEMS_PER_SHARD = 500
SOURCES = """# Sources and licences of this corpus

- Texts: WordNet 3.0 (Debian `wordnet-base`; Princeton WordNet licence: free to use, copy, modify and distribute
  with its copyright notice) example sentences and glosses; random sequences of words from the SCOWL word list
  (Debian `wamerican`; SCOWL's licence: free use with notice).
- Voices: espeak-ng (GPL-3; its voice data), flite (BSD-style; CMU voices kal, awb, rms, slt), festival with
  festvox-kallpc16k, festvox-kdlpc16k (free use) and festvox-us-slt-hts (CMU ARCTIC, BSD-style).
- Left out: every text sharing a word 5-gram with, or holding the whole of, a LibriVox or spoken-card transcript.
"""


@dataclass(frozen=True)
class PlannedItem:
    id: str
    text: str  # what the synthesiser reads
    reference: str  # the transcript the model learns to write
    kind: str  # example, examples, gloss, words
    voice: Voice
    seed: int
    speed: float | None = None  # a perturbed part's speed factor (None: not speed-perturbed)
    alpha: float | None = None  # a perturbed part's VTLP warp factor (None: not warped)


def plan(split: str, count: int, seed: int, exclusions: Exclusions) -> list[PlannedItem]:
    """The split's items: texts and voices drawn from a generator seeded by (seed, split), a perturbed part's by
    its plain part's name (the same draws, its own ids), with its items' perturbation factors."""
    base, kinds = perturbation_of(split)
    held_out = base == "held-out"
    examples, glosses = split_texts(held_out, exclusions)
    words = common_words()
    pool = voices(held_out)
    rng = random.Random(f"{seed}:{base}")
    items = []
    for number in range(count):
        kind = rng.choices(("example", "examples", "gloss", "words"), weights=(1, 0, 1, 0) if held_out else (3, 2, 3, 2))[0]
        text = _text(kind, examples, glosses, words, rng)
        voice, item_seed = pick_voice(pool, rng), rng.getrandbits(62)
        speed, alpha = draw_perturbation(kinds, item_seed) if kinds else (None, None)
        items.append(PlannedItem(f"{split}-{number:06d}", text, transcript(text), kind, voice, item_seed, speed, alpha))
    return items


def perturbed_split(split: str, kinds: Iterable[str]) -> str:
    """The name of `split` perturbed by `kinds`, in PERTURBATIONS' order: (`train-3`, (vtlp, speed)) ->
    `train-3-speed-vtlp`."""
    chosen = set(kinds)
    unknown = chosen - set(PERTURBATIONS)
    if unknown:
        raise ConfigError(f"unknown perturbation {', '.join(sorted(unknown))}: give some of {', '.join(PERTURBATIONS)}")
    if chosen and split == "held-out":
        raise ConfigError("the held-out split is never perturbed")
    return "-".join([split, *(kind for kind in PERTURBATIONS if kind in chosen)])


def perturbation_of(split: str) -> tuple[str, tuple[str, ...]]:
    """(the plain split, the perturbations) a split's name says: `train-3-speed-vtlp` -> (`train-3`, (speed, vtlp))."""
    parts = split.split("-")
    kinds: list[str] = []
    while len(parts) > 1 and parts[-1] in PERTURBATIONS and parts[-1] not in kinds:
        kinds.insert(0, parts.pop())
    base = "-".join(parts)
    if kinds and perturbed_split(base, kinds) != split:
        raise ConfigError(f"{split}: name the perturbations once each, in the order {'-'.join(PERTURBATIONS)}")
    return base, tuple(kinds)


@lru_cache(maxsize=2)
def split_texts(held_out: bool, exclusions: Exclusions) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """WordNet's example sentences and glosses a split may draw: on its side of the held-out line, none excluded.
    Kept for the next plan: the train parts of a build, and a test's plans, filter the same 140 000 texts."""
    examples, glosses = wordnet_texts()
    keep = lambda texts: tuple(t for t in texts if _is_held_out(t) == held_out and not exclusions.excludes(t))  # noqa: E731
    return keep(examples), keep(glosses)


def _text(kind: str, examples: Sequence[str], glosses: Sequence[str], words: Sequence[str], rng: random.Random) -> str:
    if kind == "example":
        return rng.choice(examples)
    if kind == "examples":
        return f"{rng.choice(examples)}, {rng.choice(examples)}"
    if kind == "gloss":
        return rng.choice(glosses)
    return word_sequence(words, rng)


def _is_held_out(text: str) -> bool:
    return int(hashlib.blake2b(transcript(text).encode(), digest_size=8).hexdigest(), 16) % HELD_OUT_SHARE == 0


def render(item: PlannedItem, audio_dir: Path) -> Path:
    """Synthesise and augment one item into `audio_dir/ID.flac` with its transcript in `ID.txt` (kept if there)."""
    path = audio_dir / f"{item.id}.flac"
    if not path.exists():
        rng = random.Random(item.seed)
        audio = augment(perturb(synthesise(item.text, item.voice, rng), item.speed, item.alpha), rng)
        partial = path.with_name(f"{path.name}.part")  # not *.flac: a killed render leaves no audio file behind
        sf.write(partial, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        partial.rename(path)
    path.with_suffix(".txt").write_text(item.reference + "\n")
    return path


def build_split(split: str, count: int, dest: Path, seed: int, exclusions: Exclusions, workers: int) -> Path:
    """Render the split's items (resuming) and pack them; returns its manifest. A built split is left as it is."""
    manifest = dest / f"{split}.yaml"
    if manifest.exists():
        return manifest
    items = plan(split, count, seed, exclusions)
    audio_dir = dest / "audio" / split
    audio_dir.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for done, _ in enumerate(pool.map(render, items, [audio_dir] * len(items), chunksize=16), 1):
            if done % 500 == 0 or done == len(items):
                print(f"{split}: {done}/{len(items)} items rendered", flush=True)
    _write_sources(dest / f"{split}-items.jsonl", items)
    return Path(build_shards(audio_dir, None, f"synthetic-{split}", "asr", str(dest / split), ITEMS_PER_SHARD))


def _write_sources(path: Path, items: Iterable[PlannedItem]) -> None:
    with path.open("w") as file:
        for item in items:
            row = {key: value for key, value in asdict(item).items() if value is not None}  # factors of a perturbed part
            row["voice"] = item.voice.label
            file.write(json.dumps(row) + "\n")


def build(dest: Path, train_items: int, held_out_items: int, seed: int, evaluation_transcripts: Iterable[str],
          workers: int = 2, train_parts: int = 1, perturb: Iterable[str] = ()) -> dict[str, Path]:
    """Both splits under `dest` (`held-out.yaml`, `train.yaml` and `train-N.yaml` for the further parts of
    `train_items` each, shards, per-item sources, SOURCES.md). With `perturb` (some of PERTURBATIONS), the last
    part comes perturbed: `train-K-speed-vtlp.yaml` in place of `train-K.yaml`."""
    last = perturbed_split(train_split(train_parts), perturb)
    check_synthesisers()
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "SOURCES.md").write_text(SOURCES)
    exclusions = Exclusions.of(evaluation_transcripts)
    parts = [train_split(part) for part in range(1, train_parts)] + [last]
    splits = [("held-out", held_out_items)] + [(split, train_items) for split in parts]
    return {split: build_split(split, count, dest, seed, exclusions, workers) for split, count in splits}


def train_split(part: int) -> str:
    """The training split's name of part `part` (1: `train`, as built before parts existed)."""
    return "train" if part == 1 else f"train-{part}"
