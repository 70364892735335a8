"""Re-score stored prediction sets and compare them: per corpus and task, every run against a baseline.

    python -m jobs.rescore --run NAME=URL --run NAME=URL [...] --output URL [--baseline NAME]
                           [--references MANIFEST_OR_URL] [--spice-lib DIR] [--storage-options JSON] [--force]

Reads only Parquet, never runs a model. Writes under --output: `runs/NAME/` (each run's metrics and
report, as jobs.score writes them), `comparison.parquet` (COMPARISON_SCHEMA: one row per corpus, task,
metric and compared run, with the delta from the baseline), `comparison.json` and `comparison.md`.
Idempotent, for schedules: the fingerprint of the inputs (every part file's path, size and ETag or
modification time, and the scoring options) is recorded; a rerun over unchanged inputs writes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from typing import Any

import fsspec
import pyarrow as pa

from jobs.command_line import add_storage_options_argument, module_entry, storage_options
from jobs.metrics.registry import registered
from jobs.predictions import parquet_bytes, prediction_files
from jobs.score import add_scoring_arguments
from nota_model.errors import NotaError
from nota_model.storage import write_bytes_atomically

COMPARISON_SCHEMA = pa.schema(
    [
        pa.field("corpus", pa.string(), nullable=False),
        pa.field("task", pa.string()),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("baseline_run", pa.string(), nullable=False),
        pa.field("baseline_model", pa.string(), nullable=False),
        pa.field("baseline_value", pa.float64()),
        pa.field("run", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("delta", pa.float64()),  # value - baseline_value
        pa.field("relative_delta", pa.float64()),  # delta / baseline_value
    ]
)


def compare(runs: dict[str, list[dict[str, Any]]], baseline: str) -> list[dict[str, Any]]:
    """COMPARISON_SCHEMA rows: each other run's groups against the baseline run's groups of the same
    corpus and task, for every compared metric (jobs.metrics.registry) either side has."""
    compared = [metric for metric in registered() if metric.compared]
    rows = []
    for base in runs[baseline]:
        for name, groups in runs.items():
            if name == baseline:
                continue
            for group in (g for g in groups if (g["corpus"], g["task"]) == (base["corpus"], base["task"])):
                for metric in compared:
                    base_value, value = metric.value(base), metric.value(group)
                    if base_value is not None or value is not None:
                        rows.append(_delta(base, baseline, base_value, group, name, value, metric.name))
    return rows


def _delta(base, baseline: str, base_value, group, name: str, value, metric: str) -> dict[str, Any]:
    delta = value - base_value if value is not None and base_value is not None else None
    return {
        "corpus": base["corpus"], "task": base["task"], "metric": metric,
        "baseline_run": baseline, "baseline_model": base["model"], "baseline_value": base_value,
        "run": name, "model": group["model"], "value": value, "delta": delta,
        "relative_delta": delta / base_value if delta is not None and base_value else None,
    }


def fingerprint(runs: dict[str, str], settings: dict[str, Any], storage_options: dict[str, Any]) -> str:
    """A hash of every input part file's path, size and version, and of the scoring settings."""
    listing = {"settings": settings}
    for name, url in sorted(runs.items()):
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        listing[name] = sorted(
            (path, info.get("size"), str(info.get("ETag") or info.get("mtime") or info.get("LastModified")))
            for path, info in prediction_files(fs, root).items()
        )
    return hashlib.sha256(json.dumps(listing, sort_keys=True, default=str).encode()).hexdigest()


def rescore(
    runs: dict[str, str],
    output: str,
    baseline: str | None = None,
    references: str | None = None,
    spice_lib: str | None = None,
    storage_options: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Score every run and compare; returns the comparison document (with `unchanged` when skipped)."""
    from jobs.scoring.scorer import score  # with Ray: not loaded to parse the command line
    options = storage_options or {}
    baseline = baseline or next(iter(runs))
    if baseline not in runs:
        raise NotaError(f"--baseline {baseline!r} is not one of the runs {sorted(runs)}")
    settings = {"baseline": baseline, "references": references, "spice_lib": spice_lib}
    stamp = fingerprint(runs, settings, options)
    fs, root = fsspec.core.url_to_fs(output, **options)
    previous = _previous(fs, f"{root}/comparison.json")
    if previous and previous["fingerprint"] == stamp and not force:
        return {**previous, "unchanged": True}
    groups = {name: score(url, f"{output.rstrip('/')}/runs/{name}", references, spice_lib, storage_options=options)
              for name, url in runs.items()}
    rows = compare(groups, baseline)
    document = {"fingerprint": stamp, "runs": runs, "baseline": baseline, "comparison": rows}
    write_bytes_atomically(fs, f"{root}/comparison.parquet", parquet_bytes(pa.Table.from_pylist(rows, schema=COMPARISON_SCHEMA)))
    write_bytes_atomically(fs, f"{root}/comparison.md", markdown(rows).encode())
    write_bytes_atomically(fs, f"{root}/comparison.json", json.dumps(document, indent=2).encode())  # last: it marks completion
    return {**document, "unchanged": False}


def _previous(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison table: each metric in its report unit (WER in percent, its delta in points) with its
    better direction; a metric no longer registered (an older comparison's) by its name, as stored."""
    registry = {metric.name: metric for metric in registered()}
    lines = ["# Comparison", "", "| corpus | task | metric | better | baseline | value | run | value | delta | delta % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        metric = registry.get(row["metric"])
        label, better, scale = (metric.unit_label, metric.better, metric.scale) if metric else (row["metric"], "–", 1)
        relative = row["relative_delta"]
        lines.append(
            f"| {row['corpus']} | {row['task']} | {label} | {better} | {row['baseline_run']} "
            f"| {_fmt(row['baseline_value'], scale)} | {row['run']} | {_fmt(row['value'], scale)} "
            f"| {_fmt(row['delta'], scale, sign=True)} | {_fmt(relative, 100, sign=True)} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, scale: float = 1, sign: bool = False) -> str:
    return "–" if value is None else f"{value * scale:{'+' if sign else ''}.4g}"


def _run(spec: str) -> tuple[str, str]:
    name, sep, url = spec.partition("=")
    if not sep or not name or not url:
        raise argparse.ArgumentTypeError(f"--run takes NAME=URL, not {spec!r}")
    return name, url


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=_run, action="append", required=True, metavar="NAME=URL",
                        help="a stored prediction set (the job's output URL or one corpus folder); repeat")
    parser.add_argument("--output", required=True, help="where runs/NAME/, comparison.parquet, .json and .md go")
    parser.add_argument("--baseline", help="the run the others are compared with (default: the first)")
    parser.add_argument("--force", action="store_true", help="score again even when the inputs are unchanged")
    add_storage_options_argument(parser)
    add_scoring_arguments(parser)
    args = parser.parse_args(argv)
    args.runs = dict(args.run)
    if len(args.runs) != len(args.run):
        parser.error("run names must be distinct")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = storage_options(args.storage_options, [*args.runs.values(), args.output, args.references])
    document = rescore(args.runs, args.output, args.baseline, args.references, args.spice_lib, options, args.force)
    if document["unchanged"]:
        print(f"inputs unchanged since the last comparison (fingerprint {document['fingerprint'][:12]}): nothing written")
    print(markdown(document["comparison"]))
    return 0


if __name__ == "__main__":
    sys.exit(module_entry(main))
