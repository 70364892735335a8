"""Run a NOTA model over audio files or JSONL item lists on this machine, without Ray.

Prints one JSON line per item (the answer, or an error code and message) and a closing summary.
For corpora, use the Ray job (`python -m jobs.infer`).

Usage: python -m nota_model.transcribe --model tiny [--checkpoint C] [--set llm.path=DIR] INPUT...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.utils import logging as transformers_logging

from nota_model.audio import AudioClip, load_audio
from nota_model.build import load_model
from nota_model.config import load_config
from nota_model.errors import AudioError
from nota_model.long_form import generate_pieces
from nota_model.overrides import parse_overrides
from nota_model.segment import plan_pieces
from nota_model.signals import flags


@dataclass(frozen=True)
class Item:
    id: str
    audio: str
    task: str
    prompt: str | None = None
    reference: str | list[str] | None = None


def read_items(inputs: list[str], default_task: str) -> Iterator[Item]:
    """Audio paths as they are; `.jsonl` files as item lists (`id`, `audio`, optional `task`, `prompt`,
    `reference`; see manifests/README.md)."""
    for source in inputs:
        if source.endswith(".jsonl"):
            for line in Path(source).read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    task = row.get("task", default_task)
                    yield Item(str(row["id"]), row["audio"], task, row.get("prompt"), row.get("reference"))
        else:
            yield Item(Path(source).stem, source, default_task)


def batched(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="audio files or JSONL item lists")
    parser.add_argument("--model", default="tiny", help="preset name or YAML config path")
    parser.add_argument("--checkpoint", help="trained parameters: seed .pth or safetensors, path or URL")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--task", default="asr", help="task for inputs that name none")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of the model (default: all)")
    args = parser.parse_args(argv)
    transformers_logging.set_verbosity_error()

    config = load_config(args.model, parse_overrides(args.set))
    loaded = load_model(config, checkpoint=args.checkpoint, device=args.device, threads=args.threads)
    if loaded.warning():
        print(f"WARNING: {loaded.warning()}", file=sys.stderr)
    started, counts = time.perf_counter(), {"items": 0, "errors": 0, "audio_seconds": 0.0}
    for batch in batched(read_items(args.inputs, args.task), args.batch_size):
        for row in run_batch(loaded.model, batch, loaded.identity):
            counts["items"] += 1
            counts["errors"] += row["error"] is not None
            counts["audio_seconds"] += row.get("audio_seconds") or 0.0
            print(json.dumps(row, ensure_ascii=False), flush=True)
    wall = time.perf_counter() - started
    summary = {**counts, "wall_s": round(wall, 3), "items_per_s": round(counts["items"] / wall, 3),
               "x_real_time": round(counts["audio_seconds"] / wall, 3), "model": loaded.identity}
    print(json.dumps({"summary": summary}), flush=True)
    return 0


def run_batch(model: Any, batch: list[Item], identity: str) -> list[dict[str, Any]]:
    """One row per item, in order: the answer and its signals, or the audio error that kept the item out of the
    batch. Recordings over the window are segmented (unless the config's `audio.long_form` is `truncate`) and
    the pieces of the whole batch share model batches of the batch's size."""
    rows: list[dict[str, Any]] = [
        {"id": item.id, "task": item.task, "text": None, "error": None, "reference": item.reference} for item in batch
    ]
    audio = model.config.audio
    ready: list[tuple[int, AudioClip]] = []
    for position, item in enumerate(batch):
        try:
            ready.append((position, load_audio(item.audio, audio, whole=audio.long_form == "segment")))
        except AudioError as err:
            rows[position].update(error=err.code, message=err.message)
    if ready:
        prompts = [model.prompt_for(batch[p].task, batch[p].prompt) for p, _ in ready]
        signals = model.config.signals
        plans = [plan_pieces(clip.waveform, batch[p].task, audio.max_seconds, signals.skip_silence) for p, clip in ready]
        output = generate_pieces(model, [clip for _, clip in ready], prompts, [plan.pieces for plan in plans], len(batch))
        for (position, clip), plan, answer in zip(ready, plans, output.answers):
            rows[position].update(
                text=answer.text,
                segments=[[round(s.start, 3), round(s.end, 3), s.text] for s in answer.segments],
                language=answer.language,
                language_probability=None if answer.language_probability is None else round(answer.language_probability, 4),
                words=None if answer.words is None else [[w.word, round(w.start, 3), round(w.end, 3), round(w.probability, 3)]
                                                         for w in answer.words],
                speech_share=plan.speech_share,
                mean_logprob=answer.signals.mean_logprob,
                compression_ratio=answer.signals.compression_ratio,
                flags=flags(answer.signals, plan.speech_share, signals),
                audio_seconds=round(clip.original_seconds, 3),
                truncated=clip.truncated,
                output_tokens=answer.output_tokens,
                ttft_s=None if output.ttft_s is None else round(output.ttft_s, 4),
                tpot_s=None if output.tpot_s is None else round(output.tpot_s, 4),
                model=identity,
            )
    return rows


if __name__ == "__main__":
    sys.exit(main())
