"""Throughput side by side, in one run on this machine and the same real speech clips: the batch job
(`jobs.infer` on a local Ray), the project's best single-process runner (`nota_model.transcribe`,
batched, every core), and faster-whisper one file at a time on the same CTranslate2 weights and
compute type. Each runner is a fresh process timed from its start to its exit: start-up included.

    python -m benchmarks.throughput [--items 300] [--batch-size 8] [--models whisper-base,tiny] [--set K=V] [--output FILE.json]

The clips are the real sample speech (LibriVox and spoken playing cards, with transcripts), repeated to
`--items`. Decoding is greedy. Prints a Markdown table: items/s, x real time, WER (Whisper English
normalizer; meaningless for random-weight models), the ratios, the job's model batch sizes and its model
actor's CPU time per item outside `model.generate` (the rows' `actor_cpu_s`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import soundfile as sf

from jobs.metrics.wer import corpus_wer
from jobs.samples import default_dest, fetch_cards, fetch_librivox
from nota_model.build import random_parts
from nota_model.config import WhisperASRConfig, load_config
from nota_model.overrides import parse_overrides
from nota_model.storage import resolve

CORPUS = "throughput"


def build_corpus(folder: Path, items: int) -> tuple[Path, dict[str, str], float]:
    """An item list of the real sample speech repeated to `items` items, its manifest, the references by
    id and the total audio seconds."""
    clips = [json.loads(line) for fetch in (fetch_librivox, fetch_cards) for line in fetch(default_dest()).read_text().splitlines()]
    rows = [{**clips[i % len(clips)], "id": f"{clips[i % len(clips)]['id']}#{i}"} for i in range(items)]
    (folder / "items.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    manifest = folder / "corpus.yaml"
    manifest.write_text(f"name: {CORPUS}\ntask: asr\nitems: items.jsonl\n")
    seconds = {clip["audio"]: sf.info(clip["audio"]).duration for clip in clips}
    return manifest, {row["id"]: row["reference"] for row in rows}, sum(seconds[row["audio"]] for row in rows)


def timed(command: list[str]) -> tuple[float, str]:
    """Wall seconds of a fresh process, and what it printed."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return wall, done.stdout


