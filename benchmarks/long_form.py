"""Long-form against short clips: the same real speech as 1-5 minute recordings (segmented at pauses, pieces
batched across items, answers stitched) and as the clips they are made of, one item each.

    python -m benchmarks.long_form [--model whisper-base] [--batch-size 8] [--set K=V] [--output FILE.json]

Both corpora come from `python -m jobs.samples` (`long-form-sample` and `long-form-clips`). Each runs in the
batch job (`jobs.infer` on a local Ray), a fresh process, with the same model and batch size. Reports WER
(Whisper English normalizer, corpus level), x real time (audio seconds over the job's own wall time, and
over the whole process's, start-up included), the items segmented, and whether any voiced second is lost:
every speech span Silero VAD finds with its default settings must lie inside one of the item's segments.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from benchmarks.throughput import set_arguments, timed
from jobs.metrics.wer import corpus_wer
from jobs.samples import build_long_form, default_dest
from nota_model.audio import SAMPLE_RATE, load_audio
from nota_model.config import AudioConfig
from nota_model.segment import speech_spans

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
CORPORA = {"long-form": "long-form-sample", "short clips": "long-form-clips"}


def run_job(corpus: str, model: str, batch_size: int, overrides: list[str], folder: Path) -> dict[str, Any]:
    output = folder / corpus
    wall, _ = timed([sys.executable, "-m", "jobs.infer", "--manifest", str(MANIFESTS / f"{corpus}.yaml"), "--model", model,
                     "--output", str(output), "--batch-size", str(batch_size), "--no-score", *set_arguments(overrides)])
    summary = json.loads((output / corpus / "_SUCCESS.json").read_text())
    rows = pq.read_table(output / corpus).to_pylist()
    return {"process_wall_s": wall, "summary": summary, "rows": rows}


def lost_voiced_seconds(row: dict[str, Any]) -> tuple[float, float]:
    """The item's voiced seconds (Silero VAD, default settings, no length limit) and those outside its segments."""
    waveform = load_audio(row["audio"], AudioConfig(), whole=True).waveform
    spans = [(start / SAMPLE_RATE, end / SAMPLE_RATE) for start, end in speech_spans(waveform, float("inf"), pad_ms=30)]
    covered = np.zeros(len(waveform) // 160 + 1, dtype=bool)  # 10 ms steps
    for segment in row["segments"] or []:
        covered[round(segment["start"] * 100) : round(segment["end"] * 100) + 1] = True
    voiced = lost = 0.0
    for start, end in spans:
        steps = covered[round(start * 100) : round(end * 100)]
        voiced += len(steps) / 100
        lost += (~steps).sum() / 100
    return voiced, lost


def measure(corpus: str, run: dict[str, Any]) -> dict[str, Any]:
    rows = [row for row in run["rows"] if row["error"] is None]
    audio_s = run["summary"]["audio_seconds_this_run"]
    wer = corpus_wer([" ".join(row["reference"]) for row in rows], [row["text"] or "" for row in rows])
    result = {
        "corpus": corpus, "items": len(run["rows"]), "errors": len(run["rows"]) - len(rows), "audio_s": round(audio_s, 1),
        "segmented": sum(1 for row in rows if len(row["segments"] or []) > 1),
        "pieces": sum(len(row["segments"] or []) for row in rows),
        "wer": round(100 * wer.wer, 2), "job_wall_s": run["summary"]["wall_s"], "x_real_time": run["summary"]["wall_x_real_time"],
        "process_wall_s": round(run["process_wall_s"], 2), "process_x_real_time": round(audio_s / run["process_wall_s"], 2),
    }
    if result["segmented"]:
        voiced, lost = np.sum([lost_voiced_seconds(row) for row in rows], axis=0)
        result.update(voiced_s=round(float(voiced), 2), voiced_s_lost=round(float(lost), 2))
    return result


def table(results: list[dict[str, Any]]) -> str:
    columns = ["corpus", "items", "segmented", "pieces", "audio_s", "wer", "job_wall_s", "x_real_time", "process_x_real_time",
               "voiced_s", "voiced_s_lost"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(result.get(column, "")) for column in columns) + " |" for result in results]
    long, short = results
    lines.append(f"\nWER long-form - short clips: {long['wer'] - short['wer']:+.2f} points; x real time long-form / short clips: "
                 f"{long['x_real_time'] / short['x_real_time']:.2f} (job), "
                 f"{long['process_x_real_time'] / short['process_x_real_time']:.2f} (process)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="whisper-base")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", type=Path, help="also write the results here (JSON)")
    args = parser.parse_args()
    build_long_form(default_dest())
    with tempfile.TemporaryDirectory() as folder:
        results = [measure(name, run_job(corpus, args.model, args.batch_size, args.set, Path(folder)))
                   for name, corpus in CORPORA.items()]
    print(table(results))
    if args.output:
        args.output.write_text(json.dumps({"model": args.model, "batch_size": args.batch_size, "set": args.set, "results": results}, indent=2))


if __name__ == "__main__":
    main()
