"""Speech synthesised from text with Debian's offline synthesisers, and augmented, for training data.

Engines (Debian packages): `espeak-ng` (several English accents, each with many voice variants; rate and pitch),
`flite` (four US/Scottish voices; duration stretch), `festival` with `festvox-kallpc16k`, `festvox-kdlpc16k`
and `festvox-us-slt-hts` (duration stretch). Voices are split into a training pool and a held-out pool that no
training item uses, so that a held-out set measures voices the model never heard.

Augmentation (numpy, seeded per item): silence before and after, a synthetic room (exponentially decaying noise
as impulse response), a telephone band, additive white, pink or brown noise at a random SNR, and a random level.

Perturbations (for a perturbed training part only, `jobs.corpus.synthetic_speech`; applied to the synthesised speech
before `augment`, with factors drawn per item by `draw_perturbation`): `speed`, Kaldi/ESPnet speed perturbation
(the speech resampled by soxr by a factor of 0.9, 1.0 or 1.1: tempo and pitch together, length / factor), and
`vtlp`, a vocal-tract-length warp (Jaitly & Hinton 2013: the STFT's frequency axis warped piecewise-linearly, by
alpha in [0.9, 1.1] below a boundary of 4800 Hz, by a phase-locked phase vocoder, back to a waveform of the same
length: formants, and the harmonics with them, move by alpha; the duration does not).
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

PERTURBATIONS = ("speed", "vtlp")  # in the order they apply and a perturbed part's name lists them
SPEED_FACTORS = (0.9, 1.0, 1.1)
VTLP_ALPHAS = (0.9, 1.1)  # alpha's range
VTLP_BOUNDARY = 4800.0  # Hz: below it (less for alpha > 1) frequencies scale by alpha; above, a line to Nyquist
STFT_SIZE, STFT_HOP = 512, 128  # 32 ms Hann frames, 75 % overlap


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


def draw_perturbation(kinds: tuple[str, ...], seed: int) -> tuple[float | None, float | None]:
    """The item's (speed factor, VTLP alpha), None where `kinds` leaves one out: drawn from a stream of the item's
    own seed (not its synthesis rng), both always drawn, so that an item's factors are the same in every
    perturbed part of its plan (`speed`, `vtlp`, `speed-vtlp`) and its voice and augmentation those of the plain part."""
    rng = random.Random(f"{seed}:perturb")
    speed, alpha = rng.choice(SPEED_FACTORS), round(rng.uniform(*VTLP_ALPHAS), 3)
    return (speed if "speed" in kinds else None), (alpha if "vtlp" in kinds else None)


def perturb(speech: np.ndarray, speed: float | None = None, alpha: float | None = None) -> np.ndarray:
    """`speech` speed-perturbed by `speed` and then vocal-tract-length warped by `alpha` (None or 1.0: left out)."""
    if speed is not None and speed != 1.0:
        speech = speed_perturb(speech, speed)
    if alpha is not None and alpha != 1.0:
        speech = vtlp(speech, alpha)
    return speech


def speed_perturb(audio: np.ndarray, factor: float) -> np.ndarray:
    """Played `factor` times as fast (sox's `speed`): read as sampled at SAMPLE_RATE x factor and resampled to
    SAMPLE_RATE, so the length divides by `factor` and every frequency multiplies by it."""
    return soxr.resample(audio.astype(np.float32), SAMPLE_RATE * factor, SAMPLE_RATE).astype(np.float32)


def vtlp_warp(frequencies: np.ndarray, alpha: float, rate: int = SAMPLE_RATE,
              boundary: float = VTLP_BOUNDARY) -> np.ndarray:
    """Jaitly & Hinton's piecewise-linear warp: f -> alpha f up to boundary x min(alpha, 1) / alpha, then the line
    to (Nyquist, Nyquist), so the warp is continuous and maps [0, Nyquist] onto itself."""
    nyquist = rate / 2
    knee = boundary * min(alpha, 1.0) / alpha
    upper = nyquist - (nyquist - boundary * min(alpha, 1.0)) / (nyquist - knee) * (nyquist - frequencies)
    return np.where(frequencies <= knee, frequencies * alpha, upper)


def vtlp(audio: np.ndarray, alpha: float) -> np.ndarray:
    """`audio` with its spectrum warped by `vtlp_warp`, of the same length: a phase vocoder with identity phase
    locking (Laroche & Dolson 1999). Each output bin takes the magnitude at its source frequency (the inverse
    warp, interpolated); each spectral peak's phase advances at the warped instantaneous frequency of its source,
    and the bins around a peak keep their source phases relative to it, so that a harmonic's bins stay coherent.
    A tone at f comes out a tone at warp(f); alpha 1.0 gives back the input (to rounding)."""
    size, hop = STFT_SIZE, STFT_HOP
    window = np.hanning(size + 1)[:-1]
    padded = np.concatenate([np.zeros(size), audio.astype(np.float64), np.zeros(size + hop)])
    starts = hop * np.arange((len(padded) - size) // hop + 1)
    spectra = np.fft.rfft(padded[starts[:, None] + np.arange(size)] * window, axis=1)
    magnitude, phase = np.abs(spectra), np.angle(spectra)
    bins = np.fft.rfftfreq(size, 1 / SAMPLE_RATE)
    index = np.arange(len(bins))
    bin_omega = 2 * np.pi * index / size  # radians per sample
    # each source bin's instantaneous frequency, from its phase advance over a hop
    advance = np.diff(phase, axis=0, prepend=phase[:1]) - bin_omega * hop
    instantaneous = bin_omega + (advance - 2 * np.pi * np.round(advance / (2 * np.pi))) / hop
    # each output bin's source frequency: the inverse of the (increasing, piecewise-linear) warp, in bins
    position = np.interp(bins, vtlp_warp(bins, alpha), bins) / bins[1]
    low = np.clip(np.floor(position).astype(int), 0, len(bins) - 1)
    high = np.clip(low + 1, 0, len(bins) - 1)
    warped_magnitude = magnitude[:, low] * (1 - (position - low)) + magnitude[:, high] * (position - low)
    nearest = np.clip(np.round(position).astype(int), 0, len(bins) - 1)
    source_phase = phase[:, nearest]
    # the warped instantaneous frequency (a little outside [0, Nyquist] near the ends, where the warp's two lines
    # extend, so that alpha 1.0 keeps every bin's phase)
    omega = vtlp_warp(instantaneous[:, nearest] * SAMPLE_RATE / (2 * np.pi), alpha) * 2 * np.pi / SAMPLE_RATE
    warped_phase = np.empty_like(warped_magnitude)
    warped_phase[0] = source_phase[0]
    for frame in range(1, len(starts)):
        peaks = _peaks(warped_magnitude[frame])
        owner = np.searchsorted((peaks[1:] + peaks[:-1]) / 2, index)  # each bin's nearest peak
        peak_phase = warped_phase[frame - 1, peaks] + omega[frame, peaks] * hop
        warped_phase[frame] = peak_phase[owner] + source_phase[frame] - source_phase[frame, peaks[owner]]
    frames = np.fft.irfft(warped_magnitude * np.exp(1j * warped_phase), size, axis=1) * window
    out, norm = np.zeros(len(padded)), np.zeros(len(padded))
    for start, samples in zip(starts, frames):
        out[start : start + size] += samples
        norm[start : start + size] += window**2
    return (out / np.maximum(norm, 1e-8))[size : size + len(audio)].astype(np.float32)


def _peaks(magnitude: np.ndarray, reach: int = 2) -> np.ndarray:
    """The bins at least as high as the `reach` bins below and higher than those above (bin 0 if none)."""
    edged = np.concatenate([np.full(reach, -1.0), magnitude, np.full(reach, -1.0)])
    count = len(magnitude)
    peak = np.ones(count, bool)
    for step in range(1, reach + 1):
        below, above = edged[reach - step : reach - step + count], edged[reach + step : reach + step + count]
        peak &= (magnitude >= below) & (magnitude > above)
    return np.flatnonzero(peak) if peak.any() else np.zeros(1, int)
