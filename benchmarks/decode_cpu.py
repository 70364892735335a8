"""The decode stage's CPU per item: `decode_item` on one thread, as a model run's decode tasks run it (with the
model's features) and as a dry run's do (without them); both hear the clip with the VAD (its speech share).

    python -m benchmarks.decode_cpu [--model tiny] [--seconds 0.1] [--items 2000]

The clip is a 16 kHz 16-bit WAV tone, decoded as speech would be (the VAD hears no speech in a tone: silence is
not skipped here); the CPU time is the process's (`time.process_time`) over `--items` decodes after 50 of
warm-up, with torch on one thread as in a decode task given one CPU.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import soundfile as sf
import torch

from jobs.inference.decode import decode_item
from nota_model.audio import SAMPLE_RATE
from nota_model.config import load_config

WARM_UP = 50


def tone_wav(seconds: float) -> bytes:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def cpu_ms_per_item(data: bytes, model: str, items: int, dry_run: bool) -> float:
    config = load_config(model)
    item = {"id": "a", "audio": "a.wav", "error": None, "task": "asr"}
    for _ in range(WARM_UP):
        decode_item(dict(item), data, config.audio, features_for=config, dry_run=dry_run, skip_silence=False)
    started = time.process_time()
    for _ in range(items):
        decode_item(dict(item), data, config.audio, features_for=config, dry_run=dry_run, skip_silence=False)
    return 1000 * (time.process_time() - started) / items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seconds", type=float, default=0.1)
    parser.add_argument("--items", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = tone_wav(args.seconds)
    for name, dry_run in (("model run", False), ("dry run", True)):
        print(f"{name}: {cpu_ms_per_item(data, args.model, args.items, dry_run):.3f} ms CPU per item "
              f"({args.seconds} s clip, {args.model})")


if __name__ == "__main__":
    main()
