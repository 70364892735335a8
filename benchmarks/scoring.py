"""The scorer at scale: generated prediction rows (speech recognition and captioning), scored by today's
scorer and by the new one, in one run on the same machine.

    python -m benchmarks.scoring [--sizes 200000,2000000] [--tasks asr,aac] [--baseline-sizes 200000]
                                 [--in-process-sizes 200000] [--ray-data-sizes 200000] [--baseline-ref 3185eef]
                                 [--pycocoevalcap-sizes 20000] [--references] [--data DIR] [--output bench.json]

Rows are written as the job writes them (OUTPUT_SCHEMA, 10 000 rows a part file, batches of 8 that
share their timing, two workers, 12-word transcripts or five captions an item). Each measurement runs
in a fresh Python process that scores one prediction set and reports its wall time and its own peak
RSS: the driver's, since the scorer's Ray workers are other processes. "new" is jobs.score as it runs
by default (Ray Data where jobs.scoring.sizing.on_ray_data says it would finish first or the in-process path would not fit; `ray_data`
in the results says which it chose); "in-process" and "ray-data" force the same code into one process
or onto Ray Data. It starts its own
local Ray (RAY_ADDRESS=local) unless RAY_ADDRESS names one. Today's scorer is
the in-process one of `--baseline-ref` (the last commit before the distributed scorer), exported with
`git archive` and run from there. "pycocoevalcap" (captioning only) is what a user would write by hand:
pycocoevalcap's own scorers in one process on the same captioned rows (its PTB tokenizer, BLEU-1..4,
METEOR, ROUGE-L and CIDEr-D, as its COCO evaluation calls them), with no Parquet output, report or
per-item file. `--references` also writes each set's references as a JSONL of `id`,
`corpus`, `reference` (one line a row) and scores with `--references` pointing at it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.predictions import OUTPUT_SCHEMA, parquet_bytes

ROWS_PER_FILE = 10_000
BATCH = 8
BASELINE_REF = "3185eef"  # main before issue 16: jobs.score reads every row into Python dicts
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "so", "vi", "de", "pa", "gu", "be", "fo", "ri", "zu", "an"]
SPECIALS = ["twenty", "three", "mr", "colour", "o'clock", "2", "10%", "it's", "hmm"]
T0 = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


def vocabulary(rng: np.random.Generator, size: int = 3000) -> np.ndarray:
    words = {"".join(rng.choice(SYLLABLES, rng.integers(1, 4))) for _ in range(size * 2)}
    return np.array(sorted(words)[:size] + SPECIALS)


def sentences(rng: np.random.Generator, words: np.ndarray, count: int, length: int) -> list[str]:
    return [" ".join(row) for row in words[rng.integers(0, len(words), (count, length))]]


def hypotheses(rng: np.random.Generator, words: np.ndarray, references: list[str]) -> list[str]:
    """Each reference with about one word in ten substituted, dropped or doubled, capitalised and ended
    with a full stop, as a model writes it."""
    out = []
    for reference, edits in zip(references, rng.random((len(references), 12))):
        tokens = reference.split()
        kept = [words[rng.integers(len(words))] if e < 0.04 else "" if e < 0.07 else f"{t} {t}" if e < 0.1 else t
                for t, e in zip(tokens, edits)]
        out.append(" ".join(t for t in kept if t).capitalize() + ".")
    return out


def part_table(rng: np.random.Generator, words: np.ndarray, task: str, first: int, count: int) -> pa.Table:
    """`count` rows of one part file; every 50th item failed to decode."""
    if task == "asr":
        references = sentences(rng, words, count, 12)
        texts, reference_lists = hypotheses(rng, words, references), [[r] for r in references]
    else:
        captions = sentences(rng, words[:400], count * 6, 8)
        reference_lists, texts = [captions[i * 6:i * 6 + 5] for i in range(count)], captions[5::6]
    index = np.arange(first, first + count)
    failed = index % 50 == 0
    batch = index // BATCH
    model_s = 0.2 + 0.01 * (batch % 17)
    created = [T0 + np.timedelta64(int(b * 100_000), "us").item() for b in batch]
    timing = lambda values: pa.array(np.where(failed, np.nan, values), mask=failed)  # noqa: E731
    columns = {
        "id": [f"item-{i}" for i in index], "corpus": [f"bench-{task}"] * count, "shard": first // ROWS_PER_FILE,
        "index": index - first, "task": [task] * count, "reference": reference_lists,
        "text": pa.array(texts, mask=failed), "error": pa.array(["not_audio"] * count, mask=~failed),
        "audio_seconds": np.where(failed, 0.0, 5.0 + index % 20), "output_tokens": pa.array(12 + index % 7, pa.int32(), mask=failed),
        "ttft_s": timing(0.05 + 0.001 * (batch % 31)), "tpot_s": timing(0.02 + 0.0005 * (batch % 13)),
        "model_s": timing(model_s), "model": ["bench-model"] * count, "worker": [f"w{b % 2}" for b in batch],
        "job_id": ["bench-job"] * count, "created_at": pa.array(created, OUTPUT_SCHEMA.field("created_at").type, mask=failed),
    }
    arrays = {name: pa.array(value, OUTPUT_SCHEMA.field(name).type) if not isinstance(value, (pa.Array, int)) else value
              for name, value in columns.items()}
    arrays["shard"] = pa.array(np.full(count, columns["shard"]), pa.int32())
    return pa.table({f.name: arrays.get(f.name, pa.nulls(count, f.type)) for f in OUTPUT_SCHEMA}, schema=OUTPUT_SCHEMA)


def generate(root: Path, task: str, rows: int, seed: int = 16) -> Path:
    """`rows` prediction rows of `task` under root/TASK-ROWS/bench-TASK/ (kept: a second run reuses them)."""
    folder = root / f"{task}-{rows}"
    corpus = folder / f"bench-{task}"
    if (folder / "_DONE").exists():
        return folder
    corpus.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = vocabulary(rng)
    for shard, first in enumerate(range(0, rows, ROWS_PER_FILE)):
        table = part_table(rng, words, task, first, min(ROWS_PER_FILE, rows - first))
        (corpus / f"part-{shard:05d}.parquet").write_bytes(parquet_bytes(table))
    (folder / "_DONE").touch()
    return folder


def write_references(predictions: Path) -> Path:
    """The references of a generated set, one JSONL line a row, beside it (kept: a second run reuses them)."""
    path = predictions / "references.jsonl"
    if not path.exists():
        with open(path.with_suffix(".tmp"), "w") as file:
            for part in sorted(predictions.glob("*/part-*.parquet")):
                for row in pq.read_table(part, columns=["id", "corpus", "reference"]).to_pylist():
                    file.write(json.dumps(row) + "\n")
        path.with_suffix(".tmp").rename(path)
    return path


def measure(predictions: str, output: str, distributed: bool | None = None, references: str | None = None) -> None:
    """Score once in this process and print wall time and this process's peak RSS (JSON);
    `distributed` as jobs.score takes it (today's scorer has no such choice: None)."""
    import ray

    import jobs.scoring.scorer
    from jobs.scoring.scorer import score

    started = time.perf_counter()
    choice = {} if distributed is None else {"distributed": distributed}
    groups = score(predictions, output, references, **choice)
    print(json.dumps({
        "wall_s": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "quality": groups[0]["quality"],
        "scorer_code": jobs.scoring.scorer.__file__,
        "ray_data": ray.is_initialized(),
    }))


def measure_pycocoevalcap(predictions: str) -> None:
    """pycocoevalcap's scorers in this process over the rows jobs.score scores as captions (answered,
    with references), as its COCO evaluation runs them; print wall time (reading the rows included),
    peak RSS and the corpus scores (JSON)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    started = time.perf_counter()
    rows = ds.dataset(predictions, format="parquet").to_table(columns=["reference", "text", "error"])
    rows = rows.filter(pc.and_(pc.is_null(rows["error"]), pc.greater(pc.list_value_length(rows["reference"]), 0)))
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in enumerate(rows["reference"].to_pylist())})
    res = tokenizer.tokenize({i: [{"caption": text}] for i, text in enumerate(rows["text"].to_pylist())})
    quality = {"items": len(res)}
    for name, scorer in [("bleu", Bleu(4)), ("meteor", Meteor()), ("rouge_l", Rouge()), ("cider_d", Cider())]:
        score, _ = scorer.compute_score(gts, res, verbose=0) if name == "bleu" else scorer.compute_score(gts, res)
        quality |= {f"bleu_{n}": value for n, value in enumerate(score, 1)} if name == "bleu" else {name: score}
    print(json.dumps({"wall_s": time.perf_counter() - started,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "quality": quality, "ray_data": False}))


def export_baseline(ref: str, into: Path) -> Path:
    """Today's scorer: `jobs` and `nota_model` at `ref`, exported from this repository's git."""
    archive = subprocess.run(["git", "archive", ref, "jobs", "nota_model"], check=True, capture_output=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_measure(predictions: Path, output: Path, code: Path | None, distributed: bool | None = None,
                references: Path | None = None) -> dict:
    """One measurement in a fresh process, run from `code` (another tree's `jobs` first on the path)
    or from here."""
    arguments = [str(predictions), str(output), distributed, references and str(references)]
    return run_in_fresh_process("measure", arguments, code)


def run_in_fresh_process(function: str, arguments: list, code: Path | None = None) -> dict:
    """The JSON line that this file's `function` prints, called with `arguments` in a fresh Python process
    run from `code` (another tree's `jobs` first on the path) or from here."""
    here = Path(__file__).resolve().parents[1]
    call = f"import runpy; runpy.run_path({__file__!r})[{function!r}]({', '.join(map(repr, arguments))})"
    before = _children_cpu_s()
    done = subprocess.run([sys.executable, "-c", call], cwd=code or here, capture_output=True, text=True,
                          env={"RAY_ADDRESS": "local", **os.environ, "PYTHONPATH": str(code or here)})
    if done.returncode != 0:
        raise RuntimeError(f"{function}{tuple(arguments)} failed:\n{done.stderr[-3000:]}")
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith('{"wall_s"')][-1])  # Ray may print after it
    return result | {"cpu_s": _children_cpu_s() - before}


def _children_cpu_s() -> float:
    """CPU seconds (user and system) of this process's ended children and the descendants they waited for:
    a one-process measurement's Python and its JVMs; not all of a local Ray's workers."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="200000,2000000")
    parser.add_argument("--baseline-sizes", default="200000", help="sizes today's scorer also runs (empty: none)")
    parser.add_argument("--in-process-sizes", default="", help="sizes the new scorer also runs in one process (forced)")
    parser.add_argument("--ray-data-sizes", default="", help="sizes the new scorer also runs on Ray Data (forced)")
    parser.add_argument("--pycocoevalcap-sizes", default="", help="captioning sizes pycocoevalcap's scorers also run, by hand in one process")
    parser.add_argument("--tasks", default="asr,aac")
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--references", action="store_true", help="score with --references: a JSONL of the rows' references")
    parser.add_argument("--data", help="where generated rows are kept (default: a temporary folder)")
    parser.add_argument("--output", help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    sizes, baseline_sizes = _sizes(args.sizes), set(_sizes(args.baseline_sizes))
    forced = {"in-process": set(_sizes(args.in_process_sizes)), "ray-data": set(_sizes(args.ray_data_sizes))}
    by_hand = set(_sizes(args.pycocoevalcap_sizes))
    with tempfile.TemporaryDirectory(prefix="nota-bench-scoring-") as tmp:
        data = Path(args.data or tmp).resolve()
        baseline = export_baseline(args.baseline_ref, Path(tmp, "baseline").resolve()) if baseline_sizes else None
        results = []
        for task in args.tasks.split(","):
            for rows in sizes:
                predictions = generate(data, task, rows)
                references = write_references(predictions) if args.references else None
                scorers = [("new", None, None)] + [(name, None, name == "ray-data") for name in forced if rows in forced[name]]
                scorers += [("today", baseline, None)] if rows in baseline_sizes else []
                for name, code, distributed in scorers:
                    result = run_measure(predictions, Path(tmp, f"scores-{task}-{rows}-{name}"), code, distributed, references)
                    result |= {"task": task, "rows": rows, "scorer": name, "references": args.references, "rows_per_s": rows / result["wall_s"],
                               "load_avg_1m": os.getloadavg()[0]}
                    if name == "today":
                        result["same_as_new"] = same_outputs(Path(tmp, f"scores-{task}-{rows}-new"),
                                                                     Path(tmp, f"scores-{task}-{rows}-today"))
                    print(json.dumps(result), flush=True)
                    results.append(result)
                if task == "aac" and rows in by_hand:
                    result = run_in_fresh_process("measure_pycocoevalcap", [str(predictions)])
                    result |= {"task": task, "rows": rows, "scorer": "pycocoevalcap", "rows_per_s": rows / result["wall_s"],
                               "load_avg_1m": os.getloadavg()[0], "largest_difference_from_new": _largest_difference(
                                   result["quality"], next(r["quality"] for r in results if r["rows"] == rows and r["scorer"] == "new"))}
                    print(json.dumps(result), flush=True)
                    results.append(result)
    print(table(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


def _sizes(text: str) -> list[int]:
    return [int(size) for size in text.split(",") if size]


def same_outputs(new: Path, old: Path) -> dict:
    """Whether two scorers wrote the same report figures and charts, and the largest relative difference
    between their metrics.parquet values."""
    values = [{(r["worker"], r["metric"]): r["value"] for r in pq.read_table(d / "metrics.parquet").to_pylist()} for d in (new, old)]
    shared = [k for k in values[1] if values[1][k] is not None and values[0].get(k) is not None]
    return {
        "same_metrics": values[0].keys() == values[1].keys(),
        "metrics_only_in_new": sorted(metric for _, metric in values[0].keys() - values[1].keys()),
        "max_relative_difference": max((abs(values[0][k] - values[1][k]) / max(abs(values[1][k]), 1e-300) for k in shared), default=0.0),
        "same_report": _report_figures(new) == _report_figures(old),
        "same_charts": all((new / c).read_bytes() == (old / c).read_bytes() for c in ("charts/quality.png", "charts/speed.png", "charts/latency.png")
                           if (old / c).exists()),
    }


def _largest_difference(mine: dict[str, float], theirs: dict[str, float]) -> float:
    """The largest absolute difference between the figures both hold."""
    return max(abs(mine[name] - theirs[name]) for name in mine.keys() & theirs.keys())


def _report_figures(scores: Path) -> str:
    """The report without its closing definitions (worded since today's scorer)."""
    return (scores / "report.md").read_text().split("## How these are computed")[0]


def table(results: list[dict]) -> str:
    lines = ["| task | rows | scorer | ran | wall s | rows/s | CPU s | driver peak RSS MB | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ran = "Ray Data" if r.get("ray_data") else "one process"
        lines.append(f"| {r['task']} | {r['rows']:,} | {r['scorer']} | {ran} | {r['wall_s']:.1f} | {r['rows_per_s']:,.0f} "
                     f"| {r['cpu_s']:.1f} | {r['peak_rss_mb']:,.0f} | {r['load_avg_1m']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
