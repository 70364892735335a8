"""The metrics the scorer reports, each registered once: its name, task, report label and unit, which
direction is better, and where its per-item and corpus values come from. The report's table
(jobs.scoring.report), items.parquet's metric columns (jobs.scoring.item_scores.items_schema), the
comparison of runs (jobs.rescore) and the metrics files follow from it.

A new metric is its maths (a module of jobs.metrics) and one `register` call here: a metric of the
`Source.ITEM_MEAN` kind gives each scored item a value from its references and answer, and its corpus
value is their mean; the scorer computes, sums, writes and reports it with no other change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from jobs.metrics.speed import RATE_LABELS

Better = Literal["lower", "higher"]
# each scored item's value, from its references and its answer (a block's items at once)
ItemValues = Callable[[Sequence[Sequence[str]], Sequence[str]], Sequence[float]]


class Source(Enum):
    """Where a metric's values come from."""

    WORD_ERRORS = "word_errors"  # a field of jobs.metrics.wer.WordErrors: per item from its own alignment's edits, the corpus's from the summed edits
    CAPTIONS = "captions"  # a field of jobs.metrics.captions.CaptionScores, from the caption scorer (jobs.scoring.caption_totals)
    SPEED = "speed"  # a group's speed figure (jobs.metrics.speed.Speed); `ttft_s.p50`: a field of a percentile dict
    ITEM_MEAN = "item_mean"  # `item_values` of each scored item of its task; the corpus value is their mean


@dataclass(frozen=True)
class Metric:
    name: str  # its key in a group's figures, metrics.parquet/json, items.parquet and comparison.parquet
    task: str | None  # the task whose groups it scores ("asr", "aac"); None: every task's (speed)
    label: str  # its report column
    better: Better
    source: Source
    percent: bool = False  # shown times 100, as a percentage
    digits: int = 3  # significant digits shown
    item_column: bool = False  # the scorer gives each item's value too (items.parquet); always so for ITEM_MEAN
    in_report: bool = True  # a column of the report's table
    compared: bool = True  # compared between runs (jobs.rescore)
    item_values: ItemValues | None = None  # ITEM_MEAN only

    def __post_init__(self) -> None:
        if (self.source is Source.ITEM_MEAN) != (self.item_values is not None):
            raise ValueError(f"metric {self.name!r}: item_values is what an ITEM_MEAN metric, and only one, computes")

    @property
    def per_item(self) -> bool:
        """Whether items.parquet has a column of its per-item values."""
        return self.item_column or self.source is Source.ITEM_MEAN

    @property
    def unit_label(self) -> str:
        """Its label with its unit: `WER %`."""
        return f"{self.label} %" if self.percent else self.label

    def value(self, group: dict[str, Any]) -> float | None:
        """Its value in a scored group (jobs.scoring.scorer.score's groups); None where the group has none."""
        if self.source is not Source.SPEED:
            return group["quality"].get(self.name)
        found = group["speed"]
        for part in self.name.split("."):
            found = (found or {}).get(part)
        return found

    @property
    def arrow(self) -> str:
        """Its better direction as the report's tables mark it: ↓ lower, ↑ higher."""
        return "↓" if self.better == "lower" else "↑"

    @property
    def scale(self) -> float:
        """What its values are multiplied by to be shown in its unit."""
        return 100 if self.percent else 1


_REGISTERED: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add a metric, after those registered before it (the report's columns keep this order)."""
    if metric.name in _REGISTERED:
        raise ValueError(f"a metric named {metric.name!r} is registered already")
    _REGISTERED[metric.name] = metric
    return metric


def registered() -> tuple[Metric, ...]:
    """Every registered metric, in registration order."""
    return tuple(_REGISTERED.values())


def metric(name: str) -> Metric:
    return _REGISTERED[name]


register(Metric("wer", "asr", "WER", "lower", Source.WORD_ERRORS, percent=True, item_column=True))
register(Metric("cer", "asr", "CER", "lower", Source.WORD_ERRORS, percent=True, item_column=True))
register(Metric("cider_d", "aac", "CIDEr-D", "higher", Source.CAPTIONS, item_column=True))
register(Metric("spice", "aac", "SPICE", "higher", Source.CAPTIONS))
register(Metric("spider", "aac", "SPIDEr", "higher", Source.CAPTIONS))
register(Metric("meteor", "aac", "METEOR", "higher", Source.CAPTIONS, item_column=True))
register(Metric("bleu_1", "aac", "BLEU-1", "higher", Source.CAPTIONS, compared=False))
register(Metric("bleu_4", "aac", "BLEU-4", "higher", Source.CAPTIONS))
register(Metric("rouge_l", "aac", "ROUGE-L", "higher", Source.CAPTIONS, item_column=True))
register(Metric("items_per_s", None, RATE_LABELS["model_phase"], "higher", Source.SPEED))
register(Metric("x_real_time", None, "x real time model phase", "higher", Source.SPEED))
register(Metric("output_tokens_per_s", None, "output tokens/s", "higher", Source.SPEED, in_report=False))
register(Metric("ttft_s.p50", None, "ttft p50 s", "lower", Source.SPEED, digits=4))
register(Metric("tpot_s.p50", None, "tpot p50 s", "lower", Source.SPEED, digits=4))
