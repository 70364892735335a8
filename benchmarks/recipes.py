"""Lightweight recipes side by side, quality and cost, in one run on this machine and the same clips: for a model
and a list of recipes (sets of model options), each recipe

- through the batch job (`jobs.infer` on a local Ray, a fresh process per corpus, its own scoring): WER on the
  LibriVox sample and on the real-speech development set (Whisper English normalizer), and the job's model-phase
  items/s and x real time over both corpora;
- through `jobs.bench` (a fresh process): TTFT, TPOT and items/s at batch 1 and at the recipe's job batch size
  (its config's `batch_size`), on synthetic clips decoding exactly `--new-tokens` tokens, and peak memory.

    python -m benchmarks.recipes --model nota-small --recipes baseline,merged-lora,int8,half-tokens,merged-lora+int8
        [--seconds 5] [--new-tokens 24] [--repeats 3] [--set K=V] [--work DIR] [--output FILE.json]

A recipe is a name of `RECIPES` or names joined by `+` (their options together); a recipe named twice is measured
twice (the first recipe again at the end shows how far the machine's load moved the figures). Prints a Markdown
table in the seed's layout (its published figures and hardware first), each row's job items/s over the first
row's, and the load average at each row's end. With `--work`, each measured row is kept there and a rerun
measures only the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.throughput import set_arguments, timed
from jobs.bench import SEED_PUBLISHED, BenchSettings
from nota_model.build import random_parts
from nota_model.config import load_config
from nota_model.overrides import parse_overrides

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
CORPORA = {"librivox": "librivox-sample", "dev": "real-speech-dev"}

# Each recipe's model options, as `--set` takes them.
RECIPES: dict[str, list[str]] = {
    "baseline": [],
    "merged-lora": ["lora.merge=true"],
    "int8": ["llm.quantization=int8"],
    "half-tokens": ["qformer.pool_tokens=2"],
    "bfloat16": ["dtype=bfloat16"],
    "static-cache": ["decoding.cache=static"],
    "batch-16": ["batch_size=16"],
}


def recipe_options(recipe: str) -> list[str]:
    """The `--set` options of a recipe: a name of RECIPES, or names joined by `+`."""
    unknown = [name for name in recipe.split("+") if name not in RECIPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown recipe {', '.join(unknown)}: recipes are {', '.join(RECIPES)}, "
                                         "or several joined by +")
    return [option for name in recipe.split("+") for option in RECIPES[name]]


def recipes(text: str) -> list[str]:
    names = text.split(",")
    for name in names:
        recipe_options(name)
    return names


def run_job(corpus: str, model: str, options: list[str], output: Path) -> dict[str, Any]:
    """The job on one corpus, scored by itself: its group's quality and model-phase speed."""
    timed([sys.executable, "-m", "jobs.infer", "--manifest", str(MANIFESTS / f"{corpus}.yaml"), "--model", model,
           "--output", str(output), *set_arguments(options)])
    [group] = json.loads((output / corpus / "_scores" / "metrics.json").read_text())["groups"]
    return group


def run_bench(model: str, options: list[str], settings: BenchSettings, output: Path) -> list[dict[str, Any]]:
    """`jobs.bench` in a fresh process (its peak memory its own): its entry per batch size."""
    timed([sys.executable, "-m", "jobs.bench", "--model", model, *set_arguments(options), "--device", "cpu",
           "--batch-sizes", ",".join(map(str, settings.batch_sizes)), "--seconds", str(settings.seconds),
           "--new-tokens", str(settings.new_tokens), "--repeats", str(settings.repeats), "--warmup", str(settings.warmup),
           "--output", str(output)])
    return json.loads(output.read_text())["batches"]


def measure(model: str, recipe: str, extra: list[str], settings: BenchSettings, folder: Path) -> dict[str, Any]:
    """One recipe's row, kept in `folder`: a rerun of the same command with the same --work takes it from there (on a
    shared machine a Ray start can time out hours into a run)."""
    done = folder / "row.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)  # what an interrupted measurement left
    folder.mkdir(parents=True)
    row = measure_afresh(model, recipe, extra, settings, folder)
    done.write_text(json.dumps(row, indent=2))
    return row


