"""Time a model config one item at a time against batched, in one run on this machine.

Clips are synthetic (a chirp plus noise) of the given seconds; weights are random unless the config
names them. Greedy decoding of a fixed budget of new tokens. Reports per-item seconds, the batched
speed-up ratio, time to first token and time per output token.

Usage: python -m benchmarks.batching --model tiny --items 8 --batch-size 8 [--seconds 10] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nota_model.build import load_model
from nota_model.config import DecodingConfig, load_config
from nota_model.overrides import parse_overrides
from nota_model.testing import synthetic_clip


def timed(run) -> tuple[float, list]:
    start = time.perf_counter()
    outputs = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device")
    args = parser.parse_args()

    config = load_config(args.model, parse_overrides(args.set))
    build_s, loaded = timed(lambda: load_model(config, device=args.device))
    model = loaded.model
    clips = [synthetic_clip(args.seconds, seed=i) for i in range(args.items)]
    prompts = [config.prompt.task_prompt("asr")] * len(clips)
    decoding = DecodingConfig(num_beams=1, max_new_tokens=args.new_tokens)
    model.generate(clips[:1], prompts[:1], decoding)  # warm-up

    single_s, singles = timed(lambda: [model.generate([c], [p], decoding) for c, p in zip(clips, prompts)])
    batches = range(0, len(clips), args.batch_size)
    batched_s, batched = timed(
        lambda: [model.generate(clips[i : i + args.batch_size], prompts[i : i + args.batch_size], decoding) for i in batches]
    )
    tokens = sum(sum(o.output_tokens) for o in singles)
    report = {
        "model": loaded.identity,
        "device": str(model.device),
        "dtype": str(model.dtype),
        "threads": torch.get_num_threads(),
        "build_s": round(build_s, 2),
        "items": len(clips),
        "clip_seconds": args.seconds,
        "output_tokens": tokens,
        "one_by_one_s_per_item": round(single_s / len(clips), 4),
        "batched_s_per_item": round(batched_s / len(clips), 4),
        "batch_size": args.batch_size,
        "batched_speedup": round(single_s / batched_s, 2),
        "ttft_s_batch1_median": round(statistics.median(o.ttft_s for o in singles), 4),
        "tpot_s_batch1_median": round(statistics.median(o.tpot_s for o in singles if o.tpot_s), 4),
        "ttft_s_batched_median": round(statistics.median(o.ttft_s for o in batched), 4),
        "tpot_s_batched_median": round(statistics.median(o.tpot_s for o in batched if o.tpot_s), 4),
        "same_text": [t for o in singles for t in o.texts] == [t for o in batched for t in o.texts],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
