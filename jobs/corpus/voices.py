"""Speech synthesised from text with Debian's offline synthesisers, and augmented, for training data.

Engines (Debian packages): `espeak-ng` (several English accents, each with many voice variants; rate and pitch),
`flite` (four US/Scottish voices; duration stretch), `festival` with `festvox-kallpc16k`, `festvox-kdlpc16k`
and `festvox-us-slt-hts` (duration stretch). Voices are split into a training pool and a held-out pool that no
training item uses, so that a held-out set measures voices the model never heard.

Augmentation (numpy, seeded per item): silence before and after, a synthetic room (exponentially decaying noise
as impulse response), a telephone band, additive white, pink or brown noise at a random SNR, and a random level.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from nota_model.errors import ConfigError

SAMPLE_RATE = 16000
DEBIAN_PACKAGES = ("espeak-ng", "flite", "festival", "festvox-kallpc16k", "festvox-kdlpc16k", "festvox-us-slt-hts")

ESPEAK_ACCENTS_TRAIN = ("en", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-029", "en-us-nyc")
ESPEAK_ACCENTS_HELD_OUT = ("en-gb-x-gbcwmd",)
# espeak-ng variants (`espeak-ng --voices=variant`), less the whispered, robotic and distorted ones.
ESPEAK_VARIANTS_TRAIN = (
    "m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f5", "adam", "Alex", "Alicia", "Andy", "Annie",
    "antonio", "aunty", "belinda", "benjamin", "boris", "caleb", "david", "Denis", "Diogo", "ed", "edward",
    "Gene", "gustave", "Henrique", "Hugo", "iven", "iven2", "Jacky", "john", "kaukovalta", "Lee", "linda",
    "marcelo", "Marco", "Mario", "max", "Michael", "michel", "miguel", "Mike", "Mr", "Nguyen", "norbert",
    "pablo", "paul", "pedro", "quincy", "rob", "robert", "sandro", "shelby", "steph", "steph2", "victor", "zac",
    "klatt", "klatt2", "klatt3", "grandpa", "grandma",
)
ESPEAK_VARIANTS_HELD_OUT = ("m6", "f4", "Andrea", "travis", "iven3", "steph3", "edward2", "klatt4")
FLITE_TRAIN = ("kal16", "awb", "slt")
FLITE_HELD_OUT = ("rms",)
FESTIVAL_TRAIN = ("cmu_us_slt_arctic_hts", "ked_diphone")
FESTIVAL_HELD_OUT = ("kal_diphone",)


@dataclass(frozen=True)
class Voice:
    """A synthesiser voice: `engine` (espeak-ng, flite, festival), its `name`, and an espeak-ng `variant`."""

    engine: str
    name: str
    variant: str | None = None

    @property
    def label(self) -> str:
        return f"{self.engine}:{self.name}" + (f"+{self.variant}" if self.variant else "")


def voices(held_out: bool) -> list[Voice]:
    """The training pool, or the held-out pool (disjoint accents, variants and voices)."""
    accents, variants = (ESPEAK_ACCENTS_HELD_OUT, ESPEAK_VARIANTS_HELD_OUT) if held_out else (ESPEAK_ACCENTS_TRAIN, ESPEAK_VARIANTS_TRAIN)
    espeak = [Voice("espeak-ng", accent, variant) for accent in accents for variant in variants]
    flite = [Voice("flite", name) for name in (FLITE_HELD_OUT if held_out else FLITE_TRAIN)]
    festival = [Voice("festival", name) for name in (FESTIVAL_HELD_OUT if held_out else FESTIVAL_TRAIN)]
    return espeak + flite + festival


def pick_voice(pool: list[Voice], rng: random.Random) -> Voice:
    """espeak-ng's many accent x variant voices get half the items, flite's and festival's few voices a quarter each."""
    engine = rng.choices(("espeak-ng", "flite", "festival"), weights=(2, 1, 1))[0]
    return rng.choice([voice for voice in pool if voice.engine == engine])


def check_synthesisers() -> None:
    missing = [tool for tool in ("espeak-ng", "flite", "text2wave") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"speech synthesis needs {', '.join(missing)}: apt-get install {' '.join(DEBIAN_PACKAGES)}")