def set_arguments(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def run_job(manifest: Path, model: str, batch_size: int, overrides: list[str], folder: Path) -> dict[str, Any]:
    output = folder / f"job-{Path(model).stem}"
    wall, _ = timed([sys.executable, "-m", "jobs.infer", "--manifest", str(manifest), "--model", model,
                     "--output", str(output), "--batch-size", str(batch_size), "--no-score", *set_arguments(overrides)])
    rows = pq.read_table(output / CORPUS).select(["id", "text", "worker", "created_at", "batch_size", "actor_cpu_s"]).to_pylist()
    batches = Counter((row["worker"], row["created_at"]) for row in rows)  # one timestamp per model batch
    actor_cpu = [row["actor_cpu_s"] for row in rows if row["actor_cpu_s"] is not None]
    return {"wall_s": wall, "texts": {row["id"]: row["text"] for row in rows}, "batch_sizes": sorted(batches.values(), reverse=True),
            "actor_cpu_ms": round(1000 * sum(actor_cpu) / len(actor_cpu), 3) if actor_cpu else None}


def run_single_process(items: Path, model: str, batch_size: int, overrides: list[str]) -> dict[str, Any]:
    wall, out = timed([sys.executable, "-m", "nota_model.transcribe", str(items), "--model", model, "--batch-size", str(batch_size),
                       *set_arguments(overrides)])
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{") and '"summary"' not in line]
    return {"wall_s": wall, "texts": {row["id"]: row["text"] for row in rows}}


def run_faster_whisper(items: Path, model: str, overrides: list[str]) -> dict[str, Any]:
    wall, out = timed([sys.executable, "-m", "benchmarks.throughput", "--faster-whisper-items", str(items), "--models", model,
                       *set_arguments(overrides)])
    return {"wall_s": wall, "texts": json.loads(out)}


def faster_whisper_transcripts(items: Path, model: str, overrides: list[str]) -> dict[str, str]:
    """faster-whisper on the model's own CTranslate2 files and compute type, one file at a time, greedy,
    its other options at their defaults."""
    from faster_whisper import WhisperModel  # the benchmark's own runner, installed with the test extras

    config = load_config(model, parse_overrides(overrides))
    compute_type = "int8" if config.compute_type == "auto" else config.compute_type
    whisper = WhisperModel(str(resolve(config.ctranslate2_location)), device="cpu", compute_type=compute_type, cpu_threads=os.cpu_count())
    texts = {}
    for line in items.read_text().splitlines():
        item = json.loads(line)
        segments, _ = whisper.transcribe(item["audio"], language=config.language, beam_size=1)
        texts[item["id"]] = "".join(segment.text for segment in segments)
    return texts


def measure(model: str, overrides: list[str], manifest: Path, references: dict[str, str], audio_s: float, batch_size: int,
            folder: Path) -> list[dict[str, Any]]:
    config = load_config(model, parse_overrides(overrides))
    items = manifest.parent / "items.jsonl"
    runs = {"job": run_job(manifest, model, batch_size, overrides, folder),
            "single process": run_single_process(items, model, batch_size, overrides)}
    if isinstance(config, WhisperASRConfig):
        runs["faster-whisper"] = run_faster_whisper(items, model, overrides)
    meaningful = not random_parts(config, None)
    results = []
    for runner, run in runs.items():
        ids = sorted(references)
        answered = sum(1 for i in ids if run["texts"].get(i) is not None)
        wer = corpus_wer([references[i] for i in ids], [run["texts"].get(i) or "" for i in ids]).wer if meaningful else None
        results.append({"model": model, "runner": runner, "items": len(ids), "answered": answered, "wall_s": round(run["wall_s"], 2),
                        "items_per_s": round(len(ids) / run["wall_s"], 3), "x_real_time": round(audio_s / run["wall_s"], 2),
                        "wer": None if wer is None else round(100 * wer, 2), "batch_sizes": run.get("batch_sizes"),
                        "actor_cpu_ms": run.get("actor_cpu_ms")})
    for result in results:
        result["job_over_this"] = round(results[0]["items_per_s"] / result["items_per_s"], 3)
    return results


def table(results: list[dict[str, Any]], batch_size: int) -> str:
    lines = ["| model | runner | items | wall s | items/s | x real time | WER % | job / this | model batches | actor CPU ms/item outside generate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(result["model"] for result in results):
        group = [result for result in results if result["model"] == model]
        for result in group:
            sizes = result["batch_sizes"]
            batches = f"{len(sizes)} ({sum(1 for s in sizes if s < batch_size)} not full)" if sizes else ""
            wer = "–" if result["wer"] is None else f"{result['wer']:.2f}"
            lines.append(f"| {model} | {result['runner']} | {result['items']} | {result['wall_s']} | {result['items_per_s']} | "
                         f"{result['x_real_time']} | {wer} | {result['job_over_this']:.2f} | {batches} | {result['actor_cpu_ms'] or ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--models", default="whisper-base,tiny", help="presets or configs, comma-separated")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every model")
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    parser.add_argument("--faster-whisper-items", type=Path, help=argparse.SUPPRESS)  # the faster-whisper runner's own process
    args = parser.parse_args(argv)
    if args.faster_whisper_items:
        print(json.dumps(faster_whisper_transcripts(args.faster_whisper_items, args.models, args.set)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        manifest, references, audio_s = build_corpus(Path(tmp), args.items)
        results = [result for model in args.models.split(",")
                   for result in measure(model, args.set, manifest, references, audio_s, args.batch_size, Path(tmp))]
    report = {"machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()}, "items": args.items, "overrides": args.set,
              "audio_seconds": round(audio_s, 1), "batch_size": args.batch_size, "results": results}
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))
    print(table(results, args.batch_size))
    print(json.dumps({key: value for key, value in report.items() if key != "results"}))


if __name__ == "__main__":
    main()
