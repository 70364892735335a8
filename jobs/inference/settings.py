"""What every stage of a run is told: the corpus, the job and the model the rows are made with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobSettings:
    corpus: str
    job_id: str
    model_identity: str
    decoding: str
    batch_size: int = 8  # pieces per model batch (a long recording's pieces share batches with other items')
