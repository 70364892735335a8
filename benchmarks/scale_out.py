"""The job at corpus scale: tiny generated clips in tar shards of 1 000, the driver's cost as the corpus grows.

    python -m benchmarks.scale_out [--sizes 20000,100000,200000] [--modes dry,stub] [--s3-items 5000]
                                   [--baseline-ref 6e6465c] [--baseline-sizes 20000,100000,200000] [--work DIR]

For each corpus size and mode it runs the real job (`jobs.infer.run`) in a fresh Python process with a
fresh local Ray (4 logical CPUs, one fake GPU), and reports from that process:

- `driver_peak_rss_mb`: the driver process's own peak RSS (its Ray workers are other processes);
- `first_batch_s`: job start to the start of its first model batch (the dry run: to its first row);
- `items_per_s`: items over the job's own wall time (`run()`'s summary);
- `rows`, `errors`: every item has its row (a run with a missing row or an error is reported as failed).

Modes: `dry` (`--dry-run`: read, decode and write, no model), `stub` (the `benchmarks.scaling` stub model
answering at no cost: the pipeline's own ceiling with a model stage). Against the loopback S3 server
(moto, counting the requests it serves) the `dry` mode (the baseline: `stub`) over `--s3-items` items
gives `get_requests_per_item` (all of them: the shards, listings, the output's staging, commits and
summary) and `corpus_get_requests_per_item` (those reading the shards). The baseline is the job at `--baseline-ref`, exported with `git archive`
and run from there; it has no dry run.

Clips: 0.1 s of 16 kHz 16-bit tone (3.3 kB) each; all sizes share one set of shards (hard links).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

ITEMS_PER_SHARD = 1000
BASELINE_REF = "6e6465c"  # main before issue 12: the driver lists every item and writes every file
CLIP_SECONDS = 0.1
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def clip_bytes(number: int) -> bytes:
    t = np.arange(int(CLIP_SECONDS * 16000)) / 16000
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * (200 + number % 50 * 10) * t)).astype(np.float32), 16000,
             format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_shards(folder: Path, shards: int) -> list[Path]:
    """`shards` tar shards of ITEMS_PER_SHARD WebDataset items (`NNNNNN.wav` + `NNNNNN.json`), made once."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = [clip_bytes(number) for number in range(50)]
    paths = []
    for shard in range(shards):
        path = folder / f"shard-{shard:05d}.tar"
        paths.append(path)
        if path.exists():
            continue
        with tarfile.open(path.with_suffix(".tmp"), "w") as tar:
            for index in range(ITEMS_PER_SHARD):
                key = f"{index:06d}"
                meta = json.dumps({"id": f"s{shard}-{key}", "reference": "a tone"}).encode()
                for name, data in ((f"{key}.wav", clips[index % 50]), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        path.with_suffix(".tmp").rename(path)
    return paths


def corpus(work: Path, items: int) -> Path:
    """A manifest over the first items // ITEMS_PER_SHARD shared shards (hard-linked into its own folder)."""
    shards = write_shards(work / "shards", items // ITEMS_PER_SHARD)
    folder = work / f"corpus-{items}"
    folder.mkdir(exist_ok=True)
    for shard in shards:
        if not (folder / shard.name).exists():
            os.link(shard, folder / shard.name)
    manifest = folder / "corpus.yaml"
    manifest.write_text("name: scale\ntask: asr\nshards: shard-?????.tar\n")
    return manifest


def measure(manifest: str, output: str, mode: str, storage_options: str) -> None:
    """Child process: one run of the job from the code on the path; prints its figures (JSON)."""
    import pyarrow.compute as pc
    import ray

    from benchmarks.scaling import SimulatedPredictor
    from jobs.infer import parse_args, run
    from jobs.predictions import read_predictions

    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="warning")
    ray.data.DataContext.get_current().enable_progress_bars = False
    argv = ["--manifest", manifest, "--model", "tiny", "--output", output, "--batch-size", "32", "--no-score",
            "--storage-options", storage_options]
    started = time.time()
    if mode == "dry":
        summary = run(parse_args([*argv, "--dry-run"]))
    else:
        summary = run(parse_args(argv), predictor=SimulatedPredictor, predictor_kwargs={"cost_s": 0.0})
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ray.shutdown()
    rows = read_predictions(f"{output.rstrip('/')}/scale", json.loads(storage_options),
                            columns=["id", "error", "created_at", "model_s"])
    batch_starts = rows["created_at"].cast("int64").to_numpy() / 1e6 - pc.fill_null(rows["model_s"], 0.0).to_numpy()
    print(json.dumps({
        "wall_s": summary["wall_s"], "items": summary["items"], "rows": rows.num_rows,
        "unique_ids": pc.count_distinct(rows["id"]).as_py(), "errors": rows.num_rows - rows["error"].null_count,
        "driver_peak_rss_mb": round(peak_rss_mb, 1),
        "first_batch_s": round(float(batch_starts.min()) - started, 2),
        "items_per_s": round(summary["items"] / summary["wall_s"], 1),
    }))


def run_measure(manifest: str, output: str, mode: str, code: Path | None, storage_options: dict[str, Any]) -> dict:
    """One measurement in a fresh process, run from `code` (another tree, first on the path) or from here."""
    here = Path(__file__).resolve().parents[1]
    call = (f"import runpy; runpy.run_path({__file__!r})['measure']({manifest!r}, {output!r}, {mode!r}, "
            f"{json.dumps(storage_options)!r})")
    env = {**os.environ, "PYTHONPATH": str(code or here)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", call], cwd=code or here, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"failed": done.stderr[-3000:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["ok"] = result["rows"] == result["unique_ids"] == result["items"] and result["errors"] == 0
    return result


def export_baseline(ref: str, into: Path) -> Path:
    """The job at `ref`: `jobs`, `nota_model` and `benchmarks`, exported from this repository's git."""
    archive = subprocess.run(["git", "archive", ref, "jobs", "nota_model", "benchmarks"], check=True,
                             capture_output=True, cwd=Path(__file__).resolve().parents[1]).stdout
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


class CountingS3Server:
    """moto's S3 server on a loopback port, counting the requests it serves by HTTP method, those on the corpus's
    shards apart (`GET corpus`)."""

    def __init__(self) -> None:
        import logging

        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
        self.requests: Counter[str] = Counter()
        app = DomainDispatcherApplication(create_backend_app)

        def counted(environ: dict, start_response: Any) -> Any:
            corpus = "/scale/shard-" in environ["PATH_INFO"]
            self.requests[f"{environ['REQUEST_METHOD']}{' corpus' if corpus else ''}"] += 1
            return app(environ, start_response)

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.server = make_server("127.0.0.1", port, counted, threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.storage_options = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
                                "key": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}


def s3_run(work: Path, items: int, mode: str, code: Path | None) -> dict:
    """The job over `items` items in tar shards on the counting S3 server; its GET requests per item."""
    import s3fs

    os.environ.update(CREDENTIALS)
    server = CountingS3Server()
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options)
        bucket = f"corpus-{uuid.uuid4().hex[:8]}"  # moto keeps buckets across servers in one process
        fs.mkdir(bucket)
        for shard in write_shards(work / "shards", items // ITEMS_PER_SHARD):
            fs.put_file(str(shard), f"{bucket}/scale/{shard.name}")
        fs.pipe(f"{bucket}/scale/corpus.yaml", b"name: scale\ntask: asr\nshards: shard-?????.tar\n")
        before = dict(server.requests)
        result = run_measure(f"s3://{bucket}/scale/corpus.yaml", f"s3://{bucket}/out", mode, code, server.storage_options)
        result["requests"] = {method: count - before.get(method, 0) for method, count in server.requests.items()}
        gets = result["requests"].get("GET", 0) + result["requests"].get("GET corpus", 0)
        result["get_requests_per_item"] = round(gets / items, 4)
        result["corpus_get_requests_per_item"] = round(result["requests"].get("GET corpus", 0) / items, 4)
    finally:
        server.server.shutdown()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20000,100000,200000")
    parser.add_argument("--modes", default="dry,stub")
    parser.add_argument("--s3-items", type=int, default=5000, help="items of the S3 request count (0: skip it)")
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--baseline-sizes", default="20000,100000,200000", help="sizes the baseline also runs (empty: none)")
    parser.add_argument("--only-baseline", action="store_true", help="measure the baseline alone")
    parser.add_argument("--work", help="where the shards are kept (default: a temporary folder)")
    parser.add_argument("--output", help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    baseline_sizes = {int(size) for size in args.baseline_sizes.split(",") if size}
    results = []
    with tempfile.TemporaryDirectory(prefix="nota-scale-out-") as tmp:
        work = Path(args.work or tmp).resolve()
        baseline = export_baseline(args.baseline_ref, Path(tmp, "baseline")) if baseline_sizes else None
        runs = [] if args.only_baseline else [("new", None, mode) for mode in args.modes.split(",")]
        runs += [("baseline", baseline, "stub")] if baseline else []
        for code_name, code, mode in runs:
            for items in sizes if code_name == "new" else sorted(baseline_sizes):
                output = Path(tmp, f"out-{code_name}-{mode}-{items}")
                result = run_measure(str(corpus(work, items)), str(output), mode, code, {})
                results.append({"code": code_name, "mode": mode, "items": items, "load_avg_1m": os.getloadavg()[0], **result})
                print(json.dumps(results[-1]), flush=True)
            if args.s3_items:
                s3_mode = "stub" if code_name == "baseline" else mode
                result = s3_run(work, args.s3_items, s3_mode, code)
                results.append({"code": code_name, "mode": f"{s3_mode} s3", "items": args.s3_items,
                                "load_avg_1m": os.getloadavg()[0], **result})
                print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


def table(results: list[dict]) -> str:
    lines = ["| code | mode | items | wall s | items/s | first batch s | driver peak RSS MB | GET/item (shards) | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['code']} | {r['mode']} | {r['items']:,} | FAILED | | | | | {r['load_avg_1m']:.1f} |")
            continue
        lines.append(f"| {r['code']} | {r['mode']} | {r['items']:,} | {r['wall_s']:.1f} | {r['items_per_s']:,.0f} "
                     f"| {r['first_batch_s']:.1f} | {r['driver_peak_rss_mb']:,.0f} | {_gets(r)} "
                     f"| {r['load_avg_1m']:.1f} |")
    return "\n".join(lines)


def _gets(result: dict) -> str:
    if "get_requests_per_item" not in result:
        return ""
    return f"{result['get_requests_per_item']} ({result['corpus_get_requests_per_item']})"


if __name__ == "__main__":
    main()
