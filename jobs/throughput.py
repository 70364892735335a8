"""Speed of a run, from its prediction rows alone (so stored outputs can be re-scored).

Each row that went through the model carries `model_s` (the wall time of its batch's model call) and
`created_at` (when that call ended); a batch's rows share both, so (worker, created_at) names a batch.

- total: wall time is, per job, the first batch's start to the last batch's end (Ray start-up and
  model loading excluded), summed over the jobs that made the rows;
- per worker: busy time, the sum of its batches' model calls;
- latency: ttft/tpot percentiles over items (each item sees its batch's figures).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Speed:
    items: int
    wall_s: float
    items_per_s: float
    audio_seconds: float
    x_real_time: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_s: dict[str, float] | None
    tpot_s: dict[str, float] | None


def modelled(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows the model answered (errors before or in the model have no timing)."""
    return [row for row in rows if row.get("model_s") is not None and row.get("created_at") is not None]


def run_speed(rows: Sequence[dict[str, Any]]) -> Speed | None:
    rows = modelled(rows)
    by_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_job[row.get("job_id") or ""].append(row)
    wall = sum(_span(job_rows) for job_rows in by_job.values())
    return _speed(rows, wall) if rows else None


def worker_speeds(rows: Sequence[dict[str, Any]]) -> dict[str, Speed]:
    by_worker: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in modelled(rows):
        by_worker[row.get("worker") or "unknown"].append(row)
    return {worker: _speed(worker_rows, _busy(worker_rows)) for worker, worker_rows in sorted(by_worker.items())}


def percentiles(values: Iterable[float | None]) -> dict[str, float] | None:
    present = np.array([v for v in values if v is not None], dtype=float)
    if not len(present):
        return None
    return {"mean": float(present.mean()), **{f"p{p}": float(np.percentile(present, p)) for p in PERCENTILES}}


def _speed(rows: Sequence[dict[str, Any]], wall: float) -> Speed:
    audio = sum(row.get("audio_seconds") or 0.0 for row in rows)
    tokens = sum(row.get("output_tokens") or 0 for row in rows)
    per_s = (lambda amount: amount / wall) if wall > 0 else (lambda amount: float("nan"))
    return Speed(
        items=len(rows),
        wall_s=wall,
        items_per_s=per_s(len(rows)),
        audio_seconds=audio,
        x_real_time=per_s(audio),
        output_tokens=tokens,
        output_tokens_per_s=per_s(tokens),
        ttft_s=percentiles(row.get("ttft_s") for row in rows),
        tpot_s=percentiles(row.get("tpot_s") for row in rows),
    )


def _span(rows: Sequence[dict[str, Any]]) -> float:
    ends = [row["created_at"].timestamp() for row in rows]
    starts = [end - row["model_s"] for end, row in zip(ends, rows)]
    return max(ends) - min(starts)


def _busy(rows: Sequence[dict[str, Any]]) -> float:
    batches = {(row["created_at"], row["model_s"]) for row in rows}
    return sum(model_s for _, model_s in batches)
