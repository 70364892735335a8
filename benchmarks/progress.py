"""The job's ETA against the time a run really took: a real `jobs.infer` run (the stub model of
benchmarks.scaling, so the run's pace is known and steady) over tar shards of varying item counts and
clip lengths, its progress log lines every `--every` seconds compared with when the run ended.

    python -m benchmarks.progress [--shards 10] [--items 2500] [--cost-s 0.02] [--every 2] [--work DIR]

Each progress line's ETA is compared with the time left from that line to the last block (the line
written at the end, ETA 0): the figure is their ratio from the first line with a quarter of the shards
committed to the last with half of them. It runs in a fresh process with its own local Ray (4 logical
CPUs, one fake GPU).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import soundfile as sf


def write_corpus(folder: Path, shards: int, items: int, seed: int = 25) -> Path:
    """`shards` tar shards holding `items` in all, 60 % to 140 % of the mean each, clips of 0.2 to 1 s."""
    rng = np.random.default_rng(seed)
    counts = rng.uniform(0.6, 1.4, shards)
    counts = np.maximum(1, np.round(counts / counts.sum() * items)).astype(int)
    folder.mkdir(parents=True, exist_ok=True)
    for shard, count in enumerate(counts):
        with tarfile.open(folder / f"shard-{shard:05d}.tar", "w") as tar:
            for index in range(count):
                t = np.arange(int(rng.uniform(0.2, 1.0) * 16000)) / 16000
                buffer = io.BytesIO()
                sf.write(buffer, (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
                meta = json.dumps({"id": f"s{shard}-{index}", "reference": "a tone"}).encode()
                for name, data in ((f"{index:06d}.wav", buffer.getvalue()), (f"{index:06d}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    manifest = folder / "corpus.yaml"
    manifest.write_text("name: progress\ntask: asr\nshards: shard-?????.tar\n")
    return manifest


def measure(manifest: str, output: str, cost_s: float, every_s: float) -> None:
    """Child process: the run, its progress lines on stderr (structlog JSON)."""
    import ray

    import jobs.inference.progress as progress
    from benchmarks.scaling import SimulatedPredictor
    from jobs.infer import parse_args, run

    progress.REPORT_EVERY_S = every_s
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="warning")
    argv = ["--manifest", manifest, "--model", "tiny", "--output", output, "--batch-size", "16", "--no-score"]
    run(parse_args(argv), predictor=SimulatedPredictor, predictor_kwargs={"cost_s": cost_s})
    ray.shutdown()


def figures(stderr: str) -> dict:
    lines = []
    for text in stderr.splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("event") == "progress":
            lines.append(line)
    end = datetime.fromisoformat(lines[-1]["timestamp"])
    checked = []
    for line in lines:
        left = (end - datetime.fromisoformat(line["timestamp"])).total_seconds()
        if line["shards"] / 4 <= line["shards_done"] < line["shards"] / 2 and line["eta_s"] is not None and left > 0:
            checked.append({"shards_done": line["shards_done"], "items_done": line["items_done"],
                            "items_total": line["items_total"], "eta_s": line["eta_s"], "left_s": round(left, 1),
                            "ratio": round(line["eta_s"] / left, 3)})
    start = datetime.fromisoformat(lines[0]["timestamp"])
    timeline = [[round((datetime.fromisoformat(line["timestamp"]) - start).total_seconds(), 1), line["shards_done"],
                 line["items_done"], line["items_total"], line["answer_items_per_s"], line["eta_s"]] for line in lines]
    return {"items": lines[-1]["items_done"], "shards": lines[-1]["shards"], "lines": len(lines), "checked": checked,
            "timeline (s, shards done, items done, items total, items/s, ETA s)": timeline,
            "worst_ratio": max((c["ratio"] for c in checked), key=lambda r: abs(r - 1), default=None)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--items", type=int, default=2500)
    parser.add_argument("--cost-s", type=float, default=0.02, help="the stub model's seconds per item")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between progress lines")
    parser.add_argument("--work", help="where the corpus and output go (default: a temporary folder)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="nota-progress-"))
    manifest = write_corpus(work / "corpus", args.shards, args.items)
    call = (f"import runpy; runpy.run_path({__file__!r})['measure']({str(manifest)!r}, {str(work / 'out')!r}, "
            f"{args.cost_s!r}, {args.every!r})")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    print(json.dumps(figures(done.stderr), indent=1))


if __name__ == "__main__":
    main()
