"""What word timestamps cost: Whisper on CTranslate2 with `decoding.word_timestamps` off and on, over the same
clips, in one process on one thread (CPU time, so that other work on the machine counts less).

    python -m benchmarks.word_times [--model whisper-base] [--repeats 3] [--long-form] [--output FILE.json]

The LibriVox sample's five clips in one batch, and with `--long-form` the one-minute long-form sample through
`generate_pieces` (its pieces in one batch). The two settings run alternately, after one warm-up each.
Prints a Markdown table: CPU seconds a pass, and the ratio on to off.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.samples import build_long_form, default_dest, fetch_librivox
from nota_model.audio import load_audio
from nota_model.build import load_model
from nota_model.config import load_config
from nota_model.long_form import generate_pieces
from nota_model.segment import plan_pieces


def cpu_seconds(run: Callable[[], Any]) -> float:
    started = time.process_time()
    run()
    return time.process_time() - started


def workloads(model: Any, long_form: bool) -> dict[str, Callable[[Any], Any]]:
    """Each workload: a function of the decoding config that runs it."""
    items = [json.loads(line) for line in fetch_librivox(default_dest()).read_text().splitlines()]
    clips = [load_audio(item["audio"], model.config.audio) for item in items]
    loads = {f"LibriVox, {len(clips)} clips in one batch": lambda decoding: model.generate(clips, decoding=decoding)}
    if long_form:
        recording = build_long_form(default_dest()).parent / "long-1min.wav"
        clip = load_audio(recording, model.config.audio, whole=True)
        pieces = plan_pieces(clip.waveform, "asr", model.config.audio.max_seconds).pieces
        prompt = model.prompt_for("asr")
        loads[f"long-form 1 min, {len(pieces)} pieces in one batch"] = lambda decoding: generate_pieces(
            model, [clip], [prompt], [pieces], len(pieces), decoding)
    return loads


def measure(model_name: str, repeats: int, long_form: bool) -> list[dict[str, Any]]:
    model = load_model(load_config(model_name), device="cpu", threads=1).model
    settings = {flag: model.config.decoding.model_copy(update={"word_timestamps": flag}) for flag in (False, True)}
    results = []
    for name, run in workloads(model, long_form).items():
        for decoding in settings.values():
            run(decoding)  # warm-up
        seconds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats):
            for flag, decoding in settings.items():
                seconds[flag].append(cpu_seconds(lambda: run(decoding)))
        off, on = (min(seconds[flag]) for flag in (False, True))
        results.append({"workload": name, "off_cpu_s": off, "on_cpu_s": on, "ratio": on / off})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="whisper-base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-form", action="store_true", help="also the one-minute long-form sample")
    parser.add_argument("--output", help="write the results as JSON")
    args = parser.parse_args()
    results = measure(args.model, args.repeats, args.long_form)
    print(f"{args.model}, CTranslate2 on one CPU thread, the least CPU time of {args.repeats} passes\n")
    print("| workload | words off (CPU s) | words on (CPU s) | on / off |\n|---|---|---|---|")
    for result in results:
        print(f"| {result['workload']} | {result['off_cpu_s']:.2f} | {result['on_cpu_s']:.2f} | {result['ratio']:.2f} |")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