def measure_afresh(model: str, recipe: str, extra: list[str], settings: BenchSettings, folder: Path) -> dict[str, Any]:
    """The job on both corpora, then the bench at batch 1 and at the job's batch size."""
    options = [*extra, *recipe_options(recipe)]
    config = load_config(model, parse_overrides(options))
    groups = {name: run_job(corpus, model, options, folder / "predictions") for name, corpus in CORPORA.items()}
    bench_settings = dataclasses.replace(settings, batch_sizes=(1, config.batch_size))
    single, batched = run_bench(model, options, bench_settings, folder / "bench.json")
    meaningful = not random_parts(config, None)
    wall_s = sum(group["speed"]["wall_s"] for group in groups.values())
    return {
        "recipe": recipe, "options": options, "model": groups["librivox"]["model"], "batch_size": config.batch_size,
        **{f"wer_{name}": round(100 * group["quality"]["wer"], 2) if meaningful else None for name, group in groups.items()},
        "job_items_per_s": round(sum(group["speed"]["items"] for group in groups.values()) / wall_s, 3),
        "job_x_real_time": round(sum(group["speed"]["audio_seconds"] for group in groups.values()) / wall_s, 2),
        **bench_figures(single, "1", settings.seconds), **bench_figures(batched, "b", settings.seconds),
        "peak_memory_gb": batched["peak_memory_gb"], "load_average": round(os.getloadavg()[0], 1),
    }


def bench_figures(batch: dict[str, Any], suffix: str, seconds: float) -> dict[str, float]:
    """A bench entry's medians under the table's keys (`ttft_s_1`, ... for batch 1; `…_b` at the job's batch size),
    x real time being items/s times the clip's seconds."""
    items_per_s = batch["items_per_s"]["median"]
    return {f"ttft_s_{suffix}": batch["ttft_s"]["median"], f"tpot_s_{suffix}": batch["tpot_s"]["median"],
            f"items_per_s_{suffix}": items_per_s, f"x_real_time_{suffix}": round(items_per_s * seconds, 2)}


def hardware() -> str:
    """This machine in words: its CPU model and core count."""
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    return f"{names[0] if names else platform.processor()}, {os.cpu_count()} cores"


# The table's columns after model, recipe and hardware: (header, row key); the seed's published figures first.
COLUMNS = [("WER % LibriVox", "wer_librivox"), ("WER % dev set", "wer_dev"), ("TTFT s b1", "ttft_s_1"), ("TPOT s b1", "tpot_s_1"),
           ("TTFT s bB", "ttft_s_b"), ("TPOT s bB", "tpot_s_b"), ("items/s b1", "items_per_s_1"), ("x real time b1", "x_real_time_1"),
           ("items/s bB", "items_per_s_b"), ("x real time bB", "x_real_time_b"), ("B", "batch_size"), ("job items/s", "job_items_per_s"), ("job x real time", "job_x_real_time"),
           ("job items/s / first", "speed_up"), ("peak memory GB bB", "peak_memory_gb"), ("load", "load_average")]
SEED_ROW = {"model": "NOTA seed (Whisper-large-v3-turbo, CED, Qwen2.5-0.5B)", "recipe": "published", "hardware": "V100-32GB",
            "wer_librivox": "6.99 (LibriSpeech test-other)", "ttft_s_1": SEED_PUBLISHED["ttft_s"],
            "tpot_s_1": SEED_PUBLISHED["tpot_s"], "peak_memory_gb": f"{SEED_PUBLISHED['peak_memory_gb']} (VRAM, b1)"}


def table(model: str, machine: str, rows: list[dict[str, Any]]) -> str:
    """The seed's row, then a row per recipe; `job items/s / first` is each recipe's job speed over the first's."""
    ours = [{"model": model, "hardware": machine, **row, "speed_up": round(row["job_items_per_s"] / rows[0]["job_items_per_s"], 2)}
            for row in rows]
    keys = ["model", "recipe", "hardware", *(key for _, key in COLUMNS)]
    lines = ["| model | recipe | hardware | " + " | ".join(header for header, _ in COLUMNS) + " |", "|---" * len(keys) + "|"]
    for row in [SEED_ROW, *ours]:
        lines.append("| " + " | ".join("–" if row.get(key) is None else str(row[key]) for key in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="preset name or YAML config")
    parser.add_argument("--recipes", type=recipes, default=["baseline", "merged-lora", "int8", "half-tokens"],
                        help=f"comma list of recipes ({', '.join(RECIPES)}), each one name or names joined by +")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model option for every recipe")
    parser.add_argument("--seconds", type=float, default=5.0, help="the bench's clip length")
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens each bench item decodes")
    parser.add_argument("--repeats", type=int, default=3, help="the bench's timed runs per batch size")
    parser.add_argument("--work", type=Path, help="keep the runs' outputs here (default: a temporary folder)")
    parser.add_argument("--output", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    settings = BenchSettings(seconds=args.seconds, new_tokens=args.new_tokens, repeats=args.repeats)
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        rows = [measure(args.model, recipe, args.set, settings, work / f"{index:02d}-{recipe}") for index, recipe in enumerate(args.recipes)]
    report = {"model": args.model, "hardware": hardware(), "bench": dataclasses.asdict(settings), "rows": rows}
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))
    print(table(args.model, report["hardware"], rows))
    print(json.dumps({key: value for key, value in report.items() if key != "rows"}))


if __name__ == "__main__":
    main()
