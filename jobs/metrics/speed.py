"""Speed of a run, from its prediction rows alone (so stored outputs can be re-scored).

Each row that went through the model carries `model_s` (the wall time of its batch's model call) and
`created_at` (when that call ended); a batch's rows share both, so (worker, created_at) names a batch.

- total: wall time is, per job, the first batch's start to the last batch's end (Ray start-up and
  model loading excluded), summed over the jobs that made the rows;
- per worker: busy time, the sum of its batches' model calls;
- latency: ttft/tpot percentiles over items (each item sees its batch's figures).

The scorer (jobs.scoring) gathers these sums and distributions; this module turns them into figures.

Three rates are shown, each under its own label wherever it appears (RATE_LABELS), since they differ for one run:
- the **answer rate**, on the job's progress line: items answered over the last minute of answer times
  (`created_at`), this run's answers only: how fast the model answers now;
- the **wall-clock rate**, in the job's summary (`wall_items_per_s`): this run's items over its whole wall time,
  Ray's start-up, model loading and the last shard's commit included: what a user waits;
- the **model-phase rate**, in the scores (`items_per_s`, above): items over first batch's start to last batch's
  end: the model's throughput, comparable across runs of any size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PERCENTILES = (50, 90, 99)
RATE_LABELS = {"answer": "items/s answered (last min)", "wall_clock": "items/s wall clock (start-up incl.)",
               "model_phase": "items/s model phase"}


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


def percentiles(values: np.ndarray) -> dict[str, float] | None:
    """Mean and exact percentiles (numpy's linear interpolation) of the items' values."""
    if not len(values):
        return None
    return {"mean": float(values.mean()), **{f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}}


def speed(items: int, wall_s: float, audio_seconds: float, output_tokens: int, ttft_s: np.ndarray, tpot_s: np.ndarray) -> Speed:
    per_s = (lambda amount: amount / wall_s) if wall_s > 0 else (lambda amount: float("nan"))
    return Speed(
        items=items,
        wall_s=wall_s,
        items_per_s=per_s(items),
        audio_seconds=audio_seconds,
        x_real_time=per_s(audio_seconds),
        output_tokens=output_tokens,
        output_tokens_per_s=per_s(output_tokens),
        ttft_s=percentiles(ttft_s),
        tpot_s=percentiles(tpot_s),
    )
