"""Stage 2: a mergeable accumulator of everything the groups' figures need, and their summary.

Only sums, counts, exact value distributions (distinct values and their counts: each item carries its
batch's latency, so there are at most as many values as batches), distinct batches per worker and job
spans. (CIDEr-D's document frequencies, which grow with the corpus, are merged apart: frequencies.py.) Percentiles are exact: numpy's over the expanded distribution.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.metrics.registry import Metric, Source
from jobs.metrics.speed import Speed, speed
from jobs.metrics.wer import EDIT_COLUMNS, word_errors
from jobs.scoring.analysis import Analysis
from jobs.scoring.item_table import GROUP_KEYS
from jobs.scoring.merged import merge_by_key
from nota_model.signals import FLAGS

LATENCIES = ("ttft_s", "tpot_s")
NO_REFERENCE = "no item has a reference: pass --references with the corpus manifest"


@dataclass
class Distribution:
    """Distinct values and how often each occurs."""

    values: np.ndarray = field(default_factory=lambda: np.empty(0))
    counts: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @classmethod
    def of(cls, values: np.ndarray) -> Distribution:
        distinct, counts = np.unique(values, return_counts=True)
        return cls(distinct, counts)

    def merge(self, other: Distribution) -> Distribution:
        distinct, where = np.unique(np.concatenate([self.values, other.values]), return_inverse=True)
        counts = np.bincount(where, weights=np.concatenate([self.counts, other.counts]), minlength=len(distinct))
        return Distribution(distinct, counts.astype(np.int64))

    def expand(self) -> np.ndarray:
        return np.repeat(self.values, self.counts)


@dataclass
class WorkerTotals:
    items: int = 0
    audio_seconds: float = 0.0
    output_tokens: int = 0
    latency: dict[str, Distribution] = field(default_factory=lambda: {name: Distribution() for name in LATENCIES})
    batches: np.ndarray = field(default_factory=lambda: np.empty((0, 2)))  # distinct (end_s, model_s)

    @classmethod
    def of(cls, items: pa.Table) -> WorkerTotals:
        latency = {name: Distribution.of(items[name].drop_null().to_numpy()) for name in LATENCIES}
        batches = np.unique(np.column_stack([items["end_s"].to_numpy(), items["model_s"].to_numpy()]), axis=0)
        return cls(items.num_rows, pc.sum(items["modelled_audio_seconds"]).as_py(), pc.sum(items["output_tokens"]).as_py(),
                   latency, batches)

    def merge(self, other: WorkerTotals) -> WorkerTotals:
        return WorkerTotals(self.items + other.items, self.audio_seconds + other.audio_seconds,
                            self.output_tokens + other.output_tokens,
                            {name: self.latency[name].merge(other.latency[name]) for name in LATENCIES},
                            np.unique(np.concatenate([self.batches, other.batches]), axis=0))


@dataclass
class GroupTotals:
    items: int = 0
    error_codes: Counter = field(default_factory=Counter)
    succeeded: int = 0
    scored: int = 0
    segmented: int = 0
    signalled: int = 0  # items whose rows carry flags (answered by a model that gives signals)
    flagged: int = 0  # items with at least one flag
    flags: Counter = field(default_factory=Counter)  # flag -> its items
    captioned: int = 0  # items with a tokenized hypothesis (stage 4 scores them where the group is scored)
    audio_seconds: float = 0.0
    edits: Counter = field(default_factory=Counter)
    item_sums: dict[str, float] = field(default_factory=dict)  # ITEM_MEAN metric -> the sum of its scored items' values
    caption_failure: str | None = None
    workers: dict[str, WorkerTotals] = field(default_factory=dict)
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)  # job -> first start, last end
    analysis: Analysis = field(default_factory=Analysis)

    @classmethod
    def of(cls, items: pa.Table, metrics: Sequence[Metric]) -> GroupTotals:
        """The totals of one group's items (item_table rows), with the sums of the ITEM_MEAN `metrics` that
        score its task."""
        errors = items["error"].drop_null().to_pylist()
        failures = items["caption_failure"].drop_null()
        modelled = items.filter(items["modelled"])
        flags = items["flags"]
        return cls(
            items=items.num_rows,
            error_codes=Counter(errors),
            succeeded=items.num_rows - len(errors),
            scored=pc.sum(items["scored"]).as_py() or 0,
            segmented=pc.sum(items["segmented"]).as_py() or 0,
            signalled=len(flags) - flags.null_count,
            flagged=pc.sum(pc.greater(pc.list_value_length(flags), 0)).as_py() or 0,
            flags=Counter(pc.list_flatten(flags).to_pylist()),
            captioned=len(items) - items["caption_hyp"].null_count,
            audio_seconds=pc.sum(items["audio_seconds"]).as_py() or 0.0,
            edits=Counter({name: pc.sum(items[name]).as_py() or 0 for name in EDIT_COLUMNS}),
            item_sums={metric.name: pc.sum(items[metric.name]).as_py() or 0.0 for metric in metrics
                       if metric.source is Source.ITEM_MEAN and metric.task in (None, items["task"][0].as_py())},
            caption_failure=failures[0].as_py() if len(failures) else None,
            workers={worker: WorkerTotals.of(rows) for worker, rows in split(modelled, ["worker"]).items()},
            spans={job: (pc.min(rows["start_s"]).as_py(), pc.max(rows["end_s"]).as_py())
                   for job, rows in split(modelled, ["job_id"]).items()},
            analysis=Analysis.of(items),
        )

    def merge(self, other: GroupTotals) -> GroupTotals:
        return GroupTotals(
            self.items + other.items, self.error_codes + other.error_codes, self.succeeded + other.succeeded,
            self.scored + other.scored, self.segmented + other.segmented, self.signalled + other.signalled,
            self.flagged + other.flagged, self.flags + other.flags, self.captioned + other.captioned,
            self.audio_seconds + other.audio_seconds,
            self.edits + other.edits,
            {name: self.item_sums.get(name, 0.0) + other.item_sums.get(name, 0.0) for name in self.item_sums | other.item_sums},
            self.caption_failure or other.caption_failure, merge_by_key(self.workers, other.workers),
            {job: _span(self.spans.get(job), other.spans.get(job)) for job in self.spans | other.spans},
            self.analysis.merge(other.analysis),
        )

    def summary(self, key: tuple[str, ...]) -> dict[str, Any]:
        """The group as jobs.score reports it; captioning quality is added by stage 3."""
        task = key[1]
        quality, unavailable = {}, {}
        if task == "asr" and self.scored:
            quality = asdict(word_errors(self.edits, self.scored))
        if self.scored:
            quality |= {name: total / self.scored for name, total in self.item_sums.items()}
        if task == "aac" and self.scored and self.caption_failure:
            unavailable["captioning"] = self.caption_failure
        if self.succeeded and not self.scored and task in ("asr", "aac"):
            unavailable["quality"] = NO_REFERENCE
        workers = dict(sorted(self.workers.items()))
        group_speed = self._speed(list(workers.values()), sum(end - start for start, end in self.spans.values()))
        return {
            **dict(zip(GROUP_KEYS, key)),
            "items": self.items,
            "errors": self.items - self.succeeded,
            "error_codes": dict(sorted(self.error_codes.items())),
            "scored_items": self.scored if quality else 0,
            "segmented_items": self.segmented,
            "signalled_items": self.signalled,
            "flagged_items": self.flagged,
            "flags": {name: self.flags[name] for name in FLAGS} if self.signalled else {},
            "audio_seconds": self.audio_seconds,
            "quality": quality,
            "unavailable": unavailable,
            "speed": asdict(group_speed) if group_speed else None,
            "workers": {name: asdict(self._speed([w], _busy(w.batches))) for name, w in workers.items()},
        }

    def latencies(self) -> dict[str, Distribution]:
        """Each latency's distribution over the group's items, all workers merged (those with a value)."""
        merged = {name: _merged_latency(list(self.workers.values()), name) for name in LATENCIES}
        return {name: distribution for name, distribution in merged.items() if distribution.counts.sum()}

    @staticmethod
    def _speed(workers: list[WorkerTotals], wall_s: float) -> Speed | None:
        if not workers:
            return None
        return speed(sum(w.items for w in workers), wall_s, sum(w.audio_seconds for w in workers),
                     sum(w.output_tokens for w in workers),
                     *(_merged_latency(workers, name).expand() for name in LATENCIES))


class Totals(dict):
    """GroupTotals by (corpus, task, model)."""

    @classmethod
    def of(cls, items: pa.Table, metrics: Sequence[Metric]) -> Totals:
        return cls({key: GroupTotals.of(rows, metrics) for key, rows in split(items, list(GROUP_KEYS)).items()})

    def merge(self, other: Totals) -> Totals:
        return Totals(merge_by_key(self, other))

    def summary(self) -> Summary:
        keys = sorted(self)
        return Summary(
            groups=[self[key].summary(key) for key in keys],
            latency={key: self[key].latencies() for key in keys},
            captions={key: self[key].scored for key in keys
                      if key[1] == "aac" and self[key].scored and not self[key].caption_failure},
            captioned_items=sum(group.captioned for group in self.values()),
            analysis={key: self[key].analysis.summary() for key in keys},
        )


@dataclass
class Summary:
    groups: list[dict[str, Any]]  # as jobs.score reports them
    latency: dict[tuple[str, ...], dict[str, Distribution]]  # the latency distributions by group and latency
    captions: dict[tuple[str, ...], int]  # the captioning groups the caption metrics score: their items
    captioned_items: int  # items with a tokenized hypothesis, in any group
    analysis: dict[tuple[str, ...], dict[str, Any]]  # Analysis.summary by group


def split(table: pa.Table, keys: list[str]) -> dict[tuple[str, ...] | str, pa.Table]:
    """The table's rows by the values of `keys` (a single key's value itself)."""
    if not table.num_rows:
        return {}
    grouped = table.group_by(keys).aggregate([([], "count_all")])
    parts = {}
    for values in grouped.select(keys).to_pylist():
        mask = None
        for key, value in values.items():
            equal = pc.equal(table[key], value)
            mask = equal if mask is None else pc.and_(mask, equal)
        parts[tuple(values.values()) if len(keys) > 1 else values[keys[0]]] = table.filter(mask)
    return parts


def _merged_latency(workers: list[WorkerTotals], name: str) -> Distribution:
    merged = Distribution()
    for worker in workers:
        merged = merged.merge(worker.latency[name])
    return merged


def _span(mine: tuple[float, float] | None, theirs: tuple[float, float] | None) -> tuple[float, float]:
    if mine is None or theirs is None:
        return mine or theirs
    return min(mine[0], theirs[0]), max(mine[1], theirs[1])


def _busy(batches: np.ndarray) -> float:
    return float(batches[:, 1].sum())
