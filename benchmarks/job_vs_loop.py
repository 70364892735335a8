"""The batch job against a one-item-at-a-time loop over the same model and clips, in one run.

Both include reading and decoding the audio; the job also includes Ray start-up of its actors, the
loop its model load. Reports items/s of each and the ratio.

Usage: python -m benchmarks.job_vs_loop --manifest M --model PRESET [--batch-size 8] [--set k=v]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import ray

from jobs.infer import parse_args, run
from jobs.manifest import load_manifest, read_item_bytes
from nota_model.audio import load_audio
from nota_model.build import load_model
from nota_model.config import load_config
from nota_model.errors import NotaError
from nota_model.transcribe import parse_overrides


def loop(manifest_url: str, model_name: str, overrides: list[str]) -> tuple[int, float]:
    """Items answered and seconds taken, one item at a time."""
    started = time.perf_counter()
    manifest = load_manifest(manifest_url)
    model = load_model(load_config(model_name, parse_overrides(overrides))).model
    answered = 0
    for item in manifest.work_items().to_pylist():
        if item["error"] is not None:
            continue
        try:
            clip = load_audio(read_item_bytes(item, manifest.storage_options), model.config.audio, name=item["member"] or item["audio"])
            model.generate([clip], [model.prompt_for(item["task"], item["prompt"])])
            answered += 1
        except NotaError:
            continue
    return answered, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-size", default="8")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    sets = [arg for setting in args.set for arg in ("--set", setting)]
    ray.init()
    with tempfile.TemporaryDirectory() as output:
        job = run(parse_args(["--manifest", args.manifest, "--model", args.model, "--output", output,
                              "--batch-size", args.batch_size, *sets]))
    answered, loop_s = loop(args.manifest, args.model, args.set)
    job_rate = job["items_per_s"]
    print(json.dumps({
        "model": job["model"], "items": job["items"], "job_items_per_s": job_rate, "job_wall_s": job["wall_s"],
        "loop_items_per_s": round(answered / loop_s, 3), "loop_wall_s": round(loop_s, 2),
        "job_over_loop": round(job_rate / (answered / loop_s), 2), "batch_size": int(args.batch_size),
        "ray": ray.cluster_resources(),
    }, indent=2))


if __name__ == "__main__":
    main()