def synthesise(text: str, voice: Voice, rng: random.Random) -> np.ndarray:
    """`text` spoken by `voice` at a random rate (and pitch for espeak-ng): mono float32 at 16 kHz."""
    with tempfile.TemporaryDirectory(prefix="nota-tts-") as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(_command(text, voice, rng, wav, Path(tmp)), check=True, capture_output=True, timeout=120)
        samples, rate = sf.read(wav, dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    return soxr.resample(mono, rate, SAMPLE_RATE).astype(np.float32) if rate != SAMPLE_RATE else mono


def _command(text: str, voice: Voice, rng: random.Random, wav: Path, tmp: Path) -> list[str]:
    if voice.engine == "espeak-ng":
        name = f"{voice.name}+{voice.variant}" if voice.variant else voice.name
        return ["espeak-ng", "-v", name, "-s", str(rng.randint(125, 205)), "-p", str(rng.randint(25, 75)), "-w", str(wav), text]
    stretch = round(rng.uniform(0.85, 1.25), 2)
    if voice.engine == "flite":
        return ["flite", "-voice", voice.name, "--setf", f"duration_stretch={stretch}", "-t", text, "-o", str(wav)]
    text_file = tmp / "text.txt"
    text_file.write_text(text + "\n")
    setup = f"(begin (voice_{voice.name}) (Parameter.set 'Duration_Stretch {stretch}))"
    return ["text2wave", "-eval", setup, str(text_file), "-o", str(wav)]


def augment(speech: np.ndarray, rng: random.Random) -> np.ndarray:
    """Silence around the speech, then (each at random) a room, a telephone band, noise; a random peak level."""
    generator = np.random.default_rng(rng.getrandbits(63))
    audio = np.concatenate([np.zeros(int(rng.uniform(0.05, 0.5) * SAMPLE_RATE), np.float32), speech,
                            np.zeros(int(rng.uniform(0.05, 0.5) * SAMPLE_RATE), np.float32)])
    if rng.random() < 0.3:
        audio = _room(audio, rng.uniform(0.15, 0.6), generator)
    if rng.random() < 0.15:
        audio = _band(audio, 300.0, 3400.0)
    if rng.random() < 0.5:
        audio = audio + _noise(len(audio), rng.choice(("white", "pink", "brown")), generator) * _noise_scale(audio, rng.uniform(5.0, 30.0))
    peak = float(np.abs(audio).max()) or 1.0
    return (audio / peak * 10 ** (rng.uniform(-20.0, -1.0) / 20)).astype(np.float32)


def _room(audio: np.ndarray, rt60: float, generator: np.random.Generator) -> np.ndarray:
    """Convolution with a synthetic impulse response: a direct path and a noise tail decaying 60 dB in `rt60` s."""
    length = int(rt60 * SAMPLE_RATE)
    time = np.arange(length) / SAMPLE_RATE
    response = generator.standard_normal(length) * np.exp(-6.9 * time / rt60) * 0.3
    response[0] = 1.0
    size = len(audio) + length - 1
    wet = np.fft.irfft(np.fft.rfft(audio, size) * np.fft.rfft(response, size), size)[: len(audio)]
    return wet.astype(np.float32)


def _band(audio: np.ndarray, low: float, high: float) -> np.ndarray:
    spectrum = np.fft.rfft(audio)
    frequencies = np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE)
    spectrum[(frequencies < low) | (frequencies > high)] = 0
    return np.fft.irfft(spectrum, len(audio)).astype(np.float32)


def _noise(length: int, colour: str, generator: np.random.Generator) -> np.ndarray:
    """Unit-power noise: white, pink (1/f power) or brown (1/f^2)."""
    spectrum = np.fft.rfft(generator.standard_normal(length))
    frequencies = np.maximum(np.fft.rfftfreq(length, 1 / SAMPLE_RATE), 20.0)
    spectrum *= {"white": 1.0, "pink": frequencies**-0.5, "brown": frequencies**-1.0}[colour]
    noise = np.fft.irfft(spectrum, length)
    return (noise / (np.sqrt(np.mean(noise**2)) or 1.0)).astype(np.float32)


def _noise_scale(audio: np.ndarray, snr_db: float) -> float:
    power = float(np.mean(audio**2))
    return float(np.sqrt(power / 10 ** (snr_db / 10)))
